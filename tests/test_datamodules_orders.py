"""Datamodules of the correlation-order tasks: XOR and higher-order (MNIST: tests/test_mnist_files.py)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.stats import kurtosis, multivariate_normal

from lightning_interp.datamodules import HigherOrderDataModule, XORDataModule

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _split(dm: pl.LightningDataModule, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup()
    return dm._splits[name].tensors


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z: float = 5.0) -> None:
    """Empirical mean and covariance within ``z`` standard errors (estimated from the data) of the exact ones."""
    x = x.double()
    n = x.shape[0]
    mean_se = x.std(0) / math.sqrt(n)
    assert torch.all((x.mean(0) - mean).abs() < z * mean_se), (x.mean(0), mean)
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    cov_se = prods.std(0) / math.sqrt(n)
    emp = prods.mean(0) * n / (n - 1)
    assert torch.all((emp - cov).abs() < z * cov_se), (emp, cov)


def _qda_accuracy(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    """Quadratic discriminant: Gaussian class models with the empirical class means, covariances and priors."""
    scores = []
    for c in (0, 1):
        xc = x_fit[y_fit == c]
        model = multivariate_normal(xc.mean(0), np.cov(xc, rowvar=False))
        scores.append(model.logpdf(x_eval) + np.log(len(xc) / len(x_fit)))
    return float(((scores[1] > scores[0]).astype(int) == y_eval).mean())


# ---------------------------------------------------------------------------------------------------------------
# XOR


def test_xor_batches_shapes_dtypes() -> None:
    dm = XORDataModule(dim=5, n_train=100, n_val=30, n_test=20, batch_size=16)
    assert dm.num_classes == 2 and dm.dim == 5
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 5) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert set(y.tolist()) <= {0, 1}
    assert [len(dm._splits[s]) for s in ("train", "val", "test")] == [100, 30, 20]
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 30
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 20


def test_xor_noise_free_labels_are_the_sign_product() -> None:
    dm = XORDataModule(dim=4, noise=0.0, n_train=500, n_val=10, n_test=10)
    x, y = _split(dm, "train")
    assert set(x[:, :2].unique().tolist()) == {-1.0, 1.0}
    assert torch.all(x[:, 2:] == 0)
    assert torch.equal(y, (x[:, 0] * x[:, 1] > 0).long())
    # class 1 = equal signs, class 0 = opposite signs, and all four corners occur
    assert torch.all(x[y == 1, 0] == x[y == 1, 1]) and torch.all(x[y == 0, 0] == -x[y == 0, 1])
    assert len({tuple(r) for r in x[:, :2].tolist()}) == 4


def test_xor_noisy_examples_keep_their_corner() -> None:
    noisy = XORDataModule(dim=3, noise=0.3, n_train=4000, seed=5)
    clean = XORDataModule(dim=3, noise=0.0, n_train=4000, seed=5)
    (xn, yn), (xc, yc) = _split(noisy, "train"), _split(clean, "train")
    assert torch.equal(yn, yc)
    assert torch.equal(noisy.signs["train"], xc[:, :2].long())
    assert torch.equal(yn, (noisy.signs["train"].prod(1) > 0).long())
    eps = (xn - xc) / 0.3  # the noise: standard normal in every coordinate, the extra one included
    assert torch.allclose(eps.mean(0), torch.zeros(3), atol=5 / math.sqrt(4000))
    assert torch.allclose(eps.std(0), torch.ones(3), atol=5 * math.sqrt(2 / 4000))
    # with small noise the label is still the sign product of the observed first two coordinates
    small = XORDataModule(dim=3, noise=0.05, n_train=4000, seed=5)
    xs, ys = _split(small, "train")
    assert torch.equal(ys, (xs[:, 0] * xs[:, 1] > 0).long())


def test_xor_class_moments_match_the_exact_ones() -> None:
    dm = XORDataModule(dim=4, noise=0.5, n_train=20_000, n_val=10, n_test=10, seed=1)
    x, y = _split(dm, "train")
    assert abs(y.float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(20_000)
    for c, off in ((0, -1.0), (1, 1.0)):
        cov = dm.class_covariance(c)
        assert cov[0, 1] == cov[1, 0] == off
        assert torch.allclose(cov.diagonal(), torch.tensor([1.25, 1.25, 0.25, 0.25], dtype=torch.float64))
        _assert_moments(x[y == c], dm.class_mean(c), cov)
    # the noise coordinates are independent of the class feature (not only uncorrelated with x_1, x_2)
    feature = (x[:, 0] * x[:, 1]).double()
    for k in (2, 3):
        r = np.corrcoef(x[:, k].double().square().numpy(), feature.numpy())[0, 1]
        assert abs(r) < 5 / math.sqrt(20_000)
        assert abs(np.corrcoef(x[:, k].abs().numpy(), y.numpy())[0, 1]) < 5 / math.sqrt(20_000)


def test_xor_is_solved_by_its_class_covariances() -> None:
    """The contrast to the higher-order task: order 2 carries the XOR class (QDA far above chance)."""
    dm = XORDataModule(dim=2, noise=0.3, n_train=5000, n_test=5000)
    (xf, yf), (xe, ye) = _split(dm, "train"), _split(dm, "test")
    assert _qda_accuracy(xf.double().numpy(), yf.numpy(), xe.double().numpy(), ye.numpy()) > 0.85


def test_xor_reproducible_and_seeded() -> None:
    a, b, c = (XORDataModule(dim=3, n_train=200, seed=s) for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        assert all(torch.equal(u, v) for u, v in zip(_split(a, split), _split(b, split), strict=True))
    assert not torch.equal(_split(a, "train")[0], _split(c, "train")[0])
    assert not torch.equal(_split(a, "val")[0], _split(a, "test")[0])
    x1, y1 = a.sample(50, torch.Generator().manual_seed(3))
    x2, y2 = a.sample(50, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (50, 3)


def test_xor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dim"):
        XORDataModule(dim=1)
    with pytest.raises(ValueError, match="noise"):
        XORDataModule(noise=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        XORDataModule(batch_size=0)
    with pytest.raises(ValueError, match="class"):
        XORDataModule().class_covariance(2)


# ---------------------------------------------------------------------------------------------------------------
# higher order

# raw moments E x^4, E x^6, E x^8 of the unit-variance coordinate distributions
_MOMENTS = {
    "gauss": (3.0, 15.0, 105.0),
    "laplace": tuple(math.factorial(k) * 0.5 ** (k // 2) for k in (4, 6, 8)),  # (2k)! b^(2k), b^2 = 1/2
    "uniform": tuple(3 ** (k // 2) / (k + 1) for k in (4, 6, 8)),  # a^k / (k + 1), a^2 = 3
}


def _kurtosis_se(dist: str, n: int) -> float:
    """Delta-method standard error of the sample excess kurtosis of ``n`` iid draws (zero mean, unit variance)."""
    m4, m6, m8 = _MOMENTS[dist]
    return math.sqrt((4 * m4**2 * (m4 - 1) + (m8 - m4**2) - 4 * m4 * (m6 - m4)) / n)


def test_kurtosis_standard_error_formula() -> None:
    assert _kurtosis_se("gauss", 1) == pytest.approx(math.sqrt(24))  # the textbook 24 / n


@pytest.mark.parametrize("distribution", ["laplace", "uniform"])
def test_higher_order_batches(distribution: str) -> None:
    dm = HigherOrderDataModule(dim=6, n_train=64, n_val=16, n_test=8, batch_size=32, distribution=distribution)
    assert dm.num_classes == 2 and dm.dim == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= {0, 1}
    assert [len(dm._splits[s]) for s in ("train", "val", "test")] == [64, 16, 8]


@pytest.mark.parametrize("distribution", ["laplace", "uniform"])
def test_higher_order_equal_mean_and_covariance(distribution: str) -> None:
    dm = HigherOrderDataModule(dim=8, n_train=20_000, n_val=10, n_test=10, distribution=distribution, seed=2)
    x, y = _split(dm, "train")
    assert abs(y.float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(20_000)
    assert torch.equal(dm.class_covariance(0), torch.eye(8, dtype=torch.float64))
    assert torch.equal(dm.class_covariance(1), dm.class_covariance(0))
    for c in (0, 1):
        _assert_moments(x[y == c], dm.class_mean(c), dm.class_covariance(c))


@pytest.mark.parametrize(("distribution", "expected"), [("laplace", 3.0), ("uniform", -1.2)])
def test_higher_order_kurtosis(distribution: str, expected: float) -> None:
    dm = HigherOrderDataModule(dim=8, n_train=20_000, n_val=10, n_test=10, distribution=distribution, seed=3)
    x, y = _split(dm, "train")
    assert (dm.excess_kurtosis(0), dm.excess_kurtosis(1)) == (0.0, expected)
    for c, dist in ((0, "gauss"), (1, distribution)):
        values = x[y == c].double().flatten().numpy()  # coordinates are iid within a class
        assert abs(kurtosis(values) - dm.excess_kurtosis(c)) < 5 * _kurtosis_se(dist, len(values))
        # symmetric: zero skewness too
        assert abs(float(np.mean(values**3))) < 5 * math.sqrt(_MOMENTS[dist][1] / len(values))


@pytest.mark.parametrize("distribution", ["laplace", "uniform"])
def test_higher_order_quadratic_discriminant_is_at_chance(distribution: str) -> None:
    """Order 2 carries no class information, while the exact likelihood ratio separates the classes."""
    dm = HigherOrderDataModule(dim=8, n_train=20_000, n_val=10, n_test=20_000, distribution=distribution)
    (xf, yf), (xe, ye) = _split(dm, "train"), _split(dm, "test")
    xf, xe, yf, ye = xf.double().numpy(), xe.double().numpy(), yf.numpy(), ye.numpy()
    assert abs(_qda_accuracy(xf, yf, xe, ye) - 0.5) < 0.03
    # positive control: the Bayes classifier (per-coordinate log-likelihood ratio) is well above chance
    if distribution == "laplace":
        llr = (-math.sqrt(2) * np.abs(xe) - 0.5 * math.log(2) + 0.5 * xe**2 + 0.5 * math.log(2 * math.pi)).sum(1)
    else:
        inside = np.all(np.abs(xe) <= math.sqrt(3), axis=1)
        llr = np.where(inside, (-math.log(2 * math.sqrt(3)) + 0.5 * xe**2 + 0.5 * math.log(2 * math.pi)).sum(1), -np.inf)
    assert float(((llr > 0).astype(int) == ye).mean()) > 0.6


def test_higher_order_reproducible_and_validated() -> None:
    a, b = HigherOrderDataModule(n_train=100, seed=4), HigherOrderDataModule(n_train=100, seed=4)
    assert torch.equal(_split(a, "train")[0], _split(b, "train")[0])
    c = HigherOrderDataModule(n_train=100, seed=4, distribution="uniform")
    xa, ya = _split(a, "train")
    xc, yc = _split(c, "train")
    assert torch.equal(ya, yc)  # same labels and Gaussian class-0 draws, different class 1
    assert torch.equal(xa[ya == 0], xc[yc == 0]) and not torch.equal(xa[ya == 1], xc[yc == 1])
    assert xc[yc == 1].abs().max() <= math.sqrt(3)
    with pytest.raises(ValueError, match="distribution"):
        HigherOrderDataModule(distribution="cauchy")
    with pytest.raises(ValueError, match="dim"):
        HigherOrderDataModule(dim=0)
