"""Generative classification tasks with exact posteriors, one module per family.

Every task is a :class:`GenerativeTask`: it samples labelled data and knows ``p(c|x)`` exactly. The
synthetic datamodules wrap a task and sample through it; :mod:`lightning_interp.posterior` measures how
far a classifier is from the task's posterior.
"""

from lightning_interp.tasks.base import Estimate, GenerativeTask
from lightning_interp.tasks.gaussian import GaussianMixtureTask, GaussianTask, XieTask, xie_task
from lightning_interp.tasks.patches import PatchImageTask, check_patch_layout, patch_masks
from lightning_interp.tasks.potts import PottsTask

__all__ = [
    "Estimate",
    "GaussianMixtureTask",
    "GaussianTask",
    "GenerativeTask",
    "PatchImageTask",
    "PottsTask",
    "XieTask",
    "check_patch_layout",
    "patch_masks",
    "xie_task",
]
