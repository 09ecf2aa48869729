"""Tests of ``lightning_interp.posterior`` against independent references (METHODS.md section 1).

References used: scipy.stats densities, scipy.special.logsumexp, scipy.integrate.quad,
scipy.optimize.brentq / minimize_scalar, numpy hand computations and the published values of
the METHODS.md table (the only hard-coded numbers).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, optimize, special, stats

from lightning_interp.posterior import GAP_MEASURES, PosteriorGap, posterior_gap
from lightning_interp.tasks import GaussianMixtureTask, GaussianTask, PatchImageTask, XieTask, xie_task

# ---------------------------------------------------------------------------------------------
# Published values (METHODS.md section 1) and independent scipy references
# ---------------------------------------------------------------------------------------------

PRESETS = {  # (mu1, s1), (mu2, s2)
    1: ((0.0, 1.0), (3.0, 1.0)),
    2: ((0.0, 2.0), (1.0, 1.0)),
    3: ((0.0, 2.0), (3.0, 1.0)),
}
TABLE_COEFFS = {1: (4.5, -3.0, 0.0), 2: (-0.19315, -1.0, 0.375), 3: (3.80685, -3.0, 0.375)}  # (c0, c1, c2)
TABLE_BOUNDARIES = {1: (1.5,), 2: (-0.1809, 2.8475), 3: (1.5817, 6.4183)}
TABLE_BAYES_ACC = {1: 0.9332, 2: 0.6950, 3: 0.8539}
TABLE_ENTROPY = {1: 0.1664, 2: 0.5650, 3: 0.3420}
TABLE_ROUNDING = 5e-5  # the table is rounded to 4 decimals
# Brackets for the roots of the log-odds (each contains exactly one boundary).
BRACKETS = {1: [(0.0, 3.0)], 2: [(-2.0, 4.0 / 3.0), (4.0 / 3.0, 5.0)], 3: [(0.0, 4.0), (4.0, 10.0)]}


def scipy_preset_log_joint(preset: int, x: np.ndarray) -> np.ndarray:
    (m1, s1), (m2, s2) = PRESETS[preset]
    return np.stack([stats.norm.logpdf(x, m1, s1), stats.norm.logpdf(x, m2, s2)], axis=1) + math.log(0.5)


def scipy_preset_log_odds(preset: int, x: float) -> float:
    (m1, s1), (m2, s2) = PRESETS[preset]
    return float(stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2))


def scipy_preset_density(preset: int, x: float) -> float:
    (m1, s1), (m2, s2) = PRESETS[preset]
    return 0.5 * stats.norm.pdf(x, m1, s1) + 0.5 * stats.norm.pdf(x, m2, s2)


def scipy_boundaries(preset: int) -> list[float]:
    return [optimize.brentq(lambda t: scipy_preset_log_odds(preset, t), a, b, xtol=1e-14) for a, b in BRACKETS[preset]]


def quad_expectation(preset: int, fn) -> float:
    """``int p(x) fn(x) dx`` for the preset's marginal density, split at the decision boundaries."""
    cuts = [-math.inf, -25.0, *scipy_boundaries(preset), 30.0, math.inf]
    total = 0.0
    for a, b in itertools.pairwise(cuts):
        val, _err = integrate.quad(lambda t: scipy_preset_density(preset, t) * fn(t), a, b, epsabs=1e-13, epsrel=1e-12, limit=200)
        total += val
    return total


def scipy_max_posterior(preset: int, x: float) -> float:
    z = scipy_preset_log_odds(preset, x)
    return float(special.expit(abs(z)))


def scipy_binary_entropy(preset: int, x: float) -> float:
    z = scipy_preset_log_odds(preset, x)
    p = np.array([special.expit(z), special.expit(-z)])
    return float(stats.entropy(p))


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.3 * np.eye(dim)


def make_random_gaussian_task(seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(3, 3))
    covs = np.stack([random_spd(rng, 3) for _ in range(3)])
    priors = np.array([0.2, 0.5, 0.3])
    task = GaussianTask(means=torch.tensor(means), covariances=torch.tensor(covs), priors=torch.tensor(priors))
    return task, means, covs, priors


def make_mixture_task(seed: int = 1):
    """2-D, 3 classes with 2, 3 and 1 components; returns the task and its numpy parameters."""
    rng = np.random.default_rng(seed)
    counts = [2, 3, 1]
    weights = [rng.dirichlet(np.ones(m)) for m in counts]
    means = [rng.normal(scale=3.0, size=(m, 2)) for m in counts]
    covs = [np.stack([random_spd(rng, 2) for _ in range(m)]) for m in counts]
    priors = np.array([0.45, 0.35, 0.2])
    task = GaussianMixtureTask(weights=weights, means=means, covariances=covs, priors=priors)
    return task, weights, means, covs, priors


def scipy_mixture_log_joint(x: np.ndarray, weights, means, covs, priors) -> np.ndarray:
    cols = []
    for w, ms, ss in zip(weights, means, covs, strict=True):
        comps = np.stack([np.atleast_1d(stats.multivariate_normal(m, s).logpdf(x)) for m, s in zip(ms, ss, strict=True)], axis=1)
        cols.append(special.logsumexp(comps + np.log(w)[None, :], axis=1))
    return np.stack(cols, axis=1) + np.log(priors)[None, :]


def tail_points(dim: int, rng: np.random.Generator) -> np.ndarray:
    """Points near the bulk plus points at |x| = 40 and 1e3 in random directions."""
    bulk = rng.normal(scale=3.0, size=(50, dim))
    dirs = rng.normal(size=(8, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.concatenate([bulk, 40.0 * dirs, -40.0 * dirs, 1e3 * dirs, -1e3 * dirs])


def assert_matches_reference(task, x: np.ndarray, ref_log_joint: np.ndarray) -> None:
    ref_lp = ref_log_joint - special.logsumexp(ref_log_joint, axis=1, keepdims=True)
    ref_ld = special.logsumexp(ref_log_joint, axis=1)
    xt = torch.tensor(x, dtype=torch.float64)
    lp = task.log_posterior(xt)
    assert lp.dtype == torch.float64 and lp.shape == ref_lp.shape
    assert torch.isfinite(lp).all()
    np.testing.assert_allclose(lp.numpy(), ref_lp, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(task.log_joint(xt).numpy(), ref_log_joint, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(task.log_density(xt).numpy(), ref_ld, rtol=1e-9, atol=1e-9)
    post = task.posterior(xt)
    np.testing.assert_allclose(post.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(post.numpy(), np.exp(ref_lp), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 1. Posteriors against scipy densities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [1, 2, 3])
@pytest.mark.parametrize("shape", ["column", "flat"])
def test_preset_posterior_matches_scipy(preset, shape):
    task = xie_task(preset)
    assert isinstance(task, XieTask) and task.num_classes == 2 and task.dim == 1
    x = np.concatenate([np.linspace(-12.0, 15.0, 271), [-1e3, -40.0, 40.0, 1e3]])
    ref = scipy_preset_log_joint(preset, x)
    if shape == "flat":  # 1-D input is accepted for a 1-D task
        lp = task.log_posterior(torch.tensor(x))
        np.testing.assert_allclose(lp.numpy(), ref - special.logsumexp(ref, axis=1, keepdims=True), rtol=1e-9, atol=1e-9)
    else:
        assert_matches_reference(task, x[:, None], ref)


def test_random_gaussian_task_matches_scipy():
    task, means, covs, priors = make_random_gaussian_task()
    x = tail_points(3, np.random.default_rng(10))
    ref = np.stack([stats.multivariate_normal(means[c], covs[c]).logpdf(x) for c in range(3)], axis=1) + np.log(priors)
    assert_matches_reference(task, x, ref)


def test_mixture_task_matches_scipy():
    task, weights, means, covs, priors = make_mixture_task()
    x = tail_points(2, np.random.default_rng(11))
    assert_matches_reference(task, x, scipy_mixture_log_joint(x, weights, means, covs, priors))


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        (torch.zeros(4, 2), ValueError),
        (torch.zeros(4), ValueError),
        (np.zeros((4, 3)), TypeError),
    ],
)
def test_bad_x_raises(bad, exc):
    task, *_ = make_random_gaussian_task()
    with pytest.raises(exc):
        task.log_posterior(bad)


# ---------------------------------------------------------------------------------------------
# 2. The METHODS.md table
# ---------------------------------------------------------------------------------------------


def package_log_odds(task, x) -> np.ndarray:
    lp = task.log_posterior(torch.as_tensor(np.atleast_1d(x), dtype=torch.float64)[:, None])
    return (lp[:, 0] - lp[:, 1]).numpy()


@pytest.mark.parametrize("preset", [1, 2, 3])
def test_log_odds_closed_form(preset):
    task = xie_task(preset)
    x = np.linspace(-20.0, 20.0, 401)
    c0, c1, c2 = TABLE_COEFFS[preset]
    np.testing.assert_allclose(package_log_odds(task, x), c0 + c1 * x + c2 * x**2, rtol=0, atol=TABLE_ROUNDING / 5)
    coef = task.log_odds_coefficients()
    np.testing.assert_allclose(coef, TABLE_COEFFS[preset], rtol=0, atol=TABLE_ROUNDING / 5)
    # The method's coefficients are exact (not only to the table's rounding).
    exact = coef[0] + coef[1] * x + coef[2] * x**2
    np.testing.assert_allclose(package_log_odds(task, x), exact, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("preset", [1, 2, 3])
def test_boundaries(preset):
    task = xie_task(preset)
    roots = [optimize.brentq(lambda t: float(package_log_odds(task, t)[0]), a, b, xtol=1e-12) for a, b in BRACKETS[preset]]
    np.testing.assert_allclose(roots, TABLE_BOUNDARIES[preset], rtol=0, atol=1e-4)


def package_p1(task, x: float) -> float:
    return float(task.posterior(torch.tensor([[x]], dtype=torch.float64))[0, 0])


def test_spot_values():
    assert package_p1(xie_task(1), 1.0) == pytest.approx(0.8176, abs=1e-4)
    assert package_p1(xie_task(3), 7.0) == pytest.approx(0.7653, abs=1e-4)
    for preset, (lo, hi), argmin, value in [(2, (0.0, 3.0), 4.0 / 3.0, 0.2974), (3, (2.0, 6.0), 4.0, 0.1004)]:
        task = xie_task(preset)
        res = optimize.minimize_scalar(
            lambda t, task=task: package_p1(task, t), bounds=(lo, hi), method="bounded", options={"xatol": 1e-9}
        )
        assert res.x == pytest.approx(argmin, abs=1e-4)
        assert res.fun == pytest.approx(value, abs=1e-4)
        assert package_p1(task, argmin) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("preset", [1, 2, 3])
def test_table_by_quadrature(preset):
    """Independent numerical integration of the scipy densities reproduces the table."""
    np.testing.assert_allclose(scipy_boundaries(preset), TABLE_BOUNDARIES[preset], rtol=0, atol=1e-4)
    assert quad_expectation(preset, lambda t: 1.0) == pytest.approx(1.0, abs=1e-10)
    acc = quad_expectation(preset, lambda t: scipy_max_posterior(preset, t))
    ent = quad_expectation(preset, lambda t: scipy_binary_entropy(preset, t))
    assert acc == pytest.approx(TABLE_BAYES_ACC[preset], abs=1e-4)
    assert ent == pytest.approx(TABLE_ENTROPY[preset], abs=1e-4)


@pytest.mark.parametrize("preset", [1, 2, 3])
@pytest.mark.parametrize("quantity", ["bayes_accuracy", "conditional_entropy"])
def test_monte_carlo_estimates(preset, quantity):
    task = xie_task(preset)
    n = 200_000
    est = getattr(task, quantity)(n, torch.Generator().manual_seed(100 + preset))
    table = (TABLE_BAYES_ACC if quantity == "bayes_accuracy" else TABLE_ENTROPY)[preset]
    assert est.stderr > 0
    assert abs(est.value - table) <= 4 * est.stderr + TABLE_ROUNDING
    # The reported standard error is std/sqrt(n), with the std of the per-sample values by quadrature.
    fn = scipy_max_posterior if quantity == "bayes_accuracy" else scipy_binary_entropy
    mean = quad_expectation(preset, lambda t: fn(preset, t))
    second = quad_expectation(preset, lambda t: fn(preset, t) ** 2)
    expected_stderr = math.sqrt(second - mean**2) / math.sqrt(n)
    assert est.stderr == pytest.approx(expected_stderr, rel=0.05)
    # A second, independent run agrees within the combined standard errors.
    est2 = getattr(task, quantity)(n, torch.Generator().manual_seed(200 + preset))
    assert abs(est.value - est2.value) <= 4 * math.hypot(est.stderr, est2.stderr)
    assert est2.stderr == pytest.approx(expected_stderr, rel=0.05)


# ---------------------------------------------------------------------------------------------
# 3. Sampling
# ---------------------------------------------------------------------------------------------


def test_sample_types_and_reproducibility():
    task, *_ = make_random_gaussian_task()
    x, y = task.sample(500, torch.Generator().manual_seed(3))
    assert x.dtype == torch.float32 and x.shape == (500, 3)
    assert y.dtype == torch.int64 and y.shape == (500,)
    assert set(y.unique().tolist()) <= {0, 1, 2}
    x2, y2 = task.sample(500, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = task.sample(500, torch.Generator().manual_seed(4))
    assert not torch.equal(x, x3)
    x0, y0 = task.sample(0, torch.Generator().manual_seed(3))
    assert x0.shape == (0, 3) and x0.dtype == torch.float32 and y0.shape == (0,) and y0.dtype == torch.int64


def test_sample_moments_match_gaussian_task():
    task, means, covs, priors = make_random_gaussian_task()
    n = 60_000
    x, y = task.sample(n, torch.Generator().manual_seed(5))
    x, y = x.double().numpy(), y.numpy()
    for c in range(3):
        freq_se = math.sqrt(priors[c] * (1 - priors[c]) / n)
        assert abs((y == c).mean() - priors[c]) < 4 * freq_se
        xc = x[y == c]
        nc = len(xc)
        mean_se = np.sqrt(np.diag(covs[c]) / nc)
        assert np.all(np.abs(xc.mean(axis=0) - means[c]) < 4 * mean_se)
        d = np.diag(covs[c])
        cov_se = np.sqrt((np.outer(d, d) + covs[c] ** 2) / nc)  # Gaussian: Var(s_ij) = (S_ii S_jj + S_ij^2) / n
        assert np.all(np.abs(np.cov(xc, rowvar=False) - covs[c]) < 4 * cov_se)


def test_sample_follows_1d_mixture_ks():
    w0, m0, s0 = np.array([0.3, 0.7]), np.array([-3.0, 2.0]), np.array([1.0, 0.5])
    m1, s1 = 0.5, 2.0
    priors = np.array([0.4, 0.6])
    task = GaussianMixtureTask(
        weights=[w0, [1.0]],
        means=[m0[:, None], [[m1]]],
        covariances=[(s0**2)[:, None, None], [[[s1**2]]]],
        priors=priors,
    )

    def cdf0(t):
        return w0[0] * stats.norm.cdf(t, m0[0], s0[0]) + w0[1] * stats.norm.cdf(t, m0[1], s0[1])

    def cdf1(t):
        return stats.norm.cdf(t, m1, s1)

    x, y = task.sample(20_000, torch.Generator().manual_seed(6))
    x, y = x[:, 0].double().numpy(), y.numpy()
    assert stats.kstest(x, lambda t: priors[0] * cdf0(t) + priors[1] * cdf1(t)).pvalue > 1e-3
    assert stats.kstest(x[y == 0], cdf0).pvalue > 1e-3
    assert stats.kstest(x[y == 1], cdf1).pvalue > 1e-3
    # The component weights are honoured (not e.g. the first component only).
    frac_left = (x[y == 0] < -0.5).mean()
    assert abs(frac_left - cdf0(-0.5)) < 4 * math.sqrt(cdf0(-0.5) * (1 - cdf0(-0.5)) / (y == 0).sum())


def test_sample_2d_mixture_moments():
    task, weights, means, covs, _priors = make_mixture_task()
    x, y = task.sample(60_000, torch.Generator().manual_seed(7))
    x, y = x.double().numpy(), y.numpy()
    for c in range(3):
        mix_mean = (weights[c][:, None] * means[c]).sum(axis=0)
        second = sum(w * (s + np.outer(m, m)) for w, m, s in zip(weights[c], means[c], covs[c], strict=True))
        mix_cov = second - np.outer(mix_mean, mix_mean)
        xc = x[y == c]
        se = np.sqrt(np.diag(mix_cov) / len(xc))
        assert np.all(np.abs(xc.mean(axis=0) - mix_mean) < 4 * se)
        # Projections onto each axis follow the 1-D marginal mixture CDF.
        for d in range(2):
            sd = np.sqrt(covs[c][:, d, d])

            def cdf(t, c=c, d=d, sd=sd):
                return sum(w * stats.norm.cdf(t, m[d], s) for w, m, s in zip(weights[c], means[c], sd, strict=True))

            assert stats.kstest(xc[:, d], cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# 4. Logistic regression on [1, x, x^2] recovers the log-odds
# ---------------------------------------------------------------------------------------------


def features(x: torch.Tensor) -> torch.Tensor:
    x = x.double().flatten()
    return torch.stack([torch.ones_like(x), x, x * x], dim=1)


def fit_logistic(phi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minimise the 2-class cross-entropy with logits ``[phi @ w, 0]`` by full-batch LBFGS in float64.

    ``target`` is either int64 labels or ``[N, 2]`` class probabilities.
    """
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe"
    )

    def loss_fn():
        f = phi @ w
        return F.cross_entropy(torch.stack([f, torch.zeros_like(f)], dim=1), target)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    (grad,) = torch.autograd.grad(loss_fn(), w)
    assert grad.abs().max() < 1e-8, f"LBFGS did not converge: grad {grad.tolist()}"
    return w.detach()


@pytest.mark.parametrize("preset", [1, 2, 3])
def test_logistic_regression_hard_labels(preset):
    task = xie_task(preset)
    x, y = task.sample(200_000, torch.Generator().manual_seed(20 + preset))
    phi = features(x)
    w = fit_logistic(phi, y)
    # Asymptotic covariance: inverse of the Hessian of the summed NLL at the fit.
    s = torch.sigmoid(phi @ w)
    hess = (phi * (s * (1 - s))[:, None]).T @ phi
    se = torch.linalg.inv(hess).diagonal().sqrt().numpy()
    closed = np.array(task.log_odds_coefficients())
    z = (w.numpy() - closed) / se
    assert np.all(np.abs(z) < 4), f"fit {w.tolist()} vs closed form {closed.tolist()} (z = {z.tolist()})"
    # The test has power: the standard errors are small compared with the coefficients.
    assert np.all(se < 0.05)


@pytest.mark.parametrize("preset", [1, 2, 3])
def test_logistic_regression_soft_labels(preset):
    """Cross-entropy against the exact posterior is minimised by the posterior's own log-odds."""
    task = xie_task(preset)
    x, _ = task.sample(20_000, torch.Generator().manual_seed(30 + preset))
    w = fit_logistic(features(x), task.posterior(x))
    np.testing.assert_allclose(w.numpy(), task.log_odds_coefficients(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(w.numpy(), TABLE_COEFFS[preset], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 5. posterior_gap
# ---------------------------------------------------------------------------------------------


def hand_gap(logits: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    q = np.exp(logits - special.logsumexp(logits, axis=1, keepdims=True))

    def kl(a, b):  # 0 log 0 = 0
        def row(ra, rb):
            return sum(ai * math.log(ai / bi) if ai > 0 else 0.0 for ai, bi in zip(ra, rb, strict=True))

        return np.array([row(ra, rb) for ra, rb in zip(a, b, strict=True)])

    m = 0.5 * (p + q)
    return {
        "kl": kl(p, q),
        "js": 0.5 * kl(p, m) + 0.5 * kl(q, m),
        "tv": 0.5 * np.abs(p - q).sum(axis=1),
        "l2": ((p - q) ** 2).sum(axis=1),
        "max_abs": np.abs(p - q).max(axis=1),
    }


@pytest.mark.parametrize("logit_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("log_target", [False, True])
def test_gap_exactly_zero_at_posterior(logit_dtype, log_target):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 5, generator=g, dtype=torch.float64) * 4).to(logit_dtype)
    target = torch.log_softmax(logits.double(), dim=1) if log_target else torch.softmax(logits.double(), dim=1)
    if log_target:  # exact equality needs exp(log p) == softmax bit for bit; only check near-zero then
        out = posterior_gap(logits, target, log_target=True, reduction="none")
        for k in GAP_MEASURES:
            assert out[k].abs().max() < 1e-14, k
        return
    out = posterior_gap(logits, target, reduction="none")
    assert sorted(out) == sorted(GAP_MEASURES)
    for k in GAP_MEASURES:
        assert out[k].dtype == torch.float64 and out[k].shape == (64,)
        assert torch.all(out[k] == 0.0), (k, out[k])
    for red in ("mean", "sum"):
        for k, v in posterior_gap(logits, target, reduction=red).items():
            assert v.item() == 0.0, (red, k)


def test_gap_hand_computed_2x3():
    q_probs = np.array([[0.25, 0.25, 0.5], [0.1, 0.6, 0.3]])
    p = np.array([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    logits = np.log(q_probs) + np.array([[1.0], [-2.0]])  # softmax is shift-invariant
    out = posterior_gap(torch.tensor(logits), torch.tensor(p), reduction="none")
    hand = hand_gap(logits, p)
    hand["reverse_kl"] = (q_probs * np.log(q_probs / p)).sum(axis=1)
    # A few entries fully by hand: row 1, TV = 0.5 * (0.6 + 0.4 + 0.2) = 0.6, max_abs = 0.6, l2 = 0.36 + 0.16 + 0.04.
    assert hand["tv"][1] == pytest.approx(0.6) and hand["max_abs"][1] == pytest.approx(0.6)
    assert hand["l2"][1] == pytest.approx(0.56)
    assert hand["kl"][0] == pytest.approx(0.2 * math.log(0.2 / 0.25) + 0.3 * math.log(0.3 / 0.25))
    for k in GAP_MEASURES:
        np.testing.assert_allclose(out[k].numpy(), hand[k], rtol=1e-12, atol=1e-15, err_msg=k)
    # Same values via scipy: KL = stats.entropy(p, q); JS = jensenshannon^2.
    from scipy.spatial.distance import jensenshannon

    np.testing.assert_allclose(out["kl"].numpy(), [stats.entropy(a, b) for a, b in zip(p, q_probs, strict=True)], rtol=1e-12)
    np.testing.assert_allclose(out["js"].numpy(), [jensenshannon(a, b) ** 2 for a, b in zip(p, q_probs, strict=True)], rtol=1e-9)


def random_distribution(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, dim=1)


def test_gap_swap_symmetry():
    g = torch.Generator().manual_seed(1)
    p, q = random_distribution(g, 40, 4), random_distribution(g, 40, 4)
    a = posterior_gap(q.log(), p, reduction="none")  # model q, posterior p
    b = posterior_gap(p.log(), q, reduction="none")  # model p, posterior q
    torch.testing.assert_close(a["kl"], b["reverse_kl"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a["reverse_kl"], b["kl"], rtol=1e-12, atol=1e-14)
    for k in ("js", "tv", "l2", "max_abs"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
    assert (a["kl"] - a["reverse_kl"]).abs().max() > 1e-3  # KL really is asymmetric here
    assert torch.all(a["js"] <= math.log(2)) and torch.all(a["js"] >= 0) and torch.all(a["tv"] <= 1)


def test_gap_log_target_equivalent():
    g = torch.Generator().manual_seed(2)
    p = random_distribution(g, 30, 3)
    logits = torch.randn(30, 3, generator=g, dtype=torch.float64)
    a = posterior_gap(logits, p)
    b = posterior_gap(logits, p.log(), log_target=True)
    for k in GAP_MEASURES:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-15)


def test_gap_reductions_consistent():
    g = torch.Generator().manual_seed(3)
    p = random_distribution(g, 25, 3)
    logits = torch.randn(25, 3, generator=g)
    none = posterior_gap(logits, p, reduction="none")
    total = posterior_gap(logits, p, reduction="sum")
    mean = posterior_gap(logits, p, reduction="mean")
    default = posterior_gap(logits, p)
    for k in GAP_MEASURES:
        assert none[k].shape == (25,) and none[k].dtype == torch.float64
        torch.testing.assert_close(total[k], none[k].sum(), rtol=1e-14, atol=0)
        torch.testing.assert_close(mean[k], none[k].mean(), rtol=1e-14, atol=0)
        torch.testing.assert_close(default[k], mean[k], rtol=0, atol=0)
        assert total[k].ndim == 0 and mean[k].ndim == 0


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "exc"),
    [
        (torch.zeros(3), torch.zeros(3), {}, ValueError),
        (torch.zeros(2, 3), torch.zeros(2, 4), {}, ValueError),
        (torch.zeros(2, 3), torch.zeros(3, 3), {}, ValueError),
        (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), {}, ValueError),
        (torch.zeros(2, 3), torch.full((2, 3), 1 / 3), {"reduction": "max"}, ValueError),
        ([[0.0, 0.0]], torch.full((1, 2), 0.5), {}, TypeError),
        (torch.zeros(1, 2), [[0.5, 0.5]], {}, TypeError),
        (np.zeros((1, 2)), np.full((1, 2), 0.5), {}, TypeError),
    ],
)
def test_gap_bad_inputs(logits, target, kwargs, exc):
    with pytest.raises(exc):
        posterior_gap(logits, target, **kwargs)


@pytest.mark.parametrize("log_target", [False, True])
def test_gap_zero_probabilities(log_target):
    p = np.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])
    logits = np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -1.0]])
    with np.errstate(divide="ignore"):
        target = torch.tensor(np.log(p) if log_target else p)
    out = posterior_gap(torch.tensor(logits), target, log_target=log_target, reduction="none")
    hand = hand_gap(logits, p)
    for k in ("kl", "js", "tv", "l2", "max_abs"):
        assert torch.isfinite(out[k]).all(), k
        np.testing.assert_allclose(out[k].numpy(), hand[k], rtol=1e-12, atol=1e-15, err_msg=k)
    # KL(q || p) is infinite where p = 0 < q (never NaN).
    assert torch.all(out["reverse_kl"] == math.inf)


# ---------------------------------------------------------------------------------------------
# 6. PosteriorGap metric
# ---------------------------------------------------------------------------------------------


def random_batches(seed: int, sizes=(7, 20, 13), k: int = 3):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        logits = torch.randn(n, k, generator=g) * 2
        p = random_distribution(g, n, k)
        y = torch.multinomial(p, 1, generator=g).flatten()
        logd = torch.randn(n, generator=g, dtype=torch.float64) * 2 - 3
        batches.append((logits, p, y, logd))
    return batches


@pytest.mark.parametrize("log_target", [False, True])
def test_metric_streaming_equals_functional(log_target):
    batches = random_batches(0)
    metric = PosteriorGap(log_target=log_target)
    for logits, p, y, _ in batches:
        metric.update(logits, p.log() if log_target else p, target=y)
    out = metric.compute()
    logits = torch.cat([b[0] for b in batches])
    p = torch.cat([b[1] for b in batches])
    ref = posterior_gap(logits, p)
    for k in GAP_MEASURES:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("log_target", [False, True])
def test_metric_labelled_summaries(log_target):
    batches = random_batches(1)
    metric = PosteriorGap(log_target=log_target)
    for logits, p, y, _ in batches:
        metric.update(logits, p.log() if log_target else p, target=y)
    out = metric.compute()
    logits = torch.cat([b[0] for b in batches]).double().numpy()
    p = torch.cat([b[1] for b in batches]).numpy()
    y = torch.cat([b[2] for b in batches]).numpy()
    logq = logits - special.logsumexp(logits, axis=1, keepdims=True)
    ce = -logq[np.arange(len(y)), y].mean()
    ent = np.mean([stats.entropy(row) for row in p])
    acc_q = (logits.argmax(axis=1) == y).mean()
    acc_p = (p.argmax(axis=1) == y).mean()
    assert out["cross_entropy"].item() == pytest.approx(ce, rel=1e-12)
    assert out["conditional_entropy"].item() == pytest.approx(ent, rel=1e-12)
    assert out["excess_ce"].item() == pytest.approx(ce - ent, rel=1e-10)
    assert out["accuracy"].item() == pytest.approx(acc_q, abs=1e-15)
    assert out["bayes_accuracy"].item() == pytest.approx(acc_p, abs=1e-15)
    assert out["accuracy_gap"].item() == pytest.approx(acc_p - acc_q, abs=1e-15)
    assert acc_p != acc_q  # the check is not vacuous


def test_metric_without_labels_has_no_label_keys():
    logits, p, _, _ = random_batches(2)[0]
    metric = PosteriorGap()
    metric.update(logits, p)
    out = metric.compute()
    assert set(out) == {*GAP_MEASURES, *(f"{k}_se" for k in GAP_MEASURES), *(f"{k}_worst" for k in GAP_MEASURES)}


def test_metric_standard_errors_and_worst_cases_match_the_per_example_values():
    edges = [-4.0, -3.0, -2.0]
    batches = random_batches(4, sizes=(30, 45, 25))
    metric = PosteriorGap(density_edges=edges)
    for logits, p, y, logd in batches:
        metric.update(logits, p, target=y, log_density=logd)
    out = metric.compute()
    logits, p, y, logd = (torch.cat([b[i] for b in batches]) for i in range(4))
    per = posterior_gap(logits, p, reduction="none")
    for k in GAP_MEASURES:  # scipy's standard error of the mean (ddof=1)
        assert out[f"{k}_se"].item() == pytest.approx(stats.sem(per[k].numpy()), rel=1e-9), k
        assert out[f"{k}_worst"].item() == pytest.approx(per[k].max().item(), rel=1e-12), k
    lq = torch.log_softmax(logits.double(), dim=1)
    excess = -lq[torch.arange(len(y)), y] + (p.double() * p.double().log()).sum(dim=1)
    hit_q = (lq.argmax(dim=1) == y).double()
    hit_p = (p.argmax(dim=1) == y).double()
    assert out["excess_ce_se"].item() == pytest.approx(stats.sem(excess.numpy()), rel=1e-9)
    assert out["accuracy_se"].item() == pytest.approx(stats.sem(hit_q.numpy()), rel=1e-9)
    assert out["accuracy_gap_se"].item() == pytest.approx(stats.sem((hit_p - hit_q).numpy()), rel=1e-9)
    idx = np.digitize(logd.numpy(), edges, right=True)
    for b in range(len(edges) + 1):
        values = per["kl"].numpy()[idx == b]
        expected = stats.sem(values) if len(values) > 1 else math.nan
        assert out["kl_se_by_density"][b].item() == pytest.approx(expected, rel=1e-9, nan_ok=True), b


def test_metric_standard_errors_shrink_like_one_over_sqrt_n():
    task = xie_task(1)
    ses = []
    for n in (1000, 16000):
        x, y = task.sample(n, torch.Generator().manual_seed(n))
        metric = PosteriorGap(log_target=True)
        metric.update(torch.cat([x, -x], dim=1), task.log_posterior(x), target=y)  # a fixed, imperfect model
        ses.append(metric.compute())
    for k in ("kl", "tv", "excess_ce", "accuracy"):
        ratio = (ses[0][f"{k}_se"] / ses[1][f"{k}_se"]).item()
        assert ratio == pytest.approx(4.0, rel=0.15), k  # sqrt(16000 / 1000) = 4


def test_metric_density_bins():
    edges = [-4.0, -3.0, -2.0, 5.0]
    batches = random_batches(3)
    # Values exactly on an edge belong to the bin on its left: (e_{i-1}, e_i].
    batches[0][3][:4] = torch.tensor([-4.0, -3.0, -2.0, -3.5], dtype=torch.float64)
    metric = PosteriorGap(density_edges=edges)
    for logits, p, y, logd in batches:
        metric.update(logits, p, target=y, log_density=logd)
    out = metric.compute()
    logits = torch.cat([b[0] for b in batches])
    p = torch.cat([b[1] for b in batches])
    logd = torch.cat([b[3] for b in batches]).numpy()
    per = posterior_gap(logits, p, reduction="none")
    bins = np.array([sum(v > e for e in edges) for v in logd])  # index of (e_{i-1}, e_i]
    assert bins[0] == 0 and bins[1] == 1 and bins[2] == 2
    assert np.all(bins < 4)  # the last bin (5, inf) is empty by construction
    counts = np.bincount(bins, minlength=5)
    np.testing.assert_array_equal(out["count_by_density"].numpy(), counts)
    for k in GAP_MEASURES:
        vals = out[f"{k}_by_density"].numpy()
        assert vals.shape == (5,)
        for b in range(5):
            if counts[b] == 0:
                assert np.isnan(vals[b]), (k, b)
            else:
                assert vals[b] == pytest.approx(per[k].numpy()[bins == b].mean(), rel=1e-12, abs=1e-15), (k, b)
    assert counts[4] == 0 and min(counts[:4]) > 0


def test_metric_density_requires_log_density():
    logits, p, y, _ = random_batches(4)[0]
    metric = PosteriorGap(density_edges=[-1.0, 0.0])
    with pytest.raises(ValueError):
        metric.update(logits, p, target=y)
    with pytest.raises(ValueError):
        PosteriorGap(density_edges=[0.0, -1.0])


def test_metric_locates_gap_in_low_density_region_preset3():
    """A model that misses only the right boundary of preset 3 shows its gap in the lowest-density bin."""
    task = xie_task(3)
    x, y = task.sample(100_000, torch.Generator().manual_seed(40))
    lp = task.log_posterior(x)
    logits = lp.clone()
    right = TABLE_BOUNDARIES[3][1]
    beyond = x[:, 0].double() > right
    logits[beyond] = torch.tensor([0.0, 20.0], dtype=torch.float64)  # keeps predicting class 2 past x = 6.4183
    # Edge 0 from scipy: every x beyond the boundary has log p(x) below the density at the boundary.
    edge0 = math.log(scipy_preset_density(3, right)) + 1e-6
    metric = PosteriorGap(log_target=True, density_edges=[edge0, -4.0, -2.5])
    for sl in torch.split(torch.arange(len(y)), 25_000):
        metric.update(logits[sl], lp[sl], target=y[sl], log_density=task.log_density(x[sl]))
    out = metric.compute()
    assert 0 < beyond.sum() < 0.002 * len(y)  # ~0.05 % of the data lies beyond the boundary
    assert out["count_by_density"][0] >= beyond.sum()
    for k in GAP_MEASURES:
        by = out[f"{k}_by_density"]
        assert by[0] > 0.01, k
        assert torch.all(by[1:] < 1e-12), (k, by)
        assert out[k] < by[0] / 20, k  # on average the gap is diluted: the mean hides where it is
    assert out["excess_ce"] > 0


# ------------------------------------------------------------------------------ image task
def test_patch_image_likelihood_matches_enumeration_over_offsets():
    """``log p(x|c)``: a box-filter logsumexp against scipy normal log-densities summed per offset."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    task = PatchImageTask(num_classes=3, image_size=7, channels=2, grid=2, patch=2, contrast=1.5, noise=0.8)
    x, y = task.sample(12, torch.Generator().manual_seed(0))
    assert x.shape == (12, 2 * 49) and x.dtype == torch.float32
    xs = x.double().numpy().reshape(12, 2, 7, 7)
    cell, span = 3, 2
    ref = np.zeros((12, 3))
    for c in range(3):
        terms = []
        for dr in range(span):
            for dc in range(span):
                mean = np.zeros((2, 7, 7))
                r0, c0 = (c // 2) * cell + dr, (c % 2) * cell + dc
                mean[:, r0 : r0 + 2, c0 : c0 + 2] = 1.5
                terms.append(norm.logpdf(xs, loc=mean, scale=0.8).reshape(12, -1).sum(1))
        ref[:, c] = logsumexp(np.stack(terms), axis=0) - np.log(span * span)
    got = task.class_log_likelihood(x.double())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-8)
    # images in [N, C, H, W] are accepted as well
    assert torch.allclose(task.log_posterior(x.reshape(12, 2, 7, 7)), task.log_posterior(x))
    # the label is the most probable class almost always at this contrast
    assert (task.log_posterior(x).argmax(1) == y).double().mean() >= 0.75


def test_patch_image_datamodule_draws_from_its_task():
    """The datamodule's images follow ``dm.task``: same mean log-likelihood of the label and same Bayes accuracy."""
    from lightning_interp.datamodules import PatchImageDataModule

    kw = dict(num_classes=4, image_size=10, grid=2, patch=2, contrast=0.7, noise=1.0)
    dm = PatchImageDataModule(**kw, n_train=4000, n_val=16, batch_size=64, seed=1)
    dm.setup()
    x, y = dm._splits["train"].tensors
    task = dm.task
    assert isinstance(task, PatchImageTask) and task.input_shape == (1, 10, 10)
    xt, yt = task.sample(4000, torch.Generator().manual_seed(2))

    def stats(inputs, labels):
        lp = task.log_posterior(inputs.reshape(len(inputs), -1))
        own = lp.gather(1, labels[:, None])[:, 0]
        return own.mean().item(), own.std().item() / len(own) ** 0.5, (lp.argmax(1) == labels).double().mean().item()

    (m1, s1, a1), (m2, s2, a2) = stats(x, y), stats(xt, yt)
    assert abs(m1 - m2) < 4 * (s1**2 + s2**2) ** 0.5, (m1, m2)
    assert 0.3 < a1 < 0.98 and abs(a1 - a2) < 0.04, (a1, a2)  # chance is 0.25
    with pytest.raises(ValueError, match="patch"):
        PatchImageTask(image_size=6, grid=2, patch=3)
