"""The overhead budget: scheduled measurements stay within a share of the training wall time.

Timings appear here only as the controller's inputs (a measurement that sleeps); no test asserts how fast
anything runs.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import CorrelationOrderCallback, InterpretabilityCallback, Measurement
from lightning_interp.callbacks.budget import BUDGET_ENV, Plan, default_budget, expected_training_time, plan_point


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


# ---------------------------------------------------------------------- the planner, on its own
def test_the_planner_always_runs_the_final_measurement_at_the_size_left() -> None:
    # 100 s of training, a 10% share: 10 s of budget; 4 s spent so far
    plan = plan_point(share=0.1, cost=2.0, floor=0.25, training_time=100, expected_time=100, spent=4.0, final=True)
    assert plan.run and plan.work == 1.0 and not plan.over_budget
    plan = plan_point(share=0.1, cost=12.0, floor=0.25, training_time=100, expected_time=100, spent=4.0, final=True)
    assert plan.run and plan.work == pytest.approx(6 / 12) and not plan.over_budget, "what is left: 6 of 12 s"
    plan = plan_point(share=0.1, cost=100.0, floor=0.25, training_time=100, expected_time=100, spent=4.0, final=True)
    assert plan.run and plan.work == 0.25 and plan.over_budget and plan.allowance == pytest.approx(6.0)


def test_the_planner_reserves_the_final_measurement_and_paces_the_rest() -> None:
    # whole fit: 100 s expected, 10% share = 10 s; a full measurement costs 8 s, floor 0.25 (2 s):
    # the final one is reserved min(8, max(2, 5)) = 5 s, so points in between share 5 s in proportion to time
    kw = {"share": 0.1, "cost": 8.0, "floor": 0.25, "expected_time": 100.0}
    assert not plan_point(training_time=30, spent=0.0, **kw).run, "1.5 s paced: below the 2 s floor"
    plan = plan_point(training_time=50, spent=0.0, **kw)
    assert plan.run and plan.work == pytest.approx(2.5 / 8) and plan.allowance == pytest.approx(2.5)
    assert not plan_point(training_time=60, spent=2.5, **kw).run
    plan = plan_point(training_time=100, spent=2.5, **kw)
    assert plan.run and plan.work == pytest.approx(2.5 / 8)
    # with nothing reserved the same points could have spent 10 s: the reserve is what the final one keeps
    final = plan_point(training_time=100, spent=5.0, final=True, **kw)
    assert final.run and final.work == pytest.approx(5 / 8) and not final.over_budget
    # a cheap measurement: the reserve is its full cost, the rest paced
    plan = plan_point(share=0.1, cost=1.0, floor=0.25, training_time=20, expected_time=100, spent=0.0)
    assert plan.run and plan.work == 1.0 and plan.allowance == pytest.approx(0.1 * 20 * 0.9)


def test_the_planner_runs_monitored_points_and_has_no_limit_without_a_budget_or_cost() -> None:
    kw = {"cost": 50.0, "floor": 0.5, "training_time": 10.0, "expected_time": 100.0, "spent": 0.0}
    assert not plan_point(share=0.05, **kw).run
    plan = plan_point(share=0.05, monitored=True, **kw)
    assert plan.run and plan.work == 0.5 and plan.over_budget
    assert plan_point(share=None, **kw) == Plan(run=True, work=1.0)
    assert plan_point(share=0.05, **{**kw, "cost": None}) == Plan(run=True, work=1.0)
    with pytest.raises(ValueError, match="floor must be a fraction"):
        plan_point(share=0.05, **{**kw, "floor": 0.0})


def test_expected_training_time_extrapolates_by_steps() -> None:
    assert expected_training_time(10.0, 25, 100) == 40.0
    assert expected_training_time(10.0, 25, None) == 10.0 and expected_training_time(10.0, 25, math.inf) == 10.0
    assert expected_training_time(10.0, 0, 100) == 10.0 and expected_training_time(10.0, 200, 100) == 10.0


# ---------------------------------------------------------------------- the plan in a fit
def test_a_slow_measurement_is_kept_under_its_budget_and_still_measures_at_the_end() -> None:
    cb = SlowProbe(0.05, every_n_steps=1, budget=0.1)  # wanted: 120 x 50 ms = 6 s against ~1.2 s of training
    _fit([cb])
    assert cb.history[-1]["step"] == 120.0, "the final measurement always runs"
    assert cb.overhead <= 0.1, "the budget holds, also at the end of training"
    measured = len(cb.history)
    assert 2 <= measured <= 6 and cb.skipped >= 100 and measured + cb.skipped == 120 == cb.measured + cb.skipped
    assert [h["skipped"] for h in cb.history] == sorted(h["skipped"] for h in cb.history)  # a running count
    assert all(0 <= h["overhead"] <= 0.1 for h in cb.history)
    unlimited = SlowProbe(0.002, every_n_steps=1, budget=None)
    _fit([unlimited])
    assert len(unlimited.history) == 120 and "overhead" not in unlimited.history[-1]


def test_a_final_measurement_over_the_budget_runs_with_one_warning_giving_the_numbers() -> None:
    cb = SlowProbe(1.0, every_n_epochs=1, budget=0.05)
    with pytest.warns(UserWarning, match=r"SlowProbe: the final measurement at step 20 runs at its smallest size \(full size"):
        _fit([cb], steps=20)
    assert [h["step"] for h in cb.history] == [20.0] and cb.skipped == 0


class ReducibleProbe(SlowProbe):
    """A measurement whose work can be lowered to ``floor`` of the full one (its sleep scales with it)."""

    def __init__(self, seconds: float, floor: float, **kw: Any) -> None:
        super().__init__(seconds, **kw)
        self.floor, self.works = floor, []

    def work_floor(self) -> float:
        return self.floor

    def measure(self, pl_module: nn.Module) -> Measurement:
        self.works.append(self.work)
        time.sleep(self.seconds * self.work)
        return Measurement(scalars={"value": self.work, "probe_size": self.scaled(100, 25)})


def test_the_budget_scales_the_size_before_it_skips() -> None:
    fixed = SlowProbe(0.05, every_n_steps=5, budget=0.1, key_prefix="fixed")
    _fit([fixed])
    reducible = ReducibleProbe(0.05, floor=0.25, every_n_steps=5, budget=0.1)
    _fit([reducible])
    assert reducible.overhead <= 0.1
    assert reducible.works and all(0.25 <= w <= 1 for w in reducible.works), "reduced, never below the floor"
    assert any(w < 1 for w in reducible.works)
    assert len(reducible.history) > len(fixed.history), "cheaper measurements: more of them fit"
    assert [h["work"] for h in reducible.history] == [h["value"] for h in reducible.history]
    assert [h["probe_size"] for h in reducible.history] == [min(100, max(25, math.ceil(100 * w))) for w in reducible.works]
    assert all(h["work"] == 1.0 for h in fixed.history) and reducible.work == 1.0, "full size outside the budgeted run"


def test_without_a_pilot_the_first_measurement_teaches_the_cost() -> None:
    cb = SlowProbe(0.1, pilot=False, every_n_steps=1, budget=0.2)
    _fit([cb], steps=60)
    assert 2 <= len(cb.history) <= 4
    assert cb.history[0]["step"] == 1.0 and cb.history[0]["skipped"] == 0.0 and cb.history[-1]["step"] == 60.0


def test_auto_budgets_share_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, "0.3")
    assert default_budget() == 0.3
    a, b = SlowProbe(0.01, key_prefix="a"), SlowProbe(0.01, key_prefix="b")
    mine = SlowProbe(0.01, key_prefix="c", budget=0.2)
    trainer = _fit([a, b, mine], steps=4)
    assert trainer.state.finished
    assert (a.ledger.share, b.ledger.share, mine.ledger.share) == pytest.approx((0.15, 0.15, 0.2))
    monkeypatch.setenv(BUDGET_ENV, "off")
    assert default_budget() is None
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="LIGHTNING_INTERP_BUDGET must be 'off' or a share"):
        default_budget()
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        CorrelationOrderCallback(budget=0)


def test_the_default_budget_thins_a_short_fit_to_its_final_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    cb = SlowProbe(0.8, every_n_steps=10)  # budget="auto": 5% of ~0.4 s of training cannot pay for 0.8 s
    with pytest.warns(UserWarning, match="final measurement at step 40 runs at its smallest size"):
        _fit([cb], steps=40)
    assert [h["step"] for h in cb.history] == [40.0] and cb.skipped == 3  # steps 10, 20, 30


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
    # a measurement makes several passes of 5 ms at least: more than 5% of ~0.3 s of training, so the pilots
    # (one pass each) skip the points in between; the end of the fit is measured all the same
    cbs = [
        FinalLayerSaliencyCallback(probe_size=64, budget=0.05, every_n_steps=10),
        CorrelationOrderCallback(probe_size=64, layers=["features.1"], budget=0.05, every_n_steps=10),
    ]
    _fit(cbs, model=SlowCNN(), data=data)
    for cb in cbs:
        assert cb.skipped >= 1 and cb.history[-1]["step"] == 40.0, type(cb).__name__
        assert cb.ledger.cost is not None and cb.ledger.cost >= 0.005 * cb.forward_passes()
