"""Error-bar helpers against textbook forms."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.stats import mean_and_se, replicate_standard_error


def test_jackknife_of_a_mean_is_the_usual_standard_error() -> None:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loo = (x.sum(0) - x) / 49
    _, se = mean_and_se(x)
    assert torch.allclose(replicate_standard_error(loo, "jackknife"), se)


def test_bootstrap_standard_error_is_the_spread_of_replicates() -> None:
    x = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    assert replicate_standard_error(x, "bootstrap").item() == pytest.approx(2.0)
    assert replicate_standard_error(x[:1], "bootstrap").isnan()
    with pytest.raises(ValueError, match="jackknife"):
        replicate_standard_error(x, "bagging")
