"""Images of noise with a bright square whose cell gives the class: an image task with an exact posterior."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_interp.tasks.base import GenerativeTask

__all__ = ["PatchImageTask", "check_patch_layout", "patch_masks"]


def check_patch_layout(num_classes: int, image_size: int, grid: int, patch: int) -> int:
    """Validate a patch-image layout (one class per cell of a ``grid x grid`` layout); return the cell side.

    Raises:
        ValueError: ``num_classes`` outside ``[2, grid**2]`` or a patch that does not fit its cell.
    """
    cell = image_size // grid
    if num_classes > grid * grid or num_classes < 2:
        raise ValueError(f"num_classes must be in [2, grid**2 = {grid * grid}], got {num_classes}")
    if patch >= cell or patch < 1:
        raise ValueError(f"patch ({patch}) must be in [1, image_size // grid = {cell})")
    return cell


def patch_masks(labels: Tensor, offsets: Tensor, image_size: int, grid: int, patch: int) -> Tensor:
    """Boolean masks ``[n, size, size]`` of the squares of classes ``labels`` ``[n]`` at ``offsets`` ``[n, 2]``."""
    cell = image_size // grid
    labels = torch.as_tensor(labels).long()
    pos = torch.arange(image_size)
    top = ((labels // grid) * cell + offsets[:, 0])[:, None]
    left = ((labels % grid) * cell + offsets[:, 1])[:, None]
    rows = (pos >= top) & (pos < top + patch)  # [n, size]
    cols = (pos >= left) & (pos < left + patch)
    return rows[:, :, None] & cols[:, None, :]


class PatchImageTask(GenerativeTask):
    """Images of noise with a bright square whose cell gives the class: a task with an exact posterior.

    Class ``c`` (uniform prior) puts a ``patch x patch`` square of brightness ``contrast`` (in every channel)
    at a uniformly drawn offset inside cell ``c`` of a ``grid x grid`` layout of a ``size x size`` image,
    on i.i.d. Gaussian noise of standard deviation ``noise``. The class likelihood is a uniform mixture
    over the ``(cell - patch + 1)^2`` offsets of isotropic Gaussians, so with ``S_o(x)`` the sum of ``x``
    over the square at offset ``o`` (all channels),

    ``log p(x|c) = -|x|^2 / (2 noise^2) - D/2 log(2 pi noise^2) - C patch^2 contrast^2 / (2 noise^2)
    + logmeanexp_o (contrast / noise^2) S_o(x)``,

    computed for all offsets at once with a box filter. This is the generative model of
    :class:`~lightning_interp.datamodules.PatchImageDataModule` (its ``task`` attribute), so a CNN trained
    there can be compared with the Bayes posterior.

    Args:
        num_classes: number of classes (cells used, row by row), at most ``grid**2``.
        image_size: height and width.
        channels: image channels.
        grid: cells per side (``cell = image_size // grid``).
        patch: side of the square (smaller than a cell).
        contrast: brightness added on the square.
        noise: standard deviation of the noise.

    Example:
        >>> task = PatchImageTask(num_classes=4, image_size=12, grid=2, patch=3)
        >>> x, y = task.sample(5, torch.Generator().manual_seed(0))
        >>> x.shape, task.input_shape, task.log_posterior(x).shape
        (torch.Size([5, 144]), (1, 12, 12), torch.Size([5, 4]))
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
    ) -> None:
        cell = check_patch_layout(num_classes, image_size, grid, patch)
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.num_classes, self.image_size, self.channels, self.grid, self.patch = num_classes, image_size, channels, grid, patch
        self.contrast, self.noise, self.cell = float(contrast), float(noise), cell
        self.dim = channels * image_size * image_size
        self.priors = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def class_log_likelihood(self, x: Tensor) -> Tensor:
        if self.noise == 0:
            raise ValueError("noise must be > 0 for a density (and a posterior); this task has noise=0")
        n, var = x.shape[0], self.noise**2
        img = x.reshape(n, *self.input_shape)
        base = -(x * x).sum(dim=1) / (2 * var) - 0.5 * self.dim * math.log(2 * math.pi * var)
        base = base - self.channels * self.patch**2 * self.contrast**2 / (2 * var)
        # S[:, r, c]: sum over the square with top-left corner (r, c), all channels
        box = torch.nn.functional.avg_pool2d(img.sum(dim=1, keepdim=True), self.patch, stride=1)[:, 0] * self.patch**2
        span = self.cell - self.patch + 1
        out = torch.empty(n, self.num_classes, dtype=torch.float64)
        for c in range(self.num_classes):
            r0, c0 = (c // self.grid) * self.cell, (c % self.grid) * self.cell
            sums = box[:, r0 : r0 + span, c0 : c0 + span].reshape(n, -1)
            out[:, c] = base + torch.logsumexp(self.contrast / var * sums, dim=1) - math.log(span * span)
        return out

    def patch_mask(self, c: int, offsets: Tensor) -> Tensor:
        """Boolean masks ``[n, size, size]`` of the squares of class ``c`` at ``offsets`` ``[n, 2]``."""
        return patch_masks(torch.full((len(offsets),), c), offsets, self.image_size, self.grid, self.patch)

    def images(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Images ``[n, C, H, W]`` (float32) of classes ``labels`` and their evidence masks ``[n, H, W]``.

        The one sampler of the task: the noise is drawn first, then the square's offset in its cell.
        """
        n = len(labels)
        x = self.noise * torch.randn(n, *self.input_shape, generator=generator)
        offsets = torch.randint(0, self.cell - self.patch + 1, (n, 2), generator=generator)
        mask = patch_masks(labels, offsets, self.image_size, self.grid, self.patch)
        return x + self.contrast * mask[:, None].float(), mask

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` labelled images with their evidence masks: ``(x [n, C, H, W], y [n], masks [n, H, W])``.

        Labels are uniform (``torch.randint``), then :meth:`images`.
        """
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        x, mask = self.images(y, generator)
        return x, y, mask

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        x, _ = self.images(torch.full((n,), c, dtype=torch.long), generator)
        return x.reshape(n, -1).to(torch.float64)
