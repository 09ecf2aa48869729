"""The base every lightning-interp callback builds on: its lifecycle in the Trainer and its cadence.

A subclass chooses its data (:meth:`~InterpretabilityCallback.validate`), calls a method
(:meth:`~InterpretabilityCallback.measure`) and says what to draw (:meth:`~InterpretabilityCallback.figures`,
:meth:`~InterpretabilityCallback.tables`). The base class runs it at the cadence (``every_n_epochs`` /
``every_n_steps``, at the end of the training epoch or of validation, once at fit start and end, and at the
epochs an ``EarlyStopping`` / ``ModelCheckpoint`` reads) and keeps the history that survives checkpoints. What
each Trainer entry point does is one table (:data:`~lightning_interp.callbacks.stages.STAGES`: ``fit`` measures
at the cadence, ``validate`` once on the restored weights, ``test`` and ``predict`` never). The other jobs live
in their own modules: the overhead budget (:mod:`~lightning_interp.callbacks.budget`), one measurement and its
NaN handling (:mod:`~lightning_interp.callbacks.measurement`), isolation (:func:`~lightning_interp.hooks.isolate`),
probe data (:mod:`lightning_interp.probe`), logging (:mod:`lightning_interp.loggers`) and argument and model
checks (:mod:`lightning_interp.checks`).
"""


from __future__ import annotations

import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_interp.callbacks.budget import (
    BUDGET_ENV,
    BUDGET_SLACK,
    BUDGET_TIMED,
    DEFAULT_BUDGET,
    RENDER_PILOT,
    Ledger,
    default_budget,
    floor_warning,
)
from lightning_interp.callbacks.measurement import (
    SIZE_KEYS,
    Measurement,
    add_to_history,
    measure_guarded,
    read_out_names,
    read_out_scalars,
)
from lightning_interp.callbacks.sharding import check_not_tensor_parallel, gathered, user_sampler
from lightning_interp.callbacks.stages import find_monitors, probe_candidates, share_probe, stage_of, total_steps, validation_runs
from lightning_interp.checks import (
    check_callback_arguments,
    check_choice,
    check_class_names,
    check_int,
    check_layers_run,
    check_logits,
    check_number,
    model_device_dtype,
    nonfinite_parameters,
)
from lightning_interp.hooks import isolate
from lightning_interp.loggers import figure_filesystem, log_media, log_scalars
from lightning_interp.probe import ProbeSource, Unpack, clean_probe, find_probe_source, no_probe_message, read_probe

# re-exported for the subclasses and earlier imports: the names' homes are the modules above
__all__ = [
    "BUDGET_ENV", "BUDGET_SLACK", "BUDGET_TIMED", "DEFAULT_BUDGET", "RENDER_PILOT", "SIZE_KEYS", "InterpretabilityCallback",
    "Measurement", "RunOn", "check_choice", "check_class_names", "check_int", "check_layers_run", "check_logits",
    "check_number", "default_budget", "figure_filesystem", "isolate", "model_device_dtype", "nonfinite_parameters",
]  # fmt: skip

RunOn = Literal["train_epoch_end", "validation_epoch_end"]

class InterpretabilityCallback(Callback, ABC):
    """Base class of the lightning-interp callbacks (cadence, isolation, probe data, logging, state).

    Subclasses set :attr:`prefix` and implement :meth:`validate` and :meth:`measure`; they may override
    :meth:`figures`, :meth:`tables` and :meth:`state_key_fields`. The arguments below are shared by every
    callback (the subclasses pass them through).

    Args:
        every_n_epochs: measure at the end of every n-th epoch (``None`` or 0: never).
        every_n_steps: measure after every n-th optimizer step (``None`` or 0: never).
        run_on: ``"train_epoch_end"`` or ``"validation_epoch_end"`` (inside Lightning's ``inference_mode``
            validation; skipped during the sanity check) for the epoch cadence. ``EarlyStopping`` and
            ``ModelCheckpoint`` with their defaults read the metrics at the end of the training epoch; use
            ``"validation_epoch_end"`` when they check after validation (``check_on_train_epoch_end=False``).
        measure_at_start: also measure once before the first training step (the untrained network; never on
            a run resumed from a checkpoint).
        measure_at_end: also measure once at the end of training unless the last step was measured.
        seed: seed of the callback's own ``torch.Generator`` (probe sets and any sampling).
        log_images: render figures and send them to the loggers that take images (wandb, TensorBoard; global
            rank 0 only). Nothing is rendered when no logger takes images and ``figure_dir`` is unset.
        figure_dir: also write each figure as a PNG into this folder or URL (global rank 0 only).
        key_prefix: prefix of the logged keys instead of the class's :attr:`prefix` (to tell two instances
            apart in one run, e.g. ``"posterior_gap/preset3"``).
        probe: the probe data, instead of the trainer's: a tensor of inputs, an ``(inputs, labels)`` tuple, a
            map-style ``Dataset`` or a ``DataLoader`` (see :func:`~lightning_interp.probe.find_probe_source`).
        unpack: how to read a batch or dataset item: ``(input_key, label_key)`` (dict keys or tuple positions;
            ``label_key`` ``None`` for unlabelled data) or a callable ``batch -> (inputs, labels)``. By default
            tuples and lists are ``(inputs, labels, ...)`` and dicts use the keys of
            :data:`~lightning_interp.probe.INPUT_KEYS` and :data:`~lightning_interp.probe.LABEL_KEYS`.
        prog_bar: names (without the prefix) of scalars to show in the progress bar.
        budget: the share of training wall time this callback's measurements may use (pilots, figures and
            tables included). ``"auto"``: an equal part of :data:`DEFAULT_BUDGET` (0.05, or
            ``LIGHTNING_INTERP_BUDGET``) shared by all ``"auto"`` callbacks on the trainer; a number: this
            callback's own share; ``None``: no limit. The plan (:func:`~lightning_interp.callbacks.budget.plan_point`):
            the measurement at the end of ``fit`` always runs, its cost reserved from the start; a point in
            between runs at full size when its paced part of the share allows, at a reduced size (down to
            :meth:`work_floor`, logged as ``work``) when only that fits, and is skipped otherwise (counted in
            ``skipped``). A point a monitor reads always runs (at least at the floor). The cost of a full
            measurement is the last one's (scaled to full size), or for the first a pilot
            (:meth:`estimate_cost`). ``trainer.validate`` and explicit :meth:`run` calls are not limited.

    Raises:
        ValueError: a malformed shared argument (negative cadence, unknown ``run_on``, ...).
    """

    #: Prefix of every logged key, e.g. ``"posterior_gap"``.
    prefix: str = "interp"
    #: Whether :meth:`validate` draws probe data from the trainer's data (else from a task or a sampler).
    needs_data: bool = True

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        run_on: RunOn = "train_epoch_end",
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        seed: int = 0,
        log_images: bool = True,
        figure_dir: str | None = None,
        key_prefix: str | None = None,
        probe: ProbeSource | None = None,
        unpack: Unpack = None,
        prog_bar: Sequence[str] = (),
        budget: float | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__()
        check_callback_arguments(**{k: v for k, v in locals().items() if k not in ("self", "__class__", "probe")})
        self.every_n_epochs, self.every_n_steps, self.run_on = every_n_epochs or 0, every_n_steps or 0, run_on
        self.measure_at_start, self.measure_at_end, self.seed = measure_at_start, measure_at_end, seed
        self.log_images, self.figure_dir = log_images, figure_dir
        if key_prefix is not None:
            self.prefix = key_prefix
        self.probe, self.unpack, self.prog_bar, self.budget = probe, unpack, list(prog_bar), budget
        #: This fit's account of the measurements' time (the overhead budget).
        self.ledger = Ledger()
        #: Seconds the last measurement spent rendering and logging figures.
        self.render_seconds = 0.0
        self._monitored: list[tuple[str, int]] = []  # (metric, every n epochs) read by EarlyStopping / ModelCheckpoint
        #: The fraction of a full measurement the measurement in progress does (< 1 only when the budget scaled it).
        self.work = 1.0
        self.generator = torch.Generator().manual_seed(seed)
        #: One dict per measurement: ``step``, ``epoch`` and the scalars (without prefix).
        self.history: list[dict[str, float]] = []
        #: The most recent :class:`Measurement` (tensors on the model's device).
        self.last: Measurement | None = None
        self._warned: set[str] = set()
        #: The warnings this callback issued (each once), for reports.
        self.warning_log: list[str] = []
        self._last_step: int | None = None
        self._prepared_for: Any = None  # weak reference to the module validate() last ran on
        self._found: tuple[Any, str] | None = None  # the probe's source, found once per preparation
        self._state_key: str | None = None  # built on first use, rebuilt at setup()
        self._restored_step: int | None = None  # the step of the checkpoint trainer.validate(ckpt_path=...) restored
        #: The drawn probe inputs and labels (``None`` until drawn; labels ``None`` for unlabelled data).
        self.probe_inputs: Tensor | None = None
        self.probe_labels: Tensor | None = None
        #: Positions of the probe items in their source (``None`` for iterable sources).
        self.probe_indices: Tensor | None = None
        #: The global step of the measurement in progress (methods may seed per-step generators from it).
        self.step = 0

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive torch.multiprocessing's shared-memory pickling
        # (ddp_spawn); carry its state as bytes instead. Weak references do not pickle.
        state = {k: None if isinstance(v, weakref.ref) else v for k, v in self.__dict__.items()}
        state["generator"] = self.generator.get_state().numpy().tobytes()
        state["_state_key"] = None  # a copy may be reconfigured: its key is built afresh
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the configuration against the trainer and module and prepare probe data.

        Called once the model exists (``on_fit_start``, ``on_train_start`` or ``on_validation_start``, always
        before the first training step); raise ``ValueError`` / ``TypeError`` naming the problem and the fix.
        """

    @abstractmethod
    def measure(self, pl_module: nn.Module) -> Measurement:
        """Run the method on ``pl_module`` (already isolated: eval mode, no grad, forked RNG)."""

    def figures(self, measurement: Measurement) -> dict[str, Any]:
        """Matplotlib figures to log, by key (without prefix). Called on global rank 0 only."""
        return {}

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """Tables to log, by key (without prefix): ``(columns, rows)``. Called on global rank 0 only."""
        return {}

    def state_key_fields(self) -> dict[str, Any]:
        """The configuration, beyond cadence, seed and prefix, that tells two instances' checkpoint state apart."""
        return self._state_key_fields()

    def _state_key_fields(self) -> dict[str, Any]:
        # the former name of state_key_fields, still honoured when a subclass overrides it
        return {}

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

    # ------------------------------------------------------------------ probe data
    def probe_source(self, trainer: pl.Trainer) -> tuple[Any, str] | None:
        """Where the probe comes from, ``(source, description)``, in the order of
        :func:`~lightning_interp.probe.find_probe_source` and :func:`~lightning_interp.callbacks.stages.probe_candidates`.

        ``None`` when there is no data yet (a fit whose only data is the training loader, before ``on_train_start``).
        """
        if self._found is None:  # found once per preparation: a datamodule's loaders are built once
            self._found = find_probe_source(self.probe, probe_candidates(trainer))
        return self._found

    def draw_probe(self, trainer: pl.Trainer, size: int) -> tuple[Tensor, Tensor | None]:
        """A fixed probe batch ``(inputs, labels)`` of ``size`` items from :meth:`probe_source`, read with ``unpack``.

        Indices come from the callback's own generator only; labels are ``None`` for unlabelled data. Rank 0's
        probe is every rank's. When the source has fewer items, all are used and a warning gives the numbers.

        Raises:
            ValueError: no data at all (the message lists the ways to give it), or no finite example.
            TypeError: batches that cannot be read (the message names ``unpack``).
        """
        name = type(self).__name__
        found = self.probe_source(trainer)
        if found is None:
            raise ValueError(no_probe_message(name))
        source, where = found
        probe = read_probe(source, where, size, self.generator, self.unpack, user_sampler(source), name)
        if not probe.deterministic:
            rank_zero_info(
                f"{name}: the probe is the first {len(probe.inputs)} items of {where}, an iterable: the same items at "
                "every run only if its order is fixed (pass probe=... for a fixed set)."
            )
        share_probe(trainer, probe)
        clean_probe(probe, size, where, name, self.warn_once)
        self.probe_inputs, self.probe_labels, self.probe_indices = probe.inputs, probe.labels, probe.indices
        return probe.inputs, probe.labels

    def labelled_probe(self, trainer: pl.Trainer, size: int) -> tuple[Tensor, Tensor]:
        """:meth:`draw_probe` for methods that need labels (``ValueError`` naming how to give them when absent)."""
        x, y = self.draw_probe(trainer, size)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} needs labelled probe data, but the probe has no class labels [N]. For dict "
                "batches name the label key, e.g. unpack=('image', 'digit'); or pass probe=(inputs, labels)."
            )
        return x, y

    # ------------------------------------------------------------------ lifecycle (what each stage does: STAGES)
    @property
    def state_key(self) -> str:
        # Lightning reads the key at every hook call of every step (profiler action names), so it is built
        # once and rebuilt at setup(), where a configuration changed after construction takes effect
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                every_n_epochs=self.every_n_epochs,
                every_n_steps=self.every_n_steps,
                seed=self.seed,
                prefix=self.prefix,
                **self.state_key_fields(),
            )
        return self._state_key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Only configuration that needs neither the model (configure_model() has not run yet) nor the data
        self._state_key, self._prepared_for, self._restored_step, self.ledger.prep_seconds = None, None, None, 0.0
        if self.figure_dir and stage_of(trainer).active:
            figure_filesystem(str(self.figure_dir), type(self).__name__)  # a URL nothing can write to fails here
        if stage_of(trainer).new_history:
            # a callback reused for another fit starts a new history (a resumed fit restores its own after this)
            self.history, self.last, self._last_step = [], None, None
            self._monitored = find_monitors(trainer, self.prefix)

    def prepared(self, pl_module: nn.Module) -> bool:
        """Whether :meth:`validate` has run on ``pl_module`` in the current stage."""
        ref = self._prepared_for
        return ref is not None and ref() is pl_module

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run :meth:`validate` on ``pl_module`` (isolated) unless it already ran on this module in this stage."""
        if self.prepared(pl_module):
            return
        start = time.perf_counter()
        try:
            with gathered(trainer, pl_module), isolate(pl_module):
                # a tensor-parallel layer stays sharded when gathered: refuse before any forward pass reads it
                check_not_tensor_parallel(trainer, pl_module, type(self).__name__)
                self.validate(trainer, pl_module)
        finally:
            self._found = None
            # checks and probe draws are overhead too: the budget counts them
            self.ledger.prep_seconds += time.perf_counter() - start
        self._prepared_for = weakref.ref(pl_module)

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
        return any((trainer.current_epoch + 1) % every == 0 for _, every in self._monitored)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.scheduled_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not stage_of(trainer).cadence or trainer.global_step == self._last_step:
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
        elif what == "cadence" and trainer.global_step != self._last_step:
            # a monitored metric is measured here when validation runs: before the monitor reads it, whether it
            # checks at the end of validation or of the training epoch
            monitored = self._monitor_due(trainer)
            if monitored or (self.run_on == "validation_epoch_end" and self._epoch_due(trainer)):
                self.scheduled_run(trainer, pl_module, monitored=monitored)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final measurement always runs (its cost was reserved in the budget from the start)
        if stage_of(trainer).cadence and self.measure_at_end and trainer.global_step != self._last_step:
            self.scheduled_run(trainer, pl_module, final=True)

    # ------------------------------------------------------------------ the overhead budget
    def _start_budget(self, trainer: pl.Trainer) -> None:
        share: float | None = None
        if self.budget == "auto":
            total = default_budget()
            shared = [cb for cb in trainer.callbacks if isinstance(cb, InterpretabilityCallback) and cb.budget == "auto"]  # type: ignore[attr-defined]
            share = None if total is None else total / max(1, len(shared))
        elif self.budget is not None:
            share = float(self.budget)
        self.ledger.start(share, trainer.global_step)

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
            monitor = self._monitored[0][0] if monitored else None
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

    # ------------------------------------------------------------------ state
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # trainer.validate(ckpt_path=...) restores the weights but not the loops: remember the weights' step
        self._restored_step = checkpoint.get("global_step")

    def measurement_step(self, trainer: pl.Trainer) -> int:
        """The training step the model's weights are at: ``trainer.global_step``, or in ``validate`` with a
        checkpoint, the checkpoint's step."""
        restored = self._restored_step
        if stage_of(trainer).checkpoint_step and trainer.ckpt_path is not None and restored is not None:
            return int(restored)
        return trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "seed": self.seed, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------ running and logging
    def run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, extra: dict[str, float] | None = None, render: bool = True
    ) -> Measurement:
        """Measure now (isolated), record the scalars (and ``extra`` ones) in :attr:`history` and log everything.

        ``render=False`` logs the scalars and tables but not the figures (the budget's choice at a point in
        between whose allowance does not cover them).
        """
        step = self.step = self.measurement_step(trainer)
        self.prepare(trainer, pl_module)
        measurement, broken, cause = measure_guarded(trainer, pl_module, self.measure, self._read_out_names, self.probe_inputs)
        self.last, self._last_step = measurement, step
        scalars = read_out_scalars(measurement, extra, broken, cause, step, type(self).__name__, self.warn_once)
        add_to_history(self.history, {"step": float(step), "epoch": float(trainer.current_epoch), **scalars})
        log_scalars(trainer, {self._key(k): v for k, v in scalars.items()}, step, [self._key(k) for k in self.prog_bar])
        self.render_seconds = 0.0
        if trainer.is_global_zero and not broken:  # figures and tables: rank 0 only
            figures = (lambda: self.figures(measurement)) if render else None
            self.render_seconds = log_media(
                trainer.loggers, self.prefix, step, figures, lambda: self.tables(measurement), figure_dir=self.figure_dir,
                log_images=self.log_images, who=type(self).__name__, warn=self.warn_once,
            )  # fmt: skip
        return measurement

    def _read_out_names(self) -> list[str]:
        return read_out_names(self.history, [metric for metric, _ in self._monitored], self.prefix)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def warn_once(self, tag: str, message: str) -> None:
        """Warn with ``message`` (on rank 0) and keep it in :attr:`warning_log`, once per ``tag``."""
        if tag not in self._warned:
            self._warned.add(tag)
            self.warning_log.append(message)
            rank_zero_warn(message)

    _warn_once = warn_once  # the former, private name (subclasses call it)
