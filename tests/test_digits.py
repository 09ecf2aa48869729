"""DigitsDataModule: scikit-learn's handwritten digits, stratified seeded splits, scaling, batches, missing scikit-learn."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import TensorDataset

from lightning_interp.datamodules import DigitsDataModule
from lightning_interp.datamodules import digits as digits_module
from lightning_interp.models import MLPClassifier

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, np.ndarray]:
    """The digits as scikit-learn gives them: images ``[1797, 8, 8]`` (0..16) and labels ``[1797]``."""
    bunch = load_digits()
    return bunch.images, bunch.target


@pytest.fixture(scope="module")
def images_dm() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=50, seed=3)
    dm.setup("fit")
    return dm


def _split(dm: DigitsDataModule, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return getattr(dm, f"{name}_dataset").tensors


def test_splits_partition_the_data_stratified(images_dm: DigitsDataModule, reference: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = reference
    idx = {s: images_dm.indices[s] for s in SPLITS}
    everything = torch.cat(list(idx.values()))
    assert len(everything) == 1797 and torch.equal(everything.sort().values, torch.arange(1797))
    assert all(torch.equal(i, i.sort().values) for i in idx.values())  # load_digits order within a split
    per_class = np.bincount(labels, minlength=10)
    for name, fraction in (("test", 0.2), ("val", 0.1)):
        counts = np.bincount(labels[idx[name].numpy()], minlength=10)
        assert counts.tolist() == [round(n * fraction) for n in per_class]
        # so the class proportions of the split are those of the whole set, up to rounding
        assert np.abs(counts / counts.sum() - per_class / per_class.sum()).max() < 1.0 / counts.sum()
    train_counts = np.bincount(labels[idx["train"].numpy()], minlength=10)
    assert train_counts.tolist() == [n - round(n * 0.2) - round(n * 0.1) for n in per_class]


def test_images_labels_and_scaling_match_sklearn(images_dm: DigitsDataModule, reference: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = reference
    assert images_dm.input_shape == (1, 8, 8) and images_dm.num_classes == 10
    assert images_dm.classes == tuple("0123456789")
    for name in SPLITS:
        x, y = _split(images_dm, name)
        idx = images_dm.indices[name].numpy()
        assert x.dtype == torch.float32 and x.shape == (len(idx), 1, 8, 8) and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(labels[idx]).long())
        # [0, 1] by dividing by 16, exactly, in the row-major 8 x 8 layout of sklearn's images
        assert torch.equal(x[:, 0], torch.from_numpy(images[idx] / 16.0).float())
        assert isinstance(getattr(images_dm, f"{name}_dataset"), TensorDataset)
    x, _ = _split(images_dm, "train")
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_flat_batches_and_loaders(images_dm: DigitsDataModule) -> None:
    flat = DigitsDataModule(batch_size=50, seed=3, flatten=True, shuffle=False)
    assert flat.input_shape == (64,)
    x, y = next(iter(flat.train_dataloader()))  # a loader sets the data up on demand
    assert x.shape == (50, 64) and y.shape == (50,)
    xi, yi = _split(images_dm, "train")
    assert torch.equal(x, xi[:50].reshape(50, 64)) and torch.equal(y, yi[:50])
    for loader, name in ((flat.val_dataloader(), "val"), (flat.test_dataloader(), "test"), (flat.predict_dataloader(), "test")):
        xs, ys = zip(*loader, strict=True)
        assert torch.equal(torch.cat(ys), _split(images_dm, name)[1])
        assert torch.equal(torch.cat(xs), _split(images_dm, name)[0].reshape(-1, 64))
    # the training loader shuffles by default: every image once per epoch, not in order
    shuffled = torch.cat([b[1] for b in images_dm.train_dataloader()])
    assert len(shuffled) == len(yi) and torch.equal(shuffled.sort().values, yi.sort().values)
    assert not torch.equal(shuffled, yi)


def test_split_is_seeded() -> None:
    a, b, other = DigitsDataModule(seed=5), DigitsDataModule(seed=5), DigitsDataModule(seed=6)
    for dm in (a, b, other):
        dm.setup()
    for name in SPLITS:
        assert torch.equal(a.indices[name], b.indices[name])
    assert not torch.equal(a.indices["test"], other.indices["test"])
    # other fractions: no validation set
    dm = DigitsDataModule(val_fraction=0.0, test_fraction=0.5)
    dm.setup()
    assert len(dm.val_dataset) == 0 and abs(len(dm.test_dataset) - 1797 / 2) <= 5


def test_real_digits_are_learnable(images_dm: DigitsDataModule, reference: tuple[np.ndarray, np.ndarray]) -> None:
    """Images and labels belong together: 1-nearest-neighbour classifies the test split as scikit-learn's does on the raw data."""
    x, y = _split(images_dm, "train")
    xt, yt = _split(images_dm, "test")
    nearest = torch.cdist(xt.reshape(len(xt), -1), x.reshape(len(x), -1)).argmin(1)
    acc = float((y[nearest] == yt).double().mean())
    images, labels = reference
    train, test = images_dm.indices["train"].numpy(), images_dm.indices["test"].numpy()
    flat = images.reshape(len(images), -1)
    ref = KNeighborsClassifier(n_neighbors=1).fit(flat[train], labels[train]).score(flat[test], labels[test])
    assert acc > 0.95 and abs(acc - ref) < 0.01, (acc, ref)


def test_fits_in_a_trainer_and_parses_as_cli_arguments() -> None:
    dm = DigitsDataModule(batch_size=64, flatten=True)
    model = MLPClassifier(64, 10, hidden=(16,))
    before = model.net[0].weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and not torch.equal(model.net[0].weight, before)
    parser = ArgumentParser()
    parser.add_class_arguments(DigitsDataModule, "data")
    cfg = parser.parse_args(["--data.batch_size=16", "--data.flatten=true", "--data.val_fraction=0.2"])
    built = DigitsDataModule(**cfg.data)
    assert (built.batch_size, built.flatten, built.val_fraction, built.input_shape) == (16, True, 0.2, (64,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(val_fraction=0.5, test_fraction=0.5), "sum below 1"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_without_scikit_learn_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    digits_module._load_raw.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # what an environment without scikit-learn imports
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install lightning-interp\[digits\]"):
            DigitsDataModule()
        with pytest.raises(ImportError, match=r"pip install lightning-interp\[digits\]"):
            digits_module.load_digits_tensors()
    finally:
        digits_module._load_raw.cache_clear()
