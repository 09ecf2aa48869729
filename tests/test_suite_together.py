"""All callbacks together: one DDP run against one process, and resuming from a checkpoint.

The image run carries four of the five callbacks on one CNN (posterior gap against the exact posterior of
the patch-image task, saliency, ablation, correlation orders); the expansion needs categorical inputs and runs
with the posterior gap (exact Potts posterior), ablation and correlation orders on Potts sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_interp import callbacks as cbs
from lightning_interp.datamodules import PatchImageDataModule, PottsDataModule
from lightning_interp.models import MLPClassifier, SmallCNN
from tests.test_contract import Dump, assert_history_close, one_thread, quiet_trainer

KW: dict[str, Any] = dict(every_n_epochs=1, measure_at_start=True)


def _image_suite() -> list[cbs.InterpretabilityCallback]:
    return [
        cbs.FinalLayerSaliencyCallback(probe_size=6, min_size=4, deletion_steps=4, **KW),
        cbs.AblationProbeCallback(layers=["features.4"], probe_size=64, **KW),
        cbs.CorrelationOrderCallback(probe_size=64, min_per_class=5, **KW),
        cbs.PosteriorGapCallback(probe_size=256, **KW),
    ]


def _potts_suite() -> list[cbs.InterpretabilityCallback]:
    return [
        cbs.LogitExpansionCallback(6, 3, num_samples=64, **KW),
        cbs.AblationProbeCallback(layers=["net.1"], probe_size=64, **KW),
        cbs.CorrelationOrderCallback(probe_size=64, min_per_class=5, **KW),
        cbs.PosteriorGapCallback(probe_size=256, **KW),
    ]


#: name -> (callbacks, model, datamodule factory taking (batch_size, shuffle))
RUNS: dict[str, tuple[Callable[[], list], Callable[[], pl.LightningModule], Callable[..., pl.LightningDataModule]]] = {
    "image": (
        _image_suite,
        lambda: SmallCNN(in_channels=1, num_classes=4, channels=(6, 8), lr=1e-2),
        lambda batch_size=32, shuffle=False: PatchImageDataModule(
            n_train=128, n_val=64, batch_size=batch_size, shuffle=shuffle, seed=4
        ),
    ),
    "potts": (
        _potts_suite,
        lambda: MLPClassifier(18, 2, hidden=(8,), lr=1e-2),
        lambda batch_size=32, shuffle=False: PottsDataModule(
            seq_len=6, num_states=3, num_pairs=2, n_train=128, n_val=64, n_test=0, batch_size=batch_size, shuffle=shuffle, seed=1
        ),
    ),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_all_callbacks_in_ddp_log_what_one_process_logs(tmp_path: Path, run: str) -> None:
    suite, model, dm = RUNS[run]
    single = suite()
    pl.seed_everything(5, verbose=False)
    with one_thread():
        quiet_trainer(single, max_epochs=2).fit(model(), dm())
    ddp = suite()
    for cb in ddp:
        cb.figure_dir = str(tmp_path / "figures")  # something takes the figures (rank 0 renders them)
    dumps = [Dump(cb, str(tmp_path / type(cb).__name__)) for cb in ddp]
    for cb in ddp:
        (tmp_path / type(cb).__name__).mkdir()
    pl.seed_everything(5, verbose=False)
    quiet_trainer([*ddp, *dumps], max_epochs=2, devices=2, strategy="ddp_spawn", use_distributed_sampler=False).fit(model(), dm())
    for cb_single, cb in zip(single, ddp, strict=True):
        folder = tmp_path / type(cb).__name__
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert_history_close(ranks[0]["history"], ranks[1]["history"], rtol=0, atol=0)
        assert ranks[1]["figure_calls"] == 0 < ranks[0]["figure_calls"]
        assert_history_close(cb_single.history, ranks[0]["history"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("run", list(RUNS))
def test_all_callbacks_resume_their_histories_and_probe_sets(tmp_path: Path, run: str) -> None:
    suite, model, dm = RUNS[run]
    first = suite()
    pl.seed_everything(6, verbose=False)
    quiet_trainer([*first, ModelCheckpoint(dirpath=str(tmp_path), save_last=True)], max_epochs=1, enable_checkpointing=True).fit(
        model(), dm(shuffle=True)
    )
    resumed = suite()
    pl.seed_everything(6, verbose=False)
    quiet_trainer([*resumed, ModelCheckpoint(dirpath=str(tmp_path))], max_epochs=2, enable_checkpointing=True).fit(
        model(), dm(shuffle=True), ckpt_path=str(tmp_path / "last.ckpt")
    )
    for a, b in zip(first, resumed, strict=True):
        assert len(b.history) == len(a.history) + 1, type(a).__name__
        assert_history_close(a.history, b.history[: len(a.history)], rtol=0, atol=0)
        assert b.history[-1]["epoch"] == 1.0
    # the probe sets continue: drawn from the callbacks' own seeds, identical after the resume (the expansion
    # has no probe set: its random sequences are seeded by the step, covered by the equal histories)
    for a, b in zip(first, resumed, strict=True):
        if isinstance(a, cbs.LogitExpansionCallback):
            continue
        assert _probe_tensors(a), type(a).__name__
        for ta, tb in zip(_probe_tensors(a), _probe_tensors(b), strict=True):
            assert torch.equal(ta, tb), type(a).__name__


def _probe_tensors(cb: cbs.InterpretabilityCallback) -> list[torch.Tensor]:
    probe = getattr(cb, "_probe", None)
    if probe is None:  # a callback that keeps its probe in the base class's attributes
        probe = [cb.probe_inputs, cb.probe_labels]
    if isinstance(probe, torch.Tensor):
        return [probe]
    if isinstance(probe, dict):
        return [v for v in probe.values() if isinstance(v, torch.Tensor)]
    return [v for v in probe or () if isinstance(v, torch.Tensor)]
