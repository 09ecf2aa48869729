"""The overhead budget: scheduled measurements stay within a share of the training wall time.

Timings appear here only as the controller's inputs (a measurement that sleeps); no test asserts how fast
anything runs.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import CorrelationOrderCallback, InterpretabilityCallback, Measurement
from lightning_interp.callbacks.base import BUDGET_ENV, default_budget


class SlowProbe(InterpretabilityCallback):
    """A measurement that takes ``seconds`` (it sleeps); its pilot says so when ``pilot`` is set."""

    prefix = "slow"
    needs_data = False

    def __init__(self, seconds: float, pilot: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.seconds, self.pilot = seconds, pilot

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        return self.seconds if self.pilot else None

    def measure(self, pl_module: nn.Module) -> Measurement:
        time.sleep(self.seconds)
        return Measurement(scalars={"value": 1.0})


class Slow(pl.LightningModule):
    """A tiny model whose training steps take about 10 ms, so a short fit has a known length."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        time.sleep(0.01)
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), 0.1)


def _fit(callbacks: list[Any], steps: int = 120, model: pl.LightningModule | None = None, data: Any = None) -> pl.Trainer:
    if data is None:
        data = TensorDataset(torch.randn(steps * 4, 4), torch.randint(0, 2, (steps * 4,)))
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model or Slow(), DataLoader(data, batch_size=4))
    return trainer


def test_a_slow_measurement_is_kept_under_its_budget() -> None:
    cb = SlowProbe(0.05, every_n_steps=1, budget=0.1)  # wanted: 120 x 50 ms = 6 s against ~1.2 s of training
    _fit([cb])
    assert cb.overhead <= 0.1, "the budget holds, also at the end of training"
    measured = len(cb.history)
    # 120 step cadence points, plus the epoch end and the end of training when the last step was skipped
    assert 2 <= measured <= 6 and cb.skipped >= 100 and 120 <= measured + cb.skipped <= 122
    assert [h["skipped"] for h in cb.history] == sorted(h["skipped"] for h in cb.history)  # a running count
    overheads = [h["overhead"] for h in cb.history]
    assert all(0 <= o <= 0.1 for o in overheads)
    unlimited = SlowProbe(0.002, every_n_steps=1, budget=None)
    _fit([unlimited])
    assert len(unlimited.history) == 120 and "overhead" not in unlimited.history[-1]


def test_a_measurement_that_can_never_fit_is_skipped_with_the_numbers() -> None:
    cb = SlowProbe(5.0, every_n_epochs=1, budget=0.05)
    with pytest.warns(
        UserWarning,
        match=r"SlowProbe: skipped the measurement at step 20: it would take about 5\.00 s.*share of the training time is 5\.0%",
    ):
        _fit([cb], steps=20)
    assert cb.history == [] and cb.overhead < 0.05


class ReducibleProbe(SlowProbe):
    """A measurement whose work can be lowered to ``floor`` of the full one (its sleep scales with it)."""

    def __init__(self, seconds: float, floor: float, **kw: Any) -> None:
        super().__init__(seconds, **kw)
        self.floor, self.work, self.works = floor, 1.0, []

    def reduce_work(self, fraction: float) -> float | None:
        if fraction < self.floor:
            return None
        self.work = fraction
        return fraction

    def restore_work(self) -> None:
        self.works.append(self.work)
        self.work = 1.0

    def measure(self, pl_module: nn.Module) -> Measurement:
        time.sleep(self.seconds * self.work)
        return Measurement(scalars={"value": self.work})


def test_the_budget_lowers_the_work_before_it_skips() -> None:
    fixed = SlowProbe(0.05, every_n_steps=5, budget=0.1, key_prefix="fixed")
    _fit([fixed])
    reducible = ReducibleProbe(0.05, floor=0.25, every_n_steps=5, budget=0.1)
    _fit([reducible])
    assert reducible.overhead <= 0.1
    assert reducible.works and all(0.25 <= w < 1 for w in reducible.works), "reduced, never below the floor"
    assert len(reducible.history) > len(fixed.history), "cheaper measurements: more of them fit"
    assert [h["work"] for h in reducible.history] == [h["value"] for h in reducible.history]
    assert all(h["work"] == 1.0 for h in fixed.history)


def test_ablation_lowers_its_mcmc_steps_to_a_floor() -> None:
    from lightning_interp.callbacks import AblationProbeCallback

    cb = AblationProbeCallback(layers=["0"], num_steps=1100, burn_in=100)
    cb._units = {"0": 40}  # an MCMC layer
    assert cb.reduce_work(0.5) == pytest.approx(600 / 1100) and cb._steps_now == 600
    cb.restore_work()
    assert cb._steps_now is None
    assert cb.reduce_work(0.2) is None, "a quarter of the kept steps (250) is the floor"
    cb._units = {"0": 10}  # enumerated exactly: a fixed cost
    assert cb.reduce_work(0.9) is None


def test_without_a_pilot_the_first_measurement_teaches_the_cost() -> None:
    cb = SlowProbe(0.1, pilot=False, every_n_steps=1, budget=0.2)
    _fit([cb], steps=60)
    assert 1 <= len(cb.history) <= 3
    assert cb.history[0]["step"] == 1.0 and cb.history[0]["skipped"] == 0.0


def test_auto_budgets_share_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, "0.3")
    assert default_budget() == 0.3
    a, b = SlowProbe(0.01, key_prefix="a"), SlowProbe(0.01, key_prefix="b")
    mine = SlowProbe(0.01, key_prefix="c", budget=0.2)
    trainer = _fit([a, b, mine], steps=4)
    assert trainer.state.finished
    assert (a._share, b._share, mine._share) == pytest.approx((0.15, 0.15, 0.2))
    monkeypatch.setenv(BUDGET_ENV, "off")
    assert default_budget() is None
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="LIGHTNING_INTERP_BUDGET must be 'off' or a share"):
        default_budget()
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        CorrelationOrderCallback(budget=0)


def test_the_default_budget_skips_what_a_short_fit_cannot_afford(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    cb = SlowProbe(0.2, every_n_steps=10)  # budget="auto": 5% of ~0.4 s of training cannot pay for 0.2 s
    with pytest.warns(UserWarning, match="skipped the measurement"):
        _fit([cb], steps=40)
    assert cb.history == [] and cb.skipped == 6  # steps 10, 20, 30, 40, the epoch's end and the end of training


class _DumpSteps(pl.Callback):
    def __init__(self, watched: Any, path: str) -> None:
        self.watched, self.path = watched, path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = [(h["step"], h["overhead"], h["skipped"]) for h in self.watched.history]
        torch.save(steps, f"{self.path}/rank{trainer.global_rank}.pt")


def test_ddp_ranks_measure_at_the_same_steps(tmp_path: Any) -> None:
    cb = SlowProbe(0.03, every_n_steps=1, budget=0.1)
    data = TensorDataset(torch.randn(240, 4), torch.randint(0, 2, (240,)))
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[cb, _DumpSteps(cb, str(tmp_path))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(Slow(), DataLoader(data, batch_size=4))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0] == ranks[1] and 1 <= len(ranks[0]) < 30, "rank 0's clock decides for both ranks"


class SlowCNN(pl.LightningModule):
    """A tiny CNN whose every forward pass takes about 5 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)
        return self.fc(self.features(x).mean((2, 3)))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), 0.1)


def test_the_first_measurement_of_saliency_and_correlation_is_judged_by_a_pilot() -> None:
    from lightning_interp.callbacks import FinalLayerSaliencyCallback

    data = TensorDataset(torch.randn(160, 1, 8, 8), torch.randint(0, 2, (160,)))
    # a measurement makes 3 + 3 x 11 (saliency) or 1 + 3 (correlation) passes of 5 ms at least: more than
    # 5% of ~0.3 s of training, so the pilots (one pass each) stop even the first measurement
    cbs = [
        FinalLayerSaliencyCallback(probe_size=64, budget=0.05),
        CorrelationOrderCallback(probe_size=64, layers=["features.1"], budget=0.05),
    ]
    with pytest.warns(UserWarning, match="skipped the measurement"):
        _fit(cbs, model=SlowCNN(), data=data)
    for cb in cbs:
        assert cb.history == [] and cb.skipped >= 1, type(cb).__name__
        assert cb._cost is not None and cb._cost >= 0.005 * cb.forward_passes()
