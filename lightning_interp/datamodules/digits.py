"""scikit-learn's real handwritten digits: 1,797 grey images of 8 x 8 pixels, 10 classes, held in memory.

The images ship with scikit-learn (:func:`sklearn.datasets.load_digits`, the UCI "optical recognition of
handwritten digits" test set), so nothing is downloaded; scikit-learn is the optional extra ``digits``
(``pip install lightning-interp[digits]``).
"""

from __future__ import annotations

import functools
import importlib.util

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DIGITS_CLASSES", "DIGITS_MAX_VALUE", "DigitsDataModule", "load_digits_tensors", "stratified_split"]

DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""Class names: label ``k`` is the digit ``str(k)``."""
DIGITS_MAX_VALUE = 16.0
"""Largest pixel value of the raw images (each pixel counts ink in a 4 x 4 block of the 32 x 32 original, 0..16)."""

_INSTALL_HINT = (
    "DigitsDataModule reads scikit-learn's bundled digits (sklearn.datasets.load_digits), but scikit-learn is not "
    "installed: pip install lightning-interp[digits]  (or: pip install scikit-learn)"
)


def _require_sklearn() -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise ModuleNotFoundError(_INSTALL_HINT, name="sklearn")


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ModuleNotFoundError(_INSTALL_HINT, name="sklearn") from err
    images, labels = load_digits(return_X_y=True)
    images.setflags(write=False)  # cached: shared by every call
    labels.setflags(write=False)
    return images, labels


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as tensors: raw pixels float32 ``[1797, 64]`` (values 0..16, row-major 8 x 8) and labels int64 ``[1797]``.

    Returns:
        ``(images, labels)``, fresh tensors (the parsed file is cached).

    Raises:
        ModuleNotFoundError: scikit-learn is not installed (``pip install lightning-interp[digits]``).

    Example:
        >>> x, y = load_digits_tensors()
        >>> x.shape, y.shape, float(x.max()), y.unique().tolist()
        (torch.Size([1797, 64]), torch.Size([1797]), 16.0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    images, labels = _load_raw()
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def stratified_split(labels: Tensor, fractions: tuple[float, ...], generator: torch.Generator) -> list[Tensor]:
    """Indices of a stratified random split of ``labels`` into parts of the given fractions, plus the rest.

    Within each class the indices are permuted by ``generator`` and the first ``round(n_c * fractions[0])`` go to
    part 0, the next ``round(n_c * fractions[1])`` to part 1, and so on; what is left of every class is the last
    part. Each part's indices are sorted.

    Args:
        labels: int64 ``[N]``.
        fractions: the fraction of every class in each part but the last.
        generator: random generator of the permutation.

    Returns:
        ``len(fractions) + 1`` int64 index tensors that partition ``range(N)``.

    Example:
        >>> parts = stratified_split(torch.tensor([0] * 10 + [1] * 20), (0.1, 0.2), torch.Generator().manual_seed(0))
        >>> [len(p) for p in parts]
        [3, 6, 21]
    """
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for k, fraction in enumerate(fractions):
            count = round(len(members) * fraction)
            parts[k].append(members[start : start + count])
            start += count
        parts[-1].append(members[start:])
    return [torch.cat(p).sort().values for p in parts]


class DigitsDataModule(pl.LightningDataModule):
    """Real handwritten digits (scikit-learn's ``load_digits``): 8 x 8 grey images of the digits 0 to 9.

    The 1,797 images are split once, at :meth:`setup`, into train / val / test, **stratified** by class: within
    each digit the images are permuted by ``torch.Generator().manual_seed(seed)``, ``round(n_c * test_fraction)``
    go to the test set and ``round(n_c * val_fraction)`` to the validation set, the rest to training (so every split
    has the digits in the proportions of the whole set, up to rounding). Each split keeps the images in the order of
    ``load_digits``; ``.indices[split]`` holds their positions there. The test split is also the predict split.

    **Scaling**: raw pixels are integers 0..16 (ink counts in 4 x 4 blocks); ``x = pixels / 16``, so inputs lie in
    ``[0, 1]``. Batches are ``(x, y)`` with ``x`` float32 ``[B, 1, 8, 8]`` (``[B, 64]`` with ``flatten``, row-major,
    for MLPs) and ``y`` int64 ``[B]``. The splits are tensors in memory (``TensorDataset``), with no per-item
    transform. Class ``k`` is the digit ``classes[k] == str(k)``.

    Args:
        batch_size: batch size of every loader.
        num_workers: ``DataLoader`` workers.
        val_fraction: fraction of each digit's images held out for validation.
        test_fraction: fraction of each digit's images held out for testing.
        seed: seed of the stratified split.
        flatten: ``[64]`` vectors (for MLPs) instead of ``[1, 8, 8]`` images.
        shuffle: shuffle the training set each epoch.

    Raises:
        ValueError: a non-positive batch size, negative ``num_workers``, fractions outside ``[0, 1)`` or fractions
            that leave no training image of some digit.
        ModuleNotFoundError: scikit-learn is not installed (``pip install lightning-interp[digits]``).

    Example:
        >>> dm = DigitsDataModule(batch_size=32, flatten=True)
        >>> dm.num_classes, dm.input_shape, dm.classes[:3]
        (10, (64,), ('0', '1', '2'))
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype, 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        (torch.Size([32, 64]), torch.float32, torch.int64, True)
        >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        (1259, 179, 359)
    """

    num_classes = 10
    classes: tuple[str, ...] = DIGITS_CLASSES
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = False,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) with a sum below 1"
            )
        _require_sklearn()  # fail at construction (e.g. in LightningCLI), not at the first loader
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = seed
        self.flatten = flatten
        self.shuffle = shuffle
        self.input_shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.indices: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and split them (once; every stage gets all three splits, the data being tiny).

        Raises:
            ValueError: the fractions leave some digit without a training image.
        """
        if self.train_dataset is not None:
            return
        images, labels = load_digits_tensors()
        x = (images / DIGITS_MAX_VALUE).reshape(len(images), *self.input_shape)
        test, val, train = stratified_split(
            labels, (self.test_fraction, self.val_fraction), torch.Generator().manual_seed(self.seed)
        )
        missing = sorted(set(range(self.num_classes)) - set(labels[train].tolist()))
        if missing:
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} leave no training image of "
                f"digit(s) {missing}; lower them"
            )
        self.indices = {"train": train, "val": val, "test": test}
        self.train_dataset = TensorDataset(x[train], labels[train])
        self.val_dataset = TensorDataset(x[val], labels[val])
        self.test_dataset = TensorDataset(x[test], labels[test])

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            getattr(self, name),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train_dataset", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val_dataset", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test_dataset", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test_dataset", False)
