"""The shape every method's result shares: ``scalars()`` with standard errors, and ``tables()``.

Each method module has one entry function, ``measure_<key>(model, inputs, labels=None, *, generator=None,
**settings)``, returning a result that satisfies :class:`MethodResult`. Callbacks, the audit and the demo
log what :func:`flat_scalars` makes of it, so a number logged anywhere is a number the function returned.

This module imports neither Lightning nor matplotlib.

Example:
    >>> import torch
    >>> class Result:
    ...     def scalars(self):
    ...         return {"accuracy": (torch.tensor(0.9), torch.tensor(0.01)), "probe_size": (64, None)}
    ...     def tables(self):
    ...         return {}
    >>> flat_scalars(Result())
    {'accuracy': tensor(0.9000), 'accuracy_se': tensor(0.0100), 'probe_size': 64}
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["MethodResult", "Scalar", "Table", "flat_scalars"]

#: A number as a method returns it: a 0-d tensor on the model's device, or a Python number.
Scalar = Tensor | float | int
#: A table: ``(columns, rows)``.
Table = tuple[list[str], list[list[Any]]]


@runtime_checkable
class MethodResult(Protocol):
    """What ``measure_<key>`` returns."""

    def scalars(self) -> dict[str, tuple[Scalar, Scalar | None]]:
        """Read-outs by name: ``(value, standard error)``; the error is ``None`` for a count, a size or a diagnostic."""
        ...

    def tables(self) -> dict[str, Table]:
        """Tables by name: ``(columns, rows)``."""
        ...


def flat_scalars(result: MethodResult) -> dict[str, Scalar]:
    """``{name: value, name_se: error}`` of ``result.scalars()``: the keys a logger receives (without a prefix)."""
    flat: dict[str, Scalar] = {}
    for name, (value, se) in result.scalars().items():
        flat[name] = value
        if se is not None:
            flat[f"{name}_se"] = se
    return flat
