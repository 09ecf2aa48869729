"""MNISTDataModule on small IDX files written here: splits, transforms, missing files and damaged files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_interp.datamodules import MNISTDataModule, MNISTFileError
from lightning_interp.datamodules.mnist import MNIST_FILES, MNIST_MEAN, MNIST_STD, check_idx_file
from lightning_interp.models import SmallCNN

# ---------------------------------------------------------------------------------------------------------------
# good files

# what torchvision 0.29's MNIST._check_exists requires in <root>/MNIST/raw (the uncompressed files, no .gz)
_EXPECTED_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def test_mnist_expected_files_are_torchvisions() -> None:
    from torchvision.datasets import MNIST

    assert set(MNIST_FILES) == set(_EXPECTED_FILES) == {os.path.splitext(url)[0] for url, _ in MNIST.resources}


def _write_idx(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four MNIST files (IDX: big-endian magic 2051 / 2049 and sizes, then uint8) to ``root/MNIST/raw``."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
        data[f"{prefix}_images"], data[f"{prefix}_labels"] = images, labels
    return data


def _manual(image: np.ndarray, normalize: bool = True) -> torch.Tensor:
    x = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
    return (x - MNIST_MEAN) / MNIST_STD if normalize else x


def test_mnist_fit_split_shapes_labels_and_normalisation(tmp_path: Path) -> None:
    data = _write_idx(tmp_path)
    dm = MNISTDataModule(str(tmp_path), val_size=6, batch_size=8, shuffle=False)
    assert dm.num_classes == 10
    dm.setup("fit")
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6 and dm.test_dataset is None
    train_idx, val_idx = dm.train_dataset.indices, dm.val_dataset.indices
    assert sorted(train_idx + val_idx) == list(range(30))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(data["train_labels"][train_idx[:8]].astype(np.int64)))
    assert torch.allclose(x[0], _manual(data["train_images"][train_idx[0]]), atol=1e-5)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (6, 1, 28, 28)
    assert torch.equal(yv, torch.from_numpy(data["train_labels"][val_idx].astype(np.int64)))
    # the permutation is seeded
    again = MNISTDataModule(str(tmp_path), val_size=6)
    again.setup("fit")
    assert again.val_dataset.indices == val_idx
    other = MNISTDataModule(str(tmp_path), val_size=6, seed=1)
    other.setup("fit")
    assert other.val_dataset.indices != val_idx


def test_mnist_test_split_flatten_and_raw_pixels(tmp_path: Path) -> None:
    data = _write_idx(tmp_path)
    dm = MNISTDataModule(str(tmp_path), val_size=5, batch_size=4, flatten=True)
    dm.setup("test")
    assert dm.train_dataset is None and len(dm.test_dataset) == 10
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 784) and x.dtype == torch.float32
    assert torch.equal(y, torch.from_numpy(data["t10k_labels"][:4].astype(np.int64)))
    assert torch.allclose(x[0], _manual(data["t10k_images"][0]).flatten(), atol=1e-5)
    assert sum(len(b[1]) for b in dm.predict_dataloader()) == 10
    raw = MNISTDataModule(str(tmp_path), normalize=False, val_size=5)
    x, _ = next(iter(raw.test_dataloader()))  # a loader sets its split up on demand
    assert x.shape == (10, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[0], _manual(data["t10k_images"][0], normalize=False))


def test_mnist_missing_files_name_the_expected_paths(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    dm = MNISTDataModule(str(root))  # construction does not look for the files
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        for name in _EXPECTED_FILES:
            assert os.path.join(str(root), "MNIST", "raw", name) in message
        assert "download=True" in message
    # one file missing: it is marked, and gzip-only files get the extraction hint
    _write_idx(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "t10k-labels-idx1-ubyte"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels.read_bytes()))
    labels.unlink()
    with pytest.raises(FileNotFoundError) as info:
        MNISTDataModule(str(tmp_path)).setup("fit")  # torchvision needs all four files, whatever the stage
    lines = str(info.value).splitlines()
    assert [line for line in lines if "<- missing" in line] == [
        f"  {os.path.join(str(raw), 't10k-labels-idx1-ubyte')}   <- missing"
    ]
    assert any("Only the archives t10k-labels-idx1-ubyte.gz" in line and "gunzip" in line for line in lines)
    assert not any("cannot be decompressed" in line for line in lines)
    # pointing data_dir at the raw folder itself is called out
    with pytest.raises(FileNotFoundError, match="not the raw folder"):
        MNISTDataModule(str(raw)).setup()


def test_mnist_val_size_must_leave_training_images(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(str(tmp_path), val_size=30).setup("fit")
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(str(tmp_path), val_size=-1)


def test_mnist_trains_small_cnn(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    dm = MNISTDataModule(str(tmp_path), val_size=6, batch_size=8)
    model = SmallCNN(in_channels=1, num_classes=10)
    before = model.fc.weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 1
    assert not torch.equal(model.fc.weight, before)


# ---------------------------------------------------------------------------------------------------------------
# damaged files: each raises an MNISTFileError (a ValueError) naming the file, what was expected and what was found


def _idx_images(n: int, rows: int = 28, cols: int = 28, magic: int = 2051) -> bytes:
    return struct.pack(">IIII", magic, n, rows, cols) + bytes(n * rows * cols)


def _idx_labels(n: int, magic: int = 2049, value: int = 3) -> bytes:
    return struct.pack(">II", magic, n) + bytes([value]) * n


def _corrupt_gzip() -> bytes:
    good = gzip.compress(_idx_labels(30))
    return good[: len(good) // 2]  # a cut download: the stream ends early


# (file to overwrite, its new bytes, fragments the message must contain)
DAMAGE = {
    "magic": (
        "train-images-idx3-ubyte",
        struct.pack(">IIII", 0x12345678, 30, 28, 28) + bytes(30 * 784),
        ["wrong magic number", "expected 2051", "found 305419896", "12 34 56 78"],
    ),
    "swapped": ("train-images-idx3-ubyte", _idx_labels(30), ["expected 2051", "found 2049", "MNIST labels file", "swapped"]),
    "truncated": (
        "train-images-idx3-ubyte",
        _idx_images(30)[:-100],
        ["truncated", "30 images of 28 x 28", f"{16 + 30 * 784} bytes", f"has {16 + 30 * 784 - 100}", "100 missing"],
    ),
    "short_header": ("train-labels-idx1-ubyte", struct.pack(">I", 2049) + b"\x00\x00", ["truncated", "6 bytes", "8-byte header"]),
    "extra_bytes": ("train-labels-idx1-ubyte", _idx_labels(30) + b"\x00" * 7, ["30 labels", "38 bytes", "has 45", "7 too many"]),
    "fewer_labels": (
        "train-labels-idx1-ubyte",
        _idx_labels(29),
        ["29 labels, fewer than the 30 images", "train-images-idx3-ubyte"],
    ),
    "label_range": ("train-labels-idx1-ubyte", _idx_labels(30, value=12), ["expected labels 0..9", "found 12 at index 0"]),
    "image_size": ("train-images-idx3-ubyte", _idx_images(30, 20, 20), ["28 x 28", "the header says 20 x 20"]),
    "gzipped": ("train-labels-idx1-ubyte", gzip.compress(_idx_labels(30)), ["gzip-compressed", "gunzip -k"]),
    "bad_gzip": ("train-labels-idx1-ubyte", _corrupt_gzip(), ["gzip archive that cannot be decompressed", "EOFError"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_mnist_damaged_file_is_named_with_its_problem(tmp_path: Path, case: str) -> None:
    name, content, fragments = DAMAGE[case]
    _write_idx(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    path = raw / name
    path.write_bytes(content)
    dm = MNISTDataModule(str(tmp_path), val_size=5)
    with pytest.raises(MNISTFileError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path) and message.startswith(f"MNIST file {path}: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if case != "gzipped":  # the fix: a fresh copy of this very file, into the raw folder
        assert f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}.gz" in message and f"put {name} in {raw}" in message
    # the loaders set their split up on demand and raise the same error; the intact test split still loads
    with pytest.raises(MNISTFileError, match="MNIST file"):
        MNISTDataModule(str(tmp_path), val_size=5).train_dataloader()
    dm.setup("test")
    assert len(dm.test_dataset) == 10


def test_mnist_damaged_test_split_is_checked_at_test_setup(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(_idx_labels(12))
    dm = MNISTDataModule(str(tmp_path), val_size=5)
    dm.setup("fit")  # the training files are intact
    with pytest.raises(MNISTFileError, match=r"12 labels, more than the 10 images"):
        dm.setup("test")


def test_check_idx_file_returns_the_header_sizes(tmp_path: Path) -> None:
    _write_idx(tmp_path, n_train=7)
    raw = tmp_path / "MNIST" / "raw"
    assert check_idx_file(str(raw / "train-images-idx3-ubyte"), "images") == (7, 28, 28)
    assert check_idx_file(str(raw / "train-labels-idx1-ubyte"), "labels") == (7,)
    with pytest.raises(ValueError, match="kind"):
        check_idx_file(str(raw / "train-labels-idx1-ubyte"), "pixels")


def test_mnist_damaged_archive_of_a_missing_file_is_called_out(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(_corrupt_gzip())
    (raw / "t10k-labels-idx1-ubyte").rename(raw / "t10k-labels-idx1-ubyte.gz")  # not a gzip file at all
    (raw / "train-labels-idx1-ubyte").unlink()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(30)))  # a good archive
    with pytest.raises(FileNotFoundError) as info:
        MNISTDataModule(str(tmp_path)).setup("fit")
    lines = str(info.value).splitlines()
    damaged = [line for line in lines if "cannot be decompressed" in line]
    assert len(damaged) == 2
    assert any(str(raw / "t10k-images-idx3-ubyte.gz") in line and "EOFError" in line for line in damaged)
    assert any(str(raw / "t10k-labels-idx1-ubyte.gz") in line and "Not a gzipped file" in line for line in damaged)
    assert all("re-download" in line for line in damaged)
    good = [line for line in lines if "Only the archives" in line]
    assert len(good) == 1 and "train-labels-idx1-ubyte.gz" in good[0] and "t10k" not in good[0]
