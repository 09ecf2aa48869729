"""Class moments of a layer, their Gaussian closure through a network, and the accuracy they imply.

The theory side of correlation orders (Fischer, René, Keup, Layer, Dahmen, Helias, Physical Review Research 4,
043143, 2022; definitions follow docs/correlation.md): a layer's class-conditional Gaussian ``(mean, cov)``
(from :class:`ClassMoments`: streaming, mergeable float64 moments, with a low-rank-plus-diagonal mode for
wide layers, and Gaussian draws from them) is carried to the logits by
:func:`propagate_moments` (``Linear`` / ``Flatten`` / ``Identity`` / ``Dropout`` / ``ReLU`` /
:class:`~lightning_interp.encoding.Quadratic`), and :func:`theory_accuracy` turns the logit Gaussians into an
accuracy. The names are also importable from :mod:`lightning_interp.correlation`. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_interp.checks import check_int
from lightning_interp.encoding import Quadratic

__all__ = ["ClassMoments", "bivariate_normal_cdf", "propagate_moments", "relu_moments", "theory_accuracy"]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# streaming moments
# ---------------------------------------------------------------------------------------------


class ClassMoments:
    """Streaming per-class mean and covariance of a layer's output (float64, mergeable).

    ``update(features, labels)`` accumulates counts, sums and second moments per class (inputs are
    flattened to ``[N, D]``). Merging two accumulators (for example the ranks of a DDP run) is exact in
    full mode. For ``D > max_dim`` the second moments are kept as a low-rank-plus-diagonal
    approximation: per class a Frequent-Directions sketch ``B`` (``2 * rank x D``, Liberty 2013) with
    ``B^T B ~ X^T X`` (error at most ``||X||_F^2 / rank`` in spectral norm) plus the exact diagonal, so
    the covariance is ``low-rank + diagonal`` with exact marginal variances; memory is
    ``O(K * rank * D)`` instead of ``O(K * D^2)`` (a 6272-dim layer with 10 classes and rank 64 takes
    about 70 MB instead of 3 GB). Per unit third and fourth moments give the excess kurtosis.

    Args:
        num_classes: number of classes ``K``.
        max_dim: widest layer kept in full; wider layers use the low-rank-plus-diagonal mode.
        rank: sketch rank of the low-rank mode.
        covariances: accumulate second moments between units (``False`` keeps only per-unit moments:
            means, variances and kurtosis, for example next to :func:`~lightning_interp.correlation.gaussian_surrogates`).

    Example:
        >>> m = ClassMoments(2)
        >>> m.update(torch.randn(100, 3), torch.randint(0, 2, (100,)))
        >>> m.covariance(0).shape
        torch.Size([3, 3])
    """

    def __init__(self, num_classes: int, max_dim: int = 2048, rank: int = 64, covariances: bool = True) -> None:
        check_int("num_classes", num_classes, 1)
        self.num_classes, self.max_dim, self.rank, self.covariances = num_classes, max_dim, rank, covariances
        self.dim: int | None = None
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        # per class and unit power sums [K, D] (D = 0 until the first update)
        self.sum, self.diag, self.third, self.fourth = (torch.zeros(num_classes, 0, dtype=torch.float64) for _ in range(4))
        self.second: Tensor | None = None  # [K, D, D] in full mode
        self.sketch: list[Tensor] | None = None  # per class [rows, D] in low-rank mode
        self._cache: dict[object, object] = {}  # factorizations, cleared by update() and merge()

    @property
    def low_rank(self) -> bool:
        return self.dim is not None and self.dim > self.max_dim

    def _init(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        k = self.num_classes
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count = self.count.to(device)
        self.sum, self.diag, self.third, self.fourth = z(k, dim), z(k, dim), z(k, dim), z(k, dim)
        if not self.covariances:
            return
        if self.low_rank:
            self.sketch = [z(0, dim) for _ in range(k)]
        else:
            self.second = z(k, dim, dim)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate a batch of features ``[N, ...]`` (flattened) with class labels ``[N]``."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(
                f"features must be a floating-point tensor, got {getattr(features, 'dtype', type(features).__name__)}"
            )
        x = features.detach().reshape(features.shape[0], -1).to(torch.float64)
        labels = labels.to(x.device).long()
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        self._cache.clear()
        if self.dim is None:
            self._init(x.shape[1], x.device)
        elif x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dims, earlier batches {self.dim}")
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float64).T  # [K, N]
        self.count += onehot.sum(dim=1)
        x2 = x * x
        self.sum += onehot @ x
        self.diag += onehot @ x2
        self.third += onehot @ (x2 * x)
        self.fourth += onehot @ (x2 * x2)
        if not self.covariances:
            return
        if self.low_rank:
            for c in range(self.num_classes):
                rows = x[labels == c]
                if rows.numel():
                    self.sketch[c] = self._shrink(torch.cat([self.sketch[c], rows]))  # type: ignore[index]
        else:
            for c in range(self.num_classes):
                rows = x[labels == c]
                if rows.numel():
                    self.second[c] += rows.T @ rows  # type: ignore[index]

    def _shrink(self, b: Tensor) -> Tensor:
        """Frequent-Directions shrink of a sketch to at most ``2 * rank`` rows.

        The right singular vectors come from the eigen-decomposition of the small Gram matrix ``B B^T``
        (``m x m``, ``m <= 2 * rank + batch``): the same shrink as an SVD of ``B`` at a fraction of the cost
        for wide layers. Directions with ``s^2 <= s_rank^2`` are dropped by the shrink anyway, so the
        squared condition number of the Gram matrix does not matter.
        """
        if b.shape[0] <= 2 * self.rank:
            return b
        evals, evecs = torch.linalg.eigh(b @ b.T)  # ascending
        s2, u = evals.flip(0).clamp_min(0), evecs.flip(1)
        delta = s2[self.rank]
        keep = s2[: self.rank]
        scale = torch.where(keep > delta, ((keep - delta) / keep.clamp_min(1e-300)).sqrt(), torch.zeros_like(keep))
        return scale[:, None] * (u[:, : self.rank].T @ b)

    def merge(self, other: ClassMoments) -> ClassMoments:
        """Add ``other``'s data to this accumulator (exact in full mode). Returns ``self``."""
        if other.dim is None:
            return self
        if self.dim is None:
            self._init(other.dim, other.sum.device)
        if other.dim != self.dim or other.num_classes != self.num_classes or other.covariances != self.covariances:
            raise ValueError("cannot merge moments of different shapes")
        self._cache.clear()
        self.count += other.count
        for name in ("sum", "diag", "third", "fourth"):
            getattr(self, name).add_(getattr(other, name))
        if not self.covariances:
            return self
        if self.low_rank:
            self.sketch = [self._shrink(torch.cat([a, b])) for a, b in zip(self.sketch, other.sketch, strict=True)]  # type: ignore[arg-type]
        else:
            self.second += other.second  # type: ignore[operator]
        return self

    # ------------------------------------------------------------------ read-outs
    def _check(self, c: int | None = None, minimum: int = 2) -> None:
        if self.dim is None:
            raise ValueError("no data: call update() first")
        if minimum > 1 and not self.covariances:
            raise ValueError("these moments were accumulated with covariances=False; use ClassMoments(..., covariances=True)")
        counts = self.count if c is None else self.count[c : c + 1]
        if (counts < minimum).any():
            bad = [int(i) for i in torch.nonzero(self.count < minimum).flatten()] if c is None else [c]
            raise ValueError(f"class(es) {bad} have fewer than {minimum} probe samples; draw a larger probe set")

    def mean(self, c: int) -> Tensor:
        """Class mean ``[D]``."""
        self._check(c, 1)
        return self.sum[c] / self.count[c]

    def overall_mean(self) -> Tensor:
        """Mean over all samples ``[D]``."""
        return self.sum.sum(0) / self.count.sum()

    def _scatter(self, c: int) -> Tensor:
        """``sum (x - mu)(x - mu)^T`` of class ``c`` (full mode)."""
        mu = self.mean(c)
        return self.second[c] - self.count[c] * torch.outer(mu, mu)  # type: ignore[index]

    def covariance(self, c: int) -> Tensor:
        """Unbiased class covariance ``[D, D]`` (``ddof = 1``, as ``numpy.cov``)."""
        self._check(c)
        if self.low_rank:
            u, d = self.covariance_factor(c)
            return u @ u.T + torch.diag(d)
        return self._scatter(c) / (self.count[c] - 1)

    def pooled_covariance(self) -> Tensor:
        """Pooled within-class covariance ``sum_c scatter_c / (N - K)`` over classes with data."""
        present = [c for c in range(self.num_classes) if self.count[c] > 0]
        self._check(None if len(present) == self.num_classes else present[0])
        n = self.count[present].sum()
        if self.low_rank:
            u, d = self.pooled_covariance_factor()
            return u @ u.T + torch.diag(d)
        return sum(self._scatter(c) for c in present) / (n - len(present))

    def covariance_factor(self, c: int) -> tuple[Tensor, Tensor]:
        """Low-rank-plus-diagonal factors ``(U, d)`` with ``Sigma_c ~ U U^T + diag(d)`` (low-rank mode).

        The scatter ``B^T B - n mu mu^T`` is projected on an orthonormal basis ``Q`` of the sketch rows
        and the mean, its small eigen-decomposition gives the PSD low-rank part, and ``d`` restores the
        exact marginal variances.
        """
        self._check(c)
        if ("factor", c) in self._cache:
            return self._cache[("factor", c)]  # type: ignore[return-value]
        n = self.count[c]
        mu = self.mean(c)
        b = self.sketch[c]  # type: ignore[index]
        q, _ = torch.linalg.qr(torch.cat([b.T, mu[:, None]], dim=1))
        bq = b @ q
        mq = mu @ q
        small = (bq.T @ bq - n * torch.outer(mq, mq)) / (n - 1)
        evals, evecs = torch.linalg.eigh(0.5 * (small + small.T))
        u = q @ (evecs * evals.clamp_min(0).sqrt())
        var = (self.diag[c] - n * mu * mu) / (n - 1)
        d = (var - (u * u).sum(1)).clamp_min(0)
        self._cache[("factor", c)] = (u, d)
        return u, d

    def pooled_covariance_factor(self) -> tuple[Tensor, Tensor]:
        """``(U, d)`` of the pooled covariance in low-rank mode (class factors stacked and weighted)."""
        present = [c for c in range(self.num_classes) if self.count[c] > 1]
        n = self.count[present].sum()
        us, ds = [], []
        for c in present:
            u, d = self.covariance_factor(c)
            w = (self.count[c] - 1) / (n - len(present))
            us.append(u * torch.sqrt(w))
            ds.append(d * w)
        return torch.cat(us, dim=1), sum(ds)  # type: ignore[return-value]

    def excess_kurtosis(self) -> Tensor:
        """Per class and unit excess kurtosis ``[K, D]`` (population moments; NaN for constant units)."""
        n = self.count[:, None]
        m1 = self.sum / n
        m2, m3, m4 = self.diag / n, self.third / n, self.fourth / n
        var = m2 - m1**2
        c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        out = c4 / (var * var) - 3
        return torch.where(var > 1e-12 * (m2.abs() + 1e-300), out, torch.full_like(out, math.nan))

    def non_gaussianity(self) -> Tensor:
        """Mean absolute excess kurtosis over classes and units (0 for Gaussian activity)."""
        k = self.excess_kurtosis()
        return k[~k.isnan()].abs().mean() if (~k.isnan()).any() else torch.tensor(math.nan, dtype=torch.float64)

    # ------------------------------------------------------------------ sampling
    def _root(self, key: int | str) -> Tensor:
        """``R`` with ``R R^T = Sigma`` (PSD part, by eigen-decomposition) of class ``key`` or ``"pooled"`` (full mode)."""
        if ("root", key) not in self._cache:
            evals, evecs = torch.linalg.eigh(self._pooled() if key == "pooled" else self.covariance(key))  # type: ignore[arg-type]
            self._cache[("root", key)] = evecs * evals.clamp_min(0).sqrt()
        return self._cache[("root", key)]  # type: ignore[return-value]

    def _pooled(self) -> Tensor | tuple[Tensor, Tensor]:
        if "pooled" not in self._cache:
            self._cache["pooled"] = self.pooled_covariance_factor() if self.low_rank else self.pooled_covariance()
        return self._cache["pooled"]  # type: ignore[return-value]

    def sample(
        self, labels: Tensor, order: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """Gaussian surrogate draws ``[N, D]`` for examples of classes ``labels``.

        Factorizations are computed in float64 and cached until the next :meth:`update` or :meth:`merge`,
        so the three orders of one layer share them; the draws themselves are made in ``dtype``.

        Args:
            labels: class of each example ``[N]``.
            order: 2 ``N(mu_c, Sigma_c)``, 1 ``N(mu_c, Sigma_bar)``, 0 ``N(mu_bar, Sigma_bar)``.
            generator: a CPU ``torch.Generator``.
            dtype: floating dtype of the draws (float64 by default; the model's dtype is enough for
                surrogate accuracies).
        """
        if order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {order}")
        labels = labels.long()
        device = self.sum.device
        out = torch.empty(len(labels), self.dim, dtype=dtype, device=device)  # type: ignore[arg-type]
        for c in sorted(set(labels.tolist())):
            idx = torch.nonzero(labels.to(device) == c).flatten()
            n = len(idx)
            mean = self.overall_mean() if order == 0 else self.mean(c)
            if self.low_rank:
                u, d = self.covariance_factor(c) if order == 2 else self._pooled()
                draw = (
                    mean.to(dtype)
                    + torch.randn(n, u.shape[1], generator=generator, dtype=dtype).to(device) @ u.T.to(dtype)
                    + torch.randn(n, u.shape[0], generator=generator, dtype=dtype).to(device) * d.sqrt().to(dtype)
                )
            else:
                root = self._root(c if order == 2 else "pooled").to(dtype)
                draw = mean.to(dtype) + torch.randn(n, root.shape[1], generator=generator, dtype=dtype).to(device) @ root.T
            out[idx] = draw
        return out


# ---------------------------------------------------------------------------------------------
# analytic propagation
# ---------------------------------------------------------------------------------------------


def _phi(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / _SQRT2)


_GL_X, _GL_W = (torch.tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(24))


def bivariate_normal_cdf(h: Tensor, k: Tensor, rho: Tensor) -> Tensor:
    """``P(Z1 <= h, Z2 <= k)`` for a standard bivariate normal with correlation ``rho`` (elementwise).

    Plackett's identity integrated over the angle ``theta = asin(r)``:
    ``Phi2 = Phi(h) Phi(k) + (1 / 2 pi) int_0^{asin rho} exp(-(h^2 - 2 h k sin t + k^2) / (2 cos^2 t)) dt``
    by 24-point Gauss-Legendre quadrature (smooth up to ``|rho| -> 1``; ~1e-6 or better against scipy).
    """
    base = _cdf(h) * _cdf(k)
    x = (_GL_X.to(h.device) + 1) / 2  # nodes on [0, 1]
    w = _GL_W.to(h.device) / 2
    top = torch.asin(rho.clamp(-1.0, 1.0))
    t = top[..., None] * x  # [..., 24]
    sin_t, cos2 = torch.sin(t), torch.cos(t) ** 2
    hh, kk = h[..., None], k[..., None]
    dens = torch.exp(-(hh * hh - 2 * hh * kk * sin_t + kk * kk) / (2 * cos2.clamp_min(1e-300)))
    return base + top * (dens * w).sum(-1) / (2 * math.pi)


def relu_moments(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of ``relu(z)`` for ``z ~ N(mean, cov)``.

    The mean and the variances are the exact rectified-Gaussian moments; the cross-covariances use the
    exact truncated bivariate-normal moments (Rosenbaum 1961), with the bivariate normal CDF by
    quadrature (:func:`bivariate_normal_cdf`). Units with zero variance are deterministic.
    """
    var = torch.diagonal(cov).clamp_min(0)
    sd = var.sqrt()
    safe = sd.clamp_min(1e-300)
    a = torch.where(sd > 0, mean / safe, torch.sign(mean) * math.inf)
    a_f = torch.where(torch.isinf(a), torch.sign(a) * 40, a)
    m = torch.where(sd > 0, mean * _cdf(a_f) + sd * _phi(a_f), mean.clamp_min(0))
    # second moments E[relu(x) relu(y)]
    rho = (cov / torch.outer(safe, safe)).clamp(-0.999999, 0.999999)
    ai, aj = a_f[:, None].expand_as(cov), a_f[None, :].expand_as(cov)
    s = (1 - rho * rho).sqrt()
    p = bivariate_normal_cdf(ai, aj, rho)  # P(x > 0, y > 0)
    ex = _phi(ai) * _cdf((aj - rho * ai) / s) + rho * _phi(aj) * _cdf((ai - rho * aj) / s)  # E[Zx 1]
    ey = _phi(aj) * _cdf((ai - rho * aj) / s) + rho * _phi(ai) * _cdf((aj - rho * ai) / s)  # E[Zy 1]
    q = (ai * ai - 2 * rho * ai * aj + aj * aj) / (s * s)
    exy = rho * p - rho * ai * _phi(ai) * _cdf((aj - rho * ai) / s) - rho * aj * _phi(aj) * _cdf((ai - rho * aj) / s)
    exy = exy + s * torch.exp(-0.5 * q) / (2 * math.pi)
    sdi, sdj = sd[:, None], sd[None, :]
    mi, mj = mean[:, None], mean[None, :]
    second = mi * mj * p + mi * sdj * ey + mj * sdi * ex + sdi * sdj * exy
    c = second - torch.outer(m, m)
    # exact diagonal: E[relu(x)^2] = (mu^2 + s^2) Phi(a) + mu s phi(a)
    d2 = torch.where(sd > 0, (mean * mean + var) * _cdf(a_f) + mean * sd * _phi(a_f), mean.clamp_min(0) ** 2)
    c = c - torch.diag(torch.diagonal(c)) + torch.diag(d2 - m * m)
    # deterministic units: zero covariance with everything
    det = sd <= 0
    c = torch.where(det[:, None] | det[None, :], torch.zeros_like(c), c)
    c = torch.where(torch.eye(len(m), dtype=torch.bool, device=c.device), torch.diag(d2 - m * m), c)
    return m, 0.5 * (c + c.T)


def propagate_moments(modules: Sequence[nn.Module] | nn.Sequential, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Propagate a Gaussian ``(mean [D], cov [D, D])`` through modules by Gaussian closure.

    ``Linear`` is exact (``W mu + b``, ``W Sigma W^T``); ``Quadratic`` is exact for Gaussian input
    (``E y_i = mu_i + alpha (mu_i^2 + S_ii)``, ``Cov_ij = g_i g_j S_ij + 2 alpha^2 S_ij^2`` with
    ``g = 1 + 2 alpha mu``); ``ReLU`` uses exact rectified-Gaussian first and second moments
    (:func:`relu_moments`), after which the closure keeps only mean and covariance; ``Flatten``,
    ``Identity`` and ``Dropout`` (eval) pass through.

    Raises:
        TypeError: an unsupported module (named in the message).
    """
    mean, cov = mean.to(torch.float64), cov.to(torch.float64)
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            w = module.weight.detach().to(torch.float64)
            mean = w @ mean + (module.bias.detach().to(torch.float64) if module.bias is not None else 0)
            cov = w @ cov @ w.T
        elif isinstance(module, Quadratic):
            a = module.alpha
            g = 1 + 2 * a * mean
            new_mean = mean + a * (mean * mean + torch.diagonal(cov))
            cov = torch.outer(g, g) * cov + 2 * a * a * cov * cov
            mean = new_mean
        elif isinstance(module, nn.ReLU):
            mean, cov = relu_moments(mean, cov)
        elif isinstance(module, (nn.Flatten, nn.Identity, nn.Dropout)):
            continue
        else:
            raise TypeError(
                f"propagate_moments does not support module {i} ({type(module).__name__}); supported: Linear, ReLU, "
                "Quadratic, Flatten, Identity, Dropout"
            )
    return mean, 0.5 * (cov + cov.T)


def theory_accuracy(
    means: Sequence[Tensor],
    covs: Sequence[Tensor],
    priors: Tensor | None = None,
    num_samples: int = 100_000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Accuracy implied by Gaussian output (logit) distributions per class: ``sum_c pi_c P(argmax z = c | c)``.

    Two classes use the exact normal CDF of the logit difference; more classes use ``num_samples``
    Monte-Carlo draws per class from the output Gaussians.
    """
    k = len(means)
    pri = torch.full((k,), 1.0 / k, dtype=torch.float64) if priors is None else priors.to(torch.float64)
    accs = []
    for c in range(k):
        m, s = means[c].to(torch.float64), covs[c].to(torch.float64)
        if k == 2:
            o = 1 - c
            diff_m = m[c] - m[o]
            diff_v = (s[c, c] + s[o, o] - 2 * s[c, o]).clamp_min(0)
            accs.append(_cdf(diff_m / diff_v.sqrt()) if diff_v > 0 else (diff_m > 0).to(torch.float64))
        else:
            evals, evecs = torch.linalg.eigh(s)
            root = evecs * evals.clamp_min(0).sqrt()
            z = m.cpu() + torch.randn(num_samples, len(m), generator=generator, dtype=torch.float64) @ root.cpu().T
            accs.append((z.argmax(1) == c).to(torch.float64).mean())
    return (torch.stack([a.cpu() for a in accs]) * pri.cpu()).sum()
