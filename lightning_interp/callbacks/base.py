"""The base every lightning-interp callback builds on.

:class:`InterpretabilityCallback` handles what is common to all of them, so a subclass only
chooses its data (:meth:`~InterpretabilityCallback.validate`), calls a method
(:meth:`~InterpretabilityCallback.measure`) and says what to draw
(:meth:`~InterpretabilityCallback.figures`, :meth:`~InterpretabilityCallback.tables`):

* **cadence**: ``every_n_epochs`` and/or ``every_n_steps``, at the end of the training epoch or
  (``run_on="validation_epoch_end"``) inside Lightning's ``inference_mode`` validation;
  optionally once at fit start and once at the end of training;
* **isolation**: measurements run in eval mode under ``no_grad`` with a forked global RNG; the
  modules' train/eval modes and the parameters' ``requires_grad`` are restored in ``finally``;
  ``.grad`` is never touched, randomness comes only from the callback's own ``torch.Generator``;
* **logging** to whatever loggers are attached: scalars to every logger, images and tables to
  wandb and TensorBoard (skipped with one warning for loggers that cannot take them), images
  rendered and sent from global rank 0 only; PNGs optionally also written to ``figure_dir``;
* **history and checkpoints**: every measurement's scalars are kept in ``history`` on every rank
  and survive ``state_dict`` / ``load_state_dict`` under a ``state_key`` unique to the
  configuration;
* **validation at setup**: configuration errors surface before the first training step.
"""

from __future__ import annotations

import io
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

__all__ = ["InterpretabilityCallback", "Measurement", "isolate", "sample_dataset"]

RunOn = Literal["train_epoch_end", "validation_epoch_end"]


@dataclass
class Measurement:
    """What one run of a callback produced.

    Attributes:
        scalars: name (without the callback's prefix) to a 0-d tensor or number.
        data: anything the callback's figures and tables need (tensors on the model's device).
    """

    scalars: dict[str, Tensor | float]
    data: dict[str, Any] = field(default_factory=dict)


@contextmanager
def isolate(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Run a measurement on ``module`` without perturbing training.

    Puts every submodule in eval mode, disables autograd (unless ``grad``), forks the global CPU
    (and CUDA) RNG, and restores the train/eval mode of every submodule and the ``requires_grad``
    of every parameter in ``finally``. Gradients needed by a method must be taken with
    ``torch.autograd.grad`` (never ``.backward()``), so ``.grad`` stays untouched.
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(grad):
            module.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def sample_dataset(dataset: Sequence, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None, list[int]]:
    """A fixed probe batch of ``size`` items drawn without replacement from a map-style dataset.

    The indices come from ``generator`` only (the dataloader's sampler and the global RNG are not
    touched). Items may be tensors or ``(input, label, ...)`` tuples.

    Returns:
        ``(inputs, labels, indices)``: stacked inputs, labels (``None`` for unlabelled items) and the
        dataset indices they came from.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot draw a probe set from an empty dataset")
    idx = torch.randperm(n, generator=generator)[: min(size, n)].tolist()
    items = [dataset[i] for i in idx]
    if isinstance(items[0], (tuple, list)):
        inputs = torch.stack([torch.as_tensor(it[0]) for it in items])
        labels = torch.as_tensor([int(it[1]) for it in items]) if len(items[0]) > 1 else None
        return inputs, labels, idx
    return torch.stack([torch.as_tensor(it) for it in items]), None, idx


def model_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the first parameter (CPU / float32 for a parameterless module)."""
    for p in module.parameters():
        return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


def _to_float(value: Tensor | float) -> float:
    return float(value.detach().cpu().item()) if isinstance(value, Tensor) else float(value)


def _figure_to_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _png_to_array(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class InterpretabilityCallback(Callback, ABC):
    """Base class of the lightning-interp callbacks (cadence, isolation, logging, state).

    Subclasses set :attr:`prefix` and implement :meth:`validate` and :meth:`measure`; they may
    override :meth:`figures`, :meth:`tables` and :meth:`_state_key_fields`.

    Args:
        every_n_epochs: measure at the end of every n-th epoch (``None`` or 0: never).
        every_n_steps: measure after every n-th optimizer step (``None`` or 0: never).
        run_on: ``"train_epoch_end"`` or ``"validation_epoch_end"`` (inside Lightning's
            ``inference_mode`` validation; skipped during the sanity check) for the epoch cadence.
        measure_at_start: also measure once at fit start (the untrained network).
        measure_at_end: also measure once at the end of training unless the last step was measured.
        seed: seed of the callback's own ``torch.Generator`` (probe sets and any sampling).
        log_images: render figures and send them to the loggers (global rank 0 only).
        figure_dir: also write each figure as a PNG into this folder (global rank 0 only).
        key_prefix: prefix of the logged keys instead of the class's :attr:`prefix` (to tell two
            instances apart in one run, e.g. ``"posterior_gap/preset3"``).

    Raises:
        ValueError: negative cadences or an unknown ``run_on``.
    """

    #: Prefix of every logged key, e.g. ``"posterior_gap"``.
    prefix: str = "interp"

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
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
        if run_on not in ("train_epoch_end", "validation_epoch_end"):
            raise ValueError(f"run_on must be 'train_epoch_end' or 'validation_epoch_end', got {run_on!r}")
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_steps = every_n_steps or 0
        self.run_on = run_on
        self.measure_at_start = measure_at_start
        self.measure_at_end = measure_at_end
        self.seed = seed
        self.log_images = log_images
        self.figure_dir = figure_dir
        if key_prefix is not None:
            self.prefix = key_prefix
        self.generator = torch.Generator().manual_seed(seed)
        #: One dict per measurement: ``step``, ``epoch`` and the scalars (without prefix).
        self.history: list[dict[str, float]] = []
        #: The most recent :class:`Measurement` (tensors on the model's device).
        self.last: Measurement | None = None
        self._warned: set[str] = set()
        self._last_step: int | None = None
        self.step = 0

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive torch.multiprocessing's shared-memory pickling
        # (ddp_spawn); carry its state as bytes instead.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        state.pop("_state_key", None)  # a copy may be reconfigured: its key is built afresh
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the configuration against the trainer and module and prepare probe data.

        Called at ``setup``; raise ``ValueError`` / ``TypeError`` naming the problem and the fix.
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

    def _state_key_fields(self) -> dict[str, Any]:
        return {}

    def draw_probe(self, trainer: pl.Trainer, size: int) -> tuple[Tensor, Tensor | None]:
        """A fixed probe batch of ``size`` items from the datamodule's val (else train) dataset.

        Indices come from the callback's own generator only. Returns ``(inputs, labels)`` (labels
        ``None`` for unlabelled items).

        Raises:
            ValueError: no datamodule, or no non-empty val / train dataset.
        """
        name = type(self).__name__
        dm = trainer.datamodule
        if dm is None:
            raise ValueError(
                f"{name} needs probe data: train with a LightningDataModule that has a val_dataloader() (or "
                "train_dataloader()), or pass the probe data to the callback."
            )
        dataset = None
        for method in ("val_dataloader", "train_dataloader"):
            try:
                loader = getattr(dm, method)()
            except Exception:  # a datamodule may not implement a split
                continue
            candidate = getattr(loader, "dataset", None)
            if candidate is not None and len(candidate) > 0:
                dataset = candidate
                break
        if dataset is None:
            raise ValueError(f"{name}: {type(dm).__name__} has no non-empty val or train dataset to draw probe data from")
        inputs, labels, _ = sample_dataset(dataset, size, self.generator)
        return inputs, labels

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        # Lightning reads the key at every hook call of every step (profiler action names), so it is built
        # once and rebuilt at setup(), where a configuration changed after construction takes effect
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._generate_state_key(
                every_n_epochs=self.every_n_epochs,
                every_n_steps=self.every_n_steps,
                seed=self.seed,
                prefix=self.prefix,
                **self._state_key_fields(),
            )
            self.__dict__["_state_key"] = key
        return key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.__dict__.pop("_state_key", None)
        with isolate(pl_module):
            self.validate(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_at_start and trainer.global_step == 0 and not self.history:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on == "train_epoch_end" and self._epoch_due(trainer) and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.run_on == "validation_epoch_end"
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and self._epoch_due(trainer)
            and trainer.global_step != self._last_step
        ):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_at_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "seed": self.seed, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------ running and logging
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Measurement:
        """Measure now (isolated), record the scalars in :attr:`history` and log everything."""
        step = trainer.global_step
        #: The global step of the measurement in progress (methods may seed per-step generators from it).
        self.step = step
        with isolate(pl_module):
            measurement = self.measure(pl_module)
        self.last = measurement
        self._last_step = step
        scalars = {k: _to_float(v) for k, v in measurement.scalars.items()}
        self.history.append({"step": float(step), "epoch": float(trainer.current_epoch), **scalars})
        self._log_scalars(trainer, scalars, step)
        if trainer.is_global_zero:
            if self.log_images or self.figure_dir:
                for key, fig in self.figures(measurement).items():
                    self._log_figure(trainer, key, fig, step)
            for key, (columns, rows) in self.tables(measurement).items():
                self._log_table(trainer, key, columns, rows, step)
        return measurement

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            rank_zero_warn(message)

    def _log_scalars(self, trainer: pl.Trainer, scalars: dict[str, float], step: int) -> None:
        metrics = {self._key(k): v for k, v in scalars.items() if not math.isnan(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _log_figure(self, trainer: pl.Trainer, key: str, fig: Any, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        png = _figure_to_png(fig)
        full = self._key(key)
        if self.figure_dir:
            os.makedirs(self.figure_dir, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", full)
            with open(os.path.join(self.figure_dir, f"{name}_step{step:06d}.png"), "wb") as f:
                f.write(png)
        if not self.log_images:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=full, images=[_png_to_array(png)], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(full, _png_to_array(png), global_step=step, dataformats="HWC")
            else:
                self._warn_once(
                    f"img-{type(logger).__name__}",
                    f"{type(self).__name__}: {type(logger).__name__} cannot take images, so figures are not logged to it"
                    " (use WandbLogger or TensorBoardLogger, or set figure_dir=... to write PNG files).",
                )

    def _log_table(self, trainer: pl.Trainer, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        full = self._key(key)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=full, columns=columns, data=rows, step=step)
            elif isinstance(logger, TensorBoardLogger):
                lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
                logger.experiment.add_text(full, "\n".join(lines), global_step=step)
            else:
                self._warn_once(
                    f"table-{type(logger).__name__}",
                    f"{type(self).__name__}: {type(logger).__name__} cannot take tables, so tables are not logged to it"
                    " (use WandbLogger or TensorBoardLogger).",
                )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
