"""Opt-in instrumentation of unmodified training scripts through Lightning's callback entry point.

Lightning calls every ``lightning.pytorch.callbacks_factory`` entry point when a ``Trainer`` is created
and adds the callbacks they return. lightning-interp registers :func:`callbacks_factory`, which returns
nothing unless the environment variable ``LIGHTNING_INTERP_CALLBACKS`` names callbacks:

* comma-separated names: ``LIGHTNING_INTERP_CALLBACKS=posterior_gap,saliency``;
* or JSON, a list of objects with a ``name`` and keyword arguments:
  ``LIGHTNING_INTERP_CALLBACKS='[{"name": "ablation", "layers": ["net.1"], "every_n_epochs": 1}]'``.

Names: the keys of :data:`lightning_interp.methods.METHODS` (the class names work too). Only the first three
work as bare names; the others have required arguments, which only the JSON form can give
(:func:`required_arguments` lists them):

=================  ==============================  ==========================================================
name               class                           required arguments
=================  ==============================  ==========================================================
``posterior_gap``  ``PosteriorGapCallback``        none, but the datamodule needs a ``task`` attribute (a
                                                   ``GenerativeTask`` cannot be written in JSON, so ``task=``
                                                   is for Python code only)
``saliency``       ``FinalLayerSaliencyCallback``  none
``correlation``    ``CorrelationOrderCallback``    none
``ablation``       ``AblationProbeCallback``       ``layers``, e.g. ``[{"name": "ablation", "layers": ["net.1"]}]``
``expansion``      ``LogitExpansionCallback``      ``seq_len``, ``num_states``, e.g.
                                                   ``[{"name": "expansion", "seq_len": 8, "num_states": 4}]``
=================  ==============================  ==========================================================

A bare name whose callback has required arguments, or keyword arguments the callback's constructor
rejects, raise a ``ValueError`` that names the variable, the callback and the JSON form.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_interp import methods
from lightning_interp.methods import Method

__all__ = ["ENV_VAR", "callbacks_factory", "required_arguments"]

ENV_VAR = "LIGHTNING_INTERP_CALLBACKS"


def _registry() -> dict[str, Method]:
    """Every name ``LIGHTNING_INTERP_CALLBACKS`` accepts: the keys of :data:`METHODS` and their class names."""
    records = list(methods.METHODS)  # read now, so a record added to the registry is a name here
    names = {m.key: m for m in records}
    names.update({m.callback_name: m for m in records})
    return names


def _lookup(name: Any, registry: dict[str, Method]) -> Method:
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"{ENV_VAR}: unknown callback {name!r}; use one of {sorted(registry)}")
    return registry[name]


def _parameters(cls: type) -> list[inspect.Parameter]:
    """The named constructor arguments, with those a ``**kwargs`` passes on to the base classes' ``__init__``."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # without self
        for p in params:
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                found.setdefault(p.name, p)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return list(found.values())


def _accepts_any(cls: type) -> bool:
    """Whether some ``__init__`` down the ``**kwargs`` chain takes any keyword (then no argument is unknown)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            return False
        if klass is object or klass.__module__.startswith("lightning."):
            return True  # Lightning's Callback.__init__ ends the chain
    return True


def required_arguments(name: str) -> list[str]:
    """The constructor arguments without defaults of the callback called ``name`` (a short or class name).

    ``[]`` means the bare name works in ``LIGHTNING_INTERP_CALLBACKS``; otherwise the arguments must be
    given in the JSON form.

    Raises:
        ValueError: an unknown name (the message lists the valid names).
    """
    cls = _lookup(name, _registry()).callback
    return [p.name for p in _parameters(cls) if p.default is inspect.Parameter.empty]


def _json_form(name: str, kwargs: dict[str, Any]) -> str:
    """``LIGHTNING_INTERP_CALLBACKS='[{...}]'`` for ``name`` with ``kwargs`` (placeholder values where not JSON)."""
    entry: dict[str, Any] = {"name": name}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = "..."
        entry[key] = value
    return f"{ENV_VAR}='{json.dumps([entry])}'"


def _build(name: str, method: Method, kwargs: dict[str, Any]) -> Callback:
    cls = method.callback
    params = {p.name: p for p in _parameters(cls)}
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in kwargs]
    # The JSON example: the required arguments (given values, else sample values) and, for the other
    # known arguments given, their defaults, which are valid values.
    example = {n: kwargs.get(n, method.example_arguments.get(n, "...")) for n in required}
    example.update({n: params[n].default for n in kwargs if n in params and n not in example})
    if missing:
        given = f" (given: {', '.join(sorted(kwargs))})" if kwargs else ""
        raise ValueError(
            f"{ENV_VAR}: {name} needs {', '.join(missing)}{given}; a bare name only works for callbacks without "
            f"required arguments, so give them in the JSON form, e.g. {_json_form(name, example)}"
        )
    try:
        callback: Callback = cls(**kwargs)
    except (TypeError, ValueError) as err:
        unknown = [] if _accepts_any(cls) else sorted(set(kwargs) - set(params))
        hint = ""
        if unknown:
            hint = f" {cls.__name__} has no argument(s) {', '.join(unknown)}; its arguments are {', '.join(params)}."
        raise ValueError(
            f"{ENV_VAR}: could not build {name} ({cls.__name__}) from {kwargs!r}: {type(err).__name__}: {err}.{hint} "
            f"Give keyword arguments as JSON values, e.g. {_json_form(name, example)}"
        ) from err
    return callback


def callbacks_factory() -> list[Callback]:
    """The callbacks named in ``LIGHTNING_INTERP_CALLBACKS`` (none when it is unset or empty).

    Raises:
        ValueError: an unknown name or malformed JSON (the message lists the valid names); a callback
            with required arguments named without them (the message names the missing arguments and
            the JSON form); keyword arguments the callback's constructor rejects (chained to its error).
    """
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return []
    registry = _registry()
    entries: list[dict[str, Any]]
    if spec[0] in "[{":
        try:
            parsed = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ENV_VAR} is not valid JSON: {err}") from err
        entries = parsed if isinstance(parsed, list) else [parsed]
    else:
        entries = [{"name": name.strip()} for name in spec.split(",") if name.strip()]
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{ENV_VAR}: each JSON entry needs a 'name', got {entry!r}")
        kwargs = dict(entry)
        name = kwargs.pop("name")
        out.append(_build(name, _lookup(name, registry), kwargs))
    return out
