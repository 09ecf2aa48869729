"""Datamodules over synthetic tasks whose generative model (and so the exact posterior) is known."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.posterior import GenerativeTask

__all__ = ["PatchImageDataModule", "SyntheticDataModule"]


class SyntheticDataModule(pl.LightningDataModule):
    """Fixed train / val / test sets drawn from a :class:`~lightning_interp.posterior.GenerativeTask`.

    The three splits are drawn once, at :meth:`setup`, from independent generators derived from
    ``seed``, so every process of a distributed run holds the same data. Batches are ``(x, y)``
    with ``x`` float32 ``[B, D]`` and ``y`` int64 ``[B]``. The task is exposed as ``.task``, which is
    where the posterior-gap callback looks for it.

    Args:
        task: the generative task.
        n_train: training-set size.
        n_val: validation-set size.
        n_test: test-set size.
        batch_size: batch size of every loader.
        seed: seed of the data draw.
        shuffle: shuffle the training set each epoch.
        num_workers: ``DataLoader`` workers.

    Raises:
        TypeError: ``task`` is not a ``GenerativeTask``.
        ValueError: negative sizes or a non-positive batch size.

    Example:
        >>> from lightning_interp.posterior import xie_task
        >>> dm = SyntheticDataModule(xie_task(1), n_train=100, n_val=10, n_test=10, batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.dtype
        (torch.Size([16, 1]), torch.int64)
    """

    def __init__(
        self,
        task: GenerativeTask,
        n_train: int = 100_000,
        n_val: int = 10_000,
        n_test: int = 10_000,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(task, GenerativeTask):
            raise TypeError(f"task must be a lightning_interp.posterior.GenerativeTask, got {type(task).__name__}")
        if min(n_train, n_val, n_test) < 0 or batch_size < 1:
            raise ValueError("n_train, n_val and n_test must be >= 0 and batch_size >= 1")
        self.task = task
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for offset, (name, n) in enumerate((("train", self.n_train), ("val", self.n_val), ("test", self.n_test))):
            g = torch.Generator().manual_seed(self.seed * 3 + offset)
            self._splits[name] = TensorDataset(*self.task.sample(n, g))

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            self.setup()
        return DataLoader(self._splits[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class PatchImageDataModule(pl.LightningDataModule):
    """Image-like data with known evidence: noise plus a bright square whose position gives the class.

    Class ``c`` of ``num_classes`` (at most ``grid**2``) puts a ``patch x patch`` square of brightness
    ``contrast`` in cell ``c`` of a ``grid x grid`` layout of the image (with a random offset inside the
    cell), on Gaussian noise of standard deviation ``noise``. The evidence for each image is therefore
    known (``.masks`` holds the patch location of every image), which is what saliency maps should find.
    Batches are ``(x [B, channels, size, size], y [B])``.

    Args:
        num_classes: number of classes (cells used), at most ``grid**2``.
        image_size: height and width.
        channels: image channels.
        grid: cells per side.
        patch: side of the bright square.
        contrast: brightness added on the square.
        noise: standard deviation of the background noise.
        n_train: training-set size.
        n_val: validation-set size.
        batch_size: batch size.
        seed: seed of the data draw.
        shuffle: shuffle the training set.

    Raises:
        ValueError: ``num_classes > grid**2`` or a patch that does not fit its cell.

    Example:
        >>> dm = PatchImageDataModule(n_train=64, n_val=16, batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([16, 1, 12, 12]), torch.Size([16]))
    """

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 12,
        channels: int = 1,
        grid: int = 2,
        patch: int = 3,
        contrast: float = 2.0,
        noise: float = 0.3,
        n_train: int = 1024,
        n_val: int = 256,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        cell = image_size // grid
        if num_classes > grid * grid or num_classes < 2:
            raise ValueError(f"num_classes must be in [2, grid**2 = {grid * grid}], got {num_classes}")
        if patch >= cell:
            raise ValueError(f"patch ({patch}) must be smaller than a cell (image_size // grid = {cell})")
        self.num_classes, self.image_size, self.channels, self.grid, self.patch = num_classes, image_size, channels, grid, patch
        self.contrast, self.noise = contrast, noise
        self.n_train, self.n_val, self.batch_size, self.seed, self.shuffle = n_train, n_val, batch_size, seed, shuffle
        self._splits: dict[str, TensorDataset] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def _draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        x = self.noise * torch.randn(n, self.channels, self.image_size, self.image_size, generator=g)
        mask = torch.zeros(n, self.image_size, self.image_size, dtype=torch.bool)
        cell = self.image_size // self.grid
        offsets = torch.randint(0, cell - self.patch + 1, (n, 2), generator=g)
        for i, c in enumerate(y.tolist()):
            r = (c // self.grid) * cell + int(offsets[i, 0])
            col = (c % self.grid) * cell + int(offsets[i, 1])
            mask[i, r : r + self.patch, col : col + self.patch] = True
        x = x + self.contrast * mask[:, None].float()
        return x, y, mask

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for offset, (name, n) in enumerate((("train", self.n_train), ("val", self.n_val))):
            x, y, mask = self._draw(n, torch.Generator().manual_seed(self.seed * 2 + offset))
            self._splits[name], self.masks[name] = TensorDataset(x, y), mask

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._splits["train"], batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
