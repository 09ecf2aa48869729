"""The callback contract (DEVELOPERS.md, items 1-5), run for every callback registered in tests/contract.py."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_interp.hooks import count_hooks, get_module
from tests.contract import CASES, ContractCase

CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]
BAD_PARAMS = [pytest.param(c, b, id=f"{c.id}-{b.id}") for c in CASES for b in c.bad_configs]


def quiet_trainer(callbacks: list[Callback], tmp_path: Any = None, **kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


def _fit(case: ContractCase, callbacks: list[Callback], seed: int = 7, **kw: Any) -> pl.LightningModule:
    pl.seed_everything(seed, verbose=False)
    model = case.make_model()
    quiet_trainer(callbacks, **kw).fit(model, case.make_datamodule())
    return model


def compile_first_block(model: pl.LightningModule) -> pl.LightningModule:
    """Replace the model's first child with parameters by ``torch.compile(child)`` (as ``self.x = torch.compile(...)``)."""
    name, child = next((n, m) for n, m in model.named_children() if any(True for _ in m.parameters()))
    setattr(model, name, torch.compile(child, backend="eager"))
    return model


def plain_loaders(dm: pl.LightningDataModule) -> tuple[Any, Any]:
    """The datamodule's train and val dataloaders, as a script without a datamodule would pass them to fit()."""
    dm.prepare_data()
    dm.setup("fit")
    try:
        val = dm.val_dataloader()
    except Exception:  # the datamodule has no validation split
        val = None
    return dm.train_dataloader(), val


DATA_FORMS = ["datamodule", "plain_loaders", "compiled_submodule"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread, as each of two ddp processes on two cores does, for identical float sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _without_dropout(model: pl.LightningModule) -> pl.LightningModule:
    # Dropout masks are drawn per rank, so a dropout model cannot match across process counts.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _scalars(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items()} for h in history]


def assert_history_close(a: list[dict[str, float]], b: list[dict[str, float]], rtol: float, atol: float) -> None:
    assert len(a) == len(b) and len(a) > 0
    for ha, hb in zip(a, b, strict=True):
        assert ha.keys() == hb.keys()
        for k in ha:
            if math.isnan(ha[k]):
                assert math.isnan(hb[k]), k
            else:
                assert hb[k] == pytest.approx(ha[k], rel=rtol, abs=atol), k


# ---------------------------------------------------------------- 1. observes, never perturbs
@pytest.mark.parametrize("form", DATA_FORMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_weights_bit_identical_with_and_without_callback(case: ContractCase, form: str) -> None:
    def fit(callbacks: list[Callback]) -> pl.LightningModule:
        pl.seed_everything(7, verbose=False)
        model = case.make_model()
        dm = case.make_datamodule()
        if form == "compiled_submodule":
            compile_first_block(model)
        if form == "plain_loaders":
            quiet_trainer(callbacks, max_epochs=2).fit(model, *plain_loaders(dm))
        else:
            quiet_trainer(callbacks, max_epochs=2).fit(model, dm)
        return model

    extra = case.loader_kwargs(case.make_datamodule()) if form == "plain_loaders" else {}
    cb = case.make_callback(every_n_steps=3, every_n_epochs=1, measure_at_start=True, log_images=True, **extra)
    with_cb = fit([cb])
    without = fit([])
    assert len(cb.history) >= 4, "the callback must have measured several times"
    for (name, a), (_, b) in zip(with_cb.state_dict().items(), without.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after a fit with the callback"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_restores_modes_requires_grad_grads_and_rng(case: ContractCase) -> None:
    cb = case.make_callback(every_n_epochs=1)
    model = case.make_model()
    trainer = quiet_trainer([cb], max_steps=2)
    trainer.fit(model, case.make_datamodule())
    # A mixed state: one submodule in eval mode, one frozen parameter, gradients set.
    model.train()
    modules = [m for _, m in model.named_modules()][1:]
    modules[0].eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in params]
    grads = [p.grad.clone() for p in params]
    rng = torch.get_rng_state()
    cb.run(trainer, model)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in params] == flags
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------- 2. no hook outlives its use
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_no_hooks_left_also_after_an_exception(case: ContractCase, monkeypatch: pytest.MonkeyPatch) -> None:
    cb = case.make_callback(every_n_steps=2)
    model = case.make_model()
    trainer = quiet_trainer([cb], max_steps=4)
    before = count_hooks(model)
    trainer.fit(model, case.make_datamodule())
    assert count_hooks(model) == before

    model.train()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    target = get_module(model, case.raise_in)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(target, "forward", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        cb.run(trainer, model)
    assert count_hooks(model) == before
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in params] == flags


# ---------------------------------------------------------------- 3. inference_mode and ddp
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_works_inside_inference_mode(case: ContractCase) -> None:
    cb = case.make_callback(every_n_epochs=1, run_on="validation_epoch_end", measure_at_end=False)
    model = _fit(case, [cb], max_epochs=2, limit_val_batches=1)
    assert [h["epoch"] for h in cb.history] == [0.0, 1.0], "one measurement per validation epoch"
    trainer = quiet_trainer([cb], max_steps=1)
    trainer.fit(model, case.make_datamodule())
    plain = {k: float(v) for k, v in cb.run(trainer, model).scalars.items()}
    with torch.inference_mode():
        inside = {k: float(v) for k, v in cb.run(trainer, model).scalars.items()}
    assert plain.keys() == inside.keys()
    for k in plain:
        assert inside[k] == pytest.approx(plain[k], nan_ok=True, rel=1e-6, abs=1e-9), k


class Dump(Callback):
    """Writes, per rank, the watched callback's history and how often it rendered figures."""

    def __init__(self, watched: Any, path: str) -> None:
        self.watched, self.path, self.figure_calls = watched, path, 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        original = self.watched.figures

        def counting(measurement: Any) -> Any:
            self.figure_calls += 1
            return original(measurement)

        self.watched.figures = counting

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"history": self.watched.history, "figure_calls": self.figure_calls}, f)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_ddp_two_processes_match_single_process(case: ContractCase, tmp_path: Any) -> None:
    # Lightning's distributed sampler always shuffles training data, so here every rank reads the
    # whole (unshuffled) train set: the all-reduced gradient (g + g) / 2 equals the single-process
    # gradient exactly, the weights follow the same trajectory, and every logged number must agree
    # (up to float32 summation order: a process may run its kernels on another number of threads).
    kw = dict(every_n_steps=2, every_n_epochs=None, measure_at_start=True)
    single_cb = case.make_callback(**kw)
    pl.seed_everything(3, verbose=False)
    single = _without_dropout(case.make_model())
    with one_thread():
        quiet_trainer([single_cb], max_epochs=1).fit(single, case.make_datamodule(batch_size=32, shuffle=False))

    ddp_cb = case.make_callback(**kw, figure_dir=str(tmp_path / "figures"))  # something takes the figures
    pl.seed_everything(3, verbose=False)
    model = _without_dropout(case.make_model())
    trainer = quiet_trainer(
        [ddp_cb, Dump(ddp_cb, str(tmp_path))], max_epochs=1, devices=2, strategy="ddp_spawn", use_distributed_sampler=False
    )
    trainer.fit(model, case.make_datamodule(batch_size=32, shuffle=False))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert_history_close(ranks[0]["history"], ranks[1]["history"], rtol=0, atol=0)  # every rank logs the same numbers
    assert ranks[0]["figure_calls"] == len(ranks[0]["history"]) > 0
    assert ranks[1]["figure_calls"] == 0, "figures are rendered on rank 0 only"
    assert_history_close(single_cb.history, ranks[0]["history"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 4. state survives a checkpoint
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_survives_checkpoint(case: ContractCase, tmp_path: Any) -> None:
    cb = case.make_callback(every_n_epochs=1)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    _fit(case, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    first = _scalars(cb.history)
    assert len(first) == 2

    resumed = case.make_callback(every_n_epochs=1)
    pl.seed_everything(7, verbose=False)
    trainer = quiet_trainer([resumed, ModelCheckpoint(dirpath=str(tmp_path))], max_epochs=3, enable_checkpointing=True)
    trainer.fit(case.make_model(), case.make_datamodule(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert_history_close(first, resumed.history[:2], rtol=0, atol=0)  # the history continues rather than restarts
    assert len(resumed.history) == 3 and resumed.history[2]["epoch"] == 2.0

    other = case.make_callback(every_n_epochs=1, seed=123)
    assert other.state_key != cb.state_key
    assert resumed.state_key == cb.state_key


# ---------------------------------------------------------------- 5. configuration errors at setup
class _StepCounter(Callback):
    steps = 0

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        _StepCounter.steps += 1


@pytest.mark.parametrize(("case", "bad"), BAD_PARAMS)
def test_configuration_errors_raise_at_setup(case: ContractCase, bad: Any) -> None:
    # what needs no model raises in __init__ (inside build()), the rest before the first training step
    _StepCounter.steps = 0
    with pytest.raises(bad.error, match=bad.match):
        callback, model, dm = bad.build()
        quiet_trainer([callback, _StepCounter()], max_steps=2).fit(model, dm)
    assert _StepCounter.steps == 0, "the error must come before the first training step"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_cadence_arguments(case: ContractCase) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be None or an int >= 0"):
        case.make_callback(every_n_steps=-1)
    with pytest.raises(ValueError, match="run_on must be"):
        case.make_callback(run_on="sometimes")


def test_copies_get_their_own_state_key() -> None:
    """Lightning needs a unique state_key per callback: a reconfigured copy must not keep the original's key."""
    import copy

    cb = CASES[0].make_callback()
    key = cb.state_key
    twin = copy.deepcopy(cb)
    twin.seed = cb.seed + 1
    assert twin.state_key != key and cb.state_key == key
