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
``p_t(m) = (n_correct + 1) / (n + 2)`` on the probe examples of task ``t`` (a class: the examples of that
class classified correctly; or ``"all"``), ``prior(m) = prior_keep^|m| (1 - prior_keep)^(d - |m|)``.

Read-outs (bits): ``importance_i = P(m_i = 1)``; ``information_i = KL(Bern(importance_i) ||
Bern(prior_keep))``; ``distributedness = exp(H(information / sum information)) / d`` in ``[1/d, 1]``;
``manifold_complexity`` = total correlation ``sum_i H(m_i) - H(M)`` (exact under enumeration; under
MCMC the sum of pairwise mutual informations, and named so); ``polysemanticity_i = exp(H(info_i^t /
sum_t info_i^t))`` over the class tasks (1 = monosemantic).

Inference is exact enumeration of all ``2^d`` masks (``d <= 16``) or parallel Metropolis chains of
single-unit flips. MCMC read-outs are Rao-Blackwellised: each step that proposes flipping unit ``j``
knows ``P(m_j = 1 | m_-j)`` exactly, and importances and pairwise joints average those conditionals
instead of 0/1 samples; the pairwise information is jackknife bias-corrected over the chains (the
plug-in information of every pair is biased upwards by ``O(1/samples)``, and ``d(d-1)/2`` pairs add up).
Error bars: jackknife over chains (MCMC), bootstrap over probe examples (exact).
Many masks are evaluated in one forward pass (the mask index folded into the batch),
and where the model can be split at the layer with ``torch.fx`` the part before it runs once per probe
batch. The module is pure torch: it never imports Lightning.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.hooks import LayerSplit, as_list, forward_hooks, get_module, replace, same_logits, split_graph
from lightning_interp.stats import replicate_standard_error as replicate_se

__all__ = [
    "AblationResult",
    "BayesianAblation",
    "MaskedForward",
    "all_masks",
    "effective_sample_size",
    "information_bits",
    "informative_units",
    "pairwise_information_bits",
    "summarize",
]

MAX_EXACT_UNITS = 16
#: ``method="auto"`` enumerates at least this many masks (d <= 12) exactly rather than sampling.
AUTO_EXACT_MASKS = 4096
_MAX_ELEMENTS = 4_000_000
#: bound on the elements of the MCMC pairwise joint accumulators (per chain when they fit, else pooled)
_MAX_JOINT_ELEMENTS = 16_000_000
_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# batched masked evaluation
# ---------------------------------------------------------------------------------------------


def _unit_dim(t: Tensor) -> int:
    return -1 if t.ndim == 3 else 1


def _apply_mask(h: Tensor, masks: Tensor) -> Tensor:
    """``h`` ``[N, ...]`` times every mask of ``masks`` ``[M, d]`` -> ``[M * N, ...]`` (mask-major)."""
    return (h.unsqueeze(0) * _mask_view(h, masks)).reshape(masks.shape[0] * h.shape[0], *h.shape[1:])


#: Modules and functions ``f`` with ``f(m * h) = m * f(h)`` for a 0/1 mask ``m`` over channels
#: (``f(0) = 0``, applied per channel): the mask can be applied after them.
_MASK_COMMUTING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Hardswish, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten,
)  # fmt: skip
# (no 1-d pools: on a token output [N, T, C] they pool over the units, the last dim)
_MASK_COMMUTING_FUNCTIONS = {
    torch.relu, torch.tanh, torch.flatten, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}  # fmt: skip
_MASK_COMMUTING_METHODS = {"relu", "tanh", "flatten"}


def _commutes_with_mask(model: nn.Module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        if isinstance(module, nn.Hardtanh) and not module.min_val <= 0 <= module.max_val:
            return False  # f(0) != 0
        return isinstance(module, _MASK_COMMUTING_MODULES)
    if node.op == "call_function":
        return node.target in _MASK_COMMUTING_FUNCTIONS
    return node.op == "call_method" and node.target in _MASK_COMMUTING_METHODS


class MaskedForward:
    """Evaluate a model with a layer's units masked, for many masks per forward pass.

    With ``torch.fx`` the model is split at ``layer``: the values the rest of the network needs (the
    layer output and any earlier value used later, e.g. a skip connection) are computed once per probe
    batch, and only the part after the layer runs on the ``[masks * examples]`` batch. Where tracing
    fails the whole forward is batched instead (the layer output multiplied by a forward hook).

    Args:
        model: the model (its parameters, mode and RNG are untouched).
        layer: ``named_modules()`` path of the layer whose units are masked.
        max_batch: bound on ``masks * examples`` rows per forward pass.
        split: try the ``torch.fx`` split (``False`` forces the whole-forward path).
    """

    def __init__(self, model: nn.Module, layer: str, max_batch: int = 65536, split: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.module = get_module(model, layer)
        self.max_batch = max_batch
        self.suffix: torch.fx.GraphModule | None = None
        self.prefix: torch.fx.GraphModule | None = None
        self._split: LayerSplit | None = None
        self._pushed: list[tuple[str, torch.fx.GraphModule, torch.fx.GraphModule]] = []
        #: the op after the layer that the mask is applied after (``None``: at the layer itself)
        self.mask_after: str | None = None
        if split:
            self._split = LayerSplit(model, layer)
            self._after_split()

    def _after_split(self) -> None:
        """Take the split's parts and the pushes past the ops after the layer, or warn that there is none."""
        assert self._split is not None
        if not self._split.is_split:
            warnings.warn(f"{self._split.reason}; the whole forward pass is batched instead", stacklevel=3)
            self.prefix = self.suffix = self._split = None
            self._pushed, self.mask_after = [], None
            return
        self.prefix, self.suffix = self._split.parts  # type: ignore[misc]
        # push the mask past the ops after the layer that commute with zeroing a channel (ReLU, pooling,
        # flatten of a pooled map, ...): they then run once per probe batch instead of once per mask.
        # Candidates furthest first; prepare() keeps the first one that checks out on its inputs.
        self._pushed, self.mask_after = [], None
        graph, node = self._split.graph, self._split.node
        assert graph is not None and node is not None
        while len(node.users) == 1:
            user = next(iter(node.users))
            if user.all_input_nodes != [node] or not _commutes_with_mask(self.model, user):
                break
            node = user
            self._pushed.insert(0, (getattr(node.target, "__name__", str(node.target)), *split_graph(self.model, graph, node)))

    @property
    def is_split(self) -> bool:
        return self.suffix is not None

    def _check_split(self, x: Tensor) -> None:
        """Re-trace (or give up the split) when the traced graph no longer computes the model's logits.

        ``torch.fx`` freezes Python control flow at trace time; a model whose branches depend on attributes
        changed since then would otherwise be evaluated with the old graph.
        """
        if self._split is None:
            return
        graph = self._split.graph
        self._split.check(x)
        if not self._split.is_split or self._split.graph is not graph:  # given up, or traced again
            self._after_split()

    def _choose_push(self, x: Tensor) -> None:
        """Use the furthest push that keeps the layer's unit count and gives the same logits on random masks."""
        assert self._split is not None and self._split.parts is not None
        self.prefix, self.suffix = self._split.parts
        self.mask_after = None
        plain = as_list(self.prefix(x))
        h = plain[0]
        d, n, k = h.shape[_unit_dim(h)], x.shape[0], 8
        masks = torch.rand(k, d, generator=torch.Generator().manual_seed(0)).to(h.device) < 0.5
        masks[0] = True

        def run(suffix: torch.fx.GraphModule, vals: list[Tensor]) -> Tensor:
            rest = [v.unsqueeze(0).expand(k, *v.shape).reshape(k * n, *v.shape[1:]) for v in vals[1:]]
            return suffix(_apply_mask(vals[0], masks), *rest)

        reference = run(self.suffix, plain)
        if same_logits(reference, reference[:n].repeat(k, *([1] * (reference.ndim - 1)))):
            return  # the masks do not change the logits (e.g. a zero head): nothing to verify a push on
        for name, prefix, suffix in self._pushed:
            values = as_list(prefix(x))
            hp = values[0]
            if hp.ndim < 2 or hp.shape[:1] != x.shape[:1] or hp.shape[_unit_dim(hp)] != d:
                continue
            if same_logits(run(suffix, values), reference):
                self.prefix, self.suffix, self.mask_after = prefix, suffix, name
                return

    @torch.no_grad()
    def prepare(self, inputs: Tensor) -> list[Tensor]:
        """Values the part after the layer needs (the layer output first), for one probe batch.

        Each call first checks on (up to) 16 of the inputs that the split still computes the model's logits
        and which mask push (if any) gives the same logits as masking at the layer.
        """
        self._check_split(inputs[:16])
        if self._pushed and self._split is not None:
            self._choose_push(inputs[:16])
        if self.prefix is not None:
            values = self.prefix(inputs)
            values = list(values) if isinstance(values, (tuple, list)) else [values]
            if not all(isinstance(v, Tensor) and v.shape[:1] == inputs.shape[:1] for v in values):
                raise RuntimeError("the values crossing the layer are not all batch tensors")
            return values
        return [inputs]

    @torch.no_grad()
    def predictions(self, prepared: list[Tensor], masks: Tensor) -> Tensor:
        """Predicted class ``[M, N]`` for every mask ``[M, d]`` and probe example (of ``prepared``)."""
        n = prepared[0].shape[0]
        # rows per forward pass: at most max_batch, and at most ~4M layer-output elements (wide rows stay in cache)
        row_elems = max(1, prepared[0][0].numel())
        per = max(1, min(self.max_batch, _MAX_ELEMENTS // row_elems) // n)
        out = []
        for start in range(0, masks.shape[0], per):
            chunk = masks[start : start + per]
            k = chunk.shape[0]
            if self.suffix is not None:
                layer_out = _apply_mask(prepared[0], chunk)
                rest = [v.unsqueeze(0).expand(k, *v.shape).reshape(k * n, *v.shape[1:]) for v in prepared[1:]]
                logits = self.suffix(layer_out, *rest)
            else:
                x = prepared[0]
                big = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
                with replace(
                    self.model,
                    self.layer,
                    lambda h, chunk=chunk, k=k: (h.reshape(k, n, *h.shape[1:]) * _mask_view(h, chunk)).reshape(h.shape),
                ):
                    logits = self.model(big)
            out.append(logits.argmax(dim=-1).reshape(k, n))
        return torch.cat(out)

    def num_units(self, prepared: list[Tensor]) -> int:
        """Number of units ``d`` of the layer."""
        if self.suffix is not None:
            h = prepared[0]
            return h.shape[_unit_dim(h)]
        store: list[int] = []
        with forward_hooks(self.model, {self.layer: lambda _m, _i, h: store.append(h.shape[_unit_dim(h)])}), torch.no_grad():
            self.model(prepared[0][:1])
        return store[0]


def _mask_view(h: Tensor, masks: Tensor) -> Tensor:
    """Masks ``[k, d]`` shaped to broadcast against ``h`` viewed as ``[k, n, ...]``."""
    dim = _unit_dim(h)
    shape = [1] * (h.ndim - 1)
    shape[dim if dim == -1 else 0] = masks.shape[1]
    return masks.to(h.dtype).reshape(masks.shape[0], 1, *shape)


# ---------------------------------------------------------------------------------------------
# inference and read-outs
# ---------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    """Posterior read-outs of a Bayesian ablation run.

    Attributes:
        tasks: task names (``"class <c>"`` or ``"all"``).
        importance: ``P(m_i = 1 | t, correct)`` ``[T, d]``.
        information_bits: ``KL(Bern(importance) || Bern(prior_keep))`` in bits ``[T, d]``.
        distributedness: ``exp(H(information / sum information)) / d`` ``[T]`` (NaN without information).
        manifold_complexity: total correlation of the mask posterior in bits ``[T]``.
        complexity_kind: ``"total_correlation"`` (exact) or ``"pairwise_mutual_information"`` (MCMC).
        polysemanticity: effective number of class tasks each unit informs about ``[d]``.
        mask_entropy_bits: ``H(M)`` per task ``[T]`` (exact runs; NaN under MCMC).
        full_accuracy: smoothed accuracy ``p_t`` with no unit ablated ``[T]``.
        method: ``"exact"`` or ``"mcmc"``.
        num_evaluations: masks evaluated (exact: each on every probe example; MCMC: each on its task's examples).
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


def _binary_entropy_bits(p: Tensor) -> Tensor:
    p = p.clamp(0, 1)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / _LOG2


def information_bits(importance: Tensor, prior_keep: float = 0.5) -> Tensor:
    """``KL(Bern(importance) || Bern(prior_keep))`` in bits."""
    p = importance.clamp(0, 1)
    q = prior_keep
    kl = (torch.special.xlogy(p, p) - p * math.log(q) + torch.special.xlogy(1 - p, 1 - p) - (1 - p) * math.log(1 - q)) / _LOG2
    return kl.clamp_min(0)  # rounding can give -1e-17 for an unused unit


def effective_sample_size(result: AblationResult) -> Tensor:
    """Effective sample size of every importance estimate ``[T, d]`` (MCMC runs).

    ``p (1 - p) / SE^2``: the number of independent 0/1 draws of the keep indicator that would estimate
    ``p`` as precisely as the (Rao-Blackwellised) MCMC estimate did, with its jackknife ``importance_se``.
    It can exceed the number of samples, and is NaN where the estimate has no error (a unit no task uses);
    without jackknife errors (one chain) it is the chains' own ESS of the indicator, ``ess_per_unit``.

    Raises:
        ValueError: for an exact run (no sampling).
    """
    if result.method != "mcmc":
        raise ValueError("the effective sample size is defined for MCMC runs only")
    if result.importance_se is None or result.importance_se.isnan().all():
        if result.ess_per_unit is None:
            raise ValueError("the result carries neither importance errors nor a per-unit ESS")
        return result.ess_per_unit
    p = result.importance.to(torch.float64)
    var = result.importance_se.to(torch.float64) ** 2
    return torch.where(var > 0, p * (1 - p) / var.clamp_min(1e-300), torch.full_like(p, math.nan))


def informative_units(result: AblationResult, threshold_bits: float, prior_keep: float = 0.5, z: float = 2.0) -> Tensor:
    """Which units carry more than ``threshold_bits`` of information for some task, beyond sampling noise.

    Exact runs use the information as it is. MCMC runs also require the importance to be more than ``z``
    standard errors away from ``prior_keep``: a unit whose information is within noise of zero does not
    count (an unused unit's noisy estimate has information biased upwards). The standard error is
    ``result.importance_se`` (jackknife over chains), or ``sqrt(p (1 - p) / ESS)`` with the unit's
    effective sample size when there is none. The point estimate decides the threshold itself, so the
    count is not biased downwards at a short run.

    Args:
        result: an :class:`AblationResult`.
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
    mi = sum(
        torch.where(j > 0, j * (j.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), torch.zeros_like(j)) for j, m in cells
    )
    mi = mi / _LOG2  # type: ignore[operator]
    if cap is not None:
        mi = torch.minimum(mi, cap)
    return torch.triu(mi, diagonal=1).sum(dim=(-2, -1)) if reduce else mi


def all_masks(d: int, device: torch.device) -> Tensor:
    """All ``2^d`` masks ``[2^d, d]`` (bool), mask ``k`` keeping the units whose bit is set in ``k``."""
    idx = torch.arange(2**d, device=device)
    return ((idx[:, None] >> torch.arange(d, device=device)) & 1).bool()


def _ess(traces: Tensor) -> Tensor:
    """Multi-chain effective sample size of ``traces`` ``[C, S, d]`` (Geyer's initial positive sequence)."""
    c, s, _ = traces.shape
    x = traces.double() - traces.double().mean(dim=(0, 1), keepdim=True)
    var = (x * x).mean(dim=(0, 1))
    f = torch.fft.rfft(x, n=2 * s, dim=1)
    acov = torch.fft.irfft(f * f.conj(), n=2 * s, dim=1)[:, :s].mean(dim=0) / s  # [s, d]
    rho = acov / var.clamp_min(1e-300)
    # pairs rho_k + rho_{k+1} for k = 1, 3, 5, ..., summed up to (excluding) the first negative pair
    m = len(range(1, s - 1, 2))
    pairs = rho[1 : 1 + 2 * m : 2] + rho[2 : 2 + 2 * m : 2]  # [m, d]
    total = (pairs * (pairs >= 0).to(pairs.dtype).cumprod(dim=0)).sum(dim=0)
    ess = torch.where(total > -0.5, c * s / (1 + 2 * total), torch.full_like(total, float(c * s)))
    ess = torch.where(var > 0, ess, torch.full_like(ess, float(c * s)))
    return ess


def summarize(result: AblationResult, informative_bits: float, prior_keep: float = 0.5) -> dict[str, tuple[Tensor, Tensor]]:
    """One-number read-outs of a run, each with its standard error (NaN without replicates).

    ``distributedness`` (mean over tasks with information), ``manifold_complexity`` (mean over tasks),
    ``polysemanticity`` (mean over units weighted by each unit's information summed over the class tasks:
    a unit carrying little information, hard to place at a short run, weighs little), ``max_importance``,
    ``informative_units`` (their count; its SE from the replicates' counts of units above
    ``informative_bits``) and ``full_accuracy`` (no SE: it is not estimated by the inference). The SE of
    each is the spread of the same read-out over the jackknife / bootstrap replicates.

    Args:
        result: an :class:`AblationResult`.
        informative_bits: the threshold of :func:`informative_units`.
        prior_keep: the prior keep probability of the run.

    Returns:
        ``{name: (value, se)}`` of 0-d float64 tensors.
    """
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


class BayesianAblation:
    """Infer the distribution over ablation masks of a layer given that a task is still done correctly.

    Args:
        model: a classifier returning logits.
        layer: ``named_modules()`` path of the layer whose units (channels) are ablated.
        method: ``"exact"`` (all ``2^d`` masks, ``d <= 16``), ``"mcmc"`` (parallel Metropolis chains of
            single-unit flips), or ``"auto"`` (exact when ``d <= 12``, or when ``d <= 16`` and ``2^d`` is at
            most the MCMC budget ``num_chains * (num_steps + 1)``).
        prior_keep: prior probability that a unit is kept (0.5: uniform prior over masks).
        num_chains: MCMC chains per task.
        num_steps: MCMC steps per chain (including burn-in).
        burn_in: MCMC steps discarded at the start of each chain.
        generator: the ``torch.Generator`` of the MCMC chains (a fresh seeded one when ``None``).
        max_batch: bound on ``masks * examples`` rows per forward pass (memory).
        top_k: masks kept per task in exact runs.
        split: split the model at the layer with ``torch.fx`` where possible.
        num_bootstrap: exact runs: probe resamples for the error bars (0: none).

    Error bars: MCMC read-outs come with jackknife standard errors over the chains (the Monte-Carlo error
    for this probe set); exact ones with bootstrap standard errors over the probe examples.

    Raises:
        ValueError: an unknown layer, an unknown method, ``prior_keep`` outside ``(0, 1)``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
        >>> x = torch.randn(64, 4)
        >>> result = BayesianAblation(model, "1").fit(x, model(x).argmax(1), tasks="all")
        >>> result.method, result.importance.shape
        ('exact', torch.Size([1, 6]))
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        method: Literal["auto", "exact", "mcmc"] = "auto",
        prior_keep: float = 0.5,
        num_chains: int = 16,
        num_steps: int = 1000,
        burn_in: int = 200,
        generator: torch.Generator | None = None,
        max_batch: int = 65536,
        top_k: int = 10,
        split: bool = True,
        num_bootstrap: int = 20,
    ) -> None:
        if method not in ("auto", "exact", "mcmc"):
            raise ValueError(f"method must be 'auto', 'exact' or 'mcmc', got {method!r}")
        if not 0.0 < prior_keep < 1.0:
            raise ValueError(f"prior_keep must be in (0, 1), got {prior_keep}")
        if num_steps <= burn_in or num_chains < 1:
            raise ValueError("num_steps must exceed burn_in and num_chains must be >= 1")
        get_module(model, layer)
        self.model, self.layer, self.method = model, layer, method
        self.prior_keep, self.num_chains, self.num_steps, self.burn_in = prior_keep, num_chains, num_steps, burn_in
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if num_bootstrap < 0:
            raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}")
        self.max_batch, self.top_k, self.num_bootstrap = max_batch, top_k, num_bootstrap
        self.forward = MaskedForward(model, layer, max_batch=max_batch, split=split)

    # ------------------------------------------------------------------ data
    def _collect(self, inputs: Tensor | Iterable, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        if isinstance(inputs, Tensor):
            if labels is None:
                raise ValueError("labels are required with tensor inputs")
            return inputs, torch.as_tensor(labels)
        xs, ys = [], []
        for batch in inputs:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("a dataloader must yield (inputs, labels) batches")
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError("the dataloader yielded no batches")
        return torch.cat(xs), torch.cat(ys)

    def _tasks(self, labels: Tensor, tasks: str | Sequence[int], num_classes: int) -> tuple[list[str], Tensor]:
        """Task names and membership ``[N, T]``; class tasks come first, then ``"all"``."""
        if tasks == "all":
            return ["all"], torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device)
        if tasks == "classes":
            classes = sorted(set(labels.tolist()))
        elif isinstance(tasks, str):
            raise ValueError(f"tasks must be 'classes', 'all' or a list of class indices, got {tasks!r}")
        else:
            classes = [int(c) for c in tasks]
        names, cols = [], []
        for c in classes:
            if not 0 <= c < num_classes:
                raise ValueError(f"task class {c} is outside the model's classes [0, {num_classes})")
            member = labels == c
            if not member.any():
                raise ValueError(f"task 'class {c}' has no probe examples; draw a larger probe set or drop the class")
            names.append(f"class {c}")
            cols.append(member)
        return names, torch.stack(cols, dim=1)

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self,
        inputs: Tensor | Iterable,
        labels: Tensor | None = None,
        tasks: Literal["classes", "all"] | Sequence[int] = "classes",
    ) -> AblationResult:
        """Run the inference on probe data.

        Args:
            inputs: probe inputs ``[N, ...]``, or a dataloader of ``(inputs, labels)`` batches.
            labels: class labels ``[N]`` (with tensor inputs).
            tasks: ``"classes"`` (one task per class present: its examples classified correctly),
                ``"all"`` (every example), or a list of class indices.

        Returns:
            An :class:`AblationResult` (tensors on the model's device).

        Raises:
            ValueError: labels outside the model's classes, an empty task, ``exact`` with ``d > 16``.
        """
        x, y = self._collect(inputs, labels)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        x, y = x.to(device), y.to(device).long()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs ({x.shape[0]}) and labels ({y.shape[0]}) differ in length")
        prepared = self.forward.prepare(x)
        full = self.forward.predictions(
            prepared, torch.ones(1, self.forward.num_units(prepared), dtype=torch.bool, device=device)
        )
        num_classes = self._num_classes(prepared)
        if y.numel() and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) (the model's classes), got {y.min().item()}..{y.max().item()}"
            )
        names, member = self._tasks(y, tasks, num_classes)
        d = self.forward.num_units(prepared)
        method = self.method
        if method == "auto":
            budget = max(AUTO_EXACT_MASKS, self.num_chains * (self.num_steps + 1))
            method = "exact" if d <= MAX_EXACT_UNITS and 2**d <= budget else "mcmc"
        if method == "exact" and d > MAX_EXACT_UNITS:
            raise ValueError(f"exact enumeration needs d <= {MAX_EXACT_UNITS} units, {self.layer!r} has {d}; use method='mcmc'")
        member_f = member.to(torch.float64)
        n_t = member_f.sum(dim=0)

        # MCMC scores a chain's mask on its own task only, so each task's chains see only its examples
        rows = [torch.nonzero(member[:, t]).flatten() for t in range(member.shape[1])]
        task_prepared = [[v[r] for v in prepared] for r in rows]

        def own_log_odds(masks: Tensor) -> Tensor:
            """``log O_t(m)`` ``[T, C]`` of the masks ``[T, C, d]`` of task ``t``'s chains."""
            k = torch.stack(
                [
                    (self.forward.predictions(task_prepared[t], masks[t]) == y[rows[t]][None, :]).to(torch.float64).sum(dim=1)
                    for t in range(masks.shape[0])
                ]
            )
            p = (k + 1) / (n_t[:, None] + 2)
            return torch.log(p) - torch.log1p(-p)

        full_acc = ((full[0] == y).to(torch.float64) @ member_f + 1) / (n_t + 2)
        if method == "exact":
            correct = (self.forward.predictions(prepared, all_masks(d, device)) == y[None, :]).to(torch.float64)
            result = self._exact(correct, member_f, d, device)
        else:
            result = self._mcmc(own_log_odds, d, len(names), device)
        result.tasks = names
        result.full_accuracy = full_acc
        result.split = self.forward.is_split
        class_rows = [i for i, n in enumerate(names) if n != "all"]

        def poly(info: Tensor) -> Tensor:
            if class_rows:
                return polysemanticity(info[class_rows])
            return torch.full((d,), math.nan, dtype=info.dtype, device=info.device)

        result.polysemanticity = poly(result.information_bits)
        if result.replicate_importance is not None:
            reps = result.replicate_importance
            rep_info = information_bits(reps, self.prior_keep)
            result.importance_se = replicate_se(reps, result.replicate_kind)
            result.information_se = replicate_se(rep_info, result.replicate_kind)
            result.distributedness_se = replicate_se(distributedness(rep_info), result.replicate_kind)
            result.polysemanticity_se = replicate_se(torch.stack([poly(i) for i in rep_info]), result.replicate_kind)
            if result.replicate_complexity is not None:
                result.manifold_complexity_se = replicate_se(result.replicate_complexity, result.replicate_kind)
        return result

    def _num_classes(self, prepared: list[Tensor]) -> int:
        if self.forward.suffix is not None:
            return int(self.forward.suffix(*[v[:1] for v in prepared]).shape[-1])
        return int(self.model(prepared[0][:1]).shape[-1])

    def _log_prior(self, masks: Tensor) -> Tensor:
        k = masks.to(torch.float64).sum(dim=-1)
        return k * math.log(self.prior_keep) + (masks.shape[-1] - k) * math.log(1 - self.prior_keep)

    def _posterior(self, k: Tensor, n_t: Tensor, masks: Tensor) -> Tensor:
        """Log posterior ``[M, ...]`` of every mask from correct counts ``k`` ``[M, ...]`` out of ``n_t``."""
        p = (k + 1) / (n_t + 2)
        logp = torch.log(p) - torch.log1p(-p) + self._log_prior(masks).reshape(-1, *([1] * (k.ndim - 1)))
        return logp - torch.logsumexp(logp, dim=0, keepdim=True)

    def _exact(self, correct: Tensor, member: Tensor, d: int, device: torch.device) -> AblationResult:
        """Enumerate all masks; error bars from a bootstrap over the probe examples.

        Args:
            correct: ``[M, N]`` whether each mask classifies each probe example correctly (float64).
            member: ``[N, T]`` task membership (float64).
        """
        masks = all_masks(d, device)
        masks_f = masks.to(torch.float64)
        logp = self._posterior(correct @ member, member.sum(dim=0), masks)  # [M, T]
        p = logp.exp()
        importance = (p.T @ masks_f).clamp(0, 1)  # [T, d]
        h_m = -(p * logp).sum(dim=0) / _LOG2
        tc = _binary_entropy_bits(importance).sum(dim=1) - h_m
        info = information_bits(importance, self.prior_keep)
        top = p.topk(min(self.top_k, p.shape[0]), dim=0)
        rep_importance, rep_tc = [], []
        n = correct.shape[1]
        for _ in range(self.num_bootstrap):
            draw = torch.randint(0, n, (n,), generator=self.generator).to(device)
            weights = torch.bincount(draw, minlength=n).to(torch.float64)
            w_member = member * weights[:, None]
            lp = self._posterior(correct @ w_member, w_member.sum(dim=0), masks)
            pb = lp.exp()
            imp_b = (pb.T @ masks_f).clamp(0, 1)
            rep_importance.append(imp_b)
            rep_tc.append(_binary_entropy_bits(imp_b).sum(dim=1) + (pb * lp).sum(dim=0) / _LOG2)
        return AblationResult(
            tasks=[],
            importance=importance,
            information_bits=info,
            distributedness=distributedness(info),
            manifold_complexity=tc.clamp_min(0),
            complexity_kind="total_correlation",
            polysemanticity=torch.empty(0),
            mask_entropy_bits=h_m,
            full_accuracy=torch.empty(0),
            method="exact",
            num_evaluations=masks.shape[0],
            top_masks=[masks[top.indices[:, t]] for t in range(p.shape[1])],
            top_probs=[top.values[:, t] for t in range(p.shape[1])],
            replicate_kind="bootstrap" if rep_importance else "",
            replicate_importance=torch.stack(rep_importance) if rep_importance else None,
            replicate_complexity=torch.stack(rep_tc).clamp_min(0) if rep_tc else None,
        )

    def _mcmc(self, own_log_odds, d: int, num_tasks: int, device: torch.device) -> AblationResult:  # type: ignore[no-untyped-def]
        c, g = self.num_chains, self.generator
        state = torch.rand(num_tasks, c, d, generator=g) < self.prior_keep  # prior draws
        state = state.to(device)

        def score(masks: Tensor) -> Tensor:  # [T, C]
            return own_log_odds(masks) + self._log_prior(masks)

        current = score(state)
        kept = self.num_steps - self.burn_in
        traces = torch.zeros(num_tasks, c, kept, d, dtype=torch.bool, device=device)
        accepted = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        # Rao-Blackwellisation: a step that proposes flipping unit j has the scores of both values of m_j given
        # the rest, hence P(m_j = 1 | m_-j) exactly. The proposed unit is drawn independently of the state, so
        # its average over the steps proposing j estimates P(m_j = 1), and that of m_i P(m_j = 1 | m_-j) the
        # joint P(m_i = 1, m_j = 1), with far less noise than the 0/1 samples (an unused unit gets exactly
        # prior_keep). Sums are kept per chain for the jackknife.
        cond_sum = torch.zeros(num_tasks, c, d, dtype=torch.float64, device=device)
        cond_cnt = torch.zeros(num_tasks, c, d, dtype=torch.float64, device=device)
        cond_entropy = torch.zeros(num_tasks, c, d, dtype=torch.float64, device=device)
        per_chain_joint = num_tasks * c * d * d <= _MAX_JOINT_ELEMENTS
        joint = None
        if num_tasks * d * d <= _MAX_JOINT_ELEMENTS:
            joint = torch.zeros(num_tasks, c if per_chain_joint else 1, d, d, dtype=torch.float64, device=device)
        loop_start = time.perf_counter()
        for step in range(self.num_steps):
            flip = torch.randint(0, d, (num_tasks, c), generator=g).to(device)
            was = state.gather(2, flip[..., None])
            proposal = state.clone()
            proposal.scatter_(2, flip[..., None], ~was)
            new = score(proposal)
            u = torch.rand(num_tasks, c, generator=g, dtype=torch.float64).to(device)
            if step >= self.burn_in:
                sign = was[..., 0].to(torch.float64) * 2 - 1  # +1 where the current state keeps unit j
                cond = torch.sigmoid((current - new) * sign)  # P(m_j = 1 | m_-j)   [T, C]
                cond_sum.scatter_add_(2, flip[..., None], cond[..., None])
                cond_cnt.scatter_add_(2, flip[..., None], torch.ones_like(cond)[..., None])
                cond_entropy.scatter_add_(2, flip[..., None], _binary_entropy_bits(cond)[..., None])
                if joint is not None:
                    rows = (state.to(torch.float64) * cond[..., None])[:, :, None, :]  # [T, C, 1, d]
                    if per_chain_joint:
                        joint.scatter_add_(2, flip[:, :, None, None].expand(num_tasks, c, 1, d), rows)
                    else:
                        for chain in range(c):
                            joint[:, 0].scatter_add_(1, flip[:, chain, None, None].expand(num_tasks, 1, d), rows[:, chain])
            accept = u.log() < (new - current)
            state = torch.where(accept[..., None], proposal, state)
            current = torch.where(accept, new, current)
            if step >= self.burn_in:
                traces[:, :, step - self.burn_in] = state
                accepted += accept.to(torch.float64).sum(dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds_per_step = (time.perf_counter() - loop_start) / self.num_steps
        samples = traces.to(torch.float64)  # [T, C, S, d]
        raw_sum = samples.sum(dim=2)  # [T, C, d]

        def readouts(
            cs: Tensor, cc: Tensor, ch: Tensor, raw: Tensor, count: float, jt: Tensor | None
        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
            """Importance ``[T, d]``, pairwise information ``[T, d, d]`` and its cap from sums over some chains."""
            imp = torch.where(cc > 0, cs / cc.clamp_min(1), raw / count).clamp(0, 1)
            if jt is None:
                return imp, None, None
            rows = jt / cc.clamp_min(1)[..., None]  # row j: E[m_i P(m_j = 1 | m_-j)]
            mi = pairwise_information_bits(imp, (rows + rows.transpose(1, 2)) / 2, reduce=False)
            # I(m_i; m_j) <= I(m_j; m_-j) = H(m_j) - E[H(m_j | m_-j)], which the conditionals give with little
            # noise (exactly 0 for a unit no task uses)
            h = _binary_entropy_bits(imp)
            dependence = (h - torch.where(cc > 0, ch / cc.clamp_min(1), h)).clamp_min(0)
            return imp, mi, torch.minimum(dependence[:, :, None], dependence[:, None, :])

        def total(mi: Tensor | None, cap: Tensor) -> Tensor:
            if mi is None:
                return torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device)
            return torch.triu(torch.where(cap > 0, mi, torch.zeros_like(mi)), diagonal=1).sum(dim=(-2, -1))

        pooled = joint.sum(dim=1) if joint is not None else None
        all_sums = [t.sum(1) for t in (cond_sum, cond_cnt, cond_entropy, raw_sum)]
        importance, mi_all, cap = readouts(*all_sums, c * kept, pooled)
        rep_importance, rep_pairwise = [], []
        mi_loo_sum = torch.zeros_like(mi_all) if mi_all is not None and per_chain_joint else None
        if c >= 2:
            for chain in range(c):  # leave one chain out
                rest = [i for i in range(c) if i != chain]
                jt = joint[:, rest].sum(dim=1) if joint is not None and per_chain_joint else None
                sums = [t[:, rest].sum(1) for t in (cond_sum, cond_cnt, cond_entropy, raw_sum)]
                imp_c, mi_c, _ = readouts(*sums, (c - 1) * kept, jt)
                rep_importance.append(imp_c)
                if mi_c is not None and mi_loo_sum is not None and cap is not None:
                    mi_loo_sum += mi_c
                    rep_pairwise.append(total(mi_c, cap))
        if mi_all is not None and cap is not None:
            # Jackknife bias correction (the plug-in information of a noisy pair is biased upwards by
            # O(1 / samples), and d (d - 1) / 2 pairs add up). A pair with a unit whose conditional never
            # moved (it depends on no other unit: I(m_j; m_-j) = 0) contributes exactly 0, without noise.
            mi_est = c * mi_all - (c - 1) * mi_loo_sum / c if mi_loo_sum is not None else mi_all
            pairwise = total(mi_est, cap)
        else:
            pairwise = total(None, importance)
        rep_pw = torch.stack(rep_pairwise) if rep_pairwise else None
        info = information_bits(importance, self.prior_keep)
        ess_per_unit = torch.stack([_ess(samples[t]) for t in range(num_tasks)])  # [T, d]
        return AblationResult(
            tasks=[],
            importance=importance,
            information_bits=info,
            distributedness=distributedness(info),
            manifold_complexity=pairwise,
            complexity_kind="pairwise_mutual_information",
            polysemanticity=torch.empty(0),
            mask_entropy_bits=torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device),
            full_accuracy=torch.empty(0),
            method="mcmc",
            num_evaluations=num_tasks * c * (self.num_steps + 1),
            acceptance_rate=accepted / (c * kept),
            ess=ess_per_unit.min(dim=1).values,
            ess_per_unit=ess_per_unit,
            replicate_kind="jackknife" if rep_importance else "",
            replicate_importance=torch.stack(rep_importance) if rep_importance else None,
            replicate_complexity=rep_pw,
            seconds_per_step=seconds_per_step,
        )
