"""Lightning callbacks: thin adapters that choose data, call a method and log the results."""

from lightning_interp.callbacks.ablation import AblationProbeCallback
from lightning_interp.callbacks.base import InterpretabilityCallback
from lightning_interp.callbacks.correlation import CorrelationOrderCallback
from lightning_interp.callbacks.expansion import LogitExpansionCallback
from lightning_interp.callbacks.measurement import Measurement
from lightning_interp.callbacks.posterior_gap import PosteriorGapCallback
from lightning_interp.callbacks.saliency import FinalLayerSaliencyCallback
from lightning_interp.hooks import isolate

__all__ = [
    "AblationProbeCallback",
    "CorrelationOrderCallback",
    "FinalLayerSaliencyCallback",
    "InterpretabilityCallback",
    "LogitExpansionCallback",
    "Measurement",
    "PosteriorGapCallback",
    "isolate",
]
