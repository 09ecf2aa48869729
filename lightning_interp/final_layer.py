"""The final layer's weights: the asymmetric-Laplace audit, the recursive channel split, and the map arithmetic.

Reference:
    Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022);
    definitions in docs/saliency.md (a).

* :func:`fit_ald` audits each class row of a final ``nn.Linear``'s weight: on each side (positive weights,
  magnitudes of negative weights) ``log sort(y) ~ slope * r + intercept`` on the normalised rank ``r = i / L``,
  with ``R^2`` and the asymmetric-Laplace parameters; plus pooled ("joint") fits;
* :func:`split_chain` is the recursive mean split of a class row (:func:`chain_masks` the last subsets of
  many rows at once): the last ``"+"`` subset is the most discriminative channel set, the last ``"-"``
  subset the most confusing one;
* :func:`channel_set_map`, :func:`minmax_normalize` and :func:`bilinear_upsample`: the arithmetic of the
  maps that :mod:`lightning_interp.saliency_maps` makes of them.

Pure torch: imports neither Lightning, captum nor matplotlib. Every public name is also importable from
:mod:`lightning_interp.saliency`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_interp.checks import check_int

__all__ = [
    "ALDFit",
    "ALDSide",
    "bilinear_upsample",
    "chain_masks",
    "channel_set_map",
    "fit_ald",
    "full_tensor",
    "minmax_normalize",
    "split_chain",
]


def full_tensor(weight: Tensor) -> Tensor:
    """The whole of a weight that may be a sharded ``DTensor`` (FSDP2, tensor parallelism); others as they are.

    A collective for a sharded ``DTensor``: every rank must read the weight together.
    """
    full = getattr(weight, "full_tensor", None)
    return full() if callable(full) else weight


@dataclass
class ALDSide:
    """Log-rank fits of one side of the weights. Every field has the same shape (``[K]`` or ``[]``).

    Attributes:
        slope: ``a`` of ``log y ~ a * r + b``.
        intercept: ``b``.
        r2: coefficient of determination of the fit.
        kappa: asymmetric-Laplace asymmetry ``sqrt(e^b / (a - e^b))`` (NaN where ``a <= e^b``).
        lam: asymmetric-Laplace rate ``a * kappa``.
        mean: ``(1 - kappa^2) / (lambda * kappa)``.
        count: number of weights on this side (zeros excluded).
    """

    slope: Tensor
    intercept: Tensor
    r2: Tensor
    kappa: Tensor
    lam: Tensor
    mean: Tensor
    count: Tensor


@dataclass
class ALDFit:
    """Result of :func:`fit_ald`: per-class fits (``[K]``) and pooled fits (0-d) on each side."""

    positive: ALDSide
    negative: ALDSide
    joint_positive: ALDSide
    joint_negative: ALDSide

    def rows(self) -> list[dict[str, float]]:
        """One dict per class (``class``, then ``pos_<field>`` and ``neg_<field>``), for tables."""
        out = []
        for c in range(self.positive.slope.numel()):
            row: dict[str, float] = {"class": c}
            for prefix, side in (("pos", self.positive), ("neg", self.negative)):
                for f in fields(side):
                    row[f"{prefix}_{f.name}"] = float(getattr(side, f.name)[c])
            out.append(row)
        return out


def _fit_side(values: Tensor) -> tuple[float, ...]:
    """Fit one side; ``values`` are positive magnitudes (any order)."""
    n = values.numel()
    nan = math.nan
    if n < 2:
        return (nan, nan, nan, nan, nan, nan, float(n))
    y = torch.sort(values.double()).values.log()
    r = torch.arange(n, dtype=torch.float64) / n
    r_c, y_c = r - r.mean(), y - y.mean()
    slope = (r_c * y_c).sum() / (r_c * r_c).sum()
    intercept = y.mean() - slope * r.mean()
    ss_res = ((y - (slope * r + intercept)) ** 2).sum()
    ss_tot = (y_c * y_c).sum()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else torch.tensor(1.0 if ss_res == 0 else nan, dtype=torch.float64)
    a, b = slope.item(), intercept.item()
    denom = a - math.exp(b)
    kappa = math.sqrt(math.exp(b) / denom) if denom > 0 else nan
    lam = a * kappa
    mean = (1 - kappa**2) / (lam * kappa) if lam * kappa != 0 else nan
    return (a, b, float(r2), kappa, lam, mean, float(n))


def _stack_sides(results: Sequence[tuple[float, ...]]) -> ALDSide:
    t = torch.tensor(results, dtype=torch.float64).reshape(-1, 7)
    cols = [t[:, i] if t.shape[0] > 1 else t[0, i] for i in range(7)]
    return ALDSide(*cols)


def fit_ald(weight: Tensor) -> ALDFit:
    """Asymmetric-Laplace audit of a final layer's weight matrix (docs/saliency.md (a)).

    Per class row ``w = weight[c]`` and side (positive ``w[w > 0]``, negative ``-w[w < 0]``; zeros are
    excluded) the sorted magnitudes are fitted as ``log y ~ slope * (i / L) + intercept`` by least
    squares, and converted to asymmetric-Laplace parameters. The joint fits pool every positive (every
    negative) weight of the matrix. A side with fewer than 2 weights gives NaN, not an exception.

    Args:
        weight: ``[K, D]`` (or ``[D]`` for a single class).

    Returns:
        An :class:`ALDFit` with float64 CPU tensors.

    Example:
        >>> L = 50
        >>> y = torch.exp(2.0 * torch.arange(L) / L - 3.0)
        >>> fit = fit_ald(y[torch.randperm(L)][None])
        >>> round(fit.positive.slope.item(), 6), round(fit.positive.intercept.item(), 6), round(fit.positive.r2.item(), 6)
        (2.0, -3.0, 1.0)
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    w = weight.detach().to("cpu", torch.float64)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2:
        raise ValueError(f"weight must have shape [K, D], got {list(weight.shape)}")
    pos = _stack_sides([_fit_side(row[row > 0]) for row in w])
    neg = _stack_sides([_fit_side(-row[row < 0]) for row in w])
    return ALDFit(
        positive=pos,
        negative=neg,
        joint_positive=_stack_sides([_fit_side(w[w > 0])]),
        joint_negative=_stack_sides([_fit_side(-w[w < 0])]),
    )


def split_chain(w: Tensor, side: Literal["+", "-"] = "+", min_size: int = 20) -> list[Tensor]:
    """The recursive mean split of one class row (docs/saliency.md (a)), every level.

    Level 0 is every channel. Each next level keeps, of the current subset ``S``, the channels with
    ``w_k >= mean(w_S)`` (``"+"``) or ``w_k < mean(w_S)`` (``"-"``), and is split again while it has at
    least ``min_size`` channels. The last ``"+"`` level is the most discriminative channel set, the
    last ``"-"`` level the most confusing one.

    Args:
        w: weights ``[D]``.
        side: ``"+"`` or ``"-"``.
        min_size: a subset with fewer channels is not split further.

    Returns:
        Channel indices (``LongTensor``, increasing, on ``w``'s device) of every level, from all channels to
        the last.

    Raises:
        ValueError: an unknown ``side``, an empty or non-vector ``w``, or ``min_size < 1``.

    Example:
        >>> [c.tolist() for c in split_chain(torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]), "+", min_size=2)]
        [[0, 1, 2, 3, 4], [4]]
    """
    if side not in ("+", "-"):
        raise ValueError(f"side must be '+' or '-', got {side!r}")
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty vector [D], got shape {list(w.shape)}")
    check_int("min_size", min_size, 1)
    # on the CPU whatever the device: the sums then run in the same order as for the cached masks of many classes
    levels = _chain_levels(w.detach().cpu()[None], side, min_size, every=True)
    return [torch.nonzero(level[0])[:, 0].to(w.device) for level in levels]


def _chain_levels(values: Tensor, side: str, min_size: int, every: bool = False) -> list[Tensor]:
    """The recursive split of every row of ``values`` ``[M, D]`` at once, as masks ``[M, D]``.

    A row stops at its last split; the loop ends when no row splits. Each level's sum is the last
    cumulative sum along the row, a sum in float64 in the row's order that is the same for one row as for
    many, so :func:`split_chain` and the cached masks of many classes agree exactly.

    Args:
        values: ``[M, D]``.
        side: ``"+"`` or ``"-"``.
        min_size: a subset with fewer channels is not split further.
        every: return every level (from all channels to the last), not only the last.

    Returns:
        The masks of the levels (``every``) or ``[last]``.
    """
    values = values.to(torch.float64)
    mask = torch.ones_like(values, dtype=torch.bool)
    levels = [mask]
    while True:
        size = mask.sum(dim=1)
        mean = torch.where(mask, values, 0.0).cumsum(dim=1)[:, -1:] / size[:, None]
        keep = mask & (values >= mean if side == "+" else values < mean)
        kept = keep.sum(dim=1)
        split = (size >= min_size) & (kept > 0) & (kept < size)
        if not split.any():
            return levels if every else [mask]
        mask = torch.where(split[:, None], keep, mask)
        levels.append(mask)


def channel_set_map(features: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
    """The paper's map of a channel set (closed-form Grad-CAM++ of ``sum_{k in S} sum_ij A_kij``).

    ``M(i, j) = relu(sum_{k in S} (H * W / (2 + sum_ab A[k, a, b])) * A[k, i, j])``, then min-max
    normalised per sample (a constant map becomes 0). ``A`` is taken after a ReLU: the paper's feature
    maps are post-ReLU activations, and for signed maps (token layers, pre-activation features) this
    keeps the denominator ``2 + sum A >= 2``.

    Args:
        features: ``A`` ``[N, D, H, W]``.
        mask: channel membership ``[D]`` or per sample ``[N, D]`` (bool or 0/1).
        normalize: min-max normalise each map.

    Returns:
        ``[N, H, W]``.
    """
    n, d, h, w = features.shape
    features = F.relu(features)
    mask = mask.to(features.dtype)
    if mask.ndim == 1:
        mask = mask.expand(n, d)
    coef = mask * (h * w) / (2.0 + features.sum(dim=(2, 3)))
    maps = F.relu(torch.einsum("nd,ndhw->nhw", coef, features))
    return minmax_normalize(maps) if normalize else maps


def bilinear_upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(maps, size, mode="bilinear", align_corners=False)`` as two small matrix products.

    Bilinear interpolation is separable: ``A_h @ map @ A_w^T`` with the ``[H, h]`` and ``[W, w]`` matrices of
    1-d linear interpolation. For many small maps (a ResNet's 7x7 maps of 1000 classes to 224x224) the two
    products run at matrix-multiply speed, several times faster than the per-pixel kernel.
    """
    h, w = maps.shape[-2:]
    big_h, big_w = int(size[0]), int(size[1])

    def matrix(n: int, big: int) -> Tensor:  # [big, n]: column i is the interpolation of the unit vector e_i
        eye = torch.eye(n, dtype=maps.dtype, device=maps.device)[:, None, :]
        return F.interpolate(eye, size=big, mode="linear", align_corners=False)[:, 0, :].T

    return torch.matmul(matrix(h, big_h), torch.matmul(maps, matrix(w, big_w).T))


def minmax_normalize(maps: Tensor) -> Tensor:
    """Min-max normalise each map over its last two dimensions (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(dim=-1)[..., None, None], flat.amax(dim=-1)[..., None, None]
    span = (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny)
    return torch.where(hi > lo, (maps - lo) / span, torch.zeros_like(maps))


def chain_masks(rows: Tensor, side: str, min_size: int) -> Tensor:
    """Membership ``[M, D]`` (bool, on ``rows``' device) of the last chain subset of each row of ``rows`` ``[M, D]``."""
    # on a CPU copy, as split_chain: the cumulative sums then run in the same order
    return _chain_levels(rows.detach().cpu(), side, min_size)[-1].to(rows.device)
