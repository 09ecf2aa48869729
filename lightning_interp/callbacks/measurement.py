"""One measurement of a callback: run isolated on full weights, read out as numbers, kept in the history.

A NaN is a result: read-outs of a model with non-finite weights are all NaN (numbers computed from NaN
weights mean nothing, even the finite ones), and a method that cannot run on such weights gives NaN
read-outs rather than none; non-finite read-outs are logged as NaN with one warning naming the cause (the
model's logits on the probe, or the read-out itself). Bookkeeping scalars (:data:`SIZE_KEYS`) stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_interp.callbacks.sharding import gathered
from lightning_interp.checks import nonfinite_logits, nonfinite_parameters
from lightning_interp.hooks import isolate

__all__ = ["SIZE_KEYS", "Measurement", "add_to_history", "measure_guarded", "read_out_names", "read_out_scalars", "to_float"]

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
