"""The likelihood of a Bayesian ablation: ``p_t(m)`` from counts, the prior, the posterior of all masks, the tasks.

Part of :mod:`lightning_interp.ablation` (definitions in its docstring and docs/ablation.md). Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LIKELIHOODS",
    "REST_PER_CHAIN",
    "Likelihood",
    "MaskOutcomes",
    "TaskSet",
    "correct_probability",
    "log_prior",
    "mask_log_posterior",
    "rest_per_task",
]

#: ``p_t(m)`` of a class task: ``"balanced"`` (sensitivity and specificity averaged) or ``"sensitivity"``.
Likelihood = Literal["balanced", "sensitivity"]
LIKELIHOODS: tuple[str, ...] = ("balanced", "sensitivity")
#: MCMC, balanced likelihood: the other examples each chain of a class task scores (a fixed sample per chain).
REST_PER_CHAIN = 64


def correct_probability(
    task_correct: Tensor, num_task: Tensor, rest_correct: Tensor | None = None, num_rest: Tensor | None = None
) -> Tensor:
    """The probability of a correct response ``p_t(m)`` from counts, Beta(1, 1)-smoothed.

    One-sided (``rest_correct`` is ``None``): ``(task_correct + 1) / (num_task + 2)``, the smoothed
    sensitivity of a class task (or the accuracy of task ``"all"``). Two-sided (the ``"balanced"``
    likelihood of a class task): the average of that and the smoothed specificity
    ``(rest_correct + 1) / (num_rest + 2)``. Nam et al. use sensitivity and specificity, each Beta(1, 1)
    smoothed; averaging the two is this project's choice (the paper's combination is not reproduced here).

    Args:
        task_correct: the task's examples answered correctly (a class task: predicted as its class, ``TP``).
        num_task: the number of the task's examples (``n_t``), broadcastable against ``task_correct``.
        rest_correct: the other examples not predicted as the task's class (``TN``); ``None``: one-sided.
        num_rest: the number of other examples scored (``n_rest``); required with ``rest_correct``.

    Returns:
        ``p_t(m)`` in ``(0, 1)``, the broadcast shape of the inputs.

    Raises:
        ValueError: ``rest_correct`` without ``num_rest``.

    Example:
        >>> n, all_right, none_right = (torch.tensor(v, dtype=torch.float64) for v in (8.0, 8.0, 0.0))
        >>> float(correct_probability(all_right, n)), float(correct_probability(all_right, n, none_right, n))
        (0.9, 0.5)
    """
    sensitivity = (task_correct + 1) / (num_task + 2)
    if rest_correct is None:
        return sensitivity
    if num_rest is None:
        raise ValueError("num_rest is required with rest_correct")
    return (sensitivity + (rest_correct + 1) / (num_rest + 2)) / 2


def log_prior(masks: Tensor, prior_keep: float = 0.5) -> Tensor:
    """``log(prior_keep^|m| (1 - prior_keep)^(d - |m|))`` of masks ``[..., d]``."""
    k = masks.to(torch.float64).sum(dim=-1)
    return k * math.log(prior_keep) + (masks.shape[-1] - k) * math.log(1 - prior_keep)


def mask_log_posterior(p: Tensor, masks: Tensor, prior_keep: float = 0.5) -> Tensor:
    """``log P(m | t, correct)`` ``[M, ...]`` from ``p_t(m)`` ``[M, ...]`` of all masks ``[M, d]``, normalised over dim 0.

    ``P(m | t, correct) ∝ prior(m) * p_t(m) / (1 - p_t(m))``.

    Example:
        >>> p = torch.tensor([[0.5], [0.9]], dtype=torch.float64)  # a 1-unit layer: masks 0 and 1
        >>> [round(v, 12) for v in mask_log_posterior(p, torch.tensor([[False], [True]])).exp().flatten().tolist()]
        [0.1, 0.9]
    """
    logp = torch.log(p) - torch.log1p(-p) + log_prior(masks, prior_keep).reshape(-1, *([1] * (p.ndim - 1)))
    return logp - torch.logsumexp(logp, dim=0, keepdim=True)


@dataclass(frozen=True)
class TaskSet:
    """The tasks of a fit on its probe: names, membership ``[N, T]`` and each class task's class."""

    names: list[str]
    member: Tensor
    classes: list[int]  # empty for task "all"
    labels: Tensor
    num_classes: int

    @property
    def has_classes(self) -> bool:
        return bool(self.classes)

    def subset(self, index: Sequence[int]) -> TaskSet:
        """The tasks ``index`` alone, on the same probe."""
        classes = [self.classes[i] for i in index] if self.classes else []
        return TaskSet([self.names[i] for i in index], self.member[:, list(index)], classes, self.labels, self.num_classes)


class MaskOutcomes:
    """Every mask's predictions on every probe example ``[M, N]``, reduced to the likelihood's counts."""

    def __init__(self, pred: Tensor, tasks: TaskSet, two_sided: bool) -> None:
        self.correct = (pred == tasks.labels[None, :]).to(torch.float64)
        self.member = tasks.member.to(torch.float64)
        self.task_of_prediction: Tensor | None = None
        if two_sided:
            # the task whose class each prediction is (T: none), for the weighted count of each task's class
            num_tasks = len(tasks.classes)
            lookup = torch.full((tasks.num_classes,), num_tasks, dtype=torch.long, device=pred.device)
            lookup[torch.tensor(tasks.classes, device=pred.device)] = torch.arange(num_tasks, device=pred.device)
            # a prediction of -1 (non-finite logits) is no task's class
            self.task_of_prediction = torch.where(pred >= 0, lookup[pred.clamp_min(0)], num_tasks)

    def probability(self, weights: Tensor | None = None) -> Tensor:
        """``p_t(m)`` ``[M, T]``, each probe example counted ``weights[i]`` times (once without weights)."""
        member = self.member if weights is None else self.member * weights[:, None]
        tp, n_task = self.correct @ member, member.sum(dim=0)
        if self.task_of_prediction is None:
            return correct_probability(tp, n_task)
        w = torch.ones(self.correct.shape[1], dtype=torch.float64, device=member.device) if weights is None else weights
        m, t = self.correct.shape[0], member.shape[1]
        predicted = torch.zeros(m, t + 1, dtype=torch.float64, device=member.device)
        predicted.scatter_add_(1, self.task_of_prediction, w.expand(m, -1))  # weighted count predicted as each task's class
        n_rest = w.sum() - n_task
        # TN = the other examples not predicted t = n_rest - FP, FP = predicted t - TP
        return correct_probability(tp, n_task, n_rest - (predicted[:, :t] - tp), n_rest)


def rest_per_task(tasks: TaskSet, rest_per_chain: int, two_sided: bool) -> Tensor:
    """Other examples each chain of a task scores ``[T]``: at most ``rest_per_chain``, none one-sided."""
    others = tasks.member.shape[0] - tasks.member.sum(dim=0)
    return others.clamp_max(rest_per_chain) if two_sided else torch.zeros_like(others)
