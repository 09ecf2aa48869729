"""measure_posterior_gap: the callback logs exactly what the function returns, and the function against references."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import PosteriorGapCallback
from lightning_interp.datamodules import SyntheticDataModule
from lightning_interp.posterior import (
    PosteriorGapResult,
    exact_posterior,
    measure_posterior_gap,
    posterior_gap,
)
from lightning_interp.probe import draw_probe
from lightning_interp.results import MethodResult, flat_scalars
from lightning_interp.tasks import GaussianMixtureTask, GenerativeTask, xie_task

from .recorder import BASE_KEYS, Recorder


class TinyMLP(pl.LightningModule):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _same(logged: dict[str, float], expected: dict[str, Any]) -> None:
    """Every key, the same value; NaN equals NaN."""
    assert set(logged) == set(expected), sorted(set(logged) ^ set(expected))
    for key, value in expected.items():
        want, got = float(value), float(logged[key])
        assert (math.isnan(want) and math.isnan(got)) or want == got, (key, got, want)


def _mixture() -> GenerativeTask:
    """Three classes in 2-D, one a mixture of two Gaussians."""
    return GaussianMixtureTask(
        weights=[[1.0], [0.4, 0.6], [1.0]],
        means=[[[-1.0, 0.0]], [[1.0, -1.0], [0.0, 2.0]], [[2.0, 1.0]]],
        covariances=[
            [[[0.5, 0.1], [0.1, 1.0]]],
            [[[0.6, 0.0], [0.0, 0.4]], [[1.0, 0.0], [0.0, 0.3]]],
            [[[1.0, 0.0], [0.0, 1.0]]],
        ],
    )


@pytest.mark.parametrize("case", ["task_probe", "unlabelled_probe", "no_bins_2d"])
def test_the_callback_logs_what_measure_posterior_gap_returns(case: str) -> None:
    task = _mixture() if case == "no_bins_2d" else xie_task(3)
    torch.manual_seed(0)
    seed, size = 11, 300
    settings: dict[str, Any] = {"num_density_bins": 0 if case == "no_bins_2d" else 6, "grid_size": 50}
    source = task.sample(500, torch.Generator().manual_seed(1))[0] if case == "unlabelled_probe" else None
    cb = PosteriorGapCallback(probe_size=size, seed=seed, log_images=False, budget=None, probe=source, **settings)
    recorder = Recorder()
    model = TinyMLP(task.dim, task.num_classes)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[cb], logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, SyntheticDataModule(task, 256, 64, 64, batch_size=64))
    logged = [m for _, m in recorder.rows if any(k.startswith("posterior_gap/") for k in m)][-1]
    logged = {k.removeprefix("posterior_gap/"): v for k, v in logged.items() if k.split("/")[-1] not in BASE_KEYS}
    # the probe rebuilt from the seed alone: drawn from the task (or from `probe`), then missing labels from p(c|x)
    generator = torch.Generator().manual_seed(seed)
    if source is None:
        x, y = task.sample(size, generator)
    else:
        x, y = draw_probe(source, size, generator).inputs, None
    result = measure_posterior_gap(model.eval(), x, y, generator=generator, task=task, **settings)
    assert isinstance(result, MethodResult)
    assert torch.equal(result.exact.inputs, cb.probe_inputs) and torch.equal(result.exact.labels, cb.probe_labels)
    _same(logged, flat_scalars(result))
    _same({k: v for k, v in cb.history[-1].items() if k not in ("step", "epoch", *BASE_KEYS)}, flat_scalars(result))
    assert cb.tables(cb.last) == result.tables()
    assert ("kl_low_density" in logged) == (case != "no_bins_2d")


def test_measure_posterior_gap_against_independent_references() -> None:
    """Every read-out from the softmax and the task's posterior, computed directly."""
    task = xie_task(2)
    torch.manual_seed(3)
    model = TinyMLP(1, 2).eval()
    x, y = task.sample(400, torch.Generator().manual_seed(4))
    result = measure_posterior_gap(model, x, y, task=task, num_density_bins=4, batch_size=64)
    assert isinstance(result, PosteriorGapResult)
    with torch.no_grad():
        logits = model(x).double()
    p, lq = task.posterior(x), logits.log_softmax(1)
    q = lq.exp()
    scalars = result.scalars()
    kl = (p * (p.log() - lq)).sum(1)
    assert float(scalars["kl"][0]) == pytest.approx(float(kl.mean()), rel=1e-9)
    assert float(scalars["kl"][1]) == pytest.approx(float(kl.std() / math.sqrt(400)), rel=1e-9)
    assert float(scalars["tv"][0]) == pytest.approx(float(0.5 * (p - q).abs().sum(1).mean()), rel=1e-9)
    assert float(scalars["mean_max_abs"][0]) == pytest.approx(float((p - q).abs().max(1).values.mean()), rel=1e-9)
    assert float(scalars["max_abs"][0]) == pytest.approx(float((p - q).abs().max())) and scalars["max_abs"][1] is None
    ce = F.nll_loss(lq, y, reduction="none")
    entropy = -(p * p.log()).sum(1)
    assert float(scalars["excess_ce"][0]) == pytest.approx(float((ce - entropy).mean()), rel=1e-9)
    accuracy = (logits.argmax(1) == y).double()
    bayes = (p.argmax(1) == y).double()
    assert float(scalars["accuracy"][0]) == pytest.approx(float(accuracy.mean()))
    assert float(scalars["accuracy_gap"][0]) == pytest.approx(float((bayes - accuracy).mean()))
    assert float(scalars["accuracy_gap"][1]) == pytest.approx(float((bayes - accuracy).std() / math.sqrt(400)))
    # the low-density gap: the mean over the quarter of the probe with the lowest log p(x)
    low = task.log_density(x).argsort()[:100]
    assert float(scalars["kl_low_density"][0]) == pytest.approx(float(kl[low].mean()), rel=1e-9)
    tv = posterior_gap(logits[low], p[low], reduction="none")["tv"]
    assert float(scalars["tv_low_density"][0]) == pytest.approx(float(tv.mean()), rel=1e-9)
    assert float(scalars["tv_low_density"][1]) == pytest.approx(float(tv.std() / 10), rel=1e-9)
    columns, rows = result.tables()["by_density"]
    assert columns[:4] == ["bin", "log_density_low", "log_density_high", "count"] and len(rows) == 4
    assert [r[3] for r in rows] == [100] * 4 and rows[0][1] == -math.inf and rows[-1][2] == math.inf
    # a 1-D task: the grid of the figure spans the probe, with the model's logits on it
    assert result.exact.grid is not None and result.grid_logits is not None and result.grid_logits.shape == (400, 2)


def test_exact_posterior_draws_missing_labels_from_the_posterior() -> None:
    task = xie_task(1)
    x = task.sample(2000, torch.Generator().manual_seed(0))[0]
    exact = exact_posterior(task, x, generator=torch.Generator().manual_seed(5), num_density_bins=0)
    expected = torch.multinomial(task.posterior(x), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert torch.equal(exact.labels, expected) and exact.density_edges is None
    torch.testing.assert_close(exact.log_posterior, task.log_posterior(x))
    torch.testing.assert_close(exact.log_density, task.log_density(x))
    # the labels follow p(c|x): their mean is the posterior's mean (8 standard errors)
    p1 = task.posterior(x)[:, 1]
    assert abs(float(exact.labels.double().mean() - p1.mean())) < 8 * math.sqrt(float((p1 * (1 - p1)).mean()) / 2000)


def test_measure_posterior_gap_errors() -> None:
    task = xie_task(1)
    x, y = task.sample(10, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="GenerativeTask"):
        measure_posterior_gap(TinyMLP(1, 2), x, y, task="xie")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not \[N, 2\].*task.num_classes"):
        measure_posterior_gap(TinyMLP(1, 3), x, y, task=task)


def test_unlabelled_loader_probe() -> None:
    """``probe`` as a DataLoader of unlabelled inputs: the same probe and labels as the function's."""
    task = xie_task(1)
    source = DataLoader(TensorDataset(task.sample(64, torch.Generator().manual_seed(2))[0]), batch_size=16)
    cb = PosteriorGapCallback(probe=source, probe_size=32, seed=3, num_density_bins=0, log_images=False, budget=None)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model = TinyMLP(1, 2)
    trainer.fit(model, SyntheticDataModule(task, 64, 16, 16, batch_size=32))
    generator = torch.Generator().manual_seed(3)
    drawn = draw_probe(source, 32, generator)
    result = measure_posterior_gap(model.eval(), drawn.inputs, None, generator=generator, task=task, num_density_bins=0)
    _same({k: v for k, v in cb.history[-1].items() if k not in ("step", "epoch", *BASE_KEYS)}, flat_scalars(result))
