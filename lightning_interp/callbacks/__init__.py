"""Lightning callbacks: thin adapters that choose data, call a method and log the results."""

from lightning_interp.callbacks.base import InterpretabilityCallback, Measurement, isolate
from lightning_interp.callbacks.posterior_gap import PosteriorGapCallback

__all__ = ["InterpretabilityCallback", "Measurement", "PosteriorGapCallback", "isolate"]
