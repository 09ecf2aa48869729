"""lightning-interp: interpretability callbacks and tools for PyTorch Lightning classifiers."""

from lightning_interp.posterior import PosteriorGap, posterior_gap
from lightning_interp.tasks import GaussianMixtureTask, GaussianTask, GenerativeTask, XieTask, xie_task

__version__ = "0.1.0"

__all__ = [
    "GaussianMixtureTask",
    "GaussianTask",
    "GenerativeTask",
    "PosteriorGap",
    "XieTask",
    "__version__",
    "posterior_gap",
    "xie_task",
]
