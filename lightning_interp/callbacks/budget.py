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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FINAL_RESERVE", "Plan", "expected_training_time", "plan_point"]

#: The largest part of the whole fit's budget reserved for the final measurement.
FINAL_RESERVE = 0.5


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
