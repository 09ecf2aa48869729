"""The base every lightning-interp callback builds on: its lifecycle in the Trainer and its cadence.

A subclass chooses its data (:meth:`~InterpretabilityCallback.validate`), calls a method
(:meth:`~InterpretabilityCallback.measure`) and says what to draw (:meth:`~InterpretabilityCallback.figures`,
:meth:`~InterpretabilityCallback.tables`). This class decides when it measures:

* **what each entry point does**, one table (:data:`~lightning_interp.callbacks.stages.STAGES`): ``fit``
  measures at the cadence; ``validate`` (e.g. ``trainer.validate(model, loader, ckpt_path=...)``, the way to
  audit a trained checkpoint) measures once on the restored weights; ``test`` and ``predict`` leave the
  callback idle. Checks that need the model run at ``on_fit_start`` (after ``configure_model`` and
  ``LightningModule.setup``), or at ``on_train_start`` when the only data is the training loader: always
  before the first training step;
* **cadence**: ``every_n_epochs`` and/or ``every_n_steps``, at the end of the training epoch or
  (``run_on="validation_epoch_end"``) inside Lightning's ``inference_mode`` validation; optionally once at fit
  start and once at the end of training; and every epoch an ``EarlyStopping`` / ``ModelCheckpoint`` reads one
  of its metrics;
* **the overhead budget**: which cadence points measure and at what size, planned by the pure
  :mod:`lightning_interp.callbacks.budget`.

What one measurement is (probe data, isolation, read-outs and NaN, history, logging, checkpoint state) is
:class:`~lightning_interp.callbacks.measurement.MeasuringCallback`, with the arguments every callback shares;
argument and model checks are in :mod:`lightning_interp.checks`, probe data in :mod:`lightning_interp.probe`,
logging in :mod:`lightning_interp.loggers`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_interp.callbacks.budget import BUDGET_SLACK, default_budget, floor_warning
from lightning_interp.callbacks.measurement import Measurement, MeasuringCallback, RunOn
from lightning_interp.callbacks.sharding import gathered
from lightning_interp.callbacks.stages import find_monitors, stage_of, total_steps, validation_runs
from lightning_interp.checks import model_device_dtype
from lightning_interp.hooks import isolate

__all__ = ["InterpretabilityCallback", "Measurement", "MeasuringCallback", "RunOn"]


class InterpretabilityCallback(MeasuringCallback):
    """Base class of the lightning-interp callbacks: a :class:`MeasuringCallback` that measures at its cadence.

    The arguments (cadence, seed, logging, probe data, budget) are :class:`MeasuringCallback`'s, shared by every
    callback. Subclasses set :attr:`prefix` and implement :meth:`validate` and :meth:`measure`.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage_of(trainer).new_history:
            # a callback reused for another fit starts a new history (a resumed fit restores its own after this)
            self.history, self.last, self.last_step = [], None, None
            self.monitored = find_monitors(trainer, self.prefix)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # with only a training loader the data appears at on_train_start: prepare there, still before step 1
        if stage_of(trainer).active and (not self.needs_data or self.probe_source(trainer) is not None):
            self.prepare(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not stage_of(trainer).cadence:
            return
        self.prepare(trainer, pl_module)
        self._start_budget(trainer)
        if self.run_on == "validation_epoch_end" and self.every_n_epochs and not validation_runs(trainer):
            self.warn_once(
                "no-validation",
                f"{type(self).__name__}(run_on='validation_epoch_end') but this fit runs no validation (no validation "
                "data, or limit_val_batches=0): it measures only at the start and end. Use run_on='train_epoch_end'.",
            )
        # a resumed run restores trained weights: a "step 0" measurement of them would be a fake start
        if self.measure_at_start and trainer.global_step == 0 and trainer.ckpt_path is None and not self.history:
            self.scheduled_run(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stage_of(trainer).prepare_at_validation_start:
            self.prepare(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a metric is in callback_metrics only in an epoch that measured it: monitors never see stale values
        for key in [k for k in trainer.callback_metrics if k.startswith(self.prefix + "/")]:
            del trainer.callback_metrics[key]

    # ------------------------------------------------------------------ cadence
    def _monitor_due(self, trainer: pl.Trainer) -> bool:
        return any((trainer.current_epoch + 1) % every == 0 for _, every in self.monitored)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.scheduled_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not stage_of(trainer).cadence or trainer.global_step == self.last_step:
            return
        monitored = self._monitor_due(trainer)
        if monitored or (self.run_on == "train_epoch_end" and self._epoch_due(trainer)):
            self.scheduled_run(trainer, pl_module, monitored=monitored)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        what = stage_of(trainer).in_validation
        if trainer.sanity_checking:
            return
        if what == "once":  # trainer.validate(): one measurement of the (restored) weights
            self.run(trainer, pl_module)
        elif what == "cadence" and trainer.global_step != self.last_step:
            # a monitored metric is measured here when validation runs: before the monitor reads it, whether it
            # checks at the end of validation or of the training epoch
            monitored = self._monitor_due(trainer)
            if monitored or (self.run_on == "validation_epoch_end" and self._epoch_due(trainer)):
                self.scheduled_run(trainer, pl_module, monitored=monitored)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final measurement always runs (its cost was reserved in the budget from the start)
        if stage_of(trainer).cadence and self.measure_at_end and trainer.global_step != self.last_step:
            self.scheduled_run(trainer, pl_module, final=True)

    # ------------------------------------------------------------------ the overhead budget
    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds one measurement would take, from a small pilot (``None``: unknown until measured).

        Called (isolated) before the first scheduled measurement when a budget is set. The default pilot
        times one forward pass of the model over :attr:`probe_inputs` and multiplies by
        :meth:`forward_passes`, the passes a measurement makes; ``None`` when either is unknown.
        """
        passes, inputs = self.forward_passes(), self.probe_inputs
        if passes is None or inputs is None:
            return None
        device, dtype = model_device_dtype(pl_module)
        x = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)
        with torch.no_grad():
            start = time.perf_counter()
            pl_module(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return passes * (time.perf_counter() - start)

    def forward_passes(self) -> float | None:
        """Forward passes over the probe one measurement makes, for the default pilot (``None``: unknown)."""
        return None

    def work_floor(self) -> float:
        """The smallest fraction of a full measurement this callback can make (the budget never goes below).

        The base class cannot scale (``1.0``); a subclass that reads :attr:`work` in :meth:`measure` (through
        :meth:`scaled`) returns the fraction its floors allow.
        """
        return 1.0

    def scaled(self, full: int, floor: int) -> int:
        """The size to use for a quantity of full size ``full`` at the current :attr:`work`, never below ``floor``."""
        return min(full, max(floor, math.ceil(full * self.work)))

    def _start_budget(self, trainer: pl.Trainer) -> None:
        share: float | None = None
        if self.budget == "auto":
            total = default_budget()
            shared = [cb for cb in trainer.callbacks if isinstance(cb, InterpretabilityCallback) and cb.budget == "auto"]  # type: ignore[attr-defined]
            share = None if total is None else total / max(1, len(shared))
        elif self.budget is not None:
            share = float(self.budget)
        # the checks and probe draw of this fit (at on_fit_start / on_train_start) count as spent
        spent, self.prep_seconds = self.prep_seconds, 0.0
        self.ledger.start(share, trainer.global_step, spent)

    @property
    def skipped(self) -> int:
        """Cadence points skipped by the overhead budget in the current fit."""
        return self.ledger.skipped

    @property
    def measured(self) -> int:
        """Measurements made at cadence points (and the end) of the current fit."""
        return self.ledger.measured

    @property
    def spent(self) -> float:
        """Seconds this callback's measurements, pilots and checks used in the current fit."""
        return self.ledger.spent

    @property
    def overhead(self) -> float:
        """Share of the training wall time (since ``on_train_start``) this callback's measurements used."""
        return self.ledger.overhead()

    def scheduled_run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False, monitored: bool = False
    ) -> Measurement | None:
        """Measure at a cadence point as the budget plans it (see ``budget``); ``None`` when skipped.

        Args:
            trainer: the trainer.
            pl_module: the module.
            final: the measurement at the end of the fit (always runs). The last epoch's point is final too
                when the trainer's step count says so.
            monitored: a monitor reads this point's metric (always runs).
        """
        ledger = self.ledger
        if ledger.share is None or not stage_of(trainer).cadence:
            ledger.measured += 1
            return self.run(trainer, pl_module)
        total = total_steps(trainer)
        final = final or (total is not None and trainer.global_step >= total)
        if ledger.cost is None:  # one pilot per fit: a skipped point keeps its estimate
            started = time.perf_counter()
            self.prepare(trainer, pl_module)
            with gathered(trainer, pl_module), isolate(pl_module):
                ledger.cost = self.estimate_cost(pl_module)
            ledger.spent += time.perf_counter() - started  # the pilot is part of the overhead
        plan, training, overhead = ledger.plan(
            floor=self.work_floor(), step=trainer.global_step, total_steps=total, final=final, monitored=monitored
        )
        run, work, over = plan.run, plan.work, plan.over_budget
        if trainer.world_size > 1:  # rank 0's clock decides, so every rank measures at the same steps and sizes
            run, work, over, overhead = trainer.strategy.broadcast((run, work, over, overhead), src=0)
        if not run:
            ledger.skipped += 1
            return None
        if over and work * (ledger.cost or 0.0) - plan.allowance > BUDGET_SLACK:
            monitor = self.monitored[0][0] if monitored else None
            who, step = type(self).__name__, trainer.global_step
            self.warn_once("budget-floor", floor_warning(who, step, final, work, ledger, plan.allowance, training, monitor))
        render = ledger.renders(plan.allowance, work, final)
        begin = time.perf_counter()
        self.work = work
        try:
            extra = {"overhead": overhead, "skipped": float(ledger.skipped), "work": float(work)}
            measurement = self.run(trainer, pl_module, extra=extra, render=render)
        finally:
            self.work = 1.0
        ledger.record(time.perf_counter() - begin, self.render_seconds, work)
        return measurement
