"""Images of noise with a bright square whose cell, or whose pattern, gives the class: image tasks with an exact posterior."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_interp.tasks.base import GenerativeTask

__all__ = ["EVIDENCE_MODES", "PATTERN_NAMES", "PatchImageTask", "check_patch_layout", "patch_masks", "patch_patterns"]

Evidence = Literal["position", "content"]

#: What carries the class: the cell the square sits in, or the pattern drawn in it.
EVIDENCE_MODES: tuple[str, ...] = ("position", "content")

#: The class patterns of the content mode, in class order.
PATTERN_NAMES: tuple[str, ...] = ("horizontal bars", "vertical bars", "cross", "checkerboard")


def check_patch_layout(num_classes: int, image_size: int, grid: int, patch: int) -> int:
    """Validate a patch-image layout (one class per cell of a ``grid x grid`` layout); return the cell side.

    Args:
        num_classes: number of classes (cells used).
        image_size: height and width of the image.
        grid: cells per side.
        patch: side of the square.

    Returns:
        The cell side ``image_size // grid``.

    Raises:
        ValueError: ``num_classes`` outside ``[2, grid**2]`` or a patch that does not fit its cell.

    Example:
        >>> check_patch_layout(4, 12, 2, 3)
        6
    """
    cell = image_size // grid
    if num_classes > grid * grid or num_classes < 2:
        raise ValueError(f"num_classes must be in [2, grid**2 = {grid * grid}], got {num_classes}")
    if patch >= cell or patch < 1:
        raise ValueError(f"patch ({patch}) must be in [1, image_size // grid = {cell})")
    return cell


def patch_patterns(num_classes: int, patch: int) -> Tensor:
    """The 0/1 class patterns ``[num_classes, patch, patch]`` (float32) of the content mode.

    With ``r, c`` the row and column inside the square: horizontal bars light the even rows, vertical bars
    the even columns, the cross the middle row and column (the middle two of each when ``patch`` is even),
    and the checkerboard the squares with ``r + c`` even. Class ``k`` is the ``k``-th of
    :data:`PATTERN_NAMES`; no two patterns are equal, nor a shift of one another.

    Args:
        num_classes: number of classes, 2 to 4.
        patch: side of the square, at least 3 (bars and a cross need three rows).

    Returns:
        A float32 tensor of zeros and ones.

    Raises:
        ValueError: ``num_classes`` outside ``[2, 4]`` or ``patch < 3``.

    Example:
        >>> patch_patterns(4, 3)[2]
        tensor([[0., 1., 0.],
                [1., 1., 1.],
                [0., 1., 0.]])
    """
    if not 2 <= num_classes <= len(PATTERN_NAMES):
        raise ValueError(
            f"the content mode has {len(PATTERN_NAMES)} patterns ({', '.join(PATTERN_NAMES)}), so num_classes must be in "
            f"[2, {len(PATTERN_NAMES)}], got {num_classes}; use evidence='position' for more classes"
        )
    if patch < 3:
        raise ValueError(f"patch must be >= 3 in the content mode (bars and a cross need three rows), got {patch}")
    r = torch.arange(patch)[:, None].expand(patch, patch)
    c = torch.arange(patch)[None, :].expand(patch, patch)
    mid_r, mid_c = (2 * r - (patch - 1)).abs() <= 1, (2 * c - (patch - 1)).abs() <= 1
    patterns = torch.stack([r % 2 == 0, c % 2 == 0, mid_r | mid_c, (r + c) % 2 == 0])
    return patterns[:num_classes].float()


def patch_masks(labels: Tensor, offsets: Tensor, image_size: int, grid: int, patch: int) -> Tensor:
    """Boolean masks of the squares of classes ``labels`` at ``offsets`` in their cells.

    Args:
        labels: classes ``[n]`` (the cell, row by row); all zeros with ``grid=1`` for squares anywhere in the image.
        offsets: top-left corners ``[n, 2]`` (row, column) relative to the cell.
        image_size: height and width of the image.
        grid: cells per side.
        patch: side of the square.

    Returns:
        Boolean masks ``[n, image_size, image_size]``, on the device of ``offsets``.

    Example:
        >>> patch_masks(torch.tensor([3]), torch.tensor([[1, 0]]), 6, 2, 2)[0].nonzero().tolist()
        [[4, 3], [4, 4], [5, 3], [5, 4]]
    """
    cell = image_size // grid
    labels = torch.as_tensor(labels, device=offsets.device).long()
    pos = torch.arange(image_size, device=offsets.device)
    top = ((labels // grid) * cell + offsets[:, 0])[:, None]
    left = ((labels % grid) * cell + offsets[:, 1])[:, None]
    rows = (pos >= top) & (pos < top + patch)  # [n, size]
    cols = (pos >= left) & (pos < left + patch)
    return rows[:, :, None] & cols[:, None, :]


class PatchImageTask(GenerativeTask):
    """Images of noise with a bright square whose cell (or pattern) gives the class: a task with an exact posterior.

    Both modes draw i.i.d. Gaussian noise of standard deviation ``noise`` on a ``size x size`` image and
    add ``contrast`` (in every channel) on a template ``t`` placed at a uniformly drawn position; the class
    prior is uniform.

    - ``evidence="position"``: the template is a full ``patch x patch`` square and class ``c`` places it
      inside cell ``c`` of a ``grid x grid`` layout. A global-average-pooled CNN sees position only through
      the zero padding at the borders, so it solves this task from border effects and its saliency maps do
      not point at the square: a fine posterior-gap task, unsuitable for judging saliency.
    - ``evidence="content"``: class ``c`` is the pattern :func:`patch_patterns` ``(c)`` (horizontal bars,
      vertical bars, a cross, a checkerboard; at most four classes) in a ``patch x patch`` square placed
      anywhere in the image (``grid`` is ignored: the layout is one cell). The evidence is the square's
      content, which a pooled network can point to.

    In both modes the class likelihood is a uniform mixture over the ``P`` allowed positions ``o`` of
    isotropic Gaussians centred on the template at ``o``, so with ``<x, t_o>`` the correlation of ``x`` with
    the template (all channels),

    ``log p(x|c) = -|x|^2 / (2 noise^2) - D/2 log(2 pi noise^2) - |t_c|^2 / (2 noise^2)
    + logsumexp_o <x, t_o> / noise^2 - log P``,

    computed for all positions at once (a box filter, or one ``conv2d`` with the patterns). This is the
    generative model of :class:`~lightning_interp.datamodules.PatchImageDataModule` (its ``task``
    attribute), so a CNN trained there can be compared with the Bayes posterior. The evidence mask of an
    image is its ``patch x patch`` square (:meth:`draw`).

    Args:
        num_classes: number of classes: cells used, row by row, at most ``grid**2`` (position), or patterns
            used, at most 4 (content).
        image_size: height and width.
        channels: image channels.
        grid: cells per side (``cell = image_size // grid``); position mode only.
        patch: side of the square (smaller than a cell; at least 3 and at most ``image_size`` for content).
        contrast: brightness added on the square (on the lit pixels of the pattern for content).
        noise: standard deviation of the noise.
        evidence: ``"position"`` (the default, the original task) or ``"content"``.

    Raises:
        ValueError: an unknown ``evidence``, a layout that does not fit, too many classes, or ``noise < 0``.

    Example:
        >>> task = PatchImageTask(num_classes=4, image_size=12, grid=2, patch=3)
        >>> x, y = task.sample(5, torch.Generator().manual_seed(0))
        >>> x.shape, task.input_shape, task.log_posterior(x).shape
        (torch.Size([5, 144]), (1, 12, 12), torch.Size([5, 4]))
        >>> content = PatchImageTask(num_classes=4, image_size=12, patch=3, evidence="content")
        >>> x, y, masks = content.draw(5, torch.Generator().manual_seed(0))
        >>> x.shape, masks.shape, int(masks[0].sum())
        (torch.Size([5, 1, 12, 12]), torch.Size([5, 12, 12]), 9)
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
        evidence: Evidence = "position",
    ) -> None:
        if evidence not in EVIDENCE_MODES:
            raise ValueError(f"evidence must be one of {EVIDENCE_MODES}, got {evidence!r}")
        if evidence == "position":
            cell = check_patch_layout(num_classes, image_size, grid, patch)
            templates = torch.ones(num_classes, patch, patch)
        else:
            templates = patch_patterns(num_classes, patch)
            if patch > image_size:
                raise ValueError(f"patch ({patch}) must be at most image_size ({image_size})")
            grid, cell = 1, image_size
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.num_classes, self.image_size, self.channels, self.grid, self.patch = num_classes, image_size, channels, grid, patch
        self.contrast, self.noise, self.cell, self.evidence = float(contrast), float(noise), cell, evidence
        #: the 0/1 templates ``[K, patch, patch]`` added (times ``contrast``) at the square of each class
        self.templates = templates
        self.dim = channels * image_size * image_size
        self.priors = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def span(self) -> int:
        """Positions per axis of the square's top-left corner (in its cell): ``cell - patch + 1``."""
        return self.cell - self.patch + 1

    def class_log_likelihood(self, x: Tensor) -> Tensor:
        """``log p(x|c)`` for every class, float64 ``[n, K]`` on the device of ``x``.

        Args:
            x: flat inputs ``[n, D]`` (float64 for an exact result).

        Returns:
            The log-likelihoods, an exact logsumexp over every position of the square.

        Raises:
            ValueError: ``noise == 0`` (no density).
        """
        if self.noise == 0:
            raise ValueError("noise must be > 0 for a density (and a posterior); this task has noise=0")
        n, var, span = x.shape[0], self.noise**2, self.span
        plane = x.reshape(n, *self.input_shape).sum(dim=1, keepdim=True)  # the template is the same in every channel
        base = -(x * x).sum(dim=1) / (2 * var) - 0.5 * self.dim * math.log(2 * math.pi * var) - math.log(span * span)
        templates = self.templates.to(device=x.device, dtype=x.dtype)
        energy = self.channels * self.contrast**2 * (templates * templates).sum(dim=(1, 2))  # |t_c|^2, [K]
        if self.evidence == "content":
            # <x, t_o> for every pattern and top-left corner o (cross-correlation, as conv2d computes it)
            corr = F.conv2d(plane, templates[:, None]).reshape(n, self.num_classes, -1)
            return base[:, None] - energy / (2 * var) + torch.logsumexp(self.contrast / var * corr, dim=2)
        # S[:, r, c]: sum over the square with top-left corner (r, c), all channels
        box = F.avg_pool2d(plane, self.patch, stride=1)[:, 0] * self.patch**2
        out = torch.empty(n, self.num_classes, dtype=torch.float64, device=x.device)
        for c in range(self.num_classes):
            r0, c0 = (c // self.grid) * self.cell, (c % self.grid) * self.cell
            sums = box[:, r0 : r0 + span, c0 : c0 + span].reshape(n, -1)
            out[:, c] = base - energy[c] / (2 * var) + torch.logsumexp(self.contrast / var * sums, dim=1)
        return out

    def patch_mask(self, c: int, offsets: Tensor) -> Tensor:
        """Boolean masks of the squares of class ``c`` at ``offsets``.

        Args:
            c: the class.
            offsets: top-left corners ``[n, 2]`` inside the class's cell (the whole image in the content mode).

        Returns:
            Masks ``[n, size, size]``.
        """
        return patch_masks(
            torch.full((len(offsets),), c if self.evidence == "position" else 0), offsets, self.image_size, self.grid, self.patch
        )

    def images(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Images of classes ``labels`` and their evidence masks.

        The one sampler of the task: the noise is drawn first, then the square's offset in its cell (in the
        image for the content mode).

        Args:
            labels: classes ``[n]``.
            generator: a CPU ``torch.Generator``; the global RNG when ``None``.

        Returns:
            ``(x [n, C, H, W] float32, masks [n, H, W] bool)``, the mask being the square.
        """
        n = len(labels)
        labels = torch.as_tensor(labels).long()
        x = self.noise * torch.randn(n, *self.input_shape, generator=generator)
        offsets = torch.randint(0, self.span, (n, 2), generator=generator)
        if self.evidence == "position":
            mask = patch_masks(labels, offsets, self.image_size, self.grid, self.patch)
            return x + self.contrast * mask[:, None].float(), mask
        mask = patch_masks(torch.zeros_like(labels), offsets, self.image_size, 1, self.patch)
        # pixel (i, j) of the image shows pixel (i - top, j - left) of the pattern inside the square, 0 outside
        pos = torch.arange(self.image_size)
        rows = (pos[None] - offsets[:, :1]).clamp(0, self.patch - 1)
        cols = (pos[None] - offsets[:, 1:]).clamp(0, self.patch - 1)
        lit = self.templates[labels[:, None, None], rows[:, :, None], cols[:, None, :]] * mask
        return x + self.contrast * lit[:, None], mask

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` labelled images with their evidence masks.

        Labels are uniform (``torch.randint``), then :meth:`images`.

        Args:
            n: number of images.
            generator: a CPU ``torch.Generator``; the global RNG when ``None``.

        Returns:
            ``(x [n, C, H, W], y [n], masks [n, H, W])``.
        """
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        x, mask = self.images(y, generator)
        return x, y, mask

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        x, _ = self.images(torch.full((n,), c, dtype=torch.long), generator)
        return x.reshape(n, -1).to(torch.float64)
