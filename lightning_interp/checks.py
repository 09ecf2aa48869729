"""Argument and model checks shared by the callbacks and the method functions.

Each check raises a ``ValueError`` or ``TypeError`` whose message names the problem and the fix. This module
does not import Lightning: the method functions (``measure_<key>``) run the same checks outside a Trainer.

Example:
    >>> check_int("probe_size", 64, minimum=1)
    >>> check_choice("tasks", "clases", ("classes", "all"))
    Traceback (most recent call last):
    ...
    ValueError: tasks must be one of 'classes', 'all', got 'clases'
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.hooks import capture, isolate

__all__ = [
    "RUN_ON",
    "check_callback_arguments",
    "check_choice",
    "check_class_names",
    "check_int",
    "check_layers_run",
    "check_logits",
    "check_number",
    "model_device_dtype",
    "nonfinite_logits",
    "nonfinite_parameters",
]

#: Where a callback's epoch cadence measures (``run_on=``).
RUN_ON = ("train_epoch_end", "validation_epoch_end")


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


def check_callback_arguments(
    *,
    every_n_epochs: Any,
    every_n_steps: Any,
    run_on: Any,
    measure_at_start: Any,
    measure_at_end: Any,
    seed: Any,
    log_images: Any,
    figure_dir: Any,
    key_prefix: Any,
    unpack: Any,
    prog_bar: Any,
    budget: Any,
) -> None:
    """Check the arguments every callback shares (see ``InterpretabilityCallback``), in the order they are read.

    Raises:
        ValueError: a negative cadence, an unknown ``run_on``, a negative seed, a budget outside (0, 1].
        TypeError: a flag that is not a bool, an empty ``figure_dir`` / ``key_prefix``, a malformed ``unpack`` or
            ``prog_bar``.
    """
    if budget is not None and budget != "auto":
        check_number("budget", budget, 0, 1, open_low=True)
    for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    if run_on not in RUN_ON:
        raise ValueError(f"run_on must be 'train_epoch_end' or 'validation_epoch_end', got {run_on!r}")
    check_int("seed", seed)
    for name, flag in (("measure_at_start", measure_at_start), ("measure_at_end", measure_at_end), ("log_images", log_images)):
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


def nonfinite_logits(model: nn.Module, inputs: Tensor | None) -> str | None:
    """``"the model's logits, non-finite on k of n probe examples"`` when they are on ``inputs``, else ``None``.

    The model runs isolated (see :func:`~lightning_interp.hooks.isolate`); ``None`` also without inputs or
    for an output that is not ``[N, K]``.
    """
    if inputs is None:
        return None
    device, dtype = model_device_dtype(model)
    with isolate(model):
        logits = model(inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype))
    if isinstance(logits, Tensor) and logits.ndim == 2:
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        if bad:
            return f"the model's logits, non-finite on {bad} of {len(logits)} probe examples"
    return None
