"""One measurement of a callback: probe data, isolation on full weights, read-outs, history, logging.

:class:`MeasuringCallback` holds a callback's configuration and measures on demand (:meth:`~MeasuringCallback.run`);
:class:`~lightning_interp.callbacks.base.InterpretabilityCallback` adds when (stages, cadence, budget).

A NaN is a result: read-outs of a model with non-finite weights are all NaN (numbers computed from NaN
weights mean nothing, even the finite ones), and a method that cannot run on such weights gives NaN
read-outs rather than none; non-finite read-outs are logged as NaN with one warning naming the cause (the
model's logits on the probe, or the read-out itself). Bookkeeping scalars (:data:`SIZE_KEYS`) stay as they are.
"""

from __future__ import annotations

import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_interp.callbacks.budget import Ledger
from lightning_interp.callbacks.sharding import check_not_tensor_parallel, gathered, user_sampler
from lightning_interp.callbacks.stages import probe_candidates, share_probe, stage_of
from lightning_interp.checks import check_callback_arguments, nonfinite_logits, nonfinite_parameters
from lightning_interp.hooks import isolate
from lightning_interp.loggers import figure_filesystem, log_media, log_scalars
from lightning_interp.probe import ProbeSource, Unpack, clean_probe, find_probe_source, no_probe_message, read_probe

__all__ = [
    "SIZE_KEYS",
    "Measurement",
    "MeasuringCallback",
    "RunOn",
    "add_to_history",
    "measure_guarded",
    "read_out_names",
    "read_out_scalars",
    "to_float",
]

RunOn = Literal["train_epoch_end", "validation_epoch_end"]

#: Scalars that describe a measurement's bookkeeping rather than the model: kept finite when weights are not.
SIZE_KEYS = ("overhead", "skipped", "work", "probe_size", "num_steps")


@dataclass
class Measurement:
    """What one run of a callback produced.

    Attributes:
        scalars: name (without the callback's prefix) to a 0-d tensor or number.
        data: anything the callback's figures and tables need (tensors on the model's device).
    """

    scalars: dict[str, Tensor | float]
    data: dict[str, Any] = field(default_factory=dict)


def to_float(value: Tensor | float) -> float:
    """A scalar read-out (a 0-d tensor on any device, or a number) as a Python float."""
    return float(value.detach().cpu().item()) if isinstance(value, Tensor) else float(value)


def measure_guarded(
    trainer: pl.Trainer | None,
    module: nn.Module,
    measure: Callable[[nn.Module], Measurement],
    fallback: Callable[[], list[str]],
    probe_inputs: Tensor | None,
) -> tuple[Measurement, list[str], str | None]:
    """Run ``measure(module)`` isolated on full weights (gathered whatever the strategy shards).

    Args:
        trainer: the trainer (its strategy decides the gather); ``None`` outside a fit.
        module: the model.
        measure: the callback's method.
        fallback: the read-out names to give NaN when the method fails on non-finite weights.
        probe_inputs: the probe, on which the logits are checked when a read-out is non-finite.

    Returns:
        ``(measurement, non-finite weights, cause)``: the names of the non-finite parameters and buffers, and
        for non-finite read-outs of finite weights the logits' account when they are non-finite (else ``None``).

    Raises:
        Exception: whatever ``measure`` raises on finite weights.
    """
    cause = None
    with gathered(trainer, module):
        broken = nonfinite_parameters(module)
        try:
            with isolate(module):
                measurement = measure(module)
        except Exception:
            if not broken:
                raise
            # the method could not run on non-finite weights: its read-outs are NaN, not missing
            measurement = Measurement(scalars=dict.fromkeys(fallback(), math.nan))
        if any(not math.isfinite(to_float(v)) for v in measurement.scalars.values()) and not broken:
            # the cause is looked up with a forward pass: inside the gather, and on every rank alike
            cause = nonfinite_logits(module, probe_inputs)
    return measurement, broken, cause


def read_out_scalars(
    measurement: Measurement,
    extra: dict[str, float] | None,
    broken: list[str],
    cause: str | None,
    step: int,
    who: str,
    warn: Callable[[str, str], None],
) -> dict[str, float]:
    """The measurement's scalars (and ``extra`` ones) as floats, NaN where the weights are non-finite.

    ``warn(tag, message)`` is called once for non-finite weights, or for non-finite read-outs (naming ``cause``,
    else the read-out itself).
    """
    scalars = {k: to_float(v) for k, v in measurement.scalars.items()} | (extra or {})
    if broken:
        # numbers computed from NaN weights mean nothing, even the finite ones (argmax of NaN logits is 0)
        scalars = {k: v if k in SIZE_KEYS else math.nan for k, v in scalars.items()}
        warn(
            "nonfinite-weights",
            f"{who}: the model's weights are non-finite at step {step} ({', '.join(broken[:5])}"
            f"{' ...' if len(broken) > 5 else ''}): every read-out is logged as NaN. Lower the learning rate, clip "
            "gradients (Trainer(gradient_clip_val=...)), or stop such a fit with EarlyStopping(check_finite=True).",
        )
        return scalars
    names = [k for k, v in scalars.items() if k not in SIZE_KEYS and not math.isfinite(v)]
    if names:
        cause = cause or "the read-out itself (e.g. a class with no variance, or too few examples for an error bar)"
        warn(
            f"nonfinite-{cause[:12]}",
            f"{who}: non-finite read-outs at step {step} ({', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}), logged as NaN; the cause: {cause}.",
        )
    return scalars


def read_out_names(history: Sequence[dict[str, float]], monitored: Sequence[str], prefix: str) -> list[str]:
    """The read-outs of the last measurement and the ``monitored`` metrics (full keys), for a measurement that
    could not run (``["nonfinite"]`` when there are none)."""
    names = [k for k in history[-1] if k not in ("step", "epoch", *SIZE_KEYS)] if history else []
    names += [m[len(prefix) + 1 :] for m in monitored if m[len(prefix) + 1 :] not in names]
    return names or ["nonfinite"]


def add_to_history(history: list[dict[str, float]], entry: dict[str, float]) -> None:
    """Append ``entry`` (``step``, ``epoch`` and scalars), or replace the last one measured at the same step
    (the same weights measured again, as ``validate()`` after ``fit``): one entry per step."""
    if history and history[-1]["step"] == entry["step"]:
        history[-1] = entry
    else:
        history.append(entry)


class MeasuringCallback(Callback, ABC):
    """A configured callback that measures on demand: probe data, isolation, history, logging, checkpoint state.

    :class:`~lightning_interp.callbacks.base.InterpretabilityCallback` adds when it measures (the Trainer's
    stages, the cadence, the overhead budget); the lightning-interp callbacks subclass that. Subclasses set
    :attr:`prefix` and implement :meth:`validate` and :meth:`measure`; they may override :meth:`figures`,
    :meth:`tables` and :meth:`state_key_fields`. The arguments below are shared by every callback (the
    subclasses pass them through).

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
            tables included). ``"auto"``: an equal part of :data:`~lightning_interp.callbacks.budget.DEFAULT_BUDGET` (0.05, or
            ``LIGHTNING_INTERP_BUDGET``) shared by all ``"auto"`` callbacks on the trainer; a number: this
            callback's own share; ``None``: no limit. The plan (:func:`~lightning_interp.callbacks.budget.plan_point`):
            the measurement at the end of ``fit`` always runs, its cost reserved from the start; a point in
            between runs at full size when its paced part of the share allows, at a reduced size (down to the
            callback's ``work_floor()``, logged as ``work``) when only that fits, and is skipped otherwise (counted
            in ``skipped``). A point a monitor reads always runs (at least at the floor). The cost of a full
            measurement is the last one's (scaled to full size), or for the first a pilot (``estimate_cost()``).
            ``trainer.validate`` and explicit :meth:`run` calls are not limited.

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
        check_callback_arguments(
            every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, run_on=run_on, measure_at_start=measure_at_start,
            measure_at_end=measure_at_end, seed=seed, log_images=log_images, figure_dir=figure_dir, key_prefix=key_prefix,
            unpack=unpack, prog_bar=prog_bar, budget=budget,
        )  # fmt: skip
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
        #: ``(metric, every n epochs)`` of the EarlyStopping / ModelCheckpoint monitors that read this callback's metrics.
        self.monitored: list[tuple[str, int]] = []
        #: Seconds of checks and probe draws (:meth:`prepare`) since setup, counted by the budget.
        self.prep_seconds = 0.0
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
        #: The step of the last measurement (``None`` before the first).
        self.last_step: int | None = None
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

    # ------------------------------------------------------------------ preparation and state
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
        self._state_key, self._prepared_for, self._restored_step, self.prep_seconds = None, None, None, 0.0
        if self.figure_dir and stage_of(trainer).active:
            figure_filesystem(str(self.figure_dir), type(self).__name__)  # a URL nothing can write to fails here

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
            self.prep_seconds += time.perf_counter() - start
        self._prepared_for = weakref.ref(pl_module)

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
        return {"history": [dict(h) for h in self.history], "seed": self.seed, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last_step = state_dict.get("last_step")

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
        self.last, self.last_step = measurement, step
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
        return read_out_names(self.history, [metric for metric, _ in self.monitored], self.prefix)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def warn_once(self, tag: str, message: str) -> None:
        """Warn with ``message`` (on rank 0) and keep it in :attr:`warning_log`, once per ``tag``."""
        if tag not in self._warned:
            self._warned.add(tag)
            self.warning_log.append(message)
            rank_zero_warn(message)

    _warn_once = warn_once  # the former, private name (subclasses call it)
