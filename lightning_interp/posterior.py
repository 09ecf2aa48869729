"""Posterior-gap metrics: how far a classifier's softmax is from the exact Bayesian posterior.

Reference:
    Yudi Xie, "How do we interpret the outputs of a neural network trained on classification?",
    ICLR 2025 Blogposts Track (https://hdl.handle.net/1721.1/159032).

Cross-entropy training is minimised by the Bayesian posterior,
``E_x[CE] = E_x[H(p(.|x))] + E_x[KL(p(.|x) || q(.|x))]``, so on a task whose generative model is known
the distance between the network's softmax ``q`` and the posterior ``p`` can be measured exactly.
This module provides

* generative tasks with exact posteriors (:class:`GaussianTask`, :class:`GaussianMixtureTask`, the
  three 1-D presets of the post via :func:`xie_task`), all computed in log space;
* the functional gap measures :func:`posterior_gap`;
* the torchmetrics :class:`PosteriorGap` metric, which adds the excess cross-entropy, the accuracy
  gap, and the gap per bin of input density (*where* the network misses the posterior).

The module is pure torch (plus torchmetrics): it never imports Lightning.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_interp.stats import mean_standard_error

__all__ = [
    "GAP_MEASURES",
    "Estimate",
    "GaussianMixtureTask",
    "GaussianTask",
    "GenerativeTask",
    "PatchImageTask",
    "PosteriorGap",
    "XieTask",
    "posterior_gap",
    "xie_task",
]

#: Names of the measures returned by :func:`posterior_gap`, in a fixed order.
GAP_MEASURES: tuple[str, ...] = ("kl", "reverse_kl", "js", "tv", "l2", "max_abs")

_LOG_2PI = math.log(2.0 * math.pi)


class Estimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error."""

    value: float
    stderr: float


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


class GenerativeTask(ABC):
    """A classification task with a known generative model ``pi_c p(x|c)``.

    Subclasses implement :meth:`class_log_likelihood` (``log p(x|c)``) and :meth:`sample_class`.
    Everything else (sampling labelled data, the exact posterior, Bayes accuracy, conditional
    entropy) follows and is computed in float64 log space, so posteriors stay exact for x far in
    the tails where ``p(x|c)`` underflows.

    Attributes:
        num_classes: number of classes ``K``.
        dim: input dimension ``D``.
        priors: class priors ``pi`` (float64 tensor ``[K]``).
    """

    num_classes: int
    dim: int
    priors: Tensor

    @abstractmethod
    def class_log_likelihood(self, x: Tensor) -> Tensor:
        """``log p(x|c)`` for every class, float64 ``[n, K]``."""

    @abstractmethod
    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` float64 samples ``[n, D]`` from ``p(x|c)``."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input as the model takes it: ``(dim,)``, or ``(C, H, W)`` for image tasks.

        :meth:`sample` returns flat ``[n, dim]`` inputs; ``x.reshape(n, *task.input_shape)`` is what a
        model of the task gets.
        """
        return (self.dim,)

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 1 and self.dim == 1:
            x = x[:, None]
        if x.ndim > 2 and tuple(x.shape[1:]) == self.input_shape:
            x = x.reshape(x.shape[0], -1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [n, {self.dim}], got {list(x.shape)}")
        return x.to(dtype=torch.float64, device="cpu")

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` labelled samples.

        Args:
            n: number of samples.
            generator: a CPU ``torch.Generator``; the global RNG is used when ``None``.

        Returns:
            ``(x, y)``: inputs float32 ``[n, D]`` and labels int64 ``[n]``.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        y = torch.multinomial(self.priors, n, replacement=True, generator=generator) if n else torch.zeros(0, dtype=torch.long)
        x = torch.empty(n, self.dim, dtype=torch.float64)
        for c in range(self.num_classes):
            idx = torch.nonzero(y == c).flatten()
            if idx.numel():
                x[idx] = self.sample_class(c, idx.numel(), generator)
        return x.float(), y

    def log_joint(self, x: Tensor) -> Tensor:
        """``log pi_c + log p(x|c)``, float64 ``[n, K]``."""
        return self.class_log_likelihood(self._check_x(x)) + self.priors.log()[None, :]

    def log_density(self, x: Tensor) -> Tensor:
        """Log marginal density ``log p(x)``, float64 ``[n]``."""
        return torch.logsumexp(self.log_joint(x), dim=1)

    def log_posterior(self, x: Tensor) -> Tensor:
        """Exact log posterior ``log p(c|x)``, float64 ``[n, K]`` on the CPU."""
        return torch.log_softmax(self.log_joint(x), dim=1)

    def posterior(self, x: Tensor) -> Tensor:
        """Exact posterior ``p(c|x)``, float64 ``[n, K]`` on the CPU."""
        return self.log_posterior(x).exp()

    def _mc(self, fn, n: int, generator: torch.Generator | None, chunk: int = 100_000) -> Estimate:
        values = []
        for start in range(0, n, chunk):
            x, y = self.sample(min(chunk, n - start), generator)
            values.append(fn(x, y))
        v = torch.cat(values)
        return Estimate(v.mean().item(), (v.std() / math.sqrt(v.numel())).item())

    def bayes_accuracy(self, n: int = 200_000, generator: torch.Generator | None = None) -> Estimate:
        """Monte-Carlo estimate of the Bayes accuracy ``E_x[max_c p(c|x)]`` with its standard error."""
        return self._mc(lambda x, _y: self.posterior(x).max(dim=1).values, n, generator)

    def conditional_entropy(self, n: int = 200_000, generator: torch.Generator | None = None) -> Estimate:
        """Monte-Carlo estimate of ``H(C|X) = E_x[H(p(.|x))]`` in nats, with its standard error."""

        def entropy(x: Tensor, _y: Tensor) -> Tensor:
            lp = self.log_posterior(x)
            return -(torch.special.xlogy(lp.exp(), lp.exp())).sum(dim=1)

        return self._mc(entropy, n, generator)


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
        if noise <= 0:
            raise ValueError(f"noise must be > 0 for a density (and a posterior), got {noise}")
        self.num_classes, self.image_size, self.channels, self.grid, self.patch = num_classes, image_size, channels, grid, patch
        self.contrast, self.noise, self.cell = float(contrast), float(noise), cell
        self.dim = channels * image_size * image_size
        self.priors = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def class_log_likelihood(self, x: Tensor) -> Tensor:
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

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        offsets = torch.randint(0, self.cell - self.patch + 1, (n, 2), generator=generator)
        x = self.noise * torch.randn(n, *self.input_shape, generator=generator, dtype=torch.float64)
        x = x + self.contrast * self.patch_mask(c, offsets)[:, None].to(torch.float64)
        return x.reshape(n, -1)


def xie_task(preset: int) -> XieTask:
    """The 1-D preset ``preset`` (1, 2 or 3) of Xie (2025); see :class:`XieTask`."""
    return XieTask(preset)


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


class PosteriorGap(Metric):
    """Streaming posterior-gap metric (torchmetrics) over :func:`posterior_gap`.

    ``update(logits, true_posterior, target=None, log_density=None)`` accumulates, in float64, the sums
    of every measure of :data:`GAP_MEASURES`; with labels ``target`` it also accumulates the
    cross-entropy of the network and the conditional entropy of the posterior on the same samples, so
    ``excess_ce = CE(q) - H(C|X)`` is a paired, low-variance estimate (its expectation is the mean
    KL), and ``accuracy_gap = bayes_accuracy - accuracy`` compares the posterior's and the network's
    argmax on the same samples. With ``density_edges`` (increasing log-density bin edges) and
    ``log_density`` in ``update``, each measure is also reported per bin of input density, which
    shows *where* the gap is (the low-density regions of the post's preset 3).

    Args:
        log_target: whether ``true_posterior`` holds log-probabilities.
        density_edges: ``B - 1`` increasing inner bin edges of ``log p(x)``; bins are
            ``(-inf, e_0], (e_0, e_1], ..., (e_{B-2}, inf)``.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = PosteriorGap()
        >>> metric.update(torch.zeros(2, 2), torch.tensor([[0.5, 0.5], [0.9, 0.1]]), target=torch.tensor([0, 0]))
        >>> out = metric.compute()
        >>> sorted(out)[:4]
        ['accuracy', 'accuracy_gap', 'accuracy_gap_se', 'accuracy_se']
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, log_target: bool = False, density_edges: Tensor | Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_target = log_target
        num = len(GAP_MEASURES)
        self.add_state("gap_sum", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gap_sq_sum", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gap_worst", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # ce, entropy, correct (network), correct (posterior), labelled count
        self.add_state("label_sum", torch.zeros(5, dtype=torch.float64), dist_reduce_fx="sum")
        # squares of the per-example excess cross-entropy and of the per-example accuracy difference
        self.add_state("label_sq_sum", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        if density_edges is not None:
            edges = torch.as_tensor(density_edges, dtype=torch.float64).flatten()
            if edges.numel() and (edges[1:] <= edges[:-1]).any():
                raise ValueError("density_edges must be strictly increasing")
            self.register_buffer("density_edges", edges, persistent=False)
            bins = edges.numel() + 1
            self.add_state("bin_sum", torch.zeros(num, bins, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("bin_sq_sum", torch.zeros(num, bins, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("bin_count", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        else:
            self.density_edges = None

    def update(
        self,
        logits: Tensor,
        true_posterior: Tensor,
        target: Tensor | None = None,
        log_density: Tensor | None = None,
    ) -> None:
        """Accumulate a batch; see the class docstring for the arguments."""
        per = _per_sample_gap(logits, true_posterior, self.log_target)
        stacked = torch.stack([per[k] for k in GAP_MEASURES])  # [M, N]
        self.gap_sum += stacked.sum(dim=1)
        self.gap_sq_sum += stacked.pow(2).sum(dim=1)
        if stacked.shape[1]:
            self.gap_worst = torch.maximum(self.gap_worst, stacked.max(dim=1).values)
        self.count += logits.shape[0]
        if target is not None:
            if target.shape != logits.shape[:1]:
                raise ValueError(f"target must have shape [{logits.shape[0]}], got {list(target.shape)}")
            target = target.to(logits.device).long()
            lq = torch.log_softmax(logits.double(), dim=1)
            t = true_posterior.to(device=logits.device, dtype=torch.float64)
            lp = t if self.log_target else t.log()
            ce_i = -lq.gather(1, target[:, None])[:, 0]
            ent_i = -torch.where(lp > -math.inf, lp.exp() * lp, torch.zeros_like(lp)).sum(dim=1)
            hit_q = (lq.argmax(dim=1) == target).double()
            hit_p = (lp.argmax(dim=1) == target).double()
            ce, ent, correct_q, correct_p = ce_i.sum(), ent_i.sum(), hit_q.sum(), hit_p.sum()
            self.label_sq_sum += torch.stack([(ce_i - ent_i).pow(2).sum(), (hit_p - hit_q).pow(2).sum()])
            self.label_sum += torch.stack(
                [
                    ce,
                    ent,
                    correct_q.double(),
                    correct_p.double(),
                    torch.tensor(float(len(target)), dtype=torch.float64, device=logits.device),
                ]
            )
        if self.density_edges is not None:
            if log_density is None:
                raise ValueError("this PosteriorGap has density_edges: pass log_density=task.log_density(x) to update()")
            idx = torch.bucketize(log_density.to(device=logits.device, dtype=torch.float64), self.density_edges.to(logits.device))
            self.bin_sum.index_add_(1, idx, stacked)
            self.bin_sq_sum.index_add_(1, idx, stacked.pow(2))
            self.bin_count += torch.bincount(idx, minlength=self.bin_count.numel()).double()

    def compute(self) -> dict[str, Tensor]:
        """The mean of every gap measure, plus the labelled and per-density-bin summaries when available.

        Returns:
            ``{measure: mean}`` for :data:`GAP_MEASURES`, with ``<measure>_se`` (the standard error of
            that mean over the examples, :func:`~lightning_interp.stats.mean_standard_error`) and ``<measure>_worst`` (the
            largest per-example value: ``max_abs_worst`` is the worst ``|p - q|`` over the examples);
            with labels also ``cross_entropy``, ``conditional_entropy``, ``excess_ce``, ``accuracy``,
            ``bayes_accuracy`` and ``accuracy_gap`` (the last four with ``_se``); with density bins
            ``<measure>_by_density`` and ``<measure>_se_by_density`` (``[B]``, NaN for an empty bin)
            and ``count_by_density``.
        """
        out = {k: self.gap_sum[i] / self.count for i, k in enumerate(GAP_MEASURES)}
        for i, k in enumerate(GAP_MEASURES):
            out[f"{k}_se"] = mean_standard_error(self.gap_sum[i], self.gap_sq_sum[i], self.count)
            out[f"{k}_worst"] = self.gap_worst[i].clone()
        n = self.label_sum[4]
        if n > 0:
            ce, ent, cq, cp = (self.label_sum[i] / n for i in range(4))
            out.update(
                cross_entropy=ce,
                conditional_entropy=ent,
                excess_ce=ce - ent,
                excess_ce_se=mean_standard_error(self.label_sum[0] - self.label_sum[1], self.label_sq_sum[0], n),
                accuracy=cq,
                accuracy_se=mean_standard_error(self.label_sum[2], self.label_sum[2], n),  # 0/1 values: x^2 = x
                bayes_accuracy=cp,
                bayes_accuracy_se=mean_standard_error(self.label_sum[3], self.label_sum[3], n),
                accuracy_gap=cp - cq,
                accuracy_gap_se=mean_standard_error(self.label_sum[3] - self.label_sum[2], self.label_sq_sum[1], n),
            )
        if self.density_edges is not None:
            count = self.bin_count[None, :]
            per_bin = self.bin_sum / count.clamp_min(1)
            per_bin = torch.where(count > 0, per_bin, torch.full_like(per_bin, math.nan))
            se_bin = mean_standard_error(self.bin_sum, self.bin_sq_sum, count)
            for i, k in enumerate(GAP_MEASURES):
                out[f"{k}_by_density"] = per_bin[i]
                out[f"{k}_se_by_density"] = se_bin[i]
            out["count_by_density"] = self.bin_count.clone()
        return out
