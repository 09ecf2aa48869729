"""A model evaluated on categorical sequences: batched, encoded, its logits or the units of any layer.

What :func:`~lightning_interp.expansion.expand` evaluates: :class:`Evaluator` maps sequences of states
``[N, L]`` to outputs ``[N, K]`` (float64), and :func:`check_layer` finds a layer by its ``named_modules()``
path with a helpful error. The names are also importable from :mod:`lightning_interp.expansion`. Pure torch.
"""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_interp.hooks import capture, get_module, layer_names

__all__ = ["Evaluator", "Target", "Units", "check_layer"]

#: the output expanded: an index, a pair ``(a, b)`` for ``z_a - z_b``, or ``None`` (every output)
Target = int | tuple[int, int] | None
#: hidden units of a layer: one flattened index, several (a leading output dim, in that order) or ``None`` (all)
Units = int | Sequence[int] | None
# errors that mean "this input does not fit the model" (others propagate unchanged)
_SHAPE_ERROR = re.compile(r"shape|size|dimension|mat1|must match|expected", re.IGNORECASE)


def _outputs(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    out = model(x)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ValueError(f"the model must return [N] or [N, K] logits, got {list(out.shape)}")
    if target is None:
        return out
    if isinstance(target, tuple):
        a, b = target
        return (out[:, a] - out[:, b])[:, None]
    return out[:, target : target + 1]


def check_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule of ``model`` at ``named_modules()`` path ``layer``, or a ``ValueError`` naming close names.

    Args:
        model: the model.
        layer: a ``named_modules()`` path (``""`` is the model itself; ``torch.compile``-d submodules are
            addressed by the user's names, without ``_orig_mod``).

    Returns:
        The submodule.

    Raises:
        ValueError: ``layer`` is not a string or names no submodule; the message lists the closest names
            (or the first of the model's names when none is close).

    Example:
        >>> check_layer(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), "1")
        ReLU()
    """
    if not isinstance(layer, str):
        raise ValueError(f"layer must be a named_modules() path (a string), got {layer!r}")
    try:
        return get_module(model, layer)
    except ValueError:
        pass
    names = [n for n in layer_names(model) if n]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    if close:
        hint = "close names: " + ", ".join(repr(n) for n in close)
    else:
        hint = "the model's layers: " + ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    raise ValueError(f"unknown layer {layer!r} in {type(model).__name__}; {hint} (named_modules() paths)")


def _check_units(unit: Units) -> list[int] | None:
    """``unit`` as a list of indices (``None``: all units); ``ValueError`` for anything but ints ``>= 0``."""

    def index(v: object) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 0

    if unit is None:
        return None
    if isinstance(unit, numbers.Integral) and index(unit):
        return [int(unit)]
    if isinstance(unit, Sequence) and not isinstance(unit, str) and len(unit) > 0 and all(index(v) for v in unit):
        return [int(v) for v in unit]
    raise ValueError(f"unit must be a unit index >= 0, a non-empty list of them, or None (every unit); got {unit!r}")


class Evaluator:
    """Batched evaluation of a model on sequences of states ``[N, L]`` -> outputs ``[N, K]`` (float64).

    States are encoded with ``encode(states, num_states)`` and run in the model's dtype and device, in
    batches of ``batch``; ``target`` selects an output or a difference of two (``None``: all outputs). A
    model that rejects the encoded shape gets a ``ValueError`` that says to pass ``encode``.

    With ``layer``, the outputs are those of the module at that ``named_modules()`` path instead of the
    logits (captured with :func:`~lightning_interp.hooks.capture`, the module's output at its last call in a
    forward pass), flattened per example to ``[N, D]`` (for a ``[N, C, H, W]`` output, unit
    ``c * H * W + h * W + w``), and ``unit`` picks units of it.

    Args:
        model: the model.
        num_states: states per site ``q``.
        encode: states ``[N, L]`` -> model input.
        target: logits only: an output index, ``(a, b)`` for ``z_a - z_b``, or ``None`` for every output.
        batch: sequences per forward pass.
        layer: ``named_modules()`` path of the layer to read, or ``None`` for the logits.
        unit: with ``layer``: a flattened unit index, a list of them (outputs in that order), or ``None``
            for every unit.

    Raises:
        ValueError: in ``__init__``, for an unknown ``layer`` (with the closest names), a malformed
            ``unit``, ``unit`` without ``layer``, or ``target`` with ``layer``; when called, for a model
            that rejects the encoded input, a layer that does not run in the forward pass or whose output
            has no batch dim first, or a ``unit`` outside the layer's width.

    Example:
        >>> from lightning_interp.encoding import one_hot_flat
        >>> model = nn.Sequential(nn.Linear(2 * 3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> Evaluator(model, 3, one_hot_flat, None, 64, layer="0", unit=[1, 3])(torch.zeros(5, 2, dtype=torch.long)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        num_states: int,
        encode: Callable[[Tensor, int], Tensor],
        target: Target,
        batch: int,
        layer: str | None = None,
        unit: Units = None,
    ) -> None:
        self.model, self.q, self.encode, self.target, self.batch = model, num_states, encode, target, batch
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        self.units = _check_units(unit)
        if layer is None and self.units is not None:
            raise ValueError(f"unit={unit!r} needs layer=<a named_modules() path>; for the logits choose target= instead")
        if layer is not None:
            check_layer(model, layer)
            if target is not None:
                raise ValueError(f"target={target!r} selects logits; with layer={layer!r} choose the layer's units with unit=")
        self.layer = layer

    def _layer_outputs(self, acts: dict[str, Tensor], n: int) -> Tensor:
        if self.layer not in acts:
            name = type(self.model).__name__
            raise ValueError(f"layer {self.layer!r} did not run in {name}'s forward pass; choose a layer that forward calls")
        out = acts.pop(self.layer)
        if out.ndim == 0 or out.shape[0] != n:
            raise ValueError(
                f"layer {self.layer!r} returned shape {list(out.shape)} for {n} sequences; its output must have the batch "
                "dim first ([N, ...]); choose another layer"
            )
        flat = out.reshape(n, -1)
        width = flat.shape[1]
        if self.units is None:
            return flat
        if max(self.units) >= width:
            raise ValueError(
                f"unit {max(self.units)} is out of range: layer {self.layer!r} has {width} units (output of shape "
                f"{list(out.shape[1:])} per example, flattened); choose units in 0..{width - 1}"
            )
        return flat[:, self.units]

    @torch.no_grad()
    def __call__(self, states: Tensor) -> Tensor:
        """The outputs ``[N, K]`` (float64, on the model's device) for sequences ``[N, L]``."""
        outs = []
        with capture(self.model, [self.layer] if self.layer is not None else []) as acts:
            for i in range(0, states.shape[0], self.batch):
                x = self.encode(states[i : i + self.batch], self.q).to(device=self.device, dtype=self.dtype)
                try:
                    if self.layer is None:
                        out = _outputs(self.model, x, self.target)
                    else:
                        self.model(x)
                        out = self._layer_outputs(acts, x.shape[0])
                except (RuntimeError, TypeError) as err:
                    if not _SHAPE_ERROR.search(str(err)):
                        raise
                    raise ValueError(
                        f"{type(self.model).__name__} rejected the encoded input of shape {list(x.shape)} "
                        f"({type(err).__name__}: {err}); pass encode=... matching the model's input"
                    ) from err
                outs.append(out.to(torch.float64))
        return torch.cat(outs)  # [N, K]
