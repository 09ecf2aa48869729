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

__all__ = ["mean_and_se", "mean_standard_error"]


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
