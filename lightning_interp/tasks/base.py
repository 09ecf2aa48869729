"""Classification tasks with a known generative model, hence an exact posterior.

A :class:`GenerativeTask` knows ``pi_c p(x|c)``: it samples labelled data and gives the exact posterior
``p(c|x)``, the Bayes accuracy and the conditional entropy, computed in float64 log space. The tasks of
this package are what :mod:`lightning_interp.posterior` compares a classifier's softmax with, and what
the synthetic datamodules sample through.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Estimate", "GenerativeTask"]


class Estimate(NamedTuple):
    """A Monte-Carlo estimate and its standard error."""

    value: float
    stderr: float


class GenerativeTask(ABC):
    """A classification task with a known generative model ``pi_c p(x|c)``.

    Subclasses implement :meth:`class_log_likelihood` (``log p(x|c)``) and :meth:`sample_class`.
    Everything else (sampling labelled data, the exact posterior, Bayes accuracy, conditional
    entropy) follows and is computed in float64 log space, so posteriors stay exact for x far in
    the tails where ``p(x|c)`` underflows.

    Attributes:
        num_classes: number of classes ``K``.
        dim: input dimension ``D``.
        priors: class priors ``pi`` (float64 tensor ``[K]``).
    """

    num_classes: int
    dim: int
    priors: Tensor

    @abstractmethod
    def class_log_likelihood(self, x: Tensor) -> Tensor:
        """``log p(x|c)`` for every class, float64 ``[n, K]``."""

    @abstractmethod
    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` float64 samples ``[n, D]`` from ``p(x|c)``."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input as the model takes it: ``(dim,)``, or ``(C, H, W)`` for image tasks.

        :meth:`sample` returns flat ``[n, dim]`` inputs; ``x.reshape(n, *task.input_shape)`` is what a
        model of the task gets.
        """
        return (self.dim,)

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 1 and self.dim == 1:
            x = x[:, None]
        if x.ndim > 2 and tuple(x.shape[1:]) == self.input_shape:
            x = x.reshape(x.shape[0], -1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [n, {self.dim}], got {list(x.shape)}")
        return x.to(dtype=torch.float64, device="cpu")

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` labelled samples.

        Args:
            n: number of samples.
            generator: a CPU ``torch.Generator``; the global RNG is used when ``None``.

        Returns:
            ``(x, y)``: inputs float32 ``[n, D]`` and labels int64 ``[n]``.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        y = torch.multinomial(self.priors, n, replacement=True, generator=generator) if n else torch.zeros(0, dtype=torch.long)
        x = torch.empty(n, self.dim, dtype=torch.float64)
        for c in range(self.num_classes):
            idx = torch.nonzero(y == c).flatten()
            if idx.numel():
                x[idx] = self.sample_class(c, idx.numel(), generator)
        return x.float(), y

    def log_joint(self, x: Tensor) -> Tensor:
        """``log pi_c + log p(x|c)``, float64 ``[n, K]``."""
        return self.class_log_likelihood(self._check_x(x)) + self.priors.log()[None, :]

    def log_density(self, x: Tensor) -> Tensor:
        """Log marginal density ``log p(x)``, float64 ``[n]``."""
        return torch.logsumexp(self.log_joint(x), dim=1)

    def log_posterior(self, x: Tensor) -> Tensor:
        """Exact log posterior ``log p(c|x)``, float64 ``[n, K]`` on the CPU."""
        return torch.log_softmax(self.log_joint(x), dim=1)

    def posterior(self, x: Tensor) -> Tensor:
        """Exact posterior ``p(c|x)``, float64 ``[n, K]`` on the CPU."""
        return self.log_posterior(x).exp()

    def _mc(self, fn, n: int, generator: torch.Generator | None, chunk: int = 100_000) -> Estimate:
        values = []
        for start in range(0, n, chunk):
            x, y = self.sample(min(chunk, n - start), generator)
            values.append(fn(x, y))
        v = torch.cat(values)
        return Estimate(v.mean().item(), (v.std() / math.sqrt(v.numel())).item())

    def bayes_accuracy(self, n: int = 200_000, generator: torch.Generator | None = None) -> Estimate:
        """Monte-Carlo estimate of the Bayes accuracy ``E_x[max_c p(c|x)]`` with its standard error."""
        return self._mc(lambda x, _y: self.posterior(x).max(dim=1).values, n, generator)

    def conditional_entropy(self, n: int = 200_000, generator: torch.Generator | None = None) -> Estimate:
        """Monte-Carlo estimate of ``H(C|X) = E_x[H(p(.|x))]`` in nats, with its standard error."""

        def entropy(x: Tensor, _y: Tensor) -> Tensor:
            lp = self.log_posterior(x)
            return -(torch.special.xlogy(lp.exp(), lp.exp())).sum(dim=1)

        return self._mc(entropy, n, generator)
