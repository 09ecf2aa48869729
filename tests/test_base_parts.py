"""The parts the callbacks' base class is made of: Lightning-free modules, the stage table, the budget's ledger,
the logging functions, and attributes that exist from ``__init__`` on (none created lazily)."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import CorrelationOrderCallback, FinalLayerSaliencyCallback
from lightning_interp.callbacks.budget import RENDER_PILOT, Ledger, Plan
from lightning_interp.callbacks.stages import IDLE, STAGES, stage_of
from lightning_interp.loggers import log_table, markdown_table
from lightning_interp.probe import Probe, clean_probe, find_probe_source

from .contract import CASES


@pytest.mark.parametrize("module", ["lightning_interp.probe", "lightning_interp.checks", "lightning_interp.loggers"])
def test_lightning_free_modules_do_not_import_lightning(module: str) -> None:
    code = f"import sys, {module}; print('lightning' in sys.modules, 'lightning.pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"importing {module} imports Lightning"


def test_one_stage_table_and_its_lookup() -> None:
    assert set(STAGES) == {"fit", "validate", "test", "predict"}
    assert STAGES["test"] == STAGES["predict"] == IDLE and not IDLE.active
    assert STAGES["fit"].cadence and STAGES["fit"].in_validation == "cadence" and STAGES["fit"].new_history
    assert STAGES["validate"].in_validation == "once" and not STAGES["validate"].cadence
    assert STAGES["validate"].checkpoint_step and not STAGES["fit"].checkpoint_step
    # the trainer's state is an enum; outside an entry point it is None
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert stage_of(trainer) is IDLE
    from lightning.pytorch.trainer.states import TrainerFn

    for fn in TrainerFn:
        trainer.state.fn = fn
        assert stage_of(trainer) is STAGES[fn.value], fn


def test_find_probe_source_order_and_laziness() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 2)))
    full = DataLoader(TensorDataset(torch.zeros(3, 2)))
    seen: list[str] = []

    def candidates() -> Any:
        for loaders, where in ((None, "none"), ([empty, full], "empty first"), ({"a": full}, "dict"), (full, "never")):
            seen.append(where)
            yield loaders, where

    assert find_probe_source(None, candidates()) == (full, "dict")
    assert seen == ["none", "empty first", "dict"], "candidates after the first with data are not looked at"
    tensor = torch.zeros(2, 2)
    assert find_probe_source(tensor, candidates())[1] == "the probe argument"
    assert find_probe_source(None, iter([(None, "a"), (empty, "b")])) is None


def test_clean_probe_leaves_out_nonfinite_examples_and_warns() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    x[1, 0], x[4, 1] = math.nan, math.inf
    probe = Probe(x, torch.arange(6), 6, True, torch.arange(10, 16))
    said: list[tuple[str, str]] = []
    clean_probe(probe, 8, "the loader", "Cb", lambda tag, message: said.append((tag, message)))
    assert [tag for tag, _ in said] == ["probe-size", "probe-nonfinite"]
    assert "probe_size=8 but the loader has only 6 items" in said[0][1] and "2 of 6 probe examples" in said[1][1]
    assert probe.labels is not None and probe.indices is not None
    assert probe.labels.tolist() == [0, 2, 3, 5] and probe.indices.tolist() == [10, 12, 13, 15]
    assert torch.equal(probe.inputs, x[[0, 2, 3, 5]])
    with pytest.raises(ValueError, match="every one of the 2 probe examples from the loader has non-finite"):
        clean_probe(Probe(torch.full((2, 2), math.nan), None, 2, True), 2, "the loader", "Cb", lambda *_: None)


def test_ledger_books_checks_pilots_and_measurements() -> None:
    ledger = Ledger()
    ledger.start(0.1, step=5, spent=2.0)
    assert ledger.spent == 2.0 and ledger.step0 == 5 and ledger.cost is None and ledger.share == 0.1
    assert time.perf_counter() - ledger.clock >= 2.0, "the checks before the fit count as elapsed and spent"
    assert ledger.renders(allowance=RENDER_PILOT, work=1.0, final=False), "no cost known: the pilot allowance"
    ledger.record(seconds=3.0, render_seconds=1.0, work=0.5)
    assert (ledger.cost, ledger.render_cost, ledger.spent, ledger.measured) == (4.0, 1.0, 5.0, 1)
    # a measurement of size 0.5 costs 2 s now; figures 1 s: 3 s of allowance cover both, 2.5 s do not
    assert ledger.renders(allowance=3.0, work=0.5, final=False) and not ledger.renders(allowance=2.5, work=0.5, final=False)
    assert ledger.renders(allowance=0.0, work=0.5, final=True), "the final measurement always renders"
    # 5 s booked in about 2 s of wall time: no training time yet, so nothing is allowed and the final one runs at its floor
    plan, training, overhead = ledger.plan(floor=0.5, step=5, total_steps=None, final=True, monitored=False)
    assert (plan, training) == (Plan(run=True, work=0.5, over_budget=True, allowance=-5.0), 0.0) and overhead > 1


def test_markdown_table_and_a_logger_without_tables(tmp_path: Any) -> None:
    assert markdown_table(["a", "b"], [[1, 0.123456], ["x", 2.0]]) == "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| x | 2 |"
    said: list[tuple[str, str]] = []
    log_table([CSVLogger(tmp_path)], "k/t", ["a"], [[1]], 0, "Cb", lambda tag, message: said.append((tag, message)))
    message = "Cb: CSVLogger cannot take tables, so tables are not logged to it (use WandbLogger or TensorBoardLogger)."
    assert said == [("table-CSVLogger", message)]


def _attributes(cb: Any) -> set[str]:
    # Lightning's callback connector gives every callback the module's log / log_dict
    return set(vars(cb)) - {"log", "log_dict"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_no_attribute_is_created_after_init(case: Any) -> None:
    """Every attribute a callback has after fit, validate and test exists after ``__init__`` (none made lazily)."""
    cb = case.make_callback(every_n_steps=2, budget=0.5)
    before = _attributes(cb)
    model, dm = case.make_model(), case.make_datamodule()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, callbacks=[cb],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
        trainer.validate(model, dm, verbose=False)
    assert cb.history, "it measured"
    base_made = {"_state_key", "_found", "_prepared_for", "_restored_step", "prep_seconds", "ledger", "last_step"}
    assert base_made <= before
    assert _attributes(cb) - before == set(), f"{type(cb).__name__} created attributes after __init__"
    twin = pickle.loads(pickle.dumps(cb))
    assert _attributes(twin) == _attributes(cb) and repr(twin.history) == repr(cb.history) and twin.ledger == cb.ledger


def test_callbacks_in_test_and_predict_stay_idle(tmp_path: Any) -> None:
    x, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 2
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        def test_step(self, batch: Any, _: int) -> None:
            pass

        def predict_step(self, batch: Any, _: int) -> torch.Tensor:
            return self(batch[0])

    cbs = [FinalLayerSaliencyCallback(figure_dir="nope://x"), CorrelationOrderCallback(layers=["body.2"])]
    trainer = pl.Trainer(logger=False, callbacks=list(cbs), enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Net(), loader, verbose=False)
    trainer.predict(Net(), loader)
    for cb in cbs:
        assert cb.history == [] and cb.probe_inputs is None and cb.warning_log == [] and cb.last is None


def test_figures_skipped_by_the_budget_warn_only_for_loggers_without_images(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_interp.loggers import log_media

    warned: list[str] = []
    wandb, csv = WandbLogger(save_dir=str(tmp_path), offline=True), CSVLogger(save_dir=str(tmp_path))
    seconds = log_media(
        [wandb, csv], "p", 3, None, dict, figure_dir=None, log_images=True, who="cb", warn=lambda tag, msg: warned.append(msg)
    )
    assert seconds == 0.0
    assert len(warned) == 1 and "CSVLogger" in warned[0]
