"""Opt-in instrumentation of unmodified training scripts through Lightning's callback entry point.

Lightning calls every ``lightning.pytorch.callbacks_factory`` entry point when a ``Trainer`` is created
and adds the callbacks they return. lightning-interp registers :func:`callbacks_factory`, which returns
nothing unless the environment variable ``LIGHTNING_INTERP_CALLBACKS`` names callbacks:

* comma-separated names: ``LIGHTNING_INTERP_CALLBACKS=posterior_gap,saliency``;
* or JSON, a list of objects with a ``name`` and keyword arguments:
  ``LIGHTNING_INTERP_CALLBACKS='[{"name": "ablation", "layers": ["net.1"], "every_n_epochs": 1}]'``.

Names: ``posterior_gap``, ``saliency``, ``ablation``, ``correlation``, ``expansion`` (or the class names).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["ENV_VAR", "callbacks_factory"]

ENV_VAR = "LIGHTNING_INTERP_CALLBACKS"


def _registry() -> dict[str, type[Callback]]:
    from lightning_interp import callbacks as cb

    classes = [
        cb.PosteriorGapCallback,
        cb.FinalLayerSaliencyCallback,
        cb.AblationProbeCallback,
        cb.CorrelationOrderCallback,
        cb.LogitExpansionCallback,
    ]
    names = {c.prefix: c for c in classes}
    names.update({c.__name__: c for c in classes})
    return names


def callbacks_factory() -> list[Callback]:
    """The callbacks named in ``LIGHTNING_INTERP_CALLBACKS`` (none when it is unset or empty).

    Raises:
        ValueError: an unknown name or malformed JSON (the message lists the valid names).
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
        if name not in registry:
            raise ValueError(f"{ENV_VAR}: unknown callback {name!r}; use one of {sorted(registry)}")
        out.append(registry[name](**kwargs))
    return out
