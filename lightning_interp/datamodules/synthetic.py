"""Datamodules over synthetic tasks whose generative model (and so the exact posterior) is known."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.tasks import GenerativeTask, PatchImageTask

__all__ = ["HigherOrderDataModule", "PatchImageDataModule", "SyntheticDataModule", "XORDataModule"]


class _SplitLoaders(pl.LightningDataModule):
    """Loaders over fixed ``train`` / ``val`` / ``test`` splits held in ``self._splits`` (drawn at ``setup``)."""

    _splits: dict[str, TensorDataset]
    batch_size: int
    shuffle: bool
    num_workers: int

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            self.setup("fit")
        return DataLoader(self._splits[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class SyntheticDataModule(_SplitLoaders):
    """Fixed train / val / test sets drawn from a :class:`~lightning_interp.tasks.GenerativeTask`.

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
        >>> from lightning_interp.tasks import xie_task
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
            raise TypeError(f"task must be a lightning_interp.tasks.GenerativeTask, got {type(task).__name__}")
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


class PatchImageDataModule(pl.LightningDataModule):
    """Image-like data with known evidence: noise plus a bright square whose position, or pattern, gives the class.

    With ``evidence="position"`` (the default) class ``c`` of ``num_classes`` (at most ``grid**2``) puts a
    ``patch x patch`` square of brightness ``contrast`` in cell ``c`` of a ``grid x grid`` layout of the image
    (with a random offset inside the cell). A global-average-pooled CNN sees position only through the zero
    padding, so it solves this task from border effects and its saliency maps light up the image centre, not
    the square: use it for the posterior gap, not to judge saliency. With ``evidence="content"`` the class is
    the pattern drawn in a ``patch x patch`` square placed anywhere in the image (horizontal bars, vertical
    bars, a cross, a checkerboard; at most four classes; ``grid`` is ignored), which a pooled network can
    point to: the task for saliency maps. Either way the pattern sits on Gaussian noise of standard deviation
    ``noise``, the evidence for each image is known (``.masks[split]`` holds the square of every image, bool
    ``[n, size, size]``), which is what saliency maps should find, and so is the exact posterior: ``.task``
    is the generative model (:class:`~lightning_interp.tasks.PatchImageTask`), so
    :class:`PosteriorGapCallback` works here too. Batches are ``(x [B, channels, size, size], y [B])``.

    Args:
        num_classes: number of classes (cells used, at most ``grid**2``; or patterns used, at most 4).
        image_size: height and width.
        channels: image channels.
        grid: cells per side (position mode).
        patch: side of the square (at least 3 in the content mode).
        contrast: brightness added on the square (on the lit pixels of the pattern).
        noise: standard deviation of the background noise.
        n_train: training-set size.
        n_val: validation-set size.
        batch_size: batch size.
        seed: seed of the data draw.
        shuffle: shuffle the training set.
        evidence: ``"position"`` (the class is the square's cell) or ``"content"`` (the class is its pattern).

    Raises:
        ValueError: an unknown ``evidence``, ``num_classes > grid**2`` (position) or ``> 4`` (content), or a
            patch that does not fit.

    Example:
        >>> dm = PatchImageDataModule(n_train=64, n_val=16, batch_size=16, evidence="content")
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape, dm.masks["val"].shape
        (torch.Size([16, 1, 12, 12]), torch.Size([16]), torch.Size([16, 12, 12]))
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
        evidence: Literal["position", "content"] = "position",
    ) -> None:
        super().__init__()
        # the task checks the layout
        self._task = PatchImageTask(num_classes, image_size, channels, grid, patch, contrast, noise, evidence)
        self.num_classes, self.image_size, self.channels, self.grid, self.patch = num_classes, image_size, channels, grid, patch
        self.contrast, self.noise, self.evidence = contrast, noise, evidence
        self.n_train, self.n_val, self.batch_size, self.seed, self.shuffle = n_train, n_val, batch_size, seed, shuffle
        self._splits: dict[str, TensorDataset] = {}
        self.masks: dict[str, torch.Tensor] = {}

    @property
    def task(self) -> PatchImageTask:
        """The generative model of these images (exact posterior).

        Raises:
            ValueError: ``noise == 0`` (no density, so no posterior to compare with).
        """
        if self.noise <= 0:
            raise ValueError(f"noise must be > 0 for a density (and a posterior), got {self.noise}")
        return self._task

    def _draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._task.draw(n, g)

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


class _SampledDataModule(_SplitLoaders):
    """Shared machinery of the order-probing tasks: fixed splits drawn at :meth:`setup` by :meth:`sample`.

    Subclasses implement ``_draw(n, generator) -> (x, y, extra)``; ``extra`` (or ``None``) is kept per split in
    ``self._extra``. Split ``i`` of (train, val, test) is drawn from ``torch.Generator().manual_seed(seed * 3 + i)``,
    as in :class:`SyntheticDataModule`.
    """

    num_classes = 2

    def __init__(
        self, dim: int, n_train: int, n_val: int, n_test: int, batch_size: int, seed: int, shuffle: bool, num_workers: int
    ) -> None:
        super().__init__()
        if min(n_train, n_val, n_test, num_workers) < 0 or batch_size < 1:
            raise ValueError("n_train, n_val, n_test and num_workers must be >= 0 and batch_size >= 1")
        self.dim = dim
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}
        self._extra: dict[str, torch.Tensor] = {}

    def _draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh labelled samples ``(x float32 [n, dim], y int64 [n])`` from the task (classes equally likely).

        Args:
            n: number of samples.
            generator: random generator (the global one when ``None``).
        """
        x, y, _ = self._draw(n, generator if generator is not None else torch.default_generator)
        return x, y

    def class_mean(self, c: int) -> torch.Tensor:
        """Exact mean of class ``c`` (float64 ``[dim]``): zero for both classes of these tasks."""
        self._check_class(c)
        return torch.zeros(self.dim, dtype=torch.float64)

    def _check_class(self, c: int) -> None:
        if c not in (0, 1):
            raise ValueError(f"class must be 0 or 1, got {c}")

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for offset, (name, n) in enumerate((("train", self.n_train), ("val", self.n_val), ("test", self.n_test))):
            x, y, extra = self._draw(n, torch.Generator().manual_seed(self.seed * 3 + offset))
            self._splits[name] = TensorDataset(x, y)
            if extra is not None:
                self._extra[name] = extra


class XORDataModule(_SampledDataModule):
    """XOR (docs/correlation.md): the class is the sign product of the first two coordinates' corner.

    Each example picks a corner ``(s1, s2)`` with ``s1, s2`` independent and uniform in ``{-1, +1}`` and is
    ``x = (s1, s2, 0, ..., 0) + noise * N(0, I_dim)``; the label is ``y = 1`` when ``s1 * s2 > 0`` (corners
    ``(+1, +1)`` and ``(-1, -1)``) and ``y = 0`` when ``s1 * s2 < 0`` (corners ``(+1, -1)`` and ``(-1, +1)``).
    Coordinates beyond the first two are pure noise, ``N(0, noise**2)``, independent of everything else.

    Both classes have mean 0, so the class information sits in the covariance: per class
    ``Sigma_c = diag(1 + noise**2, 1 + noise**2, noise**2, ..., noise**2)`` with off-diagonal ``Sigma_c[0, 1] =
    Sigma_c[1, 0] = +1`` for class 1 and ``-1`` for class 0 (:meth:`class_mean`, :meth:`class_covariance`). Each
    class is a two-component Gaussian mixture, so it also has higher cumulants.

    The splits are drawn once, at :meth:`setup`, from generators derived from ``seed`` (as in
    :class:`SyntheticDataModule`); the corner of every example is kept in ``.signs[split]`` (int64 ``[n, 2]``).
    Batches are ``(x, y)`` with ``x`` float32 ``[B, dim]`` and ``y`` int64 ``[B]``.

    Args:
        dim: input dimension (at least 2).
        noise: standard deviation of the isotropic Gaussian noise (``>= 0``).
        n_train: training-set size.
        n_val: validation-set size.
        n_test: test-set size.
        batch_size: batch size of every loader.
        seed: seed of the data draw.
        shuffle: shuffle the training set each epoch.
        num_workers: ``DataLoader`` workers.

    Raises:
        ValueError: ``dim < 2``, ``noise < 0``, negative sizes or a non-positive batch size.

    Example:
        >>> dm = XORDataModule(dim=3, noise=0.3, n_train=256, n_val=64, n_test=64, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.dtype, dm.num_classes
        (torch.Size([32, 3]), torch.int64, 2)
        >>> dm.class_covariance(1)
        tensor([[1.0900, 1.0000, 0.0000],
                [1.0000, 1.0900, 0.0000],
                [0.0000, 0.0000, 0.0900]], dtype=torch.float64)
    """

    def __init__(
        self,
        dim: int = 2,
        noise: float = 0.3,
        n_train: int = 4096,
        n_val: int = 1024,
        n_test: int = 1024,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2 (the first two coordinates carry the class), got {dim}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        super().__init__(dim, n_train, n_val, n_test, batch_size, seed, shuffle, num_workers)
        self.noise = float(noise)

    @property
    def signs(self) -> dict[str, torch.Tensor]:
        """The corner ``(s1, s2)`` of every example, per split (int64 ``[n, 2]``, entries ``+-1``); after :meth:`setup`."""
        return self._extra

    def _draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        signs = 2 * torch.randint(0, 2, (n, 2), generator=generator) - 1
        eps = torch.randn(n, self.dim, generator=generator)
        x = self.noise * eps
        x[:, :2] += signs.float()
        y = (signs[:, 0] * signs[:, 1] > 0).long()
        return x, y, signs

    def class_covariance(self, c: int) -> torch.Tensor:
        """Exact covariance of class ``c`` (float64 ``[dim, dim]``): ``noise**2 I`` plus ``[[1, +-1], [+-1, 1]]``
        in the first two coordinates (``+1`` for class 1, ``-1`` for class 0)."""
        self._check_class(c)
        cov = torch.eye(self.dim, dtype=torch.float64) * self.noise**2
        cov[0, 0] += 1.0
        cov[1, 1] += 1.0
        cov[0, 1] = cov[1, 0] = 1.0 if c == 1 else -1.0
        return cov


class HigherOrderDataModule(_SampledDataModule):
    """Two classes with equal mean and covariance that differ only in higher cumulants (docs/correlation.md).

    Class 0 is ``N(0, I_dim)``. Class 1 has iid coordinates of zero mean and unit variance from ``distribution``:

    - ``"laplace"``: Laplace with scale ``1 / sqrt(2)``; fourth cumulant (excess kurtosis) ``+3``, sixth ``30``.
    - ``"uniform"``: uniform on ``[-sqrt(3), sqrt(3)]``; fourth cumulant ``-6/5``, sixth ``48/7``.

    Both classes are symmetric, so every odd cumulant vanishes, and both have mean 0 and covariance ``I``: the
    classes agree up to order 2 and differ from order 4 on (class 0 being Gaussian has no cumulant beyond
    order 2). A Gaussian order-2 surrogate of the input (``N(mu_c, Sigma_c)``) therefore carries no class
    information, and any classifier that only sees class means and covariances (e.g. quadratic discriminant
    analysis) is at chance, while the classes are separable through e.g. ``sum_i x_i**4``.

    The splits are drawn once, at :meth:`setup`, from generators derived from ``seed`` (as in
    :class:`SyntheticDataModule`). Labels are uniform in ``{0, 1}``. Batches are ``(x, y)`` with ``x`` float32
    ``[B, dim]`` and ``y`` int64 ``[B]``.

    Args:
        dim: input dimension.
        n_train: training-set size.
        n_val: validation-set size.
        n_test: test-set size.
        batch_size: batch size of every loader.
        seed: seed of the data draw.
        shuffle: shuffle the training set each epoch.
        distribution: coordinate distribution of class 1, ``"laplace"`` or ``"uniform"``.
        num_workers: ``DataLoader`` workers.

    Raises:
        ValueError: ``dim < 1``, an unknown ``distribution``, negative sizes or a non-positive batch size.

    Example:
        >>> dm = HigherOrderDataModule(dim=4, n_train=256, n_val=64, n_test=64, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.dtype, dm.num_classes
        (torch.Size([32, 4]), torch.int64, 2)
        >>> dm.excess_kurtosis(0), dm.excess_kurtosis(1)
        (0.0, 3.0)
        >>> torch.equal(dm.class_covariance(0), dm.class_covariance(1))
        True
    """

    distributions: tuple[str, ...] = ("laplace", "uniform")

    def __init__(
        self,
        dim: int = 8,
        n_train: int = 4096,
        n_val: int = 1024,
        n_test: int = 1024,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        distribution: str = "laplace",
        num_workers: int = 0,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if distribution not in self.distributions:
            raise ValueError(f"distribution must be one of {self.distributions}, got {distribution!r}")
        super().__init__(dim, n_train, n_val, n_test, batch_size, seed, shuffle, num_workers)
        self.distribution = distribution

    def _draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, None]:
        y = torch.randint(0, 2, (n,), generator=generator)
        gauss = torch.randn(n, self.dim, generator=generator)
        if self.distribution == "laplace":
            # difference of two Exp(1) draws is Laplace(0, 1); scale 1/sqrt(2) gives unit variance
            e = torch.empty(2, n, self.dim).exponential_(generator=generator)
            other = (e[0] - e[1]) * 2**-0.5
        else:
            other = (2 * torch.rand(n, self.dim, generator=generator) - 1) * 3**0.5
        x = torch.where(y[:, None] == 1, other, gauss)
        return x, y, None

    def class_covariance(self, c: int) -> torch.Tensor:
        """Exact covariance of class ``c`` (float64 ``[dim, dim]``): the identity for both classes."""
        self._check_class(c)
        return torch.eye(self.dim, dtype=torch.float64)

    def excess_kurtosis(self, c: int) -> float:
        """Exact excess kurtosis (fourth cumulant, the variance being 1) of every coordinate of class ``c``."""
        self._check_class(c)
        if c == 0:
            return 0.0
        return 3.0 if self.distribution == "laplace" else -1.2
