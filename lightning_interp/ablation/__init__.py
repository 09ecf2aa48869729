"""Bayesian ablation probing: which units of a layer a task needs, how distributed and how polysemantic.

Reference:
    Nam, Campbell, Griffiths, Cohen, Leslie, "Understanding Task Representations in Neural Networks via
    Bayesian Ablation" (arXiv:2505.13742, CogSci 2025). Definitions follow docs/ablation.md: the paper names
    distributedness, manifold complexity and polysemanticity, but its exact formulas are not reproduced
    here; the ones below are this project's, chosen to be faithful to the paper's framework.

Instead of ablating units one at a time, infer the distribution over ablation masks ``m in {0, 1}^d``
(``m_i = 0`` zeroes unit ``i``'s output; units are the channels, dim 1, of the layer output, or the
last dim of a token output ``[N, T, C]``) given that task ``t`` is still done correctly:

``P(m | t, correct) ∝ prior(m) * O_t(m)``, ``O_t(m) = p_t(m) / (1 - p_t(m))``,
``prior(m) = prior_keep^|m| (1 - prior_keep)^(d - |m|)``. For a class task ``t`` the paper builds ``p_t(m)``
from the sensitivity and the specificity, each Beta(1, 1)-smoothed; the default ``likelihood="balanced"``
averages them (this project's choice: the paper's combination is not reproduced here),
``p_t(m) = ((TP + 1) / (n_t + 2) + (TN + 1) / (n_rest + 2)) / 2`` (``TP``: class-``t`` examples predicted
``t``; ``TN``: other examples not predicted ``t``); ``likelihood="sensitivity"`` keeps the one-sided
``(TP + 1) / (n_t + 2)``, which favours a mask that makes the network answer ``t`` for everything. Task
``"all"``: the smoothed multi-class accuracy ``(n_correct + 1) / (n + 2)``.

Read-outs (bits): ``importance_i = P(m_i = 1)``; ``information_i = KL(Bern(importance_i) ||
Bern(prior_keep))``; ``distributedness = exp(H(information / sum information)) / d`` in ``[1/d, 1]``;
``manifold_complexity`` = total correlation ``sum_i H(m_i) - H(M)`` (exact under enumeration; under
MCMC the sum of pairwise mutual informations, and named so); ``polysemanticity_i = exp(H(info_i^t /
sum_t info_i^t))`` over the class tasks (1 = monosemantic).

Inference is exact enumeration of all ``2^d`` masks (``d <= 16``) on all probe examples, or parallel
Metropolis chains of single-unit flips, each scoring its task's examples and (balanced likelihood) its own
fixed sample of ``rest_per_chain`` other examples. MCMC read-outs are Rao-Blackwellised: each step that
proposes flipping unit ``j`` knows ``P(m_j = 1 | m_-j)`` exactly, and importances and pairwise joints
average those conditionals instead of 0/1 samples; the pairwise information is jackknife bias-corrected
over the chains (the plug-in information of every pair is biased upwards by ``O(1/samples)``, and
``d(d-1)/2`` pairs add up) and summed over the pairs whose information the run resolves (on a wide layer
the many pairs below its noise would add up to noise; docs/ablation.md). Error bars: jackknife over
chains (MCMC), bootstrap over probe examples (exact). Many masks are evaluated in one forward pass (the
mask index folded into the batch), and where the model can be split at the layer with ``torch.fx`` the
part before it runs once per probe batch. The package is pure torch: it never imports Lightning.

Layout: :mod:`~lightning_interp.ablation.masked` (masked evaluation: :class:`MaskedForward`, the ``torch.fx``
analysis next to :class:`~lightning_interp.hooks.LayerSplit`), :mod:`~lightning_interp.ablation.likelihood`
(``p_t(m)``, the prior, the posterior of all masks, the tasks), :mod:`~lightning_interp.ablation.mcmc` (the chains'
scorer, the Metropolis sampler, its sums and ESS), :mod:`~lightning_interp.ablation.readouts`
(:class:`AblationFit` and the read-outs), :mod:`~lightning_interp.ablation.core` (:class:`BayesianAblation`,
:func:`choose_method`) and :mod:`~lightning_interp.ablation.measure` (:func:`measure_ablation`, what the callback
logs, and the budget's sizes). Everything below is importable from ``lightning_interp.ablation``.
"""

from __future__ import annotations

from lightning_interp.ablation.core import AUTO_EXACT_MASKS, MAX_EXACT_UNITS, BayesianAblation, choose_method
from lightning_interp.ablation.likelihood import (
    LIKELIHOODS,
    REST_PER_CHAIN,
    Likelihood,
    correct_probability,
    log_prior,
    mask_log_posterior,
)
from lightning_interp.ablation.masked import MaskedForward, all_masks
from lightning_interp.ablation.mcmc import MetropolisChains, chain_ess
from lightning_interp.ablation.measure import AblationResult, measure_ablation
from lightning_interp.ablation.readouts import (
    AblationFit,
    distributedness,
    effective_sample_size,
    information_bits,
    informative_units,
    pairwise_information_bits,
    polysemanticity,
    summarize,
)

__all__ = [
    "AUTO_EXACT_MASKS",
    "LIKELIHOODS",
    "MAX_EXACT_UNITS",
    "REST_PER_CHAIN",
    "AblationFit",
    "AblationResult",
    "BayesianAblation",
    "Likelihood",
    "MaskedForward",
    "MetropolisChains",
    "all_masks",
    "chain_ess",
    "choose_method",
    "correct_probability",
    "distributedness",
    "effective_sample_size",
    "information_bits",
    "informative_units",
    "log_prior",
    "mask_log_posterior",
    "measure_ablation",
    "pairwise_information_bits",
    "polysemanticity",
    "summarize",
]
