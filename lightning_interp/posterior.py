"""Posterior-gap metrics: how far a classifier's softmax is from the exact Bayesian posterior.

Reference:
    Yudi Xie, "How do we interpret the outputs of a neural network trained on classification?",
    ICLR 2025 Blogposts Track (https://hdl.handle.net/1721.1/159032).

Cross-entropy training is minimised by the Bayesian posterior,
``E_x[CE] = E_x[H(p(.|x))] + E_x[KL(p(.|x) || q(.|x))]``, so on a task whose generative model is known
the distance between the network's softmax ``q`` and the posterior ``p`` can be measured exactly.
The tasks with exact posteriors live in :mod:`lightning_interp.tasks`. This module provides

* the functional gap measures :func:`posterior_gap`;
* the torchmetrics :class:`PosteriorGap` metric (imported on first use), which adds the excess cross-entropy, the accuracy
  gap, and the gap per bin of input density (*where* the network misses the posterior).

The module is pure torch: it never imports Lightning, and torchmetrics (which pulls torchvision, scipy and
matplotlib, seconds of import) only when :class:`PosteriorGap` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_interp._posterior_metric import PosteriorGap

__all__ = ["GAP_MEASURES", "PosteriorGap", "posterior_gap"]

#: Names of the measures returned by :func:`posterior_gap`, in a fixed order.
GAP_MEASURES: tuple[str, ...] = ("kl", "reverse_kl", "js", "tv", "l2", "max_abs")


# ---------------------------------------------------------------------------------------------
# Gap measures
# ---------------------------------------------------------------------------------------------


def _per_sample_gap(logits: Tensor, true_posterior: Tensor, log_target: bool) -> dict[str, Tensor]:
    if not isinstance(logits, Tensor) or not isinstance(true_posterior, Tensor):
        raise TypeError("logits and true_posterior must be torch.Tensors")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {list(logits.shape)}")
    if true_posterior.shape != logits.shape:
        raise ValueError(f"true_posterior must have the shape of logits {list(logits.shape)}, got {list(true_posterior.shape)}")
    t = true_posterior.to(device=logits.device, dtype=torch.float64)
    q = torch.softmax(logits.to(torch.float64), dim=1)
    if log_target:
        lp, p = t, t.exp()
    else:
        p, lp = t, t.log()
    lq = torch.log_softmax(logits.to(torch.float64), dim=1)
    same = p == q  # exact zero where the distributions agree bit for bit

    def kl(a: Tensor, la: Tensor, lb: Tensor) -> Tensor:
        term = torch.where(a > 0, a * (la - lb), torch.zeros_like(a))
        return torch.where(same, torch.zeros_like(term), term).sum(dim=1)

    m = 0.5 * (p + q)
    lm = m.log()
    diff = p - q
    return {
        "kl": kl(p, lp, lq),
        "reverse_kl": kl(q, lq, lp),
        "js": 0.5 * kl(p, lp, lm) + 0.5 * kl(q, lq, lm),
        "tv": 0.5 * diff.abs().sum(dim=1),
        "l2": (diff * diff).sum(dim=1),
        "max_abs": diff.abs().max(dim=1).values,
    }


def posterior_gap(logits: Tensor, true_posterior: Tensor, log_target: bool = False, reduction: str = "mean") -> dict[str, Tensor]:
    """Distances between the softmax of ``logits`` and the true posterior.

    With ``q = softmax(logits)`` and ``p`` the true posterior, per sample:
    ``kl = KL(p||q)``, ``reverse_kl = KL(q||p)``, ``js`` (Jensen-Shannon, nats),
    ``tv = 0.5 * sum|p - q|``, ``l2 = sum (p - q)^2`` and ``max_abs = max_c |p - q|``.
    Accumulation is in float64 and every measure is exactly zero where ``q`` equals ``p``.

    Args:
        logits: network outputs ``[N, K]``.
        true_posterior: ``p(c|x)`` ``[N, K]`` (log-probabilities if ``log_target``).
        log_target: whether ``true_posterior`` holds log-probabilities (more precise in the tails).
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (per-sample values ``[N]``).

    Returns:
        A dict from the names in :data:`GAP_MEASURES` to float64 tensors on the device of ``logits``.

    Raises:
        TypeError: inputs that are not tensors.
        ValueError: shapes that are not matching ``[N, K]`` or an unknown reduction.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0]])
        >>> gap = posterior_gap(logits, torch.tensor([[0.75, 0.25]]))
        >>> round(gap["tv"].item(), 4)
        0.25
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    per = _per_sample_gap(logits, true_posterior, log_target)
    if reduction == "none":
        return per
    if reduction == "sum":
        return {k: v.sum() for k, v in per.items()}
    return {k: v.mean() for k, v in per.items()}


def __getattr__(name: str) -> Any:
    """Import the torchmetrics metric :class:`PosteriorGap` on first use (PEP 562)."""
    if name == "PosteriorGap":
        from lightning_interp._posterior_metric import PosteriorGap

        globals()[name] = PosteriorGap
        return PosteriorGap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
