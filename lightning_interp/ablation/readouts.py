"""Read-outs of a Bayesian ablation run: the result, information, distributedness, polysemanticity, summaries.

Part of :mod:`lightning_interp.ablation` (definitions in its docstring and docs/ablation.md). Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_interp.stats import replicate_standard_error as replicate_se

__all__ = [
    "LOG2",
    "AblationFit",
    "Estimate",
    "binary_entropy_bits",
    "distributedness",
    "effective_sample_size",
    "information_bits",
    "informative_units",
    "pairwise_information_bits",
    "polysemanticity",
    "summarize",
]

LOG2 = math.log(2.0)


@dataclass
class AblationFit:
    """Posterior read-outs of a Bayesian ablation run.

    Attributes:
        tasks: task names (``"class <c>"`` or ``"all"``).
        task_classes: the class index of each class task (empty for task ``"all"``).
        importance: ``P(m_i = 1 | t, correct)`` ``[T, d]``.
        information_bits: ``KL(Bern(importance) || Bern(prior_keep))`` in bits ``[T, d]``.
        distributedness: ``exp(H(information / sum information)) / d`` ``[T]`` (NaN without information).
        manifold_complexity: total correlation of the mask posterior in bits ``[T]`` (exact); under MCMC the
            jackknife bias-corrected sum of the pairwise informations of the pairs it resolves
            (``complexity_pairs``; an estimate, which can come out slightly negative).
        complexity_kind: ``"total_correlation"`` (exact) or ``"pairwise_mutual_information"`` (MCMC).
        polysemanticity: effective number of class tasks each unit informs about ``[d]``.
        mask_entropy_bits: ``H(M)`` per task ``[T]`` (exact runs; NaN under MCMC).
        full_accuracy: ``p_t`` with no unit ablated ``[T]`` (the likelihood's probability of a correct
            response: for class tasks under the balanced likelihood, the mean of the smoothed sensitivity
            and specificity).
        method: ``"exact"`` or ``"mcmc"``.
        num_evaluations: masks evaluated (exact: each on every probe example; MCMC: each on its task's
            examples and, balanced likelihood, its chain's sample of other examples).
        num_rows: (mask, example) rows evaluated.
        likelihood: ``"balanced"`` or ``"sensitivity"``, as asked (task ``"all"`` uses the accuracy either way).
        top_masks: per task, the most probable masks ``[k, d]`` (exact runs).
        top_probs: their posterior probabilities ``[k]``.
        acceptance_rate: per task (MCMC).
        ess: effective sample size per task, the minimum over units (MCMC; of the 0/1 keep indicators, a
            mixing diagnostic: :func:`effective_sample_size` gives that of the Rao-Blackwellised estimates).
        ess_per_unit: effective sample size of every unit's keep indicator per task ``[T, d]`` (MCMC).
        split: whether the part before the layer was computed once (``torch.fx`` split).
        replicate_kind: how the error bars were made: ``"jackknife"`` (MCMC: leave one chain out; the
            Monte-Carlo error for this probe set), ``"bootstrap"`` (exact: probe examples resampled; the
            error from the finite probe set), or ``""`` (none: one chain, or ``num_bootstrap=0``).
        replicate_importance: the importance of every jackknife / bootstrap replicate ``[R, T, d]``.
        replicate_complexity: the manifold complexity of every replicate ``[R, T]``.
        importance_se: standard error of ``importance`` ``[T, d]`` (``None`` without replicates).
        information_se: standard error of ``information_bits`` ``[T, d]``.
        distributedness_se: standard error of ``distributedness`` ``[T]``.
        manifold_complexity_se: standard error of ``manifold_complexity`` ``[T]``.
        polysemanticity_se: standard error of ``polysemanticity`` ``[d]``.
        seconds_per_step: wall time of one MCMC step of all chains (MCMC; for cost estimates).
        complexity_pairs: unit pairs the MCMC manifold complexity counts, per task ``[T]`` (MCMC): the
            dependent pairs whose information this run resolves (all of them on a small layer run long enough).
        complexity_left_out_bits: the information the dependent pairs left out could carry at most, per task
            ``[T]`` (MCMC): the sum of their bounds ``min(I(m_i; m_-i), I(m_j; m_-j))``, an upper bound (often
            loose) on how much the manifold complexity is biased downwards by leaving them out.
        num_draws: the masks the MCMC chains of a task kept, ``chains * (num_steps - burn_in)`` (0: exact run):
            the bound on :func:`effective_sample_size`.
    """

    tasks: list[str]
    importance: Tensor
    information_bits: Tensor
    distributedness: Tensor
    manifold_complexity: Tensor
    complexity_kind: str
    polysemanticity: Tensor
    mask_entropy_bits: Tensor
    full_accuracy: Tensor
    method: str
    num_evaluations: int
    num_rows: int = 0
    likelihood: str = "balanced"
    top_masks: list[Tensor] = field(default_factory=list)
    top_probs: list[Tensor] = field(default_factory=list)
    acceptance_rate: Tensor | None = None
    ess: Tensor | None = None
    ess_per_unit: Tensor | None = None
    split: bool = False
    replicate_kind: str = ""
    replicate_importance: Tensor | None = None
    replicate_complexity: Tensor | None = None
    importance_se: Tensor | None = None
    information_se: Tensor | None = None
    distributedness_se: Tensor | None = None
    manifold_complexity_se: Tensor | None = None
    polysemanticity_se: Tensor | None = None
    seconds_per_step: float | None = None
    complexity_pairs: Tensor | None = None
    complexity_left_out_bits: Tensor | None = None
    num_draws: int = 0
    task_classes: list[int] = field(default_factory=list)


def binary_entropy_bits(p: Tensor) -> Tensor:
    p = p.clamp(0, 1)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / LOG2


def information_bits(importance: Tensor, prior_keep: float = 0.5) -> Tensor:
    """``KL(Bern(importance) || Bern(prior_keep))`` in bits."""
    p = importance.clamp(0, 1)
    q = prior_keep
    kl = (torch.special.xlogy(p, p) - p * math.log(q) + torch.special.xlogy(1 - p, 1 - p) - (1 - p) * math.log(1 - q)) / LOG2
    return kl.clamp_min(0)  # rounding can give -1e-17 for an unused unit


def effective_sample_size(result: AblationFit) -> Tensor:
    """Effective sample size of every importance estimate ``[T, d]`` (MCMC runs), at most the draws.

    ``p (1 - p) / SE^2``: the number of independent 0/1 draws of the keep indicator that would estimate
    ``p`` as precisely as the (Rao-Blackwellised) MCMC estimate did, with its jackknife ``importance_se``,
    capped at the masks the chains kept, ``result.num_draws`` (the Rao-Blackwellised estimate can be more
    precise than that many independent draws, but a sample size beyond the draws says nothing more). NaN
    where the estimate has no resolvable error: an SE of 0 or at the level of float64 rounding (a unit no
    task uses: every conditional is ``prior_keep`` up to rounding; ``p (1 - p) / 1e-34`` is no sample
    size), or ``p`` of 0 or 1. Without jackknife errors (one chain) it is the chains' own ESS of the
    indicator, ``ess_per_unit``.

    Raises:
        ValueError: for an exact run (no sampling).

    Example:
        >>> r = AblationFit(tasks=["all"], importance=torch.tensor([[0.5, 0.5, 0.5]]), information_bits=torch.zeros(1, 3),
        ...     distributedness=torch.zeros(1), manifold_complexity=torch.zeros(1), complexity_kind="",
        ...     polysemanticity=torch.zeros(3), mask_entropy_bits=torch.zeros(1), full_accuracy=torch.ones(1),
        ...     method="mcmc", num_evaluations=1, importance_se=torch.tensor([[0.05, 1e-17, 0.0]]), num_draws=800)
        >>> effective_sample_size(r).round().tolist()  # 0.25 / 0.05^2 = 100; rounding-level and zero SE: no sample size
        [[100.0, nan, nan]]
    """
    if result.method != "mcmc":
        raise ValueError("the effective sample size is defined for MCMC runs only")
    if result.importance_se is None or result.importance_se.isnan().all():
        if result.ess_per_unit is None:
            raise ValueError("the result carries neither importance errors nor a per-unit ESS")
        return result.ess_per_unit
    p = result.importance.to(torch.float64)
    se = result.importance_se.to(device=p.device, dtype=torch.float64)
    spread = p * (1 - p)
    # an SE below ~100 ulps of the estimate is rounding in the jackknife, not Monte-Carlo error
    resolved = (se > 100 * torch.finfo(torch.float64).eps * p.abs().clamp_min(1e-3)) & (spread > 0)
    ess = spread / torch.where(resolved, se * se, torch.ones_like(se))
    if result.num_draws > 0:
        ess = ess.clamp_max(float(result.num_draws))
    return torch.where(resolved, ess, torch.full_like(ess, math.nan))


def informative_units(result: AblationFit, threshold_bits: float, prior_keep: float = 0.5, z: float = 2.0) -> Tensor:
    """Which units carry more than ``threshold_bits`` of information for some task, beyond sampling noise.

    Exact runs use the information as it is. MCMC runs also require the importance to be more than ``z``
    standard errors away from ``prior_keep``: a unit whose information is within noise of zero does not
    count (an unused unit's noisy estimate has information biased upwards). The standard error is
    ``result.importance_se`` (jackknife over chains), or ``sqrt(p (1 - p) / ESS)`` with the unit's
    effective sample size when there is none. The point estimate decides the threshold itself, so the
    count is not biased downwards at a short run.

    Args:
        result: an :class:`AblationFit`.
        threshold_bits: the information a unit must exceed for some task.
        prior_keep: the prior keep probability the information is measured against.
        z: the number of standard errors.

    Returns:
        ``[d]`` booleans.
    """
    p = result.importance.to(torch.float64)
    above = information_bits(p, prior_keep) > threshold_bits
    if result.method == "mcmc":
        if result.importance_se is not None and not result.importance_se.isnan().any():
            se = result.importance_se.to(device=p.device, dtype=torch.float64)
        elif result.ess_per_unit is not None:
            se = (p * (1 - p) / result.ess_per_unit.to(device=p.device, dtype=torch.float64).clamp_min(1)).sqrt()
        else:
            se = torch.zeros_like(p)
        above = above & ((p - prior_keep).abs() > z * se)
    return above.any(dim=0)


def distributedness(info: Tensor) -> Tensor:
    """``exp(H(info / sum info)) / d`` over the last dim; NaN where no unit carries information."""
    total = info.sum(dim=-1, keepdim=True)
    w = info / total
    h = -torch.special.xlogy(w, w).sum(dim=-1)
    out = h.exp() / info.shape[-1]
    return torch.where(total[..., 0] > 0, out, torch.full_like(out, math.nan))


def polysemanticity(info: Tensor) -> Tensor:
    """``exp(H(info_i^t / sum_t info_i^t))`` per unit from ``info`` ``[T, d]``; NaN for uninformative units."""
    total = info.sum(dim=0, keepdim=True)
    w = info / total
    h = -torch.special.xlogy(w, w).sum(dim=0)
    return torch.where(total[0] > 0, h.exp(), torch.full_like(h, math.nan))


def pairwise_information_bits(importance: Tensor, joint: Tensor, cap: Tensor | None = None, reduce: bool = True) -> Tensor:
    """``sum_{i<j} I(m_i; m_j)`` in bits from marginals ``P(m_i = 1)`` ``[..., d]`` and joints ``[..., d, d]``.

    ``joint[..., i, j] = P(m_i = 1, m_j = 1)``.

    The joint is first clipped to the range the marginals allow (estimated separately, they may disagree);
    each pair's information is then capped by ``cap`` ``[..., d, d]`` where given (an upper bound known
    with less noise, e.g. ``min(I(m_i; m_-i), I(m_j; m_-j))``). ``reduce=False`` returns the matrix
    ``I(m_i; m_j)`` ``[..., d, d]`` (diagonal included) instead of the sum.

    Example:
        >>> p = torch.tensor([0.5, 0.5], dtype=torch.float64)
        >>> float(pairwise_information_bits(p, torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)))  # m_1 = m_2
        1.0
    """
    pi, pj = importance[..., :, None], importance[..., None, :]
    j11 = torch.maximum(torch.minimum(joint, torch.minimum(pi, pj)), (pi + pj - 1).clamp_min(0))
    cells = [
        (j11, pi * pj),
        (pi - j11, pi * (1 - pj)),
        (pj - j11, (1 - pi) * pj),
        (1 - pi - pj + j11, (1 - pi) * (1 - pj)),
    ]
    terms = [
        torch.where(j > 0, j * (j.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), torch.zeros_like(j)) for j, m in cells
    ]
    mi = terms[0]
    for term in terms[1:]:  # added in turn, as sum() would
        mi = mi + term
    mi = mi / LOG2
    if cap is not None:
        mi = torch.minimum(mi, cap)
    return torch.triu(mi, diagonal=1).sum(dim=(-2, -1)) if reduce else mi


def summarize(result: AblationFit, informative_bits: float, prior_keep: float = 0.5) -> dict[str, tuple[Tensor, Tensor]]:
    """One-number read-outs of a run, each with its standard error (NaN without replicates).

    ``distributedness`` (mean over tasks with information), ``manifold_complexity`` (mean over tasks),
    ``polysemanticity`` (mean over units weighted by each unit's information summed over the class tasks:
    a unit carrying little information, hard to place at a short run, weighs little), ``max_importance``,
    ``informative_units`` (their count; its SE from the replicates' counts of units above
    ``informative_bits``) and ``full_accuracy`` (no SE: it is not estimated by the inference). The SE of
    each is the spread of the same read-out over the jackknife / bootstrap replicates.

    Args:
        result: an :class:`AblationFit`.
        informative_bits: the threshold of :func:`informative_units`.
        prior_keep: the prior keep probability of the run.

    Returns:
        ``{name: (value, se)}`` of 0-d float64 tensors.
    """
    if bool(result.importance.isnan().any()):  # a fit on non-finite logits (_nan_result): nothing was measured
        nan = torch.tensor(math.nan, dtype=torch.float64, device=result.importance.device)
        names = ("distributedness", "manifold_complexity", "polysemanticity", "max_importance", "informative_units")
        return {name: (nan.clone(), nan.clone()) for name in (*names, "full_accuracy")}
    informative = informative_units(result, informative_bits, prior_keep)

    def nanmean(t: Tensor) -> Tensor:
        keep = t[~t.isnan()]
        return keep.mean() if keep.numel() else torch.tensor(math.nan, dtype=torch.float64, device=t.device)

    def weighted(values: Tensor, weights: Tensor) -> Tensor:
        keep = ~values.isnan() & (weights > 0)
        if not keep.any():
            return torch.tensor(math.nan, dtype=torch.float64, device=values.device)
        return (values[keep] * weights[keep]).sum() / weights[keep].sum()

    def reads(importance: Tensor, complexity: Tensor) -> dict[str, Tensor]:
        info = information_bits(importance, prior_keep)
        class_rows = [i for i, n in enumerate(result.tasks) if n != "all"]
        poly = polysemanticity(info[class_rows]) if class_rows else torch.full_like(info[0], math.nan)
        return {
            "distributedness": nanmean(distributedness(info)),
            "manifold_complexity": complexity.mean(),
            "polysemanticity": weighted(poly, info[class_rows].sum(dim=0) if class_rows else torch.zeros_like(poly)),
            "max_importance": importance.max(),
            "informative_units": (info.max(dim=0).values > informative_bits).sum().double(),
        }

    point = reads(result.importance.double(), result.manifold_complexity.double())
    point["informative_units"] = informative.sum().double()
    out = {}
    reps = result.replicate_importance
    for name, value in point.items():
        se = torch.tensor(math.nan, dtype=torch.float64, device=value.device)
        if reps is not None:
            complexity = result.replicate_complexity
            rep_complexity = complexity.double() if complexity is not None else result.manifold_complexity.expand(len(reps), -1)
            values = torch.stack([reads(reps[r].double(), rep_complexity[r])[name] for r in range(reps.shape[0])])
            se = replicate_se(values, result.replicate_kind)
        out[name] = (value.double(), se)
    acc = result.full_accuracy.double().mean()
    out["full_accuracy"] = (acc, torch.tensor(math.nan, dtype=torch.float64, device=acc.device))
    return out


@dataclass
class Estimate:
    """What an inference gives before the read-outs (the names are :class:`AblationFit`'s)."""

    importance: Tensor
    manifold_complexity: Tensor
    complexity_kind: str
    mask_entropy_bits: Tensor
    method: str
    num_evaluations: int
    num_rows: int
    replicate_kind: str
    replicate_importance: Tensor | None
    replicate_complexity: Tensor | None
    top_masks: list[Tensor] = field(default_factory=list)
    top_probs: list[Tensor] = field(default_factory=list)
    acceptance_rate: Tensor | None = None
    ess: Tensor | None = None
    ess_per_unit: Tensor | None = None
    seconds_per_step: float | None = None
    complexity_pairs: Tensor | None = None
    complexity_left_out_bits: Tensor | None = None
    num_draws: int = 0
