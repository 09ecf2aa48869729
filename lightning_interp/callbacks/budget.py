"""The overhead-budget planner: which cadence points measure, and at what size.

A pure function of times and costs (no Lightning, no torch), so the policy is unit-tested on its own:

* the **final** measurement (the end of ``fit``) always runs. It may use whatever of the share of the
  whole fit's training time the measurements before it left, down to the callback's floor size; when even
  the floor costs more, it still runs at the floor and :attr:`Plan.over_budget` says so (the callback then
  warns with the numbers);
* the final measurement's cost is **reserved** up front: at most half the budget expected for the whole fit
  (or the full cost, when smaller), so measurements in between cannot use up what the final one needs;
* a point **in between** may spend the rest of the budget in proportion to the training time so far
  (``share x training time x (1 - reserve / budget)``). It runs at full size when that allows, at a
  reduced size (down to the floor) when only that fits, and is skipped otherwise;
* a point whose metric a monitor (``EarlyStopping``, ``ModelCheckpoint``) reads always runs, at the size
  the budget allows but never below the floor: the user asked for that metric at that epoch.

Sizes are fractions of a full measurement (``work``); the callback turns a fraction into probe examples
or MCMC steps (:meth:`~lightning_interp.callbacks.base.InterpretabilityCallback.scaled`). Costs are
assumed proportional to the work, which the callbacks' floors keep roughly true.

A callback keeps one fit's account in a :class:`Ledger`: the share, the clock, the seconds spent, the cost
estimate, the points skipped and measured; :meth:`Ledger.plan` asks :func:`plan_point` about a point and
:meth:`Ledger.record` books a measurement. The total share for ``budget="auto"`` callbacks is
:func:`default_budget`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

__all__ = [
    "BUDGET_ENV",
    "BUDGET_SLACK",
    "BUDGET_TIMED",
    "DEFAULT_BUDGET",
    "FINAL_RESERVE",
    "RENDER_PILOT",
    "Ledger",
    "Plan",
    "default_budget",
    "expected_training_time",
    "floor_warning",
    "plan_point",
]

#: The largest part of the whole fit's budget reserved for the final measurement.
FINAL_RESERVE = 0.5
#: The share of training wall time that all lightning-interp callbacks on a trainer may use together.
DEFAULT_BUDGET = 0.05
#: The part of a callback's share its timed measurements may use (the rest covers the per-step hook calls).
BUDGET_TIMED = 0.9
#: Seconds of allowance left after a measurement in between that let it render figures before their cost is known.
RENDER_PILOT = 0.25
#: Seconds by which a measurement that must run (the final one, a monitored one) may exceed the budget unannounced.
BUDGET_SLACK = 0.5
#: Environment variable overriding :data:`DEFAULT_BUDGET` for ``budget="auto"`` callbacks (a share, or ``off``).
BUDGET_ENV = "LIGHTNING_INTERP_BUDGET"


def default_budget() -> float | None:
    """The total share for ``budget="auto"`` callbacks: ``LIGHTNING_INTERP_BUDGET`` if set, else 0.05.

    Raises:
        ValueError: the variable is neither ``off`` nor a number in (0, 1].
    """
    value = os.environ.get(BUDGET_ENV, "").strip().lower()
    if not value:
        return DEFAULT_BUDGET
    if value in ("off", "none"):
        return None
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:
        raise ValueError(f"{BUDGET_ENV} must be 'off' or a share of training time in (0, 1], got {value!r}")
    return share


@dataclass(frozen=True)
class Plan:
    """What to do at one cadence point.

    Attributes:
        run: whether to measure.
        work: the fraction of a full measurement to do (``0`` when skipped).
        over_budget: the measurement runs although even its floor size exceeds what is left of the budget
            (the final measurement, or one a monitor reads).
        allowance: seconds the budget allowed this point (``inf`` without a budget or a cost estimate).
    """

    run: bool
    work: float
    over_budget: bool = False
    allowance: float = math.inf


def expected_training_time(training_time: float, steps_done: int, total_steps: float | None) -> float:
    """Training time (without measurements) the whole fit is expected to take, by linear extrapolation.

    Args:
        training_time: seconds of training so far, measurements excluded.
        steps_done: optimizer steps so far.
        total_steps: the fit's total steps (``trainer.estimated_stepping_batches``); ``None`` or infinite
            when unknown (an iterable without a length and no ``max_steps``).

    Returns:
        The extrapolated total, never less than ``training_time`` (the time so far when unknown).
    """
    if total_steps is None or not math.isfinite(total_steps) or steps_done <= 0:
        return training_time
    return training_time * max(1.0, total_steps / steps_done)


def plan_point(
    *,
    share: float | None,
    cost: float | None,
    floor: float,
    training_time: float,
    expected_time: float,
    spent: float,
    final: bool = False,
    monitored: bool = False,
) -> Plan:
    """Decide whether (and at what size) to measure at a cadence point.

    Args:
        share: the share of training time this callback's measurements may use; ``None`` for no limit.
        cost: seconds of a full measurement (a pilot's estimate or the last measurement's, scaled to full
            size); ``None`` when unknown (the point then runs at full size).
        floor: the smallest fraction of a full measurement the callback can do, in (0, 1].
        training_time: seconds of training so far, the callbacks' measurements excluded.
        expected_time: training time the whole fit is expected to take (:func:`expected_training_time`).
        spent: seconds this callback's measurements (and pilots) used so far in this fit.
        final: the measurement at the end of the fit (always runs).
        monitored: a monitor reads this point's metric (always runs).

    Returns:
        The :class:`Plan`.
    """
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be a fraction in (0, 1], got {floor!r}")
    if share is None or cost is None or cost <= 0:
        return Plan(run=True, work=1.0)
    if final:
        allowance = share * max(training_time, expected_time) - spent
    else:
        budget = share * max(training_time, expected_time)
        reserve = min(cost, max(floor * cost, FINAL_RESERVE * budget))
        paced = share * training_time * (1 - reserve / budget) if budget > 0 else 0.0
        allowance = paced - spent
    fits = allowance / cost
    if fits >= floor:
        return Plan(run=True, work=min(1.0, fits), allowance=allowance)
    if final or monitored:
        return Plan(run=True, work=floor, over_budget=True, allowance=allowance)
    return Plan(run=False, work=0.0, allowance=allowance)


@dataclass
class Ledger:
    """One fit's account of a callback's measurement time (all times in seconds of ``time.perf_counter``).

    Attributes:
        share: the share of training time the callback may use (``None``: no limit).
        clock: when the fit's account started, moved back by the checks made before it (they count as spent).
        spent: seconds the measurements, pilots and checks used in this fit.
        cost: seconds of a full measurement, figures apart (``None`` until a pilot or a measurement tells).
        skipped: cadence points the budget skipped.
        measured: measurements made at cadence points (and the end).
        render_cost: seconds the last figures took (``None`` until figures were rendered).
        step0: the trainer's step when the account started (a resumed fit starts past 0).
    """

    share: float | None = None
    clock: float = field(default_factory=time.perf_counter)
    spent: float = 0.0
    cost: float | None = None
    skipped: int = 0
    measured: int = 0
    render_cost: float | None = None
    step0: int = 0

    def start(self, share: float | None, step: int, spent: float = 0.0) -> None:
        """Open the account of a fit at trainer step ``step``, with ``spent`` seconds used already (the checks)."""
        self.clock, self.spent, self.cost, self.skipped = time.perf_counter() - spent, spent, None, 0
        self.measured, self.step0, self.render_cost, self.share = 0, step, None, share

    def overhead(self) -> float:
        """Share of the wall time since :attr:`clock` that the measurements used."""
        elapsed = time.perf_counter() - self.clock
        return self.spent / elapsed if elapsed > 0 else 0.0

    def plan(
        self, *, floor: float, step: int, total_steps: float | None, final: bool, monitored: bool
    ) -> tuple[Plan, float, float]:
        """Plan the point at trainer ``step`` with the current cost estimate (:func:`plan_point`).

        A tenth of the share stays free for what is not timed here (Lightning calling the hooks every step):
        the measurements may use :data:`BUDGET_TIMED` of it.

        Returns:
            ``(plan, training seconds so far, overhead so far)``.
        """
        elapsed = time.perf_counter() - self.clock
        training = max(0.0, elapsed - self.spent)
        plan = plan_point(
            share=None if self.share is None else BUDGET_TIMED * self.share,
            cost=self.cost,
            floor=floor,
            training_time=training,
            expected_time=expected_training_time(training, step - self.step0, total_steps),
            spent=self.spent,
            final=final,
            monitored=monitored,
        )
        return plan, training, self.spent / elapsed if elapsed > 0 else 0.0

    def renders(self, allowance: float, work: float, final: bool) -> bool:
        """Whether a measurement of size ``work`` renders its figures.

        Figures cost a fixed time whatever the size (0.1-0.3 s each on a CPU): at the end of the fit always, in
        between only when what the allowance leaves after the measurement covers them.
        """
        leftover = allowance - work * (self.cost or 0.0)
        return final or leftover >= (RENDER_PILOT if self.render_cost is None else self.render_cost)

    def record(self, seconds: float, render_seconds: float, work: float) -> None:
        """Book a measurement of size ``work`` that took ``seconds``, ``render_seconds`` of them for figures.

        The cost estimate becomes this measurement's, scaled to full size, figures apart.
        """
        if render_seconds:
            self.render_cost = render_seconds
        self.cost = (seconds - render_seconds) / work
        self.spent += seconds
        self.measured += 1


def floor_warning(
    who: str, step: int, final: bool, work: float, ledger: Ledger, allowance: float, training: float, monitor: str | None
) -> str:
    """The warning for a measurement that must run although even its smallest size exceeds the budget.

    Args:
        who: the callback's name.
        step: the trainer step of the measurement.
        final: whether it is the final measurement.
        work: its size (the floor).
        ledger: the account (share, cost estimate, seconds spent).
        allowance: seconds the budget left for it.
        training: seconds of training so far.
        monitor: the monitored metric that makes it run (``None`` when none does).
    """
    share, cost = ledger.share or 0.0, ledger.cost or 0.0
    size = f"{work:.0%} of a full one" if work < 1 else "full size: it cannot be scaled"
    return (
        f"{who}: the {'final ' if final else ''}measurement at step {step} runs "
        f"at its smallest size ({size}, about {work * cost:.2f} s), more than "
        f"this callback's share of the training time allows ({share:.1%}: {max(0.0, allowance):.2f} s "
        f"left of it; {ledger.spent:.2f} s used in {training:.1f} s of training)"
        + (f", because {monitor!r} is monitored" if monitor is not None and not final else "")
        + ". To stay within it: a cheaper setting (a later layer, a smaller probe_size, fewer MCMC steps), "
        "or a larger budget (budget=0.2, or LIGHTNING_INTERP_BUDGET for all) to say the cost is fine."
    )
