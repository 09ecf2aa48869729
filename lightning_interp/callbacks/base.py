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
* **probe data from any source** (:meth:`~InterpretabilityCallback.draw_probe`), in this order: the
  ``probe=`` argument (a tensor, an ``(inputs, labels)`` pair, a map-style ``Dataset`` or a
  ``DataLoader``); the datamodule's ``val_dataloader()``, else its ``train_dataloader()``; the
  dataloaders given to ``fit`` / ``validate`` (``trainer.val_dataloaders``, else
  ``trainer.train_dataloader``). Map-style data is sampled by index with the callback's own generator
  (the same probe on every rank); iterable data gives its first ``probe_size`` items (deterministic when
  the iterable is; rank 0's items are broadcast to the other ranks). Batches may be tensors, tuples
  ``(x, y, ...)``, lists or dicts; ``unpack=`` says which entry is the input and which the label;
* **every entry point**: ``fit`` measures at the cadence; ``validate`` (e.g. ``trainer.validate(model,
  loader, ckpt_path=...)``, the way to audit a trained checkpoint) measures once on the restored weights;
  ``test`` and ``predict`` leave the callback idle. Checks that need the model run at ``on_fit_start``
  (after ``configure_model`` and ``LightningModule.setup``), or at ``on_train_start`` when the only data
  is the training loader: always before the first training step;
* **metrics where Lightning looks**: every scalar also goes to ``trainer.callback_metrics`` (so
  ``EarlyStopping`` and ``ModelCheckpoint`` can monitor it), and the names in ``prog_bar`` to the
  progress bar;
* **validation**: arguments are checked in ``__init__``, what needs the model or data before the first
  training step; each error names the problem and the fix.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_interp.callbacks.budget import expected_training_time, plan_point
from lightning_interp.callbacks.probe import ProbeSource, Unpack, draw_probe
from lightning_interp.callbacks.sharding import check_not_tensor_parallel, gathered, user_sampler
from lightning_interp.hooks import capture, uncompiled
from lightning_interp.plotting import array_to_png, figure_to_array

__all__ = [
    "BUDGET_ENV",
    "DEFAULT_BUDGET",
    "InterpretabilityCallback",
    "Measurement",
    "check_choice",
    "check_class_names",
    "check_int",
    "check_layers_run",
    "check_logits",
    "check_number",
    "default_budget",
    "figure_filesystem",
    "isolate",
    "model_device_dtype",
    "nonfinite_parameters",
]

RunOn = Literal["train_epoch_end", "validation_epoch_end"]

#: The share of training wall time that all lightning-interp callbacks on a trainer may use together.
DEFAULT_BUDGET = 0.05
#: The part of a callback's share its timed measurements may use (the rest covers the per-step hook calls).
BUDGET_TIMED = 0.9
#: Seconds of allowance left after a measurement in between that let it render figures before their cost is known.
RENDER_PILOT = 0.25
#: Seconds by which a measurement that must run (the final one, a monitored one) may exceed the budget unannounced.
BUDGET_SLACK = 0.5
#: Scalars that describe a measurement's bookkeeping rather than the model: kept finite when weights are not.
SIZE_KEYS = ("overhead", "skipped", "work", "probe_size", "num_steps")

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
    (and CUDA) RNG and Python's and NumPy's global random states, and restores the train/eval mode of
    every submodule and the ``requires_grad`` of every parameter in ``finally``. Gradients needed by a method must be taken with
    ``torch.autograd.grad`` (never ``.backward()``), so ``.grad`` stays untouched. Submodules compiled
    with ``torch.compile`` run their original, eager modules inside the block (see
    :func:`~lightning_interp.hooks.uncompiled`).
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    # datasets read for a probe may augment with Python's or NumPy's global RNG
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(grad), uncompiled(module):
            module.eval()
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def model_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the first parameter (CPU / float32 for a parameterless module)."""
    for p in module.parameters():
        return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


def check_int(name: str, value: Any, minimum: int = 0, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= minimum`` (or ``None`` where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def check_number(
    name: str, value: Any, low: float = -math.inf, high: float = math.inf, open_low: bool = False, open_high: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in the interval (bounds open where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (the message lists them)."""
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_class_names(value: Any) -> list[str] | None:
    """``value`` as a list of class names (``None`` stays ``None``); ``TypeError`` unless a sequence of strings."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(c, str) for c in value):
        raise TypeError(f"class_names must be a list of strings, got {value!r}")
    return list(value)


def check_logits(out: Any, who: str, model: nn.Module) -> Tensor:
    """Check that a model's output is ``[N, K]`` logits with ``K >= 2`` and return it.

    A single logit ``[N, 1]`` (binary classification with ``BCEWithLogitsLoss``) is refused: the methods
    need one logit per class. The message shows the two-logit form ``torch.cat([-z / 2, z / 2], 1)``, which
    has the same softmax as ``sigmoid(z)``.

    Raises:
        ValueError: the output is not ``[N, K >= 2]``.
    """
    name = type(model).__name__
    if not isinstance(out, Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{who} needs {name}.forward to return logits of shape [N, K], got {got}. "
            "Wrap the model so that forward returns a [N, K] tensor of logits."
        )
    if out.shape[1] < 2:
        raise ValueError(
            f"{who}: {name} returns a single logit per example ([N, 1]); the methods need one logit per class. "
            "For a binary classifier return two logits, e.g. torch.cat([-z / 2, z / 2], dim=1), whose softmax "
            "equals (1 - sigmoid(z), sigmoid(z))."
        )
    return out


def check_layers_run(model: nn.Module, layers: Sequence[str], inputs: Tensor, who: str) -> None:
    """Raise ``ValueError`` when a layer in ``layers`` does not run in ``model(inputs)``.

    A module that exists but is never called in ``forward`` (an unused head, a layer only used in
    ``training_step``) has no output to measure: catch it before the first training step rather than
    with a ``KeyError`` at the first measurement.

    Raises:
        ValueError: a layer does not run.
        TypeError: the model fails on ``inputs`` (the message gives their shape).
    """
    with capture(model, list(layers)) as seen:
        try:
            model(inputs)
        except Exception as err:
            raise TypeError(
                f"{type(model).__name__} failed on the probe inputs of shape {list(inputs.shape[1:])}: "
                f"{type(err).__name__}: {err}"
            ) from err
    missing = [name for name in layers if name not in seen]
    if missing:
        raise ValueError(
            f"{who}: layer(s) {missing} exist in {type(model).__name__} but do not run in its forward(), so there is "
            "nothing to measure; choose layers that forward() calls (their named_modules() paths)."
        )


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters and floating buffers of ``module`` that hold a NaN or an infinity."""
    named = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if b.is_floating_point())]
    if not named:
        return []
    # one reduction per tensor, one device-to-host copy in all: cheap next to any measurement
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def figure_filesystem(figure_dir: str, who: str = "figure_dir") -> tuple[Any, str]:
    """The fsspec filesystem and path of ``figure_dir`` (a local path, or a URL such as ``s3://bucket/run``).

    Raises:
        ValueError: a URL whose protocol fsspec does not know or whose package is not installed (``s3://``
            needs ``s3fs``, ``gs://`` needs ``gcsfs``); the message names it.
    """
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(figure_dir)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"{who}: cannot write figures to figure_dir={figure_dir!r}: {err}. Install the filesystem's package "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://) or give a local folder."
        ) from err


def _to_float(value: Tensor | float) -> float:
    return float(value.detach().cpu().item()) if isinstance(value, Tensor) else float(value)


def _takes_images(logger: Any) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    return isinstance(logger, (WandbLogger, TensorBoardLogger))


def _setup_validation_data(trainer: pl.Trainer) -> None:
    """Attach the validation loaders given to ``fit()`` now rather than when the loop starts.

    Setting up validation data creates no iterator and draws no random numbers (the sanity check does the
    same); without validation data Lightning skips the loop, and so does this.
    """
    if trainer.val_dataloaders is None:
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        except MisconfigurationException:
            pass


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what ``trainer.val_dataloaders`` / ``train_dataloader`` hold (one, a list, a dict)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _has_items(loader: Any) -> bool:
    dataset = getattr(loader, "dataset", None)
    try:
        return dataset is None or len(dataset) > 0
    except TypeError:  # an iterable dataset without a length
        return True


class InterpretabilityCallback(Callback, ABC):
    """Base class of the lightning-interp callbacks (cadence, isolation, probe data, logging, state).

    Subclasses set :attr:`prefix` and implement :meth:`validate` and :meth:`measure`; they may
    override :meth:`figures`, :meth:`tables` and :meth:`_state_key_fields`. The arguments below are
    shared by every callback (the subclasses pass them through).

    Args:
        every_n_epochs: measure at the end of every n-th epoch (``None`` or 0: never).
        every_n_steps: measure after every n-th optimizer step (``None`` or 0: never).
        run_on: ``"train_epoch_end"`` or ``"validation_epoch_end"`` (inside Lightning's
            ``inference_mode`` validation; skipped during the sanity check) for the epoch cadence.
            ``EarlyStopping`` and ``ModelCheckpoint`` with their defaults read the metrics at the end of
            the training epoch; use ``"validation_epoch_end"`` when they check after validation
            (``check_on_train_epoch_end=False``).
        measure_at_start: also measure once before the first training step (the untrained network;
            never on a run resumed from a checkpoint).
        measure_at_end: also measure once at the end of training unless the last step was measured.
        seed: seed of the callback's own ``torch.Generator`` (probe sets and any sampling).
        log_images: render figures and send them to the loggers that take images (wandb, TensorBoard;
            global rank 0 only). Nothing is rendered when no logger takes images and ``figure_dir`` is unset.
        figure_dir: also write each figure as a PNG into this folder (global rank 0 only).
        key_prefix: prefix of the logged keys instead of the class's :attr:`prefix` (to tell two
            instances apart in one run, e.g. ``"posterior_gap/preset3"``).
        probe: the probe data, instead of the trainer's: a tensor of inputs, an ``(inputs, labels)``
            tuple, a map-style ``Dataset`` or a ``DataLoader`` (see the resolution order above).
        unpack: how to read a batch or dataset item: ``(input_key, label_key)`` (dict keys or tuple
            positions; ``label_key`` ``None`` for unlabelled data) or a callable ``batch -> (inputs,
            labels)``. By default tuples and lists are ``(inputs, labels, ...)`` and dicts use the keys
            ``input``/``inputs``/``x``/``image``/``images``/... and ``label``/``labels``/``y``/``target``/...
            (:data:`~lightning_interp.callbacks.probe.INPUT_KEYS`, :data:`~lightning_interp.callbacks.probe.LABEL_KEYS`).
        prog_bar: names (without the prefix) of scalars to show in the progress bar.
        budget: the share of training wall time this callback's measurements may use (pilots, figures and
            tables included). ``"auto"``: an equal part of :data:`DEFAULT_BUDGET` (0.05, or
            ``LIGHTNING_INTERP_BUDGET``) shared by all ``"auto"`` callbacks on the trainer; a number: this
            callback's own share; ``None``: no limit. The plan (:func:`~lightning_interp.callbacks.budget.plan_point`):
            the measurement at the end of ``fit`` always runs, its cost reserved from the start; a point in
            between runs at full size when its paced part of the share allows, at a reduced size (fewer probe
            examples or MCMC steps, down to the callback's floor: :meth:`work_floor`, logged as ``work`` and
            the sizes used) when only that fits, and is skipped otherwise (counted in ``skipped``). A point
            whose metric an ``EarlyStopping`` or ``ModelCheckpoint`` monitors always runs (at least at the
            floor). The cost of a full measurement is the last measurement's (scaled to full size), or for the
            first a small pilot (:meth:`estimate_cost`). ``trainer.validate`` and explicit :meth:`run` calls
            are not limited and measure at full size.

    Raises:
        ValueError: a malformed shared argument (negative cadence, unknown ``run_on``, ...).
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
        probe: ProbeSource | None = None,
        unpack: Unpack = None,
        prog_bar: Sequence[str] = (),
        budget: float | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__()
        if budget is not None and budget != "auto":
            check_number("budget", budget, 0, 1, open_low=True)
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
        if run_on not in ("train_epoch_end", "validation_epoch_end"):
            raise ValueError(f"run_on must be 'train_epoch_end' or 'validation_epoch_end', got {run_on!r}")
        check_int("seed", seed)
        for name, flag in (
            ("measure_at_start", measure_at_start),
            ("measure_at_end", measure_at_end),
            ("log_images", log_images),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        for name, text in (("figure_dir", figure_dir), ("key_prefix", key_prefix)):
            if text is not None and (not isinstance(text, (str, os.PathLike)) or not str(text)):
                raise TypeError(f"{name} must be a non-empty string or None, got {text!r}")
        if unpack is not None and not callable(unpack):
            if isinstance(unpack, (str, bytes)) or not isinstance(unpack, Sequence) or not 1 <= len(unpack) <= 2:
                raise TypeError(
                    f"unpack must be (input_key, label_key), e.g. ('image', 'label') or (0, 1), or a callable "
                    f"batch -> (inputs, labels); got {unpack!r}"
                )
        if isinstance(prog_bar, str) or not all(isinstance(k, str) for k in prog_bar):
            raise TypeError(f"prog_bar must be a list of scalar names (without the prefix), got {prog_bar!r}")
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
        self.probe = probe
        self.unpack = unpack
        self.prog_bar = list(prog_bar)
        self.budget = budget
        self._share: float | None = None
        self._clock = time.perf_counter()
        self._spent, self._cost, self._skipped = 0.0, None, 0
        self._measured, self._render_cost = 0, None
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
        #: The drawn probe inputs and labels (``None`` until drawn; labels ``None`` for unlabelled data).
        self.probe_inputs: Tensor | None = None
        self.probe_labels: Tensor | None = None
        #: Positions of the probe items in their source (``None`` for iterable sources).
        self.probe_indices: Tensor | None = None
        self._active = True
        self.step = 0

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive torch.multiprocessing's shared-memory pickling
        # (ddp_spawn); carry its state as bytes instead. Weak references do not pickle.
        state = {k: None if isinstance(v, weakref.ref) else v for k, v in self.__dict__.items()}
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

        Called once the model exists (``on_fit_start``, ``on_train_start`` or ``on_validation_start``,
        always before the first training step); raise ``ValueError`` / ``TypeError`` naming the problem
        and the fix.
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

    #: Whether :meth:`validate` draws probe data from the trainer's data (else from a task or a sampler).
    needs_data: bool = True

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds one measurement would take, from a small pilot (``None``: unknown until measured).

        Called (isolated) before the first scheduled measurement when a budget is set. The default pilot
        times one forward pass of the model over the probe inputs (:attr:`probe_inputs`) and multiplies by
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

    # ------------------------------------------------------------------ probe data
    def work_floor(self) -> float:
        """The smallest fraction of a full measurement this callback can make (its documented size floors).

        The budget never scales a measurement below it. The base class cannot scale (``1.0``); a subclass
        that reads :attr:`work` in :meth:`measure` (through :meth:`scaled`) returns the fraction its floors allow.
        """
        return 1.0

    def scaled(self, full: int, floor: int) -> int:
        """The size to use for a quantity of full size ``full`` at the current :attr:`work`, never below ``floor``."""
        return min(full, max(floor, math.ceil(full * self.work)))

    def probe_source(self, trainer: pl.Trainer) -> tuple[Any, str] | None:
        """Where the probe comes from, ``(source, description)``, in the order of the module docstring.

        ``None`` when there is no data yet (a fit whose only data is the training loader, before
        ``on_train_start``).
        """
        if self.probe is not None:
            return self.probe, "the probe argument"
        found = self.__dict__.get("_found")  # found once per preparation: a datamodule's loaders are built once
        if found is not None:
            return found
        dm = trainer.datamodule
        if dm is not None:
            for method in ("val_dataloader", "train_dataloader"):
                if not is_overridden(method, dm):  # a datamodule may not implement a split
                    continue
                loader = _first_loader(getattr(dm, method)())
                if loader is not None and _has_items(loader):
                    self._found = (loader, f"{type(dm).__name__}.{method}()")
                    return self._found
        if trainer.state.fn == "fit":
            _setup_validation_data(trainer)
        for loaders, where in (
            (trainer.val_dataloaders, "the validation dataloader"),
            (trainer.train_dataloader, "the training dataloader"),
        ):
            loader = _first_loader(loaders)
            if loader is not None and _has_items(loader):
                self._found = (loader, where)
                return self._found
        return None

    def draw_probe(self, trainer: pl.Trainer, size: int) -> tuple[Tensor, Tensor | None]:
        """A fixed probe batch of ``size`` items from :meth:`probe_source`, read with ``unpack``.

        Indices come from the callback's own generator only. Returns ``(inputs, labels)`` (labels
        ``None`` for unlabelled data). When the source has fewer items, all of them are used and a
        warning gives the numbers.

        Raises:
            ValueError: no data at all (the message lists the ways to give it).
            TypeError: batches that cannot be read (the message names ``unpack``).
        """
        name = type(self).__name__
        found = self.probe_source(trainer)
        if found is None:
            raise ValueError(
                f"{name} needs probe data and found none: pass {name}(probe=...) (a tensor, an (inputs, labels) pair, "
                "a Dataset or a DataLoader), or give data to the trainer: trainer.fit(model, train_loader, val_loader), "
                "a LightningDataModule, or trainer.validate(model, loader)."
            )
        source, where = found
        try:
            probe = draw_probe(source, size, self.generator, self.unpack, sampler=user_sampler(source))
        except (TypeError, RuntimeError) as err:  # unreadable batches, items that do not stack
            raise TypeError(
                f"{name} could not read probe data from {where}: {type(err).__name__}: {err}. Probe data is a tensor of "
                "inputs, an (inputs, labels) tuple, a Dataset or a DataLoader; unpack= says how to read its batches."
            ) from err
        except ValueError as err:
            raise ValueError(f"{name}: {where}: {err}") from err
        if not probe.deterministic:
            rank_zero_info(
                f"{name}: the probe is the first {len(probe.inputs)} items of {where}, an iterable: the same items at "
                "every run only if its order is fixed (pass probe=... for a fixed set)."
            )
        if trainer.world_size > 1:
            # an iterable, or data that differs by rank (a datamodule reading a rank's own shard), may give other
            # items on every rank: all ranks measure rank 0's probe, so their numbers and monitors agree
            probe.inputs, probe.labels, probe.indices = trainer.strategy.broadcast(
                (probe.inputs, probe.labels, probe.indices), src=0
            )
        if len(probe.inputs) < size:
            self._warn_once(
                "probe-size",
                f"{name}: probe_size={size} but {where} has only {len(probe.inputs)} items; the probe uses those "
                f"{len(probe.inputs)} (lower probe_size to silence this warning).",
            )
        if probe.inputs.is_floating_point():
            # a NaN pixel in one probe example would turn every pooled statistic NaN (or silently shift it)
            clean = torch.isfinite(probe.inputs.reshape(len(probe.inputs), -1)).all(dim=1)
            if not bool(clean.all()):
                kept = int(clean.sum())
                if kept == 0:
                    raise ValueError(
                        f"{name}: every one of the {len(clean)} probe examples from {where} has non-finite (NaN or "
                        "infinite) inputs; check the data's preprocessing, or pass probe=... with finite inputs."
                    )
                self._warn_once(
                    "probe-nonfinite",
                    f"{name}: {len(clean) - kept} of {len(clean)} probe examples from {where} have non-finite (NaN or "
                    f"infinite) inputs and are left out; the read-outs are those of the other {kept}.",
                )
                probe.inputs = probe.inputs[clean]
                probe.labels = None if probe.labels is None else probe.labels[clean]
                probe.indices = None if probe.indices is None else probe.indices[clean]
        self.probe_inputs, self.probe_labels, self.probe_indices = probe.inputs, probe.labels, probe.indices
        return probe.inputs, probe.labels

    def labelled_probe(self, trainer: pl.Trainer, size: int) -> tuple[Tensor, Tensor]:
        """:meth:`draw_probe` for methods that need labels.

        Raises:
            ValueError: the probe has no class labels; the message says how to give them.
        """
        x, y = self.draw_probe(trainer, size)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} needs labelled probe data, but the probe has no class labels [N]. For dict "
                "batches name the label key, e.g. unpack=('image', 'digit'); or pass probe=(inputs, labels)."
            )
        return x, y

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
        # Only configuration that needs neither the model (configure_model() has not run yet) nor the data
        self.__dict__.pop("_state_key", None)
        self._active = stage in ("fit", "validate")
        self._prepared_for = None
        self._restored_step = None
        self._prep_seconds = 0.0
        if self.figure_dir and self._active:
            figure_filesystem(str(self.figure_dir), type(self).__name__)  # a URL nothing can write to fails here
        if stage == "fit":
            # a callback reused for another fit starts a new history (a resumed fit restores its own after this)
            self.history, self.last, self._last_step = [], None, None
            self._find_monitors(trainer)

    def _find_monitors(self, trainer: pl.Trainer) -> None:
        """Note the EarlyStopping / ModelCheckpoint monitors that read this callback's metrics.

        Their epochs are measured whatever the budget and the cadence: a monitor that finds its metric
        missing stops the fit ("metric ... which is not available").
        """
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        self._monitored = []
        for cb in trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            if isinstance(cb, (EarlyStopping, ModelCheckpoint)) and isinstance(monitor, str):
                if monitor.startswith(self.prefix + "/"):
                    every = getattr(cb, "_every_n_epochs", 1) if isinstance(cb, ModelCheckpoint) else 1
                    self._monitored.append((monitor, max(1, every or 1)))

    def _monitor_due(self, trainer: pl.Trainer) -> bool:
        return any((trainer.current_epoch + 1) % every == 0 for _, every in self._monitored)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a metric is in callback_metrics only in an epoch that measured it: monitors never see stale values
        for key in [k for k in trainer.callback_metrics if k.startswith(self.prefix + "/")]:
            del trainer.callback_metrics[key]

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
            self.__dict__.pop("_found", None)
            # checks and probe draws are overhead too: the budget counts them
            self._prep_seconds = self.__dict__.get("_prep_seconds", 0.0) + time.perf_counter() - start
        self._prepared_for = weakref.ref(pl_module)

    def _data_ready(self, trainer: pl.Trainer) -> bool:
        return not self.needs_data or self.probe_source(trainer) is not None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # with only a training loader the data appears at on_train_start: prepare there, still before step 1
        if self._active and self._data_ready(trainer):
            self.prepare(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self.prepare(trainer, pl_module)
        self._start_budget(trainer)
        if self.run_on == "validation_epoch_end" and self.every_n_epochs and not self._validation_runs(trainer):
            self._warn_once(
                "no-validation",
                f"{type(self).__name__}(run_on='validation_epoch_end') but this fit runs no validation (no validation "
                "data, or limit_val_batches=0): it measures only at the start and end. Use run_on='train_epoch_end'.",
            )
        # a resumed run restores trained weights: a "step 0" measurement of them would be a fake start
        if self.measure_at_start and trainer.global_step == 0 and trainer.ckpt_path is None and not self.history:
            self.scheduled_run(trainer, pl_module)

    @staticmethod
    def _validation_runs(trainer: pl.Trainer) -> bool:
        if trainer.limit_val_batches == 0:
            return False
        _setup_validation_data(trainer)
        return trainer.val_dataloaders is not None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and trainer.state.fn == "validate":
            self.prepare(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.scheduled_run(trainer, pl_module)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or trainer.global_step == self._last_step:
            return
        monitored = self._monitor_due(trainer)
        if monitored or (self.run_on == "train_epoch_end" and self._epoch_due(trainer)):
            self.scheduled_run(trainer, pl_module, monitored=monitored)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or trainer.sanity_checking:
            return
        if trainer.state.fn == "validate":  # trainer.validate(): one measurement of the (restored) weights
            self.run(trainer, pl_module)
        elif trainer.state.fn == "fit" and trainer.global_step != self._last_step:
            # a monitored metric is measured here when validation runs: before the monitor reads it, whether it
            # checks at the end of validation or of the training epoch
            monitored = self._monitor_due(trainer)
            if monitored or (self.run_on == "validation_epoch_end" and self._epoch_due(trainer)):
                self.scheduled_run(trainer, pl_module, monitored=monitored)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final measurement always runs (its cost was reserved in the budget from the start)
        if self._active and self.measure_at_end and trainer.global_step != self._last_step:
            self.scheduled_run(trainer, pl_module, final=True)

    # ------------------------------------------------------------------ the overhead budget
    def _start_budget(self, trainer: pl.Trainer) -> None:
        # the checks and probe draw of this fit (at on_fit_start / on_train_start) count as spent
        spent, self._prep_seconds = self.__dict__.get("_prep_seconds", 0.0), 0.0
        self._clock, self._spent, self._cost, self._skipped = time.perf_counter() - spent, spent, None, 0
        self._measured, self._step0, self._render_cost = 0, trainer.global_step, None
        if self.budget is None:
            self._share = None
        elif self.budget == "auto":
            total = default_budget()
            shared = [cb for cb in trainer.callbacks if isinstance(cb, InterpretabilityCallback) and cb.budget == "auto"]
            self._share = None if total is None else total / max(1, len(shared))
        else:
            self._share = float(self.budget)

    @property
    def skipped(self) -> int:
        """Cadence points skipped by the overhead budget in the current fit."""
        return self._skipped

    @property
    def measured(self) -> int:
        """Measurements made at cadence points (and the end) of the current fit."""
        return self._measured

    @property
    def spent(self) -> float:
        """Seconds this callback's measurements, pilots and checks used in the current fit."""
        return self._spent

    @property
    def overhead(self) -> float:
        """Share of the training wall time (since ``on_train_start``) this callback's measurements used."""
        elapsed = time.perf_counter() - self._clock
        return self._spent / elapsed if elapsed > 0 else 0.0

    def _total_steps(self, trainer: pl.Trainer) -> float | None:
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # no length and no max_steps: unknown
            return None

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
        if self._share is None or trainer.state.fn != "fit":
            self._measured += 1
            return self.run(trainer, pl_module)
        total_steps = self._total_steps(trainer)
        final = final or (total_steps is not None and trainer.global_step >= total_steps)
        estimate = self._cost
        if estimate is None:
            started = time.perf_counter()
            self.prepare(trainer, pl_module)
            with gathered(trainer, pl_module), isolate(pl_module):
                estimate = self.estimate_cost(pl_module)
            self._cost = estimate  # one pilot per fit: a skipped point keeps its estimate
            self._spent += time.perf_counter() - started  # the pilot is part of the overhead
        elapsed = time.perf_counter() - self._clock
        training = max(0.0, elapsed - self._spent)
        # a tenth of the share stays free for what is not timed here: Lightning calling the hooks every step
        plan = plan_point(
            share=BUDGET_TIMED * self._share,
            cost=estimate,
            floor=self.work_floor(),
            training_time=training,
            expected_time=expected_training_time(training, trainer.global_step - self._step0, total_steps),
            spent=self._spent,
            final=final,
            monitored=monitored,
        )
        overhead = self._spent / elapsed if elapsed > 0 else 0.0
        run, work, over = plan.run, plan.work, plan.over_budget
        if trainer.world_size > 1:  # rank 0's clock decides, so every rank measures at the same steps and sizes
            run, work, over, overhead = trainer.strategy.broadcast((run, work, over, overhead), src=0)
        if not run:
            self._skipped += 1
            return None
        if over and work * (estimate or 0.0) - plan.allowance > BUDGET_SLACK:
            size = f"{work:.0%} of a full one" if work < 1 else "full size: it cannot be scaled"
            self._warn_once(
                "budget-floor",
                f"{type(self).__name__}: the {'final ' if final else ''}measurement at step {trainer.global_step} runs "
                f"at its smallest size ({size}, about {work * (estimate or 0):.2f} s), more than "
                f"this callback's share of the training time allows ({self._share:.1%}: {max(0.0, plan.allowance):.2f} s "
                f"left of it; {self._spent:.2f} s used in {training:.1f} s of training)"
                + (f", because {self._monitored[0][0]!r} is monitored" if monitored and not final else "")
                + ". To stay within it: a cheaper setting (a later layer, a smaller probe_size, fewer MCMC steps), "
                "or a larger budget (budget=0.2, or LIGHTNING_INTERP_BUDGET for all) to say the cost is fine.",
            )
        # figures cost a fixed time whatever the size (0.1-0.3 s each on a CPU): at the end of the fit always,
        # in between only when what the allowance leaves after the measurement covers them
        leftover = plan.allowance - work * (estimate or 0.0)
        render = final or leftover >= (RENDER_PILOT if self._render_cost is None else self._render_cost)
        begin = time.perf_counter()
        self.work = work
        try:
            measurement = self.run(
                trainer,
                pl_module,
                extra={"overhead": overhead, "skipped": float(self._skipped), "work": float(work)},
                render=render,
            )
        finally:
            self.work = 1.0
        cost = time.perf_counter() - begin
        if self.render_seconds:
            self._render_cost = self.render_seconds
        self._cost = (cost - self.render_seconds) / work  # the estimate is of a full measurement, figures apart
        self._spent += cost
        self._measured += 1
        return measurement

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # trainer.validate(ckpt_path=...) restores the weights but not the loops: remember the weights' step
        self._restored_step = checkpoint.get("global_step")

    def measurement_step(self, trainer: pl.Trainer) -> int:
        """The training step the model's weights are at: ``trainer.global_step``, or in ``validate`` with a
        checkpoint, the checkpoint's step."""
        restored = getattr(self, "_restored_step", None)
        if trainer.state.fn == "validate" and trainer.ckpt_path is not None and restored is not None:
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
        step = self.measurement_step(trainer)
        #: The global step of the measurement in progress (methods may seed per-step generators from it).
        self.step = step
        self.prepare(trainer, pl_module)
        # every measurement, and the weight check, sees full weights whatever the strategy shards
        with gathered(trainer, pl_module):
            broken = nonfinite_parameters(pl_module)
            try:
                with isolate(pl_module):
                    measurement = self.measure(pl_module)
            except Exception:
                if not broken:
                    raise
                # the method could not run on non-finite weights: its read-outs are NaN, not missing
                measurement = Measurement(scalars=dict.fromkeys(self._read_out_names(), math.nan))
            if any(not math.isfinite(_to_float(v)) for v in measurement.scalars.values()) and not broken:
                # the cause is looked up with a forward pass: inside the gather, and on every rank alike
                self._nonfinite_cause = self._nonfinite_logits(pl_module)
        self.last = measurement
        self._last_step = step
        scalars = {k: _to_float(v) for k, v in measurement.scalars.items()}
        scalars.update(extra or {})
        if broken:
            # numbers computed from NaN weights mean nothing, even the finite ones (argmax of NaN logits is 0)
            scalars = {k: v if k in SIZE_KEYS else math.nan for k, v in scalars.items()}
            self._warn_once(
                "nonfinite-weights",
                f"{type(self).__name__}: the model's weights are non-finite at step {step} ({', '.join(broken[:5])}"
                f"{' ...' if len(broken) > 5 else ''}): every read-out is logged as NaN. Lower the learning rate, clip "
                "gradients (Trainer(gradient_clip_val=...)), or stop such a fit with EarlyStopping(check_finite=True).",
            )
        elif any(not math.isfinite(v) for k, v in scalars.items() if k not in SIZE_KEYS):
            self._warn_nonfinite(pl_module, scalars, step)
        entry = {"step": float(step), "epoch": float(trainer.current_epoch), **scalars}
        if self.history and self.history[-1]["step"] == float(step):
            self.history[-1] = entry  # the same weights measured again (validate() after fit): one entry per step
        else:
            self.history.append(entry)
        self._log_scalars(trainer, scalars, step)
        self.render_seconds = 0.0
        if trainer.is_global_zero and not broken:
            # figures cost far more than most measurements: render them only when something takes them
            takes_images = self.log_images and any(_takes_images(logger) for logger in trainer.loggers)
            if render and (self.figure_dir or takes_images):
                start = time.perf_counter()
                for key, fig in self.figures(measurement).items():
                    self._log_figure(trainer, key, fig, step)
                self.render_seconds = time.perf_counter() - start
            elif self.log_images:
                for logger in trainer.loggers:
                    self._warn_no_images(logger)
            if trainer.loggers:
                for key, (columns, rows) in self.tables(measurement).items():
                    self._log_table(trainer, key, columns, rows, step)
        return measurement

    def _read_out_names(self) -> list[str]:
        """The read-outs of the last measurement (and the monitored ones), for a measurement that could not run."""
        names = [k for k in self.history[-1] if k not in ("step", "epoch", *SIZE_KEYS)] if self.history else []
        names += [m[len(self.prefix) + 1 :] for m, _ in self._monitored if m[len(self.prefix) + 1 :] not in names]
        return names or ["nonfinite"]

    def _warn_nonfinite(self, pl_module: nn.Module, scalars: dict[str, float], step: int) -> None:
        """One warning naming why read-outs are non-finite: the logits on the probe, else the read-out itself."""
        names = [k for k, v in scalars.items() if k not in SIZE_KEYS and not math.isfinite(v)]
        cause = self.__dict__.pop("_nonfinite_cause", None) or (
            "the read-out itself (e.g. a class with no variance, or too few examples for an error bar)"
        )
        self._warn_once(
            f"nonfinite-{cause[:12]}",
            f"{type(self).__name__}: non-finite read-outs at step {step} ({', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}), logged as NaN; the cause: {cause}.",
        )

    def _nonfinite_logits(self, pl_module: nn.Module) -> str | None:
        """``"the model's logits, non-finite on k of n probe examples"`` when they are, else ``None``."""
        if self.probe_inputs is None:
            return None
        device, dtype = model_device_dtype(pl_module)
        x = self.probe_inputs
        with isolate(pl_module):
            logits = pl_module(x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype))
        if isinstance(logits, Tensor) and logits.ndim == 2:
            bad = int((~torch.isfinite(logits)).any(dim=1).sum())
            if bad:
                return f"the model's logits, non-finite on {bad} of {len(logits)} probe examples"
        return None

    def _warn_no_images(self, logger: Any) -> None:
        self._warn_once(
            f"img-{type(logger).__name__}",
            f"{type(self).__name__}: {type(logger).__name__} cannot take images, so figures are not logged to it"
            " (use WandbLogger or TensorBoardLogger, or set figure_dir=... to write PNG files).",
        )

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            self.warning_log.append(message)
            rank_zero_warn(message)

    def _log_scalars(self, trainer: pl.Trainer, scalars: dict[str, float], step: int) -> None:
        # a NaN read-out is a result: logged as NaN, so EarlyStopping(check_finite=True) sees it
        metrics = {self._key(k): v for k, v in scalars.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        # the same numbers on every rank, so monitors (EarlyStopping, ModelCheckpoint) agree across ranks
        callback_metrics, bar = trainer.callback_metrics, trainer.progress_bar_metrics
        for key, value in metrics.items():
            callback_metrics[key] = torch.tensor(value)
        for name in self.prog_bar:
            if self._key(name) in metrics:
                bar[self._key(name)] = metrics[self._key(name)]

    def _log_figure(self, trainer: pl.Trainer, key: str, fig: Any, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        image = figure_to_array(fig)
        full = self._key(key)
        if self.figure_dir:
            # through fsspec, so a URL (s3://, gs://, memory://) writes there rather than to a local folder "s3:"
            fs, root = figure_filesystem(str(self.figure_dir), type(self).__name__)
            fs.makedirs(root, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", full)
            with fs.open(f"{root.rstrip('/')}/{name}_step{step:06d}.png", "wb") as f:
                f.write(array_to_png(image))
        if not self.log_images:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=full, images=[image], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(full, image, global_step=step, dataformats="HWC")
            else:
                self._warn_no_images(logger)

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
