"""Datamodules over synthetic tasks whose generative model (and so the exact posterior) is known."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.posterior import GenerativeTask

__all__ = ["SyntheticDataModule"]


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
