"""All callbacks together: one DDP run against one process, and resuming from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_interp import callbacks as cbs
from lightning_interp.datamodules import PatchImageDataModule
from lightning_interp.models import SmallCNN
from tests.test_contract import _assert_history_close, _Dump, _trainer, one_thread


def _suite() -> list[cbs.InterpretabilityCallback]:
    kw: dict[str, Any] = dict(every_n_epochs=1, measure_at_start=True)
    return [
        cbs.FinalLayerSaliencyCallback(probe_size=6, min_size=4, deletion_steps=4, **kw),
        cbs.AblationProbeCallback(layers=["features.4"], probe_size=64, **kw),
        cbs.CorrelationOrderCallback(probe_size=64, min_per_class=5, **kw),
    ]


def _dm(batch_size: int = 32, shuffle: bool = False) -> PatchImageDataModule:
    return PatchImageDataModule(n_train=128, n_val=64, batch_size=batch_size, shuffle=shuffle, seed=4)


def _model() -> SmallCNN:
    return SmallCNN(in_channels=1, num_classes=4, channels=(6, 8), lr=1e-2)


def test_all_callbacks_in_ddp_log_what_one_process_logs(tmp_path: Path) -> None:
    single = _suite()
    pl.seed_everything(5, verbose=False)
    with one_thread():
        _trainer(single, max_epochs=2).fit(_model(), _dm())
    ddp = _suite()
    dumps = [_Dump(cb, str(tmp_path / type(cb).__name__)) for cb in ddp]
    for cb in ddp:
        (tmp_path / type(cb).__name__).mkdir()
    pl.seed_everything(5, verbose=False)
    _trainer([*ddp, *dumps], max_epochs=2, devices=2, strategy="ddp_spawn", use_distributed_sampler=False).fit(_model(), _dm())
    for cb_single, cb in zip(single, ddp, strict=True):
        folder = tmp_path / type(cb).__name__
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
        _assert_history_close(ranks[0]["history"], ranks[1]["history"], rtol=0, atol=0)
        assert ranks[1]["figure_calls"] == 0 < ranks[0]["figure_calls"]
        _assert_history_close(cb_single.history, ranks[0]["history"], rtol=1e-5, atol=1e-6)


def test_all_callbacks_resume_their_histories_and_probe_sets(tmp_path: Path) -> None:
    first = _suite()
    pl.seed_everything(6, verbose=False)
    _trainer([*first, ModelCheckpoint(dirpath=str(tmp_path), save_last=True)], max_epochs=1, enable_checkpointing=True).fit(
        _model(), _dm(shuffle=True)
    )
    resumed = _suite()
    pl.seed_everything(6, verbose=False)
    _trainer([*resumed, ModelCheckpoint(dirpath=str(tmp_path))], max_epochs=2, enable_checkpointing=True).fit(
        _model(), _dm(shuffle=True), ckpt_path=str(tmp_path / "last.ckpt")
    )
    for a, b in zip(first, resumed, strict=True):
        assert len(b.history) == len(a.history) + 1, type(a).__name__
        _assert_history_close(a.history, b.history[: len(a.history)], rtol=0, atol=0)
        assert b.history[-1]["epoch"] == 1.0
    # the probe sets continue: drawn from the callbacks' own seeds, identical after the resume
    assert (first[0]._probe == resumed[0]._probe).all()
    assert (first[1]._probe[0] == resumed[1]._probe[0]).all() and (first[2]._probe[1] == resumed[2]._probe[1]).all()
