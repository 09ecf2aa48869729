"""Logging to TensorBoard / CSV, figure files, hooks, datamodule, models and the reproduction script."""

from __future__ import annotations

import csv
import glob
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_interp.callbacks import PosteriorGapCallback
from lightning_interp.datamodules import SyntheticDataModule
from lightning_interp.hooks import capture, count_hooks, get_module, replace
from lightning_interp.models import MLPClassifier, SmallCNN
from lightning_interp.probe import draw_probe
from lightning_interp.tasks import GaussianTask, xie_task


def _fit(callback: PosteriorGapCallback, loggers: list, task=None, in_features: int = 1, max_steps: int = 8) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[callback],
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    task = task or xie_task(1)
    trainer.fit(MLPClassifier(in_features, task.num_classes, hidden=(8,)), SyntheticDataModule(task, 256, 0, 0, batch_size=32))
    return trainer


def test_tensorboard_gets_scalars_images_and_tables(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = PosteriorGapCallback(probe_size=256, every_n_steps=4, every_n_epochs=None, measure_at_end=False)
    _fit(cb, [TensorBoardLogger(str(tmp_path))])
    (events,) = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(events, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    kl = acc.Scalars("posterior_gap/kl")
    assert [e.step for e in kl] == [4, 8]
    assert [e.value for e in kl] == pytest.approx([h["kl"] for h in cb.history], rel=1e-6)
    assert {"posterior_gap/posterior", "posterior_gap/gap_by_density"} <= set(tags["images"])
    assert any("posterior_gap/by_density" in t for t in tags["tensors"])


def test_csv_logger_gets_scalars_and_one_warning_per_kind(tmp_path: Path) -> None:
    cb = PosteriorGapCallback(probe_size=256, every_n_steps=2, every_n_epochs=None, measure_at_end=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(cb, [CSVLogger(str(tmp_path))])
    messages = [str(w.message) for w in caught]
    assert sum("cannot take images" in m for m in messages) == 1
    assert sum("cannot take tables" in m for m in messages) == 1
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("posterior_gap/kl")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    assert [float(r["posterior_gap/kl"]) for r in rows] == pytest.approx([h["kl"] for h in cb.history], rel=1e-6)


def test_multidimensional_task_gets_reliability_figure_files(tmp_path: Path) -> None:
    task = GaussianTask(means=[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], covariances=torch.eye(2).expand(3, 2, 2))
    cb = PosteriorGapCallback(probe_size=300, every_n_epochs=None, figure_dir=str(tmp_path / "figs"), log_images=False)
    _fit(cb, [], task=task, in_features=2)
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["posterior_gap_gap_by_density_step000008.png", "posterior_gap_reliability_step000008.png"]
    assert cb.history[-1]["step"] == 8.0 and len(cb.history) == 1


def test_callback_uses_explicit_task_and_bounded_probe() -> None:
    task = xie_task(3)
    cb = PosteriorGapCallback(task=task, probe_size=100, num_density_bins=5, log_images=False)
    _fit(cb, [])
    assert cb.probe_inputs.shape == (100, 1)
    # equal-count density bins: 100 probe points in 5 bins of 20
    assert cb.last.data["gap"]["count_by_density"].tolist() == [20.0] * 5
    # the logged low-density gap is the first bin's gap
    assert cb.history[-1]["kl_low_density"] == pytest.approx(float(cb.last.data["gap"]["kl_by_density"][0]))


def test_callback_constructor_errors() -> None:
    with pytest.raises(TypeError, match="GenerativeTask"):
        PosteriorGapCallback(task="preset1")
    with pytest.raises(ValueError, match="probe_size must be an int >= 2, got 1"):
        PosteriorGapCallback(probe_size=1)


# ------------------------------------------------------------------------------------ hooks
def test_capture_clones_outputs_changed_in_place_and_removes_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with capture(model, ["0", "2"]) as acts:
        out = model(x)
        assert count_hooks(model) == 2
    assert count_hooks(model) == 0
    pre = x @ model[0].weight.T + model[0].bias
    assert torch.allclose(acts["0"], pre)  # not the in-place ReLU'd tensor
    assert (acts["0"] < 0).any()
    assert torch.equal(acts["2"], out.detach())


def test_replace_and_hooks_removed_on_exception() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with replace(model, "1", torch.zeros_like):
        assert torch.allclose(model(x), model[2].bias.expand(5, 2))
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["0"]):
        raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_get_module_error_lists_names() -> None:
    model = MLPClassifier(1, 2, hidden=(4,))
    assert get_module(model, "net.2") is model.net[2]
    with pytest.raises(ValueError, match=r"unknown layer 'net\.9'.*'net\.0'"):
        get_module(model, "net.9")
    with pytest.raises(TypeError, match="strings"):
        get_module(model, 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ data and models
def test_synthetic_datamodule_is_reproducible_and_exposes_task() -> None:
    task = xie_task(2)
    a = SyntheticDataModule(task, 100, 20, 30, batch_size=10, seed=5)
    b = SyntheticDataModule(task, 100, 20, 30, batch_size=10, seed=5)
    a.setup("fit")
    b.setup("fit")
    assert a.task is task
    xa, ya = a._splits["train"].tensors
    xb, yb = b._splits["train"].tensors
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(a._splits["val"]) == 20 and len(a._splits["test"]) == 30
    assert not torch.equal(a._splits["val"].tensors[0][:20], xa[:20])
    x, y = next(iter(a.val_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (10, 1) and y.dtype == torch.int64
    with pytest.raises(TypeError, match="GenerativeTask"):
        SyntheticDataModule("preset1")  # type: ignore[arg-type]


def test_draw_probe_uses_only_its_generator() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(50.0)[:, None], torch.zeros(50))
    rng = torch.get_rng_state()
    p1 = draw_probe(data, 10, torch.Generator().manual_seed(0))
    p2 = draw_probe(data, 10, torch.Generator().manual_seed(0))
    assert p1.labels is not None and p1.labels.dtype == torch.int64 and (p1.labels == 0).all()
    assert draw_probe(torch.arange(5.0), 3, torch.Generator()).labels is None
    assert torch.equal(torch.get_rng_state(), rng)
    idx = p1.inputs[:, 0].long().tolist()
    assert len(set(idx)) == 10 and torch.equal(p1.inputs, p2.inputs) and p1.available == 50 and p1.deterministic
    with pytest.raises(ValueError, match="empty"):
        draw_probe([], 3, torch.Generator())


def test_models_shapes_and_heads() -> None:
    cnn = SmallCNN(in_channels=3, num_classes=7)
    x = torch.randn(2, 3, 16, 16)
    feats = cnn.forward_features(x)
    assert feats.shape == (2, 32, 8, 8)
    assert torch.allclose(cnn(x), feats.mean(dim=(2, 3)) @ cnn.fc.weight.T + cnn.fc.bias, atol=1e-6)
    mlp = MLPClassifier(4, 3, hidden=(5, 6), dropout=0.5)
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    with pytest.raises(ValueError, match="activation"):
        MLPClassifier(activation="swish")


def test_reproduce_xie_script_runs_small(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_xie.py"
    spec = importlib.util.spec_from_file_location("reproduce_xie", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--presets", "3", "--steps", "5", "20", "--n-train", "512", "--n-probe", "512", "--out", str(tmp_path)])
    assert (tmp_path / "results.json").exists() and (tmp_path / "posterior_vs_model.png").exists()


def test_patch_image_datamodule_places_the_evidence_by_class() -> None:
    from lightning_interp.datamodules import PatchImageDataModule

    dm = PatchImageDataModule(num_classes=4, image_size=12, n_train=200, n_val=50, noise=0.0, contrast=1.0, seed=3)
    dm.setup()
    x, y = dm._splits["train"].tensors
    mask = dm.masks["train"]
    assert torch.equal(x[:, 0] > 0.5, mask)  # without noise the image is exactly the patch
    assert (mask.flatten(1).sum(1) == 9).all()
    for i in range(20):
        r, c = torch.nonzero(mask[i]).float().mean(0)
        assert int(r // 6) * 2 + int(c // 6) == int(y[i])
    with pytest.raises(ValueError, match="num_classes"):
        PatchImageDataModule(num_classes=5)
    with pytest.raises(ValueError, match="patch"):
        PatchImageDataModule(patch=6)
