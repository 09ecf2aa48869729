"""What a callback does in each Trainer entry point, and what it reads from the trainer.

:data:`STAGES` is the one table the callback's hooks consult (by ``trainer.state.fn``):

=============  =========================================================================================
``fit``        measures at its cadence (training hooks, or the end of validation) under the overhead budget,
               starts a new history and looks up the monitors that read its metrics; the probe may come
               from the validation loaders given to ``fit``, set up early for it
``validate``   measures once at the end of validation, unlimited, on the (restored) weights; prepares at
               the start of validation; the step logged is the restored checkpoint's
``test``       idle
``predict``    idle
=============  =========================================================================================

The rest are the trainer reads the hooks share: the probe's candidate loaders in order, the validation data
set up ahead of the loop, the fit's total steps, the monitors, and rank 0's probe broadcast to every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_interp.probe import Probe

__all__ = [
    "IDLE",
    "STAGES",
    "Stage",
    "find_monitors",
    "probe_candidates",
    "setup_validation_data",
    "share_probe",
    "stage_of",
    "total_steps",
    "validation_runs",
]


@dataclass(frozen=True)
class Stage:
    """What a callback does in one Trainer entry point.

    Attributes:
        cadence: it measures at its cadence, under the overhead budget (``fit``); otherwise every
            measurement is unlimited and full size.
        in_validation: what ``on_validation_epoch_end`` does: ``"cadence"`` (a cadence point, or a monitored
            epoch), ``"once"`` (one measurement of the weights) or ``None``.
        new_history: ``setup`` starts a new history and looks up the monitors of the callback's metrics.
        prepare_at_validation_start: the checks and probe draw run at ``on_validation_start``.
        checkpoint_step: the step of a measurement is the restored checkpoint's (``ckpt_path=``).
        attach_validation_data: finding the probe may set up the validation loaders given to ``fit``.
    """

    cadence: bool = False
    in_validation: str | None = None
    new_history: bool = False
    prepare_at_validation_start: bool = False
    checkpoint_step: bool = False
    attach_validation_data: bool = False

    @property
    def active(self) -> bool:
        """Whether the callback prepares and measures at all in this stage."""
        return self.cadence or self.in_validation is not None


#: A stage in which the callback does nothing.
IDLE = Stage()
#: What the callback does in each Trainer entry point (``trainer.state.fn``).
STAGES: dict[str, Stage] = {
    "fit": Stage(cadence=True, in_validation="cadence", new_history=True, attach_validation_data=True),
    "validate": Stage(in_validation="once", prepare_at_validation_start=True, checkpoint_step=True),
    "test": IDLE,
    "predict": IDLE,
}


def stage_of(trainer: pl.Trainer) -> Stage:
    """The row of :data:`STAGES` for the trainer's current entry point (:data:`IDLE` outside one)."""
    fn = trainer.state.fn
    return STAGES.get(str(getattr(fn, "value", fn)), IDLE)


def setup_validation_data(trainer: pl.Trainer) -> None:
    """Attach the validation loaders given to ``fit()`` now rather than when the loop starts.

    Setting up validation data creates no iterator and draws no random numbers (the sanity check does the
    same); without validation data Lightning skips the loop, and so does this.
    """
    if trainer.val_dataloaders is None:
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        except MisconfigurationException:
            pass


def validation_runs(trainer: pl.Trainer) -> bool:
    """Whether this fit runs validation (validation data, and ``limit_val_batches`` not 0)."""
    if trainer.limit_val_batches == 0:
        return False
    setup_validation_data(trainer)
    return trainer.val_dataloaders is not None


def probe_candidates(trainer: pl.Trainer) -> Iterator[tuple[object, str]]:
    """The trainer's loaders a probe may come from, in order, as ``(loaders, description)``.

    The datamodule's ``val_dataloader()``, else its ``train_dataloader()`` (each only when the datamodule
    implements it); then the loaders given to ``fit`` / ``validate`` (``trainer.val_dataloaders``, else
    ``trainer.train_dataloader``). Lazy: a datamodule's loaders are built, and ``fit``'s validation loaders
    set up, only when the earlier candidates gave nothing.
    """
    dm = trainer.datamodule  # type: ignore[attr-defined]
    if dm is not None:
        for method in ("val_dataloader", "train_dataloader"):
            if is_overridden(method, dm):  # a datamodule may not implement a split
                yield getattr(dm, method)(), f"{type(dm).__name__}.{method}()"
    if stage_of(trainer).attach_validation_data:
        setup_validation_data(trainer)
    yield trainer.val_dataloaders, "the validation dataloader"
    yield trainer.train_dataloader, "the training dataloader"


def share_probe(trainer: pl.Trainer, probe: Probe) -> None:
    """Give every rank rank 0's probe (in place; nothing to do in one process).

    An iterable, or data that differs by rank (a datamodule reading a rank's own shard), may give other items
    on every rank: all ranks measure rank 0's probe, so their numbers and monitors agree.
    """
    if trainer.world_size > 1:
        probe.inputs, probe.labels, probe.indices = trainer.strategy.broadcast(
            (probe.inputs, probe.labels, probe.indices), src=0
        )


def total_steps(trainer: pl.Trainer) -> float | None:
    """The fit's total optimizer steps (``trainer.estimated_stepping_batches``); ``None`` when unknown."""
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # no length and no max_steps: unknown
        return None


def find_monitors(trainer: pl.Trainer, prefix: str) -> list[tuple[str, int]]:
    """The ``(metric, every n epochs)`` that ``EarlyStopping`` / ``ModelCheckpoint`` read under ``prefix/``.

    Their epochs are measured whatever the budget and the cadence: a monitor that finds its metric missing
    stops the fit ("metric ... which is not available").
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    monitored = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        monitor = getattr(cb, "monitor", None)
        if isinstance(cb, (EarlyStopping, ModelCheckpoint)) and isinstance(monitor, str):
            if monitor.startswith(prefix + "/"):
                every = getattr(cb, "_every_n_epochs", 1) if isinstance(cb, ModelCheckpoint) else 1
                monitored.append((monitor, max(1, every or 1)))
    return monitored
