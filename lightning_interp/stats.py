"""Error bars shared by the methods: standard errors of means, from values or from running sums.

Pure torch, no Lightning. Every estimate a callback logs as ``X`` comes with ``X_se`` computed here.

Example:
    >>> import torch
    >>> mean, se = mean_and_se(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    >>> round(mean.item(), 4), round(se.item(), 4)
    (2.3333, 0.8819)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mean_and_se", "mean_standard_error", "replicate_standard_error"]


def mean_standard_error(total: Tensor, total_sq: Tensor, count: Tensor | float) -> Tensor:
    """Standard error of a mean from running sums: ``sqrt(s^2 / n)`` with the unbiased sample variance ``s^2``.

    Args:
        total: ``sum x_i``.
        total_sq: ``sum x_i^2``.
        count: ``n`` (the result is NaN where ``n < 2``).

    Example:
        >>> x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> bool(torch.isclose(mean_standard_error(x.sum(), x.pow(2).sum(), 3), x.std() / 3**0.5))
        True
    """
    n = torch.as_tensor(count, dtype=torch.float64, device=total.device)
    mean = total / n.clamp_min(1)
    var = ((total_sq - n * mean * mean) / (n - 1).clamp_min(1)).clamp_min(0)
    return torch.where(n >= 2, (var / n.clamp_min(1)).sqrt(), torch.full_like(var, math.nan))


def mean_and_se(values: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """The mean of ``values`` along ``dim`` (float64) and its standard error (NaN for fewer than 2 values)."""
    v = values.to(torch.float64)
    n = v.shape[dim]
    return v.mean(dim=dim), mean_standard_error(v.sum(dim=dim), v.pow(2).sum(dim=dim), n)


def replicate_standard_error(replicates: Tensor, kind: str) -> Tensor:
    """Standard error of an estimate from its jackknife or bootstrap replicates (along dim 0).

    Args:
        replicates: ``[R, ...]`` the estimate recomputed on each replicate.
        kind: ``"jackknife"`` (leave-one-out replicates: ``sqrt((R - 1) / R * sum (x_r - mean)^2)``) or
            ``"bootstrap"`` (resampled replicates: their standard deviation).

    Returns:
        ``[...]`` float64; NaN where a replicate is NaN or ``R < 2``.

    Example:
        >>> x = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
        >>> loo = (x.sum() - x) / 3  # leave-one-out means: the jackknife SE of a mean is the usual one
        >>> bool(torch.isclose(replicate_standard_error(loo, "jackknife"), x.std() / 2))
        True
    """
    if kind not in ("jackknife", "bootstrap"):
        raise ValueError(f"kind must be 'jackknife' or 'bootstrap', got {kind!r}")
    r = replicates.to(torch.float64)
    n = r.shape[0]
    if n < 2:
        return torch.full(r.shape[1:], math.nan, dtype=torch.float64, device=r.device)
    dev = r - r.mean(dim=0, keepdim=True)
    ss = (dev * dev).sum(dim=0)
    return (ss * (n - 1) / n).sqrt() if kind == "jackknife" else (ss / (n - 1)).sqrt()
