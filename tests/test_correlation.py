"""Correlation orders: streaming moments, Gaussian-closure propagation, surrogates on XOR and a higher-order task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.callbacks import CorrelationOrderCallback
from lightning_interp.correlation import (
    ClassMoments,
    LayerReplacement,
    Quadratic,
    gaussian_surrogates,
    measure_correlation,
    propagate_moments,
    relu_moments,
    theory_accuracy,
)
from lightning_interp.hooks import count_hooks


# ------------------------------------------------------------------------------------ moments
@pytest.mark.parametrize("splits", [[500], [1, 499], [100, 150, 250], [250, 250]])
def test_streaming_moments_equal_numpy_in_any_split(splits: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.arange(1, 7) + torch.arange(6)
    y = torch.randint(0, 3, (500,), generator=g)
    parts, start = [], 0
    for n in splits:
        m = ClassMoments(3)
        m.update(x[start : start + n], y[start : start + n])
        parts.append(m)
        start += n
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    xn, yn = x.double().numpy(), y.numpy()
    for c in range(3):
        np.testing.assert_allclose(merged.mean(c).numpy(), xn[yn == c].mean(0), rtol=1e-12)
        np.testing.assert_allclose(merged.covariance(c).numpy(), np.cov(xn[yn == c].T), rtol=1e-9, atol=1e-12)
    scatter = sum(np.cov(xn[yn == c].T) * ((yn == c).sum() - 1) for c in range(3))
    np.testing.assert_allclose(merged.pooled_covariance().numpy(), scatter / (500 - 3), rtol=1e-9, atol=1e-12)
    from scipy.stats import kurtosis

    np.testing.assert_allclose(merged.excess_kurtosis()[1].numpy(), kurtosis(xn[yn == 1], axis=0), rtol=1e-8)


def test_low_rank_mode_is_exact_at_full_rank_and_close_for_low_rank_data() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g)
    y = torch.randint(0, 2, (300,), generator=g)
    full = ClassMoments(2)
    full.update(x, y)
    lr = ClassMoments(2, max_dim=4, rank=8)
    for i in range(0, 300, 37):
        lr.update(x[i : i + 37], y[i : i + 37])
    assert lr.low_rank and not full.low_rank
    torch.testing.assert_close(lr.covariance(0), full.covariance(0), rtol=1e-9, atol=1e-9)
    # 40-dim data on a 3-dim subspace plus small isotropic noise: rank 6 captures it, the diagonal is exact
    basis = torch.randn(3, 40, generator=g, dtype=torch.float64)
    z = torch.randn(2000, 3, generator=g, dtype=torch.float64) @ basis + 0.05 * torch.randn(
        2000, 40, generator=g, dtype=torch.float64
    )
    lab = torch.zeros(2000, dtype=torch.long)
    exact = ClassMoments(1)
    exact.update(z, lab)
    sketch = ClassMoments(1, max_dim=10, rank=6)
    sketch.update(z, lab)
    ref = exact.covariance(0)
    approx = sketch.covariance(0)
    torch.testing.assert_close(torch.diagonal(approx), torch.diagonal(ref), rtol=1e-9, atol=1e-9)
    assert (approx - ref).norm() / ref.norm() < 0.02
    assert sketch.sketch[0].shape[0] <= 12  # memory: O(rank * D) rows, not D x D


def test_moment_errors() -> None:
    m = ClassMoments(3)
    with pytest.raises(TypeError, match="floating-point"):
        m.update(torch.ones(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        m.update(torch.ones(4, 2), torch.full((4,), 3))
    m.update(torch.randn(5, 2), torch.tensor([0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have fewer than 2 probe samples"):
        m.covariance(1)


# ------------------------------------------------------------------------------------ propagation
def _mc(modules: list[nn.Module], mean: torch.Tensor, cov: torch.Tensor, n: int = 1_000_000, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    root = torch.linalg.cholesky(cov)
    z = mean + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ root.T
    with torch.no_grad():
        out = nn.Sequential(*modules).double()(z)
    return out.mean(0), torch.cov(out.T)


def _gaussian(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64) * 0.5, a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)


def test_linear_and_quadratic_closed_forms_and_monte_carlo() -> None:
    torch.manual_seed(2)
    mean, cov = _gaussian(4, 3)
    lin = nn.Linear(4, 3).double()
    m, c = propagate_moments([lin], mean, cov)
    w, b = lin.weight.detach(), lin.bias.detach()
    torch.testing.assert_close(m, w @ mean + b)
    torch.testing.assert_close(c, w @ cov @ w.T)
    alpha = 0.7
    m, c = propagate_moments([Quadratic(alpha)], mean, cov)
    g = 1 + 2 * alpha * mean
    torch.testing.assert_close(m, mean + alpha * (mean**2 + torch.diagonal(cov)))
    torch.testing.assert_close(c, torch.outer(g, g) * cov + 2 * alpha**2 * cov**2)
    # both against 10^6-sample Monte Carlo (standard errors ~ 1e-3)
    modules = [lin, Quadratic(alpha)]
    m, c = propagate_moments(modules, mean, cov)
    m_mc, c_mc = _mc(modules, mean, cov)
    assert (m - m_mc).abs().max() < 6e-3 and (c - c_mc).abs().max() < 1.5e-2


def test_relu_moments_against_monte_carlo() -> None:
    # Stated tolerance: the ReLU moments are exact, so the only error is Monte-Carlo noise (10^6 samples):
    # within 3e-3 for means and 5e-3 for covariances on unit-scale inputs.
    for seed in range(3):
        mean, cov = _gaussian(5, 10 + seed)
        m, c = relu_moments(mean, cov)
        m_mc, c_mc = _mc([nn.ReLU()], mean, cov, seed=seed)
        assert (m - m_mc).abs().max() < 3e-3
        assert (c - c_mc).abs().max() < 5e-3
    # zero-mean case: the arc-cosine kernel of degree 1 (Cho & Saul) times s_i s_j / (2 pi)
    cov = torch.tensor([[1.0, 0.3], [0.3, 2.0]], dtype=torch.float64)
    _, c = relu_moments(torch.zeros(2, dtype=torch.float64), cov)
    rho = 0.3 / math.sqrt(2.0)
    theta = math.acos(rho)
    second = math.sqrt(2.0) / (2 * math.pi) * (math.sin(theta) + (math.pi - theta) * math.cos(theta))
    assert c[0, 1].item() == pytest.approx(second - math.sqrt(2.0) / (2 * math.pi), rel=1e-9)


def test_multilayer_relu_network_propagation_and_theory_accuracy() -> None:
    torch.manual_seed(4)
    net = [nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)]
    for m in net:
        m.double()
    mean, cov = _gaussian(3, 5)
    m, c = propagate_moments(net, mean, cov)
    m_mc, c_mc = _mc(net, mean, cov, n=400_000)
    scale = c_mc.abs().max()
    # Two ReLU layers: each layer's moments are exact, but the closure treats the first layer's rectified
    # output as Gaussian, so the second layer's covariance is approximate (measured here: ~25% of the
    # largest entry); the means stay within a few percent.
    assert (m - m_mc).abs().max() / scale.sqrt() < 0.05 and (c - c_mc).abs().max() / scale < 0.4
    # two classes: the closed form equals a Monte-Carlo count on the same output Gaussians
    m1, c1 = m + torch.tensor([0.5, -0.5], dtype=torch.float64), c
    exact = theory_accuracy([m, m1], [c, c1])
    mc = theory_accuracy([m, m1], [c, c1], num_samples=200_000, generator=torch.Generator().manual_seed(0))
    three = theory_accuracy([m, m1], [c, c1], num_samples=200_000, generator=torch.Generator().manual_seed(0))
    assert 0 < exact.item() < 1 and three.item() == pytest.approx(mc.item())
    with pytest.raises(TypeError, match=r"module 0 \(Conv1d\)"):
        propagate_moments([nn.Conv1d(1, 1, 1)], mean, cov)


# ------------------------------------------------------------------------------------ surrogates
def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 600, lr: float = 1e-2) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_xor_class_information_lives_in_the_covariance() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, noise = 4000, 0.5
    s = torch.randint(0, 2, (n, 2), generator=g).float() * 2 - 1
    x = s + noise * torch.randn(n, 2, generator=g)
    y = (s[:, 0] * s[:, 1] > 0).long()
    model = _train(nn.Sequential(nn.Linear(2, 16), Quadratic(0.5), nn.Linear(16, 2)), x, y)
    xt, yt = x[:2000], y[:2000]
    result = measure_correlation(model, xt, yt, generator=torch.Generator().manual_seed(0), layers=["input", "1"])
    with torch.no_grad():
        real = (model(xt).argmax(1) == yt).double().mean().item()
    assert result.layers["input"]["acc_real"][0].item() == pytest.approx(real, abs=1e-12)
    acc = {o: result.layers["input"][f"acc_order{o}"][0].item() for o in (0, 1, 2)}
    assert real > 0.9
    assert abs(acc[1] - 0.5) < 0.05 and abs(acc[0] - 0.5) < 0.05, acc  # equal class means: order 1 at chance
    # order 2 keeps the sign of the correlation: 1/2 + arcsin(rho)/pi with rho = 1/(1 + noise^2) for a
    # sign-product classifier, 0.795 here; the trained network reaches most of its accuracy from it
    assert acc[2] > 0.75 and acc[2] > 0.8 * real, (acc, real)
    # at the hidden (quadratic) layer, order 1 already carries the class (the means now differ)
    assert result.layers["1"]["acc_order1"][0].item() > 0.75


def test_higher_order_task_order2_at_chance_at_the_input() -> None:
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    n, d = 6000, 4
    gauss = torch.randn(n // 2, d, generator=g)
    lap = torch.distributions.Laplace(0.0, 1 / math.sqrt(2)).sample((n // 2, d))
    x = torch.cat([gauss, lap])
    y = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    model = _train(nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)), x, y, steps=700)
    xt, yt = x[:3000], y[:3000]
    with torch.no_grad():
        real = (model(xt).argmax(1) == yt).double().mean().item()
    inputs = measure_correlation(model, xt, yt, generator=torch.Generator().manual_seed(0), layers="input").layers["input"]
    acc2 = inputs["acc_order2"][0].item()
    assert real > 0.6, real
    assert abs(acc2 - 0.5) < 0.04, acc2
    assert inputs["non_gaussianity"][0].item() > 1.0  # the Laplace class has excess kurtosis 3


def test_bivariate_normal_cdf_against_scipy_up_to_near_perfect_correlation() -> None:
    from scipy.stats import multivariate_normal

    from lightning_interp.gaussian_closure import bivariate_normal_cdf

    cases = [(0.3, 0.3, 0.999999), (0.3, 0.3, 0.9999), (0.3, -0.2, 0.5), (-1.0, 0.5, -0.9), (2.0, 1.0, 0.95), (-3.0, -3.0, 0.0)]
    h, k, r = (torch.tensor(v, dtype=torch.float64) for v in zip(*cases, strict=True))
    got = bivariate_normal_cdf(h, k, r)
    for i, (hh, kk, rr) in enumerate(cases):
        ref = multivariate_normal([0, 0], [[1, rr], [rr, 1]]).cdf([hh, kk])
        assert got[i].item() == pytest.approx(ref, abs=1e-7)


# ------------------------------------------------------------------------- exact surrogate draws
def test_gaussian_surrogates_have_the_sample_moments_of_the_features() -> None:
    """Draws from the probe samples follow N(mu_c, Sigma_c) / N(mu_c, Sigma_bar) / N(mu_bar, Sigma_bar) (numpy moments)."""
    g = torch.Generator().manual_seed(0)
    n, d = 60, 3
    y = torch.arange(n) % 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + y[:, None]
    x[:, 2] += 0.8 * x[:, 0] * (y[:, None] == 1)[:, 0]  # class 1 has a correlation the others lack
    xs, ys = x.numpy(), y.numpy()
    mu = np.stack([xs[ys == c].mean(0) for c in range(3)])
    cov = [np.cov(xs[ys == c].T) for c in range(3)]
    pooled = sum(((ys == c).sum() - 1) * cov[c] for c in range(3)) / (n - 3)
    reps = 3000
    reps_draws = [gaussian_surrogates(x, y, (2, 1, 0), g) for _ in range(reps)]
    draws = {o: torch.stack([r[i] for r in reps_draws]).numpy() for i, o in enumerate((2, 1, 0))}  # [R, N, D]
    for c in range(3):
        idx = ys == c
        d2 = draws[2][:, idx].reshape(-1, d)
        d1 = draws[1][:, idx].reshape(-1, d)
        d0 = draws[0][:, idx].reshape(-1, d)
        scale = np.sqrt(np.diag(cov[c]))[:, None] * np.sqrt(np.diag(cov[c]))[None, :]
        # standard error of a covariance entry ~ scale * sqrt(2 / samples); samples ~ 60k per class
        assert np.abs(np.cov(d2.T) - cov[c]).max() < 0.03 * scale.max()
        assert np.abs(d2.mean(0) - mu[c]).max() < 0.03 * np.sqrt(cov[c].diagonal().max())
        assert np.abs(np.cov(d1.T) - pooled).max() < 0.03 * np.abs(pooled).max()
        assert np.abs(d1.mean(0) - mu[c]).max() < 0.03 * np.sqrt(pooled.diagonal().max())
        # asked together, orders 1 and 0 share the pooled noise: they differ by mu_c - mu_bar, exactly
        assert np.allclose(d1 - d0, mu[c] - xs.mean(0), atol=1e-12)
    # the features' dtype, shape and device are kept; the sequence form returns the same draws as single calls
    img = torch.randn(40, 2, 3, 3, generator=g)
    lab = torch.arange(40) % 2
    seq = gaussian_surrogates(img, lab, (2, 1), torch.Generator().manual_seed(5))
    one = gaussian_surrogates(img, lab, 2, torch.Generator().manual_seed(5))
    assert seq[0].shape == img.shape and seq[0].dtype == img.dtype and torch.equal(seq[0], one)
    with pytest.raises(ValueError, match="fewer than 2"):
        gaussian_surrogates(img, torch.tensor([0] * 39 + [1]), 2)
    with pytest.raises(ValueError, match="order"):
        gaussian_surrogates(img, lab, 3)
    with pytest.raises(TypeError, match="floating"):
        gaussian_surrogates(torch.ones(4, 2, dtype=torch.long), lab[:4], 2)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(torch.relu(self.b(h)) + h)


def test_layer_replacement_split_and_hook_paths_agree() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    for model, layer, shape in [
        (_Residual(), "b", (16, 6)),  # a skip connection crosses the split
        (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "1", (16, 6)),
        (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "input", (16, 4)),
    ]:
        replacement = torch.randn(*shape)
        split = LayerReplacement(model, layer)
        hooked = LayerReplacement(model, layer)
        hooked.split = None
        for run in (split, hooked):
            run.prepare(x)
        assert (split.split is not None and split.split.is_split) == (layer != "input")
        got, ref = split(replacement), hooked(replacement)
        assert torch.allclose(got, ref, atol=1e-6)
        if layer == "b":
            assert torch.allclose(got, model.head(torch.relu(replacement) + torch.relu(model.a(x))), atol=1e-6)
        assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match="prepare"):
        LayerReplacement(_Residual(), "b")(torch.zeros(1, 6))


def test_layer_replacement_follows_model_changes() -> None:
    torch.manual_seed(1)
    from tests.test_ablation import Flagged

    model = Flagged().eval()
    x = torch.randn(20, 4)
    run = LayerReplacement(model, "act")
    run.prepare(x)
    h = torch.relu(model.a(x))
    assert torch.equal(run(h), model(x))
    model.use_c = True
    run.prepare(x)
    assert run.split is not None and run.split.is_split and torch.equal(run(h), model(x))


def test_order_accuracies_carry_standard_errors_that_cover_the_seed_to_seed_spread() -> None:
    import lightning.pytorch as pl
    from scipy import stats

    from lightning_interp.callbacks import CorrelationOrderCallback
    from lightning_interp.models import MLPClassifier
    from lightning_interp.stats import mean_and_se
    from tests.contract import gaussian3_datamodule

    values = torch.tensor([0.0, 1.0, 1.0, 3.0, 7.0], dtype=torch.float64)
    mean, se = mean_and_se(values)
    assert mean.item() == pytest.approx(values.mean().item()) and se.item() == pytest.approx(stats.sem(values.numpy()))
    assert mean_and_se(values[:1])[1].isnan()

    pl.seed_everything(0, verbose=False)
    model = MLPClassifier(2, 3, hidden=(16,), lr=1e-2)
    dm = gaussian3_datamodule()
    kw: dict = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(max_epochs=3, **kw).fit(model, dm)
    runs = []
    for seed in range(6):  # other probe sets (drawn from 96 validation examples) and other surrogate draws
        cb = CorrelationOrderCallback(layers=["net.1"], probe_size=96, seed=seed, log_images=False)
        trainer = pl.Trainer(max_steps=0, callbacks=[cb], **kw)
        trainer.validate(model, dm, verbose=False)
        runs.append(cb.history[-1])
    for h in runs:
        p, n = h["net.1/acc_real"], 96
        assert h["net.1/acc_real_se"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5, rel=1e-9)  # binomial, ddof=1
        assert 0 < h["net.1/higher_order_gap_se"] < 0.2
    gaps = torch.tensor([h["net.1/higher_order_gap"] for h in runs])
    ses = torch.tensor([h["net.1/higher_order_gap_se"] for h in runs])
    # the probe is the whole validation set here, so seeds differ only by the surrogate draw: the spread of
    # the gap between seeds stays within the reported error bar
    assert gaps.std().item() <= 1.5 * ses.mean().item()


# ------------------------------------------------------------------------------------ issue 21: cost, scaling, checks
@pytest.mark.parametrize("groups", [7, 60])
def test_non_gaussianity_and_its_jackknife_equal_refits_without_each_group(groups: int) -> None:
    from lightning_interp.correlation import non_gaussianity
    from lightning_interp.stats import replicate_standard_error

    torch.manual_seed(0)
    x = torch.relu(torch.randn(60, 7) + torch.tensor([0.0, 0.0, 0.0, 1.0, -2.0, -3.0, 0.5]))
    x[:, 6] = 0.0
    x[3, 6] = 2.0  # a unit active in one example: constant (left out) in the replicate without it
    y = torch.arange(60) % 3

    def refit(keep: torch.Tensor) -> torch.Tensor:
        moments = ClassMoments(3, covariances=False)
        moments.update(x[keep], y[keep])
        return moments.non_gaussianity()

    value, se = non_gaussianity(x, y, groups=groups)
    group = torch.arange(60) % groups
    replicates = torch.stack([refit(group != j) for j in range(groups)])
    torch.testing.assert_close(value, refit(torch.ones(60, dtype=torch.bool)))
    torch.testing.assert_close(se, replicate_standard_error(replicates, "jackknife"))
    bad = x.clone()
    bad[0, 0] = math.nan
    assert all(v.isnan() for v in non_gaussianity(bad, y))


def _prepared_correlation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: object) -> CorrelationOrderCallback:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    cb = CorrelationOrderCallback(probe=(x, y), probe_size=len(x), log_images=False, **kw)  # type: ignore[arg-type]
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(callbacks=[cb], **kw).validate(model, DataLoader(TensorDataset(x, y), batch_size=64), verbose=False)  # type: ignore[arg-type]
    return cb


def test_scaled_correlation_equals_the_full_measurement_of_its_class_balanced_prefix() -> None:
    from lightning_interp.hooks import isolate
    from lightning_interp.models import MLPClassifier

    torch.manual_seed(2)
    model = MLPClassifier(4, 3, hidden=(8,))
    y = torch.tensor([0] * 40 + [1] * 25 + [2] * 15)[torch.randperm(80)]
    x = torch.randn(80, 4) + y[:, None].float()
    cb = _prepared_correlation(model, x, y, layers=["input", "net.1"], min_per_class=5)
    assert cb.work_floor() == pytest.approx(5 / 15)
    assert cb.history[-1]["probe_size"] == 80 and "net.1/non_gaussianity_se" in cb.history[-1]
    probe = cb._probe
    cb.work, cb.step = 0.25, 7
    with isolate(model):
        scaled = cb.measure(model)
    cb.work = 1.0
    # the first ceil(0.25 n_c) examples of every class, at least min_per_class: 10, 7 and 5
    sub = torch.cat([torch.nonzero(probe[1] == c).flatten()[:k] for c, k in ((0, 10), (1, 7), (2, 5))]).sort().values
    assert scaled.scalars["probe_size"] == 22
    cb._probe = (probe[0][sub], probe[1][sub])
    cb._members = [torch.nonzero(cb._probe[1] == c).flatten() for c in range(3)]
    with isolate(model):
        ref = cb.measure(model)
    assert set(scaled.scalars) == set(ref.scalars)
    for name, value in ref.scalars.items():
        torch.testing.assert_close(torch.as_tensor(scaled.scalars[name]), torch.as_tensor(value), msg=name)
    read_outs = [k for k in ref.scalars if k != "probe_size" and not k.endswith("_se")]
    assert read_outs and all(f"{k}_se" in ref.scalars for k in read_outs)


def test_correlation_read_outs_are_nan_for_non_finite_logits() -> None:
    from lightning_interp.hooks import isolate
    from lightning_interp.models import MLPClassifier

    torch.manual_seed(3)
    model = MLPClassifier(4, 3, hidden=(8,))
    y = torch.arange(60) % 3
    cb = _prepared_correlation(model, torch.randn(60, 4), y, layers=["input", "net.1"])
    with torch.no_grad():
        model.net[2].weight[0, 0] = math.nan  # the head: every logit row NaN, every layer's features finite
    with isolate(model):
        m = cb.measure(model)
    for layer in ("input", "net.1"):
        for name in ("acc_real", "acc_order2", "acc_order1", "acc_order0", "higher_order_gap"):
            assert math.isnan(float(m.scalars[f"{layer}/{name}"])), (layer, name)  # not 1/3: argmax of NaN is 0
    assert not math.isnan(float(m.scalars["input/non_gaussianity"]))


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.aux = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # defined, never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_layer_that_never_runs_fails_before_the_first_step() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_interp.models import ClassifierModule

    class Model(ClassifierModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = _Unused()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.arange(64) % 3), batch_size=8)
    cb = CorrelationOrderCallback(layers=["body.net.1", "body.aux.1"], probe_size=60, every_n_steps=8)
    trainer = pl.Trainer(max_steps=10, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"\['body.aux.1'\] exist in Model but do not run in its forward"):
        trainer.fit(Model(), data)
    assert trainer.global_step == 0
