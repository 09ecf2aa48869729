"""MNIST from torchvision's files, with a train / val split of the 60,000 training images.

:class:`torchvision.datasets.MNIST` reads the four uncompressed IDX files in ``<data_dir>/MNIST/raw/``. Nothing
is downloaded unless ``download=True``; when the files are absent the datamodule says which ones and how to get
them.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import MNIST

__all__ = ["MNIST_FILES", "MNIST_MEAN", "MNIST_STD", "MNISTDataModule", "missing_files"]

MNIST_MEAN = 0.1307
"""Mean pixel intensity of the MNIST training images (after ``ToTensor``, i.e. in ``[0, 1]``)."""
MNIST_STD = 0.3081
"""Standard deviation of the pixel intensities of the MNIST training images (in ``[0, 1]``)."""
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
"""The files that ``torchvision.datasets.MNIST`` needs in ``<root>/MNIST/raw/`` (uncompressed IDX)."""


def _raw_folder(data_dir: str) -> str:
    return os.path.join(data_dir, "MNIST", "raw")


def _legacy_present(data_dir: str) -> bool:
    """torchvision also accepts its old processed cache, ``MNIST/processed/{training,test}.pt``."""
    processed = os.path.join(data_dir, "MNIST", "processed")
    return all(os.path.isfile(os.path.join(processed, f)) for f in (MNIST.training_file, MNIST.test_file))


def missing_files(data_dir: str) -> list[str]:
    """The files of :data:`MNIST_FILES` missing from ``<data_dir>/MNIST/raw`` (empty when torchvision can load)."""
    if _legacy_present(data_dir):
        return []
    raw = _raw_folder(data_dir)
    return [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]


def _not_found_message(data_dir: str, missing: list[str]) -> str:
    raw = _raw_folder(data_dir)
    lines = [
        f"MNIST not found under data_dir={data_dir!r}: torchvision.datasets.MNIST needs these four uncompressed IDX files",
        *(f"  {os.path.join(raw, f)}{'   <- missing' if f in missing else ''}" for f in MNIST_FILES),
    ]
    gz = [f for f in missing if os.path.isfile(os.path.join(raw, f + ".gz"))]
    if gz:
        lines.append(
            f"Only the archives {', '.join(f + '.gz' for f in gz)} are there: extract them in place (gunzip -k), or pass "
            "download=True, which extracts the original archives without downloading them again."
        )
    for elsewhere in (data_dir, os.path.join(data_dir, "raw")):
        if any(os.path.isfile(os.path.join(elsewhere, f)) for f in MNIST_FILES):
            lines.append(
                f"Some of the files are in {elsewhere}: data_dir must be the folder that holds MNIST/raw/, not the raw folder."
            )
            break
    lines.append(
        "To get them: run once with download=True on a machine with internet access (MNISTDataModule(data_dir, "
        "download=True).prepare_data(), or torchvision.datasets.MNIST(data_dir, download=True)), or copy the four "
        f"files (from the train-*/t10k-* .gz archives of an MNIST mirror, uncompressed) into {raw}."
    )
    return "\n".join(lines)


class MNISTDataModule(pl.LightningDataModule):
    """MNIST digits read with :class:`torchvision.datasets.MNIST`; a seeded train / val split of the training set.

    ``data_dir`` is torchvision's ``root``: it holds ``MNIST/raw/`` with the four uncompressed IDX files of
    :data:`MNIST_FILES`. The 60,000 training images are split by a permutation drawn from ``seed`` into
    ``val_size`` validation images and the rest for training; the 10,000 ``t10k`` images are the test (and
    predict) set. Transform: ``ToTensor`` (pixels in ``[0, 1]``), then, with ``normalize``,
    ``Normalize((0.1307,), (0.3081,))``, then, with ``flatten``, a flatten to ``[784]``. Batches are ``(x, y)``
    with ``x`` float32 ``[B, 1, 28, 28]`` (``[B, 784]`` with ``flatten``) and ``y`` int64 ``[B]``.

    The files are looked for at :meth:`prepare_data` / :meth:`setup`, not at construction. With ``download=True``
    :meth:`prepare_data` (or :meth:`setup` when the files are still absent) downloads them with torchvision.

    Args:
        data_dir: folder holding ``MNIST/raw/`` (torchvision's ``root``).
        download: download the files when absent (needs internet access).
        batch_size: batch size of every loader.
        num_workers: ``DataLoader`` workers.
        val_size: number of training images held out for validation (``0 <= val_size < 60000``).
        seed: seed of the train / val permutation.
        normalize: normalise with the MNIST mean and standard deviation (:data:`MNIST_MEAN`, :data:`MNIST_STD`).
        flatten: flatten each image to a ``[784]`` vector (for MLPs).
        shuffle: shuffle the training set each epoch.

    Raises:
        ValueError: a non-positive batch size, negative ``num_workers`` or ``val_size``.
        FileNotFoundError: (at :meth:`prepare_data` / :meth:`setup`, with ``download=False``) a file of
            :data:`MNIST_FILES` is missing; the message names each expected path and how to get the files.
        ValueError: (at :meth:`setup`) ``val_size`` is not smaller than the training set.

    Example:
        >>> dm = MNISTDataModule("data", batch_size=128, flatten=True)
        >>> dm.num_classes, dm.val_size
        (10, 5000)
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> len(dm.train_dataset), len(dm.val_dataset)  # doctest: +SKIP
        (55000, 5000)
        >>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> x.shape, y.dtype  # doctest: +SKIP
        (torch.Size([128, 784]), torch.int64)
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        normalize: bool = True,
        flatten: bool = False,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or val_size < 0:
            raise ValueError("batch_size must be >= 1, num_workers and val_size >= 0")
        self.data_dir = os.path.expanduser(os.fspath(data_dir))
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.normalize = normalize
        self.flatten = flatten
        self.shuffle = shuffle
        steps: list = [T.ToTensor()]
        if normalize:
            steps.append(T.Normalize((MNIST_MEAN,), (MNIST_STD,)))
        if flatten:
            steps.append(T.Lambda(torch.flatten))
        self.transform = T.Compose(steps)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def raw_folder(self) -> str:
        """``<data_dir>/MNIST/raw``, where the IDX files are read from."""
        return _raw_folder(self.data_dir)

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming the expected files when torchvision cannot load MNIST from ``data_dir``."""
        missing = missing_files(self.data_dir)
        if missing:
            raise FileNotFoundError(_not_found_message(self.data_dir, missing))

    def prepare_data(self) -> None:
        """Download the files when ``download`` (torchvision skips files already present); else check for them."""
        if self.download and missing_files(self.data_dir):
            MNIST(self.data_dir, train=True, download=True)
            MNIST(self.data_dir, train=False, download=True)
        self.check_files()

    def setup(self, stage: str | None = None) -> None:
        if missing_files(self.data_dir):
            if self.download:
                self.prepare_data()
            self.check_files()
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            full = MNIST(self.data_dir, train=True, transform=self.transform)
            if self.val_size >= len(full):
                raise ValueError(f"val_size ({self.val_size}) must be smaller than the training set ({len(full)} images)")
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
            self.val_dataset = Subset(full, perm[: self.val_size])
            self.train_dataset = Subset(full, perm[self.val_size :])
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = MNIST(self.data_dir, train=False, transform=self.transform)

    def _loader(self, name: str, stage: str, shuffle: bool) -> DataLoader:
        if getattr(self, name) is None:
            self.setup(stage)
        return DataLoader(
            getattr(self, name),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train_dataset", "fit", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val_dataset", "fit", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test_dataset", "test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test_dataset", "predict", False)
