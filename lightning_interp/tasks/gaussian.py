"""Gaussian and Gaussian-mixture class conditionals, and the three 1-D presets of Xie (2025).

Reference for the presets: Yudi Xie, "How do we interpret the outputs of a neural network trained on
classification?", ICLR 2025 Blogposts Track.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_interp.tasks.base import GenerativeTask

__all__ = ["GaussianMixtureTask", "GaussianTask", "XieTask", "xie_task"]

_LOG_2PI = math.log(2.0 * math.pi)


def _as_float64(value: Tensor | Sequence, name: str) -> Tensor:
    try:
        return torch.as_tensor(value, dtype=torch.float64).clone()
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor or a nested sequence of numbers, got {type(value).__name__}") from err


def _check_priors(priors: Tensor | Sequence[float] | None, num_classes: int) -> Tensor:
    if priors is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    p = _as_float64(priors, "priors")
    if p.shape != (num_classes,):
        raise ValueError(f"priors must have shape [{num_classes}] (one per class), got {list(p.shape)}")
    if (p <= 0).any() or not torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64)):
        raise ValueError(f"priors must be positive and sum to 1, got {p.tolist()}")
    return p


def _gaussian_log_density(x: Tensor, means: Tensor, chol: Tensor) -> Tensor:
    """``log N(x; means[m], L L^T)`` for every row of ``x`` and every component ``m``: ``[n, M]``."""
    diff = x[:, None, :] - means[None, :, :]  # [n, M, D]
    # Solve L z = diff for each component: z = L^{-1} diff.
    z = torch.linalg.solve_triangular(chol[None], diff.unsqueeze(-1), upper=False).squeeze(-1)
    maha = (z * z).sum(-1)
    half_logdet = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # [M]
    dim = x.shape[1]
    return -0.5 * (maha + dim * _LOG_2PI) - half_logdet[None, :]


def _cholesky(covariances: Tensor, name: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(covariances)
    if (info != 0).any():
        bad = torch.nonzero(info.reshape(-1)).flatten().tolist()
        raise ValueError(f"{name} must be symmetric positive definite; entries {bad} are not")
    return chol


class GaussianMixtureTask(GenerativeTask):
    """Each class is a mixture of Gaussians, so the posterior can be as complex as wanted.

    Args:
        weights: per class, the mixture weights ``[M_c]`` (summing to 1).
        means: per class, the component means ``[M_c, D]``.
        covariances: per class, the component covariances ``[M_c, D, D]``.
        priors: class priors ``[K]``; uniform when ``None``.

    Raises:
        ValueError: inconsistent shapes, weights that are not a distribution, or covariances that
            are not positive definite.

    Example:
        >>> task = GaussianMixtureTask(
        ...     weights=[[0.5, 0.5], [1.0]],
        ...     means=[[[-3.0], [3.0]], [[0.0]]],
        ...     covariances=[[[[1.0]], [[1.0]]], [[[1.0]]]],
        ... )
        >>> x, y = task.sample(8, torch.Generator().manual_seed(0))
        >>> task.posterior(x).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        weights: Sequence[Tensor | Sequence[float]],
        means: Sequence[Tensor | Sequence[Sequence[float]]],
        covariances: Sequence[Tensor | Sequence[Sequence[Sequence[float]]]],
        priors: Tensor | Sequence[float] | None = None,
    ) -> None:
        if not (len(weights) == len(means) == len(covariances)) or len(means) < 2:
            raise ValueError("weights, means and covariances need one entry per class, and at least 2 classes")
        self.num_classes = len(means)
        self.weights = [_as_float64(w, "weights") for w in weights]
        self.means = [_as_float64(m, "means") for m in means]
        self.covariances = [_as_float64(s, "covariances") for s in covariances]
        self.dim = self.means[0].shape[-1]
        for c, (w, m, s) in enumerate(zip(self.weights, self.means, self.covariances, strict=True)):
            if m.ndim != 2 or m.shape[1] != self.dim:
                raise ValueError(f"means[{c}] must have shape [M, {self.dim}], got {list(m.shape)}")
            if s.shape != (m.shape[0], self.dim, self.dim):
                raise ValueError(f"covariances[{c}] must have shape {[m.shape[0], self.dim, self.dim]}, got {list(s.shape)}")
            if w.shape != (m.shape[0],) or (w < 0).any() or not math.isclose(w.sum().item(), 1.0, abs_tol=1e-9):
                raise ValueError(f"weights[{c}] must be {m.shape[0]} non-negative numbers summing to 1, got {w.tolist()}")
        self.chols = [_cholesky(s, f"covariances[{c}]") for c, s in enumerate(self.covariances)]
        self.priors = _check_priors(priors, self.num_classes)

    def class_log_likelihood(self, x: Tensor) -> Tensor:
        x = self._check_x(x)
        cols = []
        for w, m, chol in zip(self.weights, self.means, self.chols, strict=True):
            comp = _gaussian_log_density(x, m, chol) + torch.log(w)[None, :]
            cols.append(torch.logsumexp(comp, dim=1))
        return torch.stack(cols, dim=1)

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.weights[c], n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[c][comp] + (self.chols[c][comp] @ z.unsqueeze(-1)).squeeze(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, dim={self.dim})"


class GaussianTask(GaussianMixtureTask):
    """Gaussian class-conditionals ``p(x|c) = N(means[c], covariances[c])``.

    Args:
        means: class means ``[K, D]``.
        covariances: class covariances ``[K, D, D]``.
        priors: class priors ``[K]``; uniform when ``None``.

    Example:
        >>> task = GaussianTask(means=[[0.0], [3.0]], covariances=[[[1.0]], [[1.0]]])
        >>> round(task.posterior(torch.tensor([[1.5]]))[0, 0].item(), 6)
        0.5
    """

    def __init__(
        self,
        means: Tensor | Sequence[Sequence[float]],
        covariances: Tensor | Sequence[Sequence[Sequence[float]]],
        priors: Tensor | Sequence[float] | None = None,
    ) -> None:
        m = _as_float64(means, "means")
        s = _as_float64(covariances, "covariances")
        if m.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {list(m.shape)}")
        if s.shape != (m.shape[0], m.shape[1], m.shape[1]):
            raise ValueError(f"covariances must have shape {[m.shape[0], m.shape[1], m.shape[1]]}, got {list(s.shape)}")
        super().__init__(
            weights=[torch.ones(1, dtype=torch.float64)] * m.shape[0],
            means=[m[c : c + 1] for c in range(m.shape[0])],
            covariances=[s[c : c + 1] for c in range(m.shape[0])],
            priors=priors,
        )


#: The three 1-D presets of the post: (mu1, s1), (mu2, s2), equal priors.
XIE_PRESETS: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {
    1: ((0.0, 1.0), (3.0, 1.0)),
    2: ((0.0, 2.0), (1.0, 1.0)),
    3: ((0.0, 2.0), (3.0, 1.0)),
}


class XieTask(GaussianTask):
    """One of the three 1-D two-class presets of Xie (2025) (docs/posterior.md).

    ======  =========  =========  ===========================  ================
    preset  mu1, s1    mu2, s2    log p(c1|x) / p(c2|x)         Bayes accuracy
    ======  =========  =========  ===========================  ================
    1       0, 1       3, 1       4.5 - 3x                      0.9332
    2       0, 2       1, 1       0.375x^2 - x - 0.19315        0.6950
    3       0, 2       3, 1       0.375x^2 - 3x + 3.80685       0.8539
    ======  =========  =========  ===========================  ================

    Args:
        preset: 1, 2 or 3.

    Raises:
        ValueError: an unknown preset.
    """

    def __init__(self, preset: int = 1) -> None:
        if preset not in XIE_PRESETS:
            raise ValueError(f"preset must be one of {sorted(XIE_PRESETS)}, got {preset!r}")
        (m1, s1), (m2, s2) = XIE_PRESETS[preset]
        super().__init__(means=[[m1], [m2]], covariances=[[[s1**2]], [[s2**2]]])
        self.preset = preset

    def log_odds_coefficients(self) -> tuple[float, float, float]:
        """``(c0, c1, c2)`` with ``log p(c1|x)/p(c2|x) = c0 + c1 x + c2 x^2`` (closed form)."""
        (m1, s1), (m2, s2) = XIE_PRESETS[self.preset]
        c2 = 0.5 / s2**2 - 0.5 / s1**2
        c1 = m1 / s1**2 - m2 / s2**2
        c0 = 0.5 * m2**2 / s2**2 - 0.5 * m1**2 / s1**2 + math.log(s2 / s1)
        return c0, c1, c2

    def __repr__(self) -> str:
        return f"XieTask(preset={self.preset})"


def xie_task(preset: int) -> XieTask:
    """The 1-D preset ``preset`` (1, 2 or 3) of Xie (2025); see :class:`XieTask`."""
    return XieTask(preset)
