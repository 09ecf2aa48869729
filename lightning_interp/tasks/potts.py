"""The two planted Potts models of a :class:`~lightning_interp.datamodules.PottsDataModule` as a task."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_interp.expansion import one_hot_flat
from lightning_interp.tasks.base import GenerativeTask

if TYPE_CHECKING:
    from lightning_interp.datamodules.potts import PottsDataModule

__all__ = ["PottsTask"]


class PottsTask(GenerativeTask):
    """The two planted Potts models of a :class:`PottsDataModule` as a :class:`GenerativeTask` (exact posterior).

    Inputs are the one-hot encoded sequences ``[n, L * q]`` (:func:`one_hot_flat`), so
    :class:`~lightning_interp.callbacks.PosteriorGapCallback` can compare a classifier of Potts sequences
    with the exact Bayes posterior; ``log p(x|c) = log P_c(sigma)`` uses the enumerated partition functions.
    Obtain it as ``datamodule.task``.

    Args:
        datamodule: an enumerable :class:`PottsDataModule` with ``encoding="one_hot"``.

    Raises:
        ValueError: the model is not enumerable or the encoding is not one-hot.
    """

    def __init__(self, datamodule: PottsDataModule) -> None:
        if datamodule.encoding != "one_hot":
            raise ValueError(
                f"the Potts task's inputs are one-hot sequences; this datamodule uses encoding={datamodule.encoding!r}: "
                "use PottsDataModule(encoding='one_hot')"
            )
        datamodule.require_enumerable("the exact posterior (PottsDataModule.task)")
        self.potts = datamodule
        self.num_classes, self.dim = 2, datamodule.seq_len * datamodule.num_states
        self.priors = torch.full((2,), 0.5, dtype=torch.float64)

    def class_log_likelihood(self, x: Tensor) -> Tensor:
        states = x.reshape(len(x), self.potts.seq_len, self.potts.num_states).argmax(dim=2)
        return torch.stack([self.potts.log_prob(states, c) for c in (0, 1)], dim=1)

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        return one_hot_flat(self.potts.sample_states(c, n, generator), self.potts.num_states).to(torch.float64)
