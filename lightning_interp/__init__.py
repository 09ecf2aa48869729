"""lightning-interp: interpretability callbacks and tools for PyTorch Lightning classifiers.

Everything here is imported on first use (PEP 562 module ``__getattr__``): ``import lightning_interp``
loads no torch, torchmetrics, torchvision, scipy or matplotlib, so ``lightning-interp --help`` and scripts
that need one method stay fast. The subpackages (``lightning_interp.callbacks``, ``.datamodules``,
``.tasks``, ...) are attributes as well, without a separate import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names of the package and the module that defines each.
_NAMES: dict[str, str] = {
    "PosteriorGap": "lightning_interp.posterior",
    "PosteriorGapResult": "lightning_interp.posterior",
    "measure_posterior_gap": "lightning_interp.posterior",
    "posterior_gap": "lightning_interp.posterior",
    "CorrelationResult": "lightning_interp.correlation",
    "measure_correlation": "lightning_interp.correlation",
    "ExpansionResult": "lightning_interp.expansion",
    "measure_expansion": "lightning_interp.expansion",
    "SaliencyResult": "lightning_interp.saliency",
    "measure_saliency": "lightning_interp.saliency",
    "GaussianMixtureTask": "lightning_interp.tasks",
    "GaussianTask": "lightning_interp.tasks",
    "GenerativeTask": "lightning_interp.tasks",
    "XieTask": "lightning_interp.tasks",
    "xie_task": "lightning_interp.tasks",
    "AblationResult": "lightning_interp.ablation",
    "measure_ablation": "lightning_interp.ablation",
}

#: Submodules reachable as attributes (``lightning_interp.callbacks``) before anyone imports them.
_SUBMODULES: tuple[str, ...] = (
    "ablation",
    "audit",
    "audit_files",
    "audit_folder",
    "audit_options",
    "audit_progress",
    "callbacks",
    "checks",
    "cli",
    "correlation",
    "datamodules",
    "demo",
    "encoding",
    "entry_points",
    "expansion",
    "faithfulness",
    "final_layer",
    "gaussian_closure",
    "hooks",
    "loading",
    "loggers",
    "methods",
    "models",
    "plotting",
    "posterior",
    "posterior_metric",
    "probe",
    "report",
    "results",
    "saliency",
    "saliency_maps",
    "sequences",
    "stats",
    "tasks",
)

__all__ = [
    "AblationResult",
    "CorrelationResult",
    "ExpansionResult",
    "GaussianMixtureTask",
    "GaussianTask",
    "GenerativeTask",
    "PosteriorGap",
    "PosteriorGapResult",
    "SaliencyResult",
    "XieTask",
    "__version__",
    "measure_ablation",
    "measure_correlation",
    "measure_expansion",
    "measure_posterior_gap",
    "measure_saliency",
    "posterior_gap",
    "xie_task",
]

if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
    from lightning_interp.ablation import AblationResult, measure_ablation
    from lightning_interp.correlation import CorrelationResult, measure_correlation
    from lightning_interp.expansion import ExpansionResult, measure_expansion
    from lightning_interp.posterior import PosteriorGap, PosteriorGapResult, measure_posterior_gap, posterior_gap
    from lightning_interp.saliency import SaliencyResult, measure_saliency
    from lightning_interp.tasks import GaussianMixtureTask, GaussianTask, GenerativeTask, XieTask, xie_task


def __getattr__(name: str) -> Any:
    """Import a public name or a submodule on first access (PEP 562) and cache it in the module."""
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the submodules, so ``dir()`` and tab completion show the whole package."""
    return sorted({*__all__, *_SUBMODULES})
