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
part before it runs once per probe batch. The module is pure torch: it never imports Lightning.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from lightning_interp.hooks import LayerSplit, as_list, forward_hooks, get_module, replace, same_logits, split_graph
from lightning_interp.stats import replicate_standard_error as replicate_se

__all__ = [
    "LIKELIHOODS",
    "REST_PER_CHAIN",
    "AblationResult",
    "BayesianAblation",
    "Likelihood",
    "MaskedForward",
    "all_masks",
    "correct_probability",
    "effective_sample_size",
    "information_bits",
    "informative_units",
    "log_prior",
    "mask_log_posterior",
    "pairwise_information_bits",
    "summarize",
]

#: ``p_t(m)`` of a class task: ``"balanced"`` (sensitivity and specificity averaged) or ``"sensitivity"``.
Likelihood = Literal["balanced", "sensitivity"]
LIKELIHOODS: tuple[str, ...] = ("balanced", "sensitivity")
#: MCMC, balanced likelihood: the other examples each chain of a class task scores (a fixed sample per chain).
REST_PER_CHAIN = 64

MAX_EXACT_UNITS = 16
#: ``method="auto"`` enumerates at least this many masks (d <= 12) exactly rather than sampling.
AUTO_EXACT_MASKS = 4096
_MAX_ELEMENTS = 4_000_000
#: bound on the elements of the MCMC pairwise matrices [d, d] (above it, no manifold complexity)
_MAX_JOINT_ELEMENTS = 16_000_000
#: bounds on what one block of class tasks holds during MCMC: the chains' masks (bool) and the rows' logits
_MAX_TRACE_BYTES = 1 << 28
_MAX_LOGIT_BYTES = 1 << 28
_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# batched masked evaluation
# ---------------------------------------------------------------------------------------------


def _unit_dim(t: Tensor) -> int:
    return -1 if t.ndim == 3 else 1


def _apply_mask(h: Tensor, masks: Tensor, fill: Tensor | None = None) -> Tensor:
    """``h`` ``[N, ...]`` under every mask of ``masks`` ``[M, d]`` -> ``[M * N, ...]`` (mask-major).

    A masked unit takes the value ``fill`` (``h.shape[1:]``, the value it has at this point when it is
    zeroed at the layer) or 0 (``fill=None``: multiply by the mask, as at the layer itself).
    """
    if fill is None:
        out = h.unsqueeze(0) * _mask_view(h, masks)
    else:
        # where() copies each value as it is: bit-for-bit the masked network's value at this point
        out = torch.where(_mask_view(h, masks, as_bool=True), h.unsqueeze(0), fill)
    return out.reshape(masks.shape[0] * h.shape[0], *h.shape[1:])


#: Channel-wise ops: each output element depends on one input element, or on one channel of one example
#: (spatial pooling, a flatten of a pooled map), the same way for every example. After such ops a channel
#: zeroed at the layer takes a fixed value ``c_j = f(0)`` (a map of the channel's shape): the mask can be
#: applied after them as ``where(m_j, f(h)_j, c_j)``. ``f(0) = 0`` is not needed (BatchNorm in eval mode
#: shifts a zeroed channel to its bias, a sigmoid to 1/2): ``c`` is computed by running the ops on zeros.
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.CELU, nn.SELU,
    nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten,
)  # fmt: skip
# (no 1-d pools: on a token output [N, T, C] they pool over the units, the last dim)
_CHANNELWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, torch.flatten, torch.mean, torch.sum, torch.amax, torch.amin, torch.squeeze,
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.celu, F.selu, F.softplus, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.batch_norm, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}  # fmt: skip
# reductions and reshapes may also act on the unit dim or the batch: prepare() rejects a push whose output
# does not keep the batch and the unit count, or whose logits differ from masking at the layer
_CHANNELWISE_METHODS = {"relu", "tanh", "sigmoid", "flatten", "mean", "sum", "amax", "amin", "squeeze", "view", "reshape"}
#: modules that are channel-wise in eval mode only (batch statistics, random masks in training mode)
_EVAL_ONLY_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip


#: What a head after pooled features may consist of for the logits to be affine in the mask.
_AFFINE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Identity, nn.Flatten)
_AFFINE_FUNCTIONS = {torch.flatten, F.linear}
_AFFINE_METHODS = {"flatten", "view", "reshape", "contiguous", "size", "squeeze"}


def _is_affine_head(model: nn.Module, graph: torch.fx.Graph) -> bool:
    """Whether every op of ``graph`` (the part after the mask) is a linear layer, a reshape or a no-op."""
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            dropout = isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) and not module.training
            if not (isinstance(module, _AFFINE_MODULES) or dropout):
                return False
        elif not (
            (node.op == "call_function" and node.target in _AFFINE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _AFFINE_METHODS)
        ):
            return False
    return True


def _is_channelwise(model: nn.Module, node: torch.fx.Node) -> bool:
    """Whether ``node`` is one of the channel-wise ops (by type; the mode is checked at each prepare())."""
    if node.op == "call_module":
        return isinstance(model.get_submodule(str(node.target)), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _CHANNELWISE_METHODS


def _chain_module(root: nn.Module, start: torch.fx.Node, chain: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """The ops ``chain`` after ``start`` as a module of ``start``'s output (their constants copied in)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {start: graph.placeholder("h")}
    for node in chain:
        for arg in node.all_input_nodes:
            if arg not in env:  # a get_attr constant (F.batch_norm's running statistics)
                env[arg] = graph.node_copy(arg, lambda a: env[a])
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[chain[-1]])
    return torch.fx.GraphModule(root, graph)


@dataclass
class _Push:
    """The mask applied after the ops ``chain`` that follow the layer (see :meth:`MaskedForward.prepare`)."""

    name: str
    prefix: torch.fx.GraphModule
    suffix: torch.fx.GraphModule
    chain: torch.fx.GraphModule  # layer output -> the value the mask is applied to
    modules: list[nn.Module]  # the chain's modules, whose mode decides whether the push is valid now


class MaskedForward:
    """Evaluate a model with a layer's units masked, for many masks per forward pass.

    With ``torch.fx`` the model is split at ``layer``: the values the rest of the network needs (the
    layer output and any earlier value used later, e.g. a skip connection) are computed once per probe
    batch, and only the part after the layer runs on the ``[masks * examples]`` batch. Where tracing
    fails the whole forward is batched instead (the layer output multiplied by a forward hook).

    The mask is moved past the channel-wise ops that follow the layer (activations, BatchNorm in eval
    mode, spatial pooling, flatten of a pooled map; modules, ``F.*`` functions or tensor methods such as
    ``x.mean((2, 3))``): after them a zeroed channel has a fixed value :attr:`masked_value`, and masking
    there, ``where(m, h, masked_value)``, gives the logits of masking at the layer bit for bit (checked
    on every :meth:`prepare`). Those ops then run once per probe batch instead of once per mask, and where
    the rest is a linear head the logits are affine in the mask (:meth:`linear_head`).

    Args:
        model: the model (its parameters, mode and RNG are untouched).
        layer: ``named_modules()`` path of the layer whose units are masked.
        max_batch: bound on ``masks * examples`` rows per forward pass.
        split: try the ``torch.fx`` split (``False`` forces the whole-forward path).
        push: move the mask past the channel-wise ops after the layer where that is exact (``False``: mask at
            the layer itself, each row through everything after it; a reference for tests and benchmarks).
    """

    def __init__(self, model: nn.Module, layer: str, max_batch: int = 65536, split: bool = True, push: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.module = get_module(model, layer)
        self.max_batch = max_batch
        self.suffix: torch.fx.GraphModule | None = None
        self.prefix: torch.fx.GraphModule | None = None
        self._split: LayerSplit | None = None
        self._pushed: list[_Push] = []
        #: the op after the layer that the mask is applied after (``None``: at the layer itself)
        self.mask_after: str | None = None
        #: the value ``[*h.shape[1:]]`` a masked unit has where the mask is applied (``None``: 0, as at the layer)
        self.masked_value: Tensor | None = None
        self.push = push
        if split:
            self._split = LayerSplit(model, layer)
            self._after_split()

    def _after_split(self) -> None:
        """Take the split's parts and the pushes past the ops after the layer, or warn that there is none."""
        assert self._split is not None
        self._pushed, self.mask_after, self.masked_value = [], None, None
        if not self._split.is_split:
            warnings.warn(f"{self._split.reason}; the whole forward pass is batched instead", stacklevel=3)
            self.prefix = self.suffix = self._split = None
            return
        self.prefix, self.suffix = self._split.parts  # type: ignore[misc]
        # push the mask past the channel-wise ops after the layer (activations, eval BatchNorm, pooling,
        # flatten of a pooled map, ...): they then run once per probe batch instead of once per mask.
        # Candidates furthest first; prepare() keeps the first one that checks out on its inputs.
        graph, start = self._split.graph, self._split.node
        assert graph is not None and start is not None
        node, chain = start, []
        while self.push and len(node.users) == 1:
            user = next(iter(node.users))
            # one value flows through: the op's other inputs may only be constants (F.batch_norm's statistics)
            if [a for a in user.all_input_nodes if a.op != "get_attr"] != [node] or not _is_channelwise(self.model, user):
                break
            node = user
            chain.append(node)
            modules = [self.model.get_submodule(str(n.target)) for n in chain if n.op == "call_module"]
            name = getattr(node.target, "__name__", str(node.target))
            push = _Push(name, *split_graph(self.model, graph, node), _chain_module(self.model, start, list(chain)), modules)
            self._pushed.insert(0, push)

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
        self.mask_after, self.masked_value = None, None
        plain = as_list(self.prefix(x))
        h = plain[0]
        d, n, k = h.shape[_unit_dim(h)], x.shape[0], 8
        masks = torch.rand(k, d, generator=torch.Generator().manual_seed(0)).to(h.device) < 0.5
        masks[0] = True

        def run(suffix: torch.fx.GraphModule, vals: list[Tensor], fill: Tensor | None) -> Tensor:
            rest = [v.unsqueeze(0).expand(k, *v.shape).reshape(k * n, *v.shape[1:]) for v in vals[1:]]
            return suffix(_apply_mask(vals[0], masks, fill), *rest)

        reference = run(self.suffix, plain, None)
        if same_logits(reference, reference[:n].repeat(k, *([1] * (reference.ndim - 1)))):
            return  # the masks do not change the logits (e.g. a zero head): nothing to verify a push on
        for push in self._pushed:
            if any(
                m.training or getattr(m, "running_mean", 0) is None for m in push.modules if isinstance(m, _EVAL_ONLY_MODULES)
            ):
                continue  # batch statistics or random dropout: a masked channel has no fixed value
            values = as_list(push.prefix(x))
            hp = values[0]
            if hp.ndim < 2 or hp.shape[:1] != x.shape[:1] or hp.shape[_unit_dim(hp)] != d:
                continue
            # what a channel zeroed at the layer becomes after the chain: the chain run on a zero layer output
            fill = push.chain(torch.zeros_like(h[:1]))
            if not isinstance(fill, Tensor) or fill.shape != (1, *hp.shape[1:]):
                continue
            fill = None if not fill.any() else fill[0]  # zeros: multiply, as at the layer
            if same_logits(run(push.suffix, values, fill), reference):
                self.prefix, self.suffix, self.mask_after, self.masked_value = push.prefix, push.suffix, push.name, fill
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

    def _chunks(self, prepared: list[Tensor], masks: Tensor) -> Iterator[Tensor]:
        """Logits ``[k, N, K]`` of consecutive chunks of ``masks`` on every probe example (of ``prepared``)."""
        n = prepared[0].shape[0]
        # rows per forward pass: at most max_batch, and at most ~4M layer-output elements (wide rows stay in cache)
        row_elems = max(1, prepared[0][0].numel())
        per = max(1, min(self.max_batch, _MAX_ELEMENTS // row_elems) // n)
        for start in range(0, masks.shape[0], per):
            chunk = masks[start : start + per]
            k = chunk.shape[0]
            if self.suffix is not None:
                layer_out = _apply_mask(prepared[0], chunk, self.masked_value)
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
            yield logits.reshape(k, n, -1)

    @torch.no_grad()
    def logits(self, prepared: list[Tensor], masks: Tensor) -> Tensor:
        """Logits ``[M, N, K]`` for every mask ``[M, d]`` and probe example (of ``prepared``)."""
        return torch.cat(list(self._chunks(prepared, masks)))

    @torch.no_grad()
    def predictions(self, prepared: list[Tensor], masks: Tensor) -> Tensor:
        """Predicted class ``[M, N]`` for every mask ``[M, d]`` and probe example (of ``prepared``)."""
        return torch.cat([_argmax(logits) for logits in self._chunks(prepared, masks)])

    @torch.no_grad()
    def paired_predictions(self, prepared: list[Tensor], rows: Tensor, masks: Tensor) -> Tensor:
        """Predicted class ``[R]`` of probe example ``rows[r]`` (of ``prepared``) under mask ``masks[r]`` ``[R, d]``.

        One mask per row rather than every mask on every example (:meth:`predictions`): the rows of many
        masks, each on its own examples, run in one forward pass.
        """
        per = max(1, min(self.max_batch, _MAX_ELEMENTS // max(1, prepared[0][0].numel())))
        out = []
        for start in range(0, rows.shape[0], per):
            idx, chunk = rows[start : start + per], masks[start : start + per]
            if self.suffix is not None:
                h = prepared[0].index_select(0, idx)
                if self.masked_value is None:
                    h.mul_(_row_mask_view(h, chunk))
                else:
                    h = torch.where(_row_mask_view(h, chunk, as_bool=True), h, self.masked_value)
                logits = self.suffix(h, *[v.index_select(0, idx) for v in prepared[1:]])
            else:
                with replace(self.model, self.layer, lambda h, chunk=chunk: h * _row_mask_view(h, chunk)):
                    logits = self.model(prepared[0].index_select(0, idx))
            out.append(_argmax(logits))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=rows.device)

    def features(self, prepared: list[Tensor]) -> Tensor | None:
        """The masked values as ``[N, d]`` features when the mask sits on one value per unit (else ``None``).

        That is ``[N, d]`` or ``[N, d, 1, ..., 1]`` (pooled with ``keepdim``): the mask has been pushed past
        the pooling, and each unit's masked value is one number (:attr:`masked_value`).
        """
        h = prepared[0] if self.suffix is not None and len(prepared) == 1 else None
        if h is None or not h.is_floating_point() or h.ndim == 3 or h.ndim < 2 or any(s != 1 for s in h.shape[2:]):
            return None  # ([N, T, C] is a token output, its units the last dim)
        return h.reshape(h.shape[0], h.shape[1])

    @torch.no_grad()
    def linear_head(self, prepared: list[Tensor]) -> tuple[Tensor, Tensor] | None:
        """``(W, b)`` (float64, ``[d, K]`` and ``[K]``) when the logits are ``z @ W + b`` for every mask.

        ``z = where(m, h, c)`` ``[N, d]``: the features :meth:`features` with the masked units at their
        masked value ``c`` (:attr:`masked_value`, 0 when ``None``). That holds when the mask sits on one value
        per unit (pushed past the pooling) and the rest of the network consists of linear layers and reshapes
        (a torchvision ResNet's ``fc``): then flipping unit ``j`` moves a row's logits by ``+-(h_j - c_j) W[j]``,
        and an MCMC step costs ``K`` additions per row instead of a pass through the head. ``W`` and ``b``
        are read off a float64 copy of the head and checked against the model's own logits on random masks
        of the probe; ``None`` otherwise.
        """
        h = self.features(prepared)
        if h is None or self.suffix is None or not _is_affine_head(self.suffix, self.suffix.graph):
            return None
        shape = prepared[0].shape[1:]
        head = copy.deepcopy(self.suffix).to(torch.float64)
        d = h.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=h.device).reshape(d, *shape)
        b = head(torch.zeros(1, *shape, dtype=torch.float64, device=h.device))
        if not isinstance(b, Tensor) or b.ndim != 2:
            return None
        weight = head(eye) - b
        b = b[0]
        sample = prepared[0][:16]
        masks = torch.rand(4, d, generator=torch.Generator().manual_seed(0)).to(h.device) < 0.5
        z = _apply_mask(sample, masks, self.masked_value)
        direct = self.suffix(z)
        affine = (z.reshape(-1, d).to(torch.float64) @ weight + b).to(direct.dtype)
        scale = float(direct.abs().max()) if direct.numel() else 1.0
        if direct.shape != affine.shape or not torch.allclose(direct, affine, rtol=1e-4, atol=1e-4 * max(scale, 1e-6)):
            return None
        return weight, b

    def num_units(self, prepared: list[Tensor]) -> int:
        """Number of units ``d`` of the layer."""
        if self.suffix is not None:
            h = prepared[0]
            return h.shape[_unit_dim(h)]
        store: list[int] = []
        with forward_hooks(self.model, {self.layer: lambda _m, _i, h: store.append(h.shape[_unit_dim(h)])}), torch.no_grad():
            self.model(prepared[0][:1])
        return store[0]


def _argmax(logits: Tensor) -> Tensor:
    """The predicted class of every row of ``logits`` ``[..., K]``; ``-1`` where a row has a non-finite logit.

    ``argmax`` of a row with a NaN returns the NaN's index, a class like any other: a network with NaN
    outputs would look as if it answered one class. ``-1`` matches no class, and :meth:`BayesianAblation.fit`
    reads non-finite logits on the probe as no measurement at all (NaN read-outs).
    """
    # max() propagates a NaN, so the row maxima tell whether a row has one (or a +inf) at no extra pass
    top, pred = logits.max(dim=-1)
    finite = top.isfinite()
    return pred if bool(finite.all()) else torch.where(finite, pred, torch.full_like(pred, -1))


def _row_mask_view(h: Tensor, masks: Tensor, as_bool: bool = False) -> Tensor:
    """Masks ``[k, d]`` shaped to broadcast against ``h`` ``[k, ...]`` (one mask per row), as ``h``'s dtype or bool."""
    dim = _unit_dim(h)
    shape = [1] * (h.ndim - 1)
    shape[dim if dim == -1 else 0] = masks.shape[1]
    return (masks.bool() if as_bool else masks.to(h.dtype)).reshape(masks.shape[0], *shape)


def _mask_view(h: Tensor, masks: Tensor, as_bool: bool = False) -> Tensor:
    """Masks ``[k, d]`` shaped to broadcast against ``h`` viewed as ``[k, n, ...]``."""
    return _row_mask_view(h, masks, as_bool).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# inference and read-outs
# ---------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
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
        >>> r = AblationResult(tasks=["all"], importance=torch.tensor([[0.5, 0.5, 0.5]]), information_bits=torch.zeros(1, 3),
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
    x = traces.transpose(1, 2).double()  # [C, d, S]: the FFT runs over contiguous steps
    x = x - x.mean(dim=(0, 2), keepdim=True)
    var = (x * x).mean(dim=(0, 2))
    f = torch.fft.rfft(x, n=2 * s, dim=2)
    acov = torch.fft.irfft(f * f.conj(), n=2 * s, dim=2)[..., :s].mean(dim=0).T / s  # [s, d]
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


# ---------------------------------------------------------------------------------------------
# the likelihood
# ---------------------------------------------------------------------------------------------


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
class _TaskSet:
    """The tasks of a fit on its probe: names, membership ``[N, T]`` and each class task's class."""

    names: list[str]
    member: Tensor
    classes: list[int]  # empty for task "all"
    labels: Tensor
    num_classes: int

    @property
    def has_classes(self) -> bool:
        return bool(self.classes)

    def subset(self, index: Sequence[int]) -> _TaskSet:
        """The tasks ``index`` alone, on the same probe."""
        classes = [self.classes[i] for i in index] if self.classes else []
        return _TaskSet([self.names[i] for i in index], self.member[:, list(index)], classes, self.labels, self.num_classes)


class _MaskOutcomes:
    """Every mask's predictions on every probe example ``[M, N]``, reduced to the likelihood's counts."""

    def __init__(self, pred: Tensor, tasks: _TaskSet, two_sided: bool) -> None:
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


def _rest_per_task(tasks: _TaskSet, rest_per_chain: int, two_sided: bool) -> Tensor:
    """Other examples each chain of a task scores ``[T]``: at most ``rest_per_chain``, none one-sided."""
    others = tasks.member.shape[0] - tasks.member.sum(dim=0)
    return others.clamp_max(rest_per_chain) if two_sided else torch.zeros_like(others)


class _ChainScorer:
    """``log O_t(m)`` ``[T, C]`` of the current mask of every MCMC chain, from the probe rows each chain scores.

    A chain of task ``t`` scores its mask on task ``t``'s examples and, with the two-sided likelihood, on its
    own sample of at most ``rest_per_chain`` other examples (drawn once, without replacement, from
    ``generator``; all of them when there are no more): every step evaluates the same rows, so each chain
    targets a fixed posterior, and the cost per step is bounded by ``chains * (N + T * rest_per_chain)``
    rows. All chains' rows run as one batch of (example, mask) pairs.

    Where the logits are affine in the mask (:meth:`MaskedForward.linear_head`), the scorer keeps every
    row's logits (float64) for the chains' current masks, and a proposal that flips unit ``j`` adds
    ``+-(h_j - c_j) W[j]`` to them (``c_j``: the unit's masked value, :attr:`MaskedForward.masked_value`):
    ``K`` additions per row rather than a pass through the head.
    """

    def __init__(
        self,
        forward: MaskedForward,
        prepared: list[Tensor],
        tasks: _TaskSet,
        num_chains: int,
        rest_per_chain: int,
        two_sided: bool,
        generator: torch.Generator,
        head: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        device = tasks.labels.device
        num_tasks = len(tasks.names)
        self.forward, self.prepared, self.two_sided = forward, prepared, two_sided
        self.shape = (num_tasks, num_chains)
        self.num_task = tasks.member.sum(dim=0).to(torch.float64)[:, None]  # [T, 1]
        self.num_rest = torch.zeros(num_tasks, 1, dtype=torch.float64, device=device)
        rows, chains, rest_flags, targets = [], [], [], []
        rest_counts = _rest_per_task(tasks, rest_per_chain, two_sided)
        for t in range(num_tasks):
            own = torch.nonzero(tasks.member[:, t]).flatten()
            others = torch.nonzero(~tasks.member[:, t]).flatten() if two_sided else own[:0]
            k = int(rest_counts[t])
            self.num_rest[t] = k
            for c in range(num_chains):
                if k < others.numel():
                    rest = others[torch.randperm(others.numel(), generator=generator)[:k].to(device)]
                else:
                    rest = others
                rows += [own, rest]
                chains.append(torch.full((own.numel() + k,), t * num_chains + c, dtype=torch.long, device=device))
                rest_flags += [torch.zeros_like(own, dtype=torch.bool), torch.ones_like(rest, dtype=torch.bool)]
                target = tasks.classes[t] if tasks.classes else 0
                targets += [tasks.labels[own], torch.full_like(rest, target)]
        self.rows, self.chain = torch.cat(rows), torch.cat(chains)
        self.rest, self.target = torch.cat(rest_flags), torch.cat(targets)
        self.slot = self.chain * 2 + self.rest.long()  # [task-major chain, own / rest]
        self.head = head  # (W, b) of an affine head (MaskedForward.linear_head), read once per fit
        self.logits: Tensor | None = None  # affine head: the rows' logits under the current masks
        self.proposed: Tensor | None = None
        self.delta: Tensor | None = None
        if head is not None:
            features = forward.features(prepared)
            if features is None:
                raise ValueError("an affine head needs [N, d] features (MaskedForward.features)")
            features = features.to(torch.float64)
            d = features.shape[1]
            fill = forward.masked_value
            self.fill = torch.zeros(d, dtype=torch.float64, device=device) if fill is None else fill.reshape(d).to(torch.float64)
            self.features = features
            # h_j - c_j of every (example, unit), flat: what flipping unit j on adds to a row's z (times W[j])
            self.delta = (features - self.fill).reshape(-1)
            self.row_offset = self.rows * d

    @property
    def rows_per_step(self) -> int:
        """(example, mask) rows one step evaluates, all chains together."""
        return int(self.rows.numel())

    def start(self, states: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` of the chains' first masks ``states`` ``[T, C, d]``."""
        if self.head is None:
            return self(states)
        weight, bias = self.head
        masks = states.reshape(-1, states.shape[-1])[self.chain]
        h = self.features
        per = max(1, _MAX_ELEMENTS // max(1, h.shape[1]))
        self.logits = torch.cat(
            [
                torch.where(masks[i : i + per], h.index_select(0, self.rows[i : i + per]), self.fill) @ weight + bias
                for i in range(0, self.rows.numel(), per)
            ]
        ) if self.rows.numel() else torch.zeros(0, bias.numel(), dtype=torch.float64, device=h.device)  # fmt: skip
        return self.log_odds(self.logits.argmax(dim=-1))

    def propose(self, proposal: Tensor, flip: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` of ``proposal`` ``[T, C, d]``: the current masks with unit ``flip`` ``[T, C]`` flipped."""
        if self.head is None or self.logits is None or self.delta is None:
            return self(proposal)
        weight = self.head[0]
        flat = flip.reshape(-1)
        kept = proposal.reshape(-1, proposal.shape[-1]).gather(1, flat[:, None])[:, 0]  # the flipped unit is now kept
        unit = flat[self.chain]
        # the flipped unit's z moves from c_j to h_j (kept now) or back: +-(h_j - c_j) W[j]
        coef = self.delta.index_select(0, self.row_offset + unit) * (kept[self.chain].to(torch.float64) * 2 - 1)
        out = self.proposed if self.proposed is not None and self.proposed.shape == self.logits.shape else None
        self.proposed = torch.addcmul(self.logits, coef[:, None], weight.index_select(0, unit), out=out)
        return self.log_odds(self.proposed.argmax(dim=-1))

    def accept(self, accepted: Tensor) -> None:
        """Move the chains where ``accepted`` ``[T, C]`` to their proposals."""
        if self.logits is not None and self.proposed is not None:
            # take the proposals' logits and copy back the rejected rows only (most proposals are accepted)
            rejected = torch.nonzero(~accepted.reshape(-1)[self.chain]).flatten()
            current, self.logits = self.logits, self.proposed
            self.logits.index_copy_(0, rejected, current.index_select(0, rejected))
            self.proposed = current  # the next proposal's buffer

    def __call__(self, states: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` of the masks ``states`` ``[T, C, d]``, each row through the head."""
        masks = states.reshape(-1, states.shape[-1])[self.chain]
        return self.log_odds(self.forward.paired_predictions(self.prepared, self.rows, masks))

    def log_odds(self, pred: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` from the predicted class of every row ``[R]``."""
        # own rows: correct (predicted as labelled); rest rows: not predicted as the task's class
        hit = (pred == self.target) != self.rest
        counts = torch.zeros(2 * self.shape[0] * self.shape[1], dtype=torch.float64, device=pred.device)
        counts = counts.index_add_(0, self.slot, hit.to(torch.float64)).reshape(*self.shape, 2)
        rest = counts[..., 1] if self.two_sided else None
        p = correct_probability(counts[..., 0], self.num_task, rest, self.num_rest)
        return torch.log(p) - torch.log1p(-p)


@dataclass
class _Estimate:
    """What an inference gives before the read-outs (the names are :class:`AblationResult`'s)."""

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


@dataclass
class _ChainSums:
    """What the kept steps of a Metropolis run leave for the MCMC read-outs, per task and chain.

    ``flips`` ``[T, C, S]``: the unit each step proposed to flip; ``conds``: its conditional
    ``P(m_j = 1 | m_-j)``; ``traces`` ``[T, C, S, d]``: the masks after each step (bool); ``cond_sum``,
    ``cond_cnt``, ``cond_entropy`` ``[T, C, d]``: per unit, the sums of its conditionals, its number of
    proposals and the sums of the conditionals' entropies; ``raw``: the sums of the 0/1 keep indicators.
    """

    flips: Tensor
    conds: Tensor
    traces: Tensor
    cond_sum: Tensor
    cond_cnt: Tensor
    cond_entropy: Tensor
    raw: Tensor
    accepted: Tensor
    seconds_per_step: float

    def chain_joint(self, task: int, chain: int) -> Tensor:
        """Row ``j``: the sum of ``m_i P(m_j = 1 | m_-j)`` over the chain's steps proposing unit ``j`` ``[d, d]``.

        The masks are those after each step, which differ from those it started from in unit ``j`` only (the
        diagonal, which no pair uses).
        """
        rows = self.traces[task, chain].to(torch.float64) * self.conds[task, chain, :, None]
        d = rows.shape[1]
        return torch.zeros(d, d, dtype=torch.float64, device=rows.device).index_add_(0, self.flips[task, chain], rows)


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
        generator: the ``torch.Generator`` of the MCMC chains, their samples of non-task examples and the
            bootstrap (a fresh seeded one when ``None``).
        max_batch: bound on ``masks * examples`` rows per forward pass (memory).
        top_k: masks kept per task in exact runs.
        split: split the model at the layer with ``torch.fx`` where possible.
        num_bootstrap: exact runs: probe resamples for the error bars (0: none).
        likelihood: ``p_t(m)`` of a class task: ``"balanced"`` (the average of the Beta(1, 1)-smoothed
            sensitivity on the class's examples and specificity on the others) or ``"sensitivity"`` (the
            smoothed sensitivity alone, which favours a mask that makes the network answer the class for
            everything). Task ``"all"`` uses the smoothed multi-class accuracy either way.
        rest_per_chain: MCMC with the balanced likelihood: the other examples each chain of a class task
            scores, a sample drawn once per chain without replacement (all of them when there are no more).
        progress: a progress bar over the blocks of class tasks when MCMC runs them in several (many
            tasks on a wide layer: each block's chains and logits stay within a few hundred MB).

    Error bars: MCMC read-outs come with jackknife standard errors over the chains (the Monte-Carlo error
    for this probe set); exact ones with bootstrap standard errors over the probe examples.

    Raises:
        ValueError: an unknown layer, method or likelihood, ``prior_keep`` outside ``(0, 1)``, counts out of
            range.

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
        likelihood: Likelihood = "balanced",
        rest_per_chain: int = REST_PER_CHAIN,
        progress: bool = False,
    ) -> None:
        if method not in ("auto", "exact", "mcmc"):
            raise ValueError(f"method must be 'auto', 'exact' or 'mcmc', got {method!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")
        if not 0.0 < prior_keep < 1.0:
            raise ValueError(f"prior_keep must be in (0, 1), got {prior_keep}")
        if num_steps <= burn_in or num_chains < 1:
            raise ValueError("num_steps must exceed burn_in and num_chains must be >= 1")
        if num_bootstrap < 0:
            raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}")
        if rest_per_chain < 1:
            raise ValueError(f"rest_per_chain must be >= 1, got {rest_per_chain}")
        get_module(model, layer)
        self.model, self.layer, self.method, self.likelihood = model, layer, method, likelihood
        self.prior_keep, self.num_chains, self.num_steps, self.burn_in = prior_keep, num_chains, num_steps, burn_in
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.max_batch, self.top_k, self.num_bootstrap, self.rest_per_chain = max_batch, top_k, num_bootstrap, rest_per_chain
        self.progress = progress
        #: Called after every MCMC step (no argument), e.g. to advance a progress bar while the chains run.
        self.on_step: Callable[[], None] | None = None
        self.forward = MaskedForward(model, layer, max_batch=max_batch, split=split)

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self,
        inputs: Tensor | Iterable,
        labels: Tensor | None = None,
        tasks: Literal["classes", "all"] | Sequence[int] = "classes",
    ) -> AblationResult:
        """Run the inference on probe data: score masks, the posterior of every task, its read-outs.

        Args:
            inputs: probe inputs ``[N, ...]``, or a dataloader of ``(inputs, labels)`` batches.
            labels: class labels ``[N]`` (with tensor inputs).
            tasks: ``"classes"`` (one task per class present: its examples classified correctly and, with
                the balanced likelihood, the others not classified as it), ``"all"`` (every example
                classified correctly), or a list of class indices.

        Returns:
            An :class:`AblationResult` (tensors on the model's device).

        Raises:
            ValueError: labels outside the model's classes, an empty task, ``exact`` with ``d > 16``.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
            >>> x = torch.randn(32, 2)
            >>> result = BayesianAblation(model, "1").fit(x, (x[:, 0] > 0).long())
            >>> result.tasks, result.likelihood, result.importance.shape
            (['class 0', 'class 1'], 'balanced', torch.Size([2, 4]))
        """
        x, y = self._probe(inputs, labels)
        prepared = self.forward.prepare(x)
        d = self.forward.num_units(prepared)
        task_set = self._tasks(y, tasks, self._num_classes(prepared))
        method = self._method(d)
        two_sided = self.likelihood == "balanced" and task_set.has_classes
        full_logits = self.forward.logits(prepared, torch.ones(1, d, dtype=torch.bool, device=x.device))
        if not bool(full_logits.isfinite().all()):
            # NaN / inf logits (diverged weights): no prediction to ablate; every read-out is NaN, none a number
            # made up from argmax(NaN)
            return _nan_result(task_set, d, method, self.likelihood, self.forward.is_split)
        full = _argmax(full_logits)
        full_accuracy = _MaskOutcomes(full, task_set, two_sided).probability()[0]
        if method == "exact":
            estimate = self._exact(prepared, task_set, two_sided, d)
        else:
            blocks = self._task_blocks(task_set, two_sided, d)
            head = self.forward.linear_head(prepared)
            parts = []
            for block in tqdm(blocks, desc=f"ablation {self.layer}", unit="block", disable=not self.progress or len(blocks) < 2):
                tasks_now = task_set.subset(block) if len(blocks) > 1 else task_set
                scorer = _ChainScorer(
                    self.forward, prepared, tasks_now, self.num_chains, self.rest_per_chain, two_sided, self.generator, head
                )
                parts.append(self._mcmc(scorer, len(tasks_now.names), d, x.device))
            estimate = parts[0] if len(parts) == 1 else _concat_estimates(parts)
        return self._result(estimate, task_set, full_accuracy)

    @torch.no_grad()
    def estimate_seconds(
        self,
        inputs: Tensor,
        labels: Tensor,
        tasks: Literal["classes", "all"] | Sequence[int] = "classes",
        pilot_steps: int = 16,
    ) -> float | None:
        """Seconds :meth:`fit` would take at the current settings, from a short pilot (``None``: exact enumeration).

        The pilot runs what a fit does once (the part before the layer on the probe, the unablated logits,
        reading the affine head) and ``pilot_steps`` MCMC steps of every chain of the first block of tasks, so
        that a step evaluates the fit's rows, whatever the model. The read-outs cannot be timed on so short a
        run: their cost grows with the unit pairs whose conditionals have moved, and after a few steps most
        units of a wide layer were never proposed. They are timed instead on synthetic chains of one task at
        the fit's size (``num_steps - burn_in`` kept steps, every unit proposed and dependent: the most pairs)
        and counted once per task. A fit costs the part done once, plus ``num_steps`` steps per block of tasks,
        plus the read-outs. The pilot's generators are its own: the fit's draws are untouched.

        Args:
            inputs: probe inputs ``[N, ...]``.
            labels: class labels ``[N]``.
            tasks: as in :meth:`fit`.
            pilot_steps: MCMC steps of the pilot (at least 4).

        Returns:
            The estimated seconds of :meth:`fit`, or ``None`` where the layer is enumerated exactly.
        """
        start = time.perf_counter()
        x, y = self._probe(inputs, labels)
        prepared = self.forward.prepare(x)
        d = self.forward.num_units(prepared)
        task_set = self._tasks(y, tasks, self._num_classes(prepared))
        if self._method(d) == "exact":
            return None
        two_sided = self.likelihood == "balanced" and task_set.has_classes
        self.forward.logits(prepared, torch.ones(1, d, dtype=torch.bool, device=x.device))
        blocks = self._task_blocks(task_set, two_sided, d)
        head = self.forward.linear_head(prepared)
        block = task_set.subset(blocks[0]) if len(blocks) > 1 else task_set
        saved = self.num_steps, self.burn_in, self.generator
        try:
            self.num_steps, self.burn_in, self.generator = max(4, pilot_steps), 0, torch.Generator().manual_seed(0)
            scorer = _ChainScorer(
                self.forward, prepared, block, self.num_chains, self.rest_per_chain, two_sided, self.generator, head
            )
            once = time.perf_counter() - start
            step = self._run_chains(scorer, len(block.names), d, x.device).seconds_per_step
        finally:
            self.num_steps, self.burn_in, self.generator = saved
        # the read-outs of one task on synthetic chains of the fit's size
        g, c, kept = torch.Generator().manual_seed(1), self.num_chains, self.num_steps - self.burn_in
        flips = torch.randint(0, d, (1, c, kept), generator=g).to(x.device)
        conds = torch.rand(1, c, kept, generator=g, dtype=torch.float64).to(x.device)
        traces = (torch.randint(0, 256, (1, c, kept, d), generator=g, dtype=torch.uint8) < 128).to(x.device)
        begin = time.perf_counter()
        sums = _chain_sums(flips, conds, traces, torch.zeros(1, dtype=torch.float64, device=x.device), 0.0)
        self._estimate(sums, scorer, 1, x.device)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        readout = time.perf_counter() - begin
        return once + step * self.num_steps * len(task_set.names) / len(block.names) + readout * len(task_set.names)

    def _task_blocks(self, tasks: _TaskSet, two_sided: bool, d: int) -> list[list[int]]:
        """Consecutive groups of tasks whose chains run together, each within the memory bounds.

        A block holds its chains' masks after every kept step (``chains * steps * d`` bytes per task) and,
        with an affine head, its rows' logits (``rows * K`` float64, three copies at a step).
        """
        kept = self.num_steps - self.burn_in
        per_task_trace = self.num_chains * kept * d
        rows = self.num_chains * (tasks.member.sum(dim=0) + _rest_per_task(tasks, self.rest_per_chain, two_sided))
        per_task_logits = rows * tasks.num_classes * 8 * 3
        blocks: list[list[int]] = [[]]
        trace_bytes, logit_bytes = 0, 0
        for t in range(len(tasks.names)):
            add = int(per_task_logits[t])
            if blocks[-1] and (trace_bytes + per_task_trace > _MAX_TRACE_BYTES or logit_bytes + add > _MAX_LOGIT_BYTES):
                blocks.append([])
                trace_bytes, logit_bytes = 0, 0
            blocks[-1].append(t)
            trace_bytes, logit_bytes = trace_bytes + per_task_trace, logit_bytes + add
        return blocks

    def rows_per_step(self, labels: Tensor, tasks: Literal["classes", "all"] | Sequence[int] = "classes") -> int:
        """(example, mask) rows one MCMC step evaluates on a probe with these labels, all chains together.

        The cost of a step is proportional to it (each row is a pass through the part after the layer): a
        pilot on one task scales to the full run by the ratio of the rows.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> BayesianAblation(model, "1", num_chains=2).rows_per_step(torch.tensor([0, 0, 1]))
            12
        """
        labels = torch.as_tensor(labels).long()
        task_set = self._tasks(labels, tasks, int(labels.max()) + 1 if labels.numel() else 1)
        two_sided = self.likelihood == "balanced" and task_set.has_classes
        own = task_set.member.sum(dim=0)
        return self.num_chains * int((own + _rest_per_task(task_set, self.rest_per_chain, two_sided)).sum())

    def _probe(self, inputs: Tensor | Iterable, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Probe inputs and long labels on the model's device, from tensors or a dataloader."""
        if isinstance(inputs, Tensor):
            if labels is None:
                raise ValueError("labels are required with tensor inputs")
            x, y = inputs, torch.as_tensor(labels)
        else:
            xs, ys = [], []
            for batch in inputs:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError("a dataloader must yield (inputs, labels) batches")
                xs.append(batch[0])
                ys.append(torch.as_tensor(batch[1]))
            if not xs:
                raise ValueError("the dataloader yielded no batches")
            x, y = torch.cat(xs), torch.cat(ys)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs ({x.shape[0]}) and labels ({y.shape[0]}) differ in length")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return x.to(device), y.to(device).long()

    def _num_classes(self, prepared: list[Tensor]) -> int:
        if self.forward.suffix is not None:
            return int(self.forward.suffix(*[v[:1] for v in prepared]).shape[-1])
        return int(self.model(prepared[0][:1]).shape[-1])

    def _tasks(self, labels: Tensor, tasks: str | Sequence[int], num_classes: int) -> _TaskSet:
        """Task names, membership ``[N, T]`` and classes: one task per class, or ``"all"``."""
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) (the model's classes), got {labels.min().item()}..{labels.max().item()}"
            )
        if tasks == "all":
            return _TaskSet(["all"], torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device), [], labels, num_classes)
        if tasks == "classes":
            classes = sorted(set(labels.tolist()))
        elif isinstance(tasks, str):
            raise ValueError(f"tasks must be 'classes', 'all' or a list of class indices, got {tasks!r}")
        else:
            classes = [int(c) for c in tasks]
        for c in classes:
            if not 0 <= c < num_classes:
                raise ValueError(f"task class {c} is outside the model's classes [0, {num_classes})")
            if not (labels == c).any():
                raise ValueError(f"task 'class {c}' has no probe examples; draw a larger probe set or drop the class")
        member = torch.stack([labels == c for c in classes], dim=1)
        return _TaskSet([f"class {c}" for c in classes], member, classes, labels, num_classes)

    def _method(self, d: int) -> str:
        """``"exact"`` or ``"mcmc"`` for a layer of ``d`` units."""
        method = self.method
        if method == "auto":
            budget = max(AUTO_EXACT_MASKS, self.num_chains * (self.num_steps + 1))
            method = "exact" if d <= MAX_EXACT_UNITS and 2**d <= budget else "mcmc"
        if method == "exact" and d > MAX_EXACT_UNITS:
            raise ValueError(f"exact enumeration needs d <= {MAX_EXACT_UNITS} units, {self.layer!r} has {d}; use method='mcmc'")
        return method

    # ------------------------------------------------------------------ exact enumeration
    def _exact(self, prepared: list[Tensor], tasks: _TaskSet, two_sided: bool, d: int) -> _Estimate:
        """Enumerate all masks on all probe examples; error bars from a bootstrap over the probe examples."""
        masks = all_masks(d, tasks.labels.device)
        outcomes = _MaskOutcomes(self.forward.predictions(prepared, masks), tasks, two_sided)
        logp = mask_log_posterior(outcomes.probability(), masks, self.prior_keep)  # [M, T]
        p = logp.exp()
        importance = _posterior_importance(p, masks)
        h_m = -(p * logp).sum(dim=0) / _LOG2
        top = p.topk(min(self.top_k, p.shape[0]), dim=0)
        replicates = [self._bootstrap_replicate(outcomes, masks) for _ in range(self.num_bootstrap)]
        return _Estimate(
            importance=importance,
            manifold_complexity=(_binary_entropy_bits(importance).sum(dim=1) - h_m).clamp_min(0),
            complexity_kind="total_correlation",
            mask_entropy_bits=h_m,
            method="exact",
            num_evaluations=masks.shape[0],
            num_rows=masks.shape[0] * tasks.labels.numel(),
            replicate_kind="bootstrap" if replicates else "",
            replicate_importance=torch.stack([imp for imp, _ in replicates]) if replicates else None,
            replicate_complexity=torch.stack([tc for _, tc in replicates]).clamp_min(0) if replicates else None,
            top_masks=[masks[top.indices[:, t]] for t in range(p.shape[1])],
            top_probs=[top.values[:, t] for t in range(p.shape[1])],
        )

    def _bootstrap_replicate(self, outcomes: _MaskOutcomes, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Importance ``[T, d]`` and total correlation ``[T]`` with the probe examples resampled."""
        n = outcomes.correct.shape[1]
        draw = torch.randint(0, n, (n,), generator=self.generator).to(masks.device)
        weights = torch.bincount(draw, minlength=n).to(torch.float64)
        logp = mask_log_posterior(outcomes.probability(weights), masks, self.prior_keep)
        p = logp.exp()
        importance = _posterior_importance(p, masks)
        return importance, _binary_entropy_bits(importance).sum(dim=1) + (p * logp).sum(dim=0) / _LOG2

    # ------------------------------------------------------------------ MCMC
    def _mcmc(self, scorer: _ChainScorer, num_tasks: int, d: int, device: torch.device) -> _Estimate:
        """Parallel Metropolis chains of single-unit flips; Rao-Blackwellised read-outs, jackknife over chains."""
        return self._estimate(self._run_chains(scorer, num_tasks, d, device), scorer, num_tasks, device)

    def _estimate(self, sums: _ChainSums, scorer: _ChainScorer, num_tasks: int, device: torch.device) -> _Estimate:
        """The MCMC read-outs of the chains' kept steps ``sums``."""
        c, kept = self.num_chains, sums.flips.shape[2]
        importance = _chain_marginals(sums, range(c), c * kept)[0]
        rep_importance = [_chain_marginals(sums, _others(c, chain), (c - 1) * kept)[0] for chain in range(c)] if c >= 2 else []
        complexity = _pairwise_complexity(sums, kept)
        ess_per_unit = torch.stack([_ess(sums.traces[t]) for t in range(num_tasks)])  # [T, d]
        return _Estimate(
            importance=importance,
            manifold_complexity=complexity.value,
            complexity_kind="pairwise_mutual_information",
            mask_entropy_bits=torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device),
            method="mcmc",
            num_evaluations=num_tasks * c * (self.num_steps + 1),
            num_rows=scorer.rows_per_step * (self.num_steps + 1),
            replicate_kind="jackknife" if rep_importance else "",
            replicate_importance=torch.stack(rep_importance) if rep_importance else None,
            replicate_complexity=complexity.replicates,
            acceptance_rate=sums.accepted / (c * kept),
            ess=ess_per_unit.min(dim=1).values,
            ess_per_unit=ess_per_unit,
            seconds_per_step=sums.seconds_per_step,
            complexity_pairs=complexity.pairs,
            complexity_left_out_bits=complexity.left_out_bits,
            num_draws=c * kept,
        )

    def _run_chains(self, scorer: _ChainScorer, num_tasks: int, d: int, device: torch.device) -> _ChainSums:
        """Run the chains from prior draws; the per-chain sums of the kept steps."""
        c, g = self.num_chains, self.generator
        state = (torch.rand(num_tasks, c, d, generator=g) < self.prior_keep).to(device)  # prior draws

        current = scorer.start(state) + log_prior(state, self.prior_keep)  # [T, C]
        kept = self.num_steps - self.burn_in
        traces = torch.zeros(num_tasks, c, kept, d, dtype=torch.bool, device=device)
        flips = torch.zeros(num_tasks, c, kept, dtype=torch.long, device=device)
        conds = torch.zeros(num_tasks, c, kept, dtype=torch.float64, device=device)
        accepted = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        # Rao-Blackwellisation: a step that proposes flipping unit j has the scores of both values of m_j given
        # the rest, hence P(m_j = 1 | m_-j) exactly. The proposed unit is drawn independently of the state, so
        # its average over the steps proposing j estimates P(m_j = 1), and that of m_i P(m_j = 1 | m_-j) the
        # joint P(m_i = 1, m_j = 1), with far less noise than the 0/1 samples (an unused unit gets exactly
        # prior_keep). The proposed units, their conditionals and the masks are kept per chain for the jackknife.
        loop_start = time.perf_counter()
        for step in range(self.num_steps):
            flip = torch.randint(0, d, (num_tasks, c), generator=g).to(device)
            was = state.gather(2, flip[..., None])
            proposal = state.clone()
            proposal.scatter_(2, flip[..., None], ~was)
            new = scorer.propose(proposal, flip) + log_prior(proposal, self.prior_keep)
            u = torch.rand(num_tasks, c, generator=g, dtype=torch.float64).to(device)
            if step >= self.burn_in:
                sign = was[..., 0].to(torch.float64) * 2 - 1  # +1 where the current state keeps unit j
                conds[:, :, step - self.burn_in] = torch.sigmoid((current - new) * sign)  # P(m_j = 1 | m_-j)
                flips[:, :, step - self.burn_in] = flip
            accept = u.log() < (new - current)
            scorer.accept(accept)
            state = torch.where(accept[..., None], proposal, state)
            current = torch.where(accept, new, current)
            if step >= self.burn_in:
                traces[:, :, step - self.burn_in] = state
                accepted += accept.to(torch.float64).sum(dim=1)
            if self.on_step is not None:
                self.on_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds_per_step = (time.perf_counter() - loop_start) / self.num_steps

        return _chain_sums(flips, conds, traces, accepted, seconds_per_step)

    # ------------------------------------------------------------------ read-outs
    def _result(self, estimate: _Estimate, tasks: _TaskSet, full_accuracy: Tensor) -> AblationResult:
        """The read-outs of an estimate and their standard errors from its replicates."""
        class_rows = list(range(len(tasks.classes)))
        d = estimate.importance.shape[1]

        def poly(info: Tensor) -> Tensor:
            if class_rows:
                return polysemanticity(info[class_rows])
            return torch.full((d,), math.nan, dtype=info.dtype, device=info.device)

        info = information_bits(estimate.importance, self.prior_keep)
        reps, kind = estimate.replicate_importance, estimate.replicate_kind
        rep_info = information_bits(reps, self.prior_keep) if reps is not None else None

        def se(replicates: Tensor | None) -> Tensor | None:
            return replicate_se(replicates, kind) if replicates is not None and reps is not None else None

        return AblationResult(
            **{f.name: getattr(estimate, f.name) for f in fields(estimate)},
            tasks=tasks.names,
            task_classes=list(tasks.classes),
            information_bits=info,
            distributedness=distributedness(info),
            polysemanticity=poly(info),
            full_accuracy=full_accuracy,
            split=self.forward.is_split,
            likelihood=self.likelihood,
            importance_se=se(reps),
            information_se=se(rep_info),
            distributedness_se=se(distributedness(rep_info)) if rep_info is not None else None,
            manifold_complexity_se=se(estimate.replicate_complexity),
            polysemanticity_se=se(torch.stack([poly(i) for i in rep_info])) if rep_info is not None else None,
        )


def _nan_result(tasks: _TaskSet, d: int, method: str, likelihood: str, split: bool) -> AblationResult:
    """The result of a fit whose unablated logits on the probe are not finite: every read-out NaN."""
    num_tasks, device = len(tasks.names), tasks.labels.device

    def nan(*shape: int) -> Tensor:
        return torch.full(shape, math.nan, dtype=torch.float64, device=device)

    mcmc = method == "mcmc"
    return AblationResult(
        tasks=tasks.names,
        task_classes=list(tasks.classes),
        importance=nan(num_tasks, d),
        information_bits=nan(num_tasks, d),
        distributedness=nan(num_tasks),
        manifold_complexity=nan(num_tasks),
        complexity_kind="pairwise_mutual_information" if mcmc else "total_correlation",
        polysemanticity=nan(d),
        mask_entropy_bits=nan(num_tasks),
        full_accuracy=nan(num_tasks),
        method=method,
        num_evaluations=0,
        likelihood=likelihood,
        split=split,
        acceptance_rate=nan(num_tasks) if mcmc else None,
        ess=nan(num_tasks) if mcmc else None,
        ess_per_unit=nan(num_tasks, d) if mcmc else None,
        importance_se=nan(num_tasks, d),
        information_se=nan(num_tasks, d),
        distributedness_se=nan(num_tasks),
        manifold_complexity_se=nan(num_tasks),
        polysemanticity_se=nan(d),
        complexity_left_out_bits=nan(num_tasks) if mcmc else None,
    )


def _concat_estimates(parts: list[_Estimate]) -> _Estimate:
    """One MCMC estimate of all tasks from those of consecutive blocks of tasks."""

    def cat(name: str, dim: int = 0) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values, dim=dim)

    first = parts[0]
    per_task = ("importance", "manifold_complexity", "mask_entropy_bits", "acceptance_rate", "ess", "ess_per_unit")
    return _Estimate(
        **{name: cat(name) for name in per_task},  # type: ignore[arg-type]
        complexity_kind=first.complexity_kind,
        method=first.method,
        num_evaluations=sum(p.num_evaluations for p in parts),
        num_rows=sum(p.num_rows for p in parts),
        replicate_kind=first.replicate_kind,
        replicate_importance=cat("replicate_importance", dim=1),
        replicate_complexity=cat("replicate_complexity", dim=1),
        seconds_per_step=sum(p.seconds_per_step or 0.0 for p in parts),
        complexity_pairs=cat("complexity_pairs"),
        complexity_left_out_bits=cat("complexity_left_out_bits"),
        num_draws=first.num_draws,
    )


def _chain_sums(flips: Tensor, conds: Tensor, traces: Tensor, accepted: Tensor, seconds_per_step: float) -> _ChainSums:
    """The per-chain sums of kept steps: proposed units ``flips`` ``[T, C, S]``, their conditionals, the masks."""
    num_tasks, c, d = traces.shape[0], traces.shape[1], traces.shape[3]

    def per_unit(values: Tensor) -> Tensor:  # sums over each chain's steps proposing each unit  [T, C, d]
        return torch.zeros(num_tasks, c, d, dtype=torch.float64, device=traces.device).scatter_add_(2, flips, values)

    return _ChainSums(
        flips=flips,
        conds=conds,
        traces=traces,
        cond_sum=per_unit(conds),
        cond_cnt=per_unit(torch.ones_like(conds)),
        cond_entropy=per_unit(_binary_entropy_bits(conds)),
        raw=traces.sum(dim=2, dtype=torch.float64),
        accepted=accepted,
        seconds_per_step=seconds_per_step,
    )


def _posterior_importance(p: Tensor, masks: Tensor) -> Tensor:
    """``P(m_i = 1)`` ``[T, d]`` from the posterior ``[M, T]`` of all masks ``[M, d]``."""
    return (p.T @ masks.to(torch.float64)).clamp(0, 1)


def _others(num_chains: int, left_out: int) -> list[int]:
    return [i for i in range(num_chains) if i != left_out]


def _chain_marginals(sums: _ChainSums, chains: Sequence[int], count: float) -> tuple[Tensor, Tensor, Tensor]:
    """Importance, dependence ``I(m_j; m_-j)`` and proposal counts ``[T, d]`` from the sums over some chains.

    ``I(m_j; m_-j) = H(m_j) - E[H(m_j | m_-j)]``, from the conditionals: exactly 0 for a unit whose
    conditional never moved (it depends on no other unit, e.g. a unit no task uses).
    """
    idx = list(chains)
    cs, cc, ch, raw = (t[:, idx].sum(1) for t in (sums.cond_sum, sums.cond_cnt, sums.cond_entropy, sums.raw))
    imp = torch.where(cc > 0, cs / cc.clamp_min(1), raw / count).clamp(0, 1)
    h = _binary_entropy_bits(imp)
    dependence = (h - torch.where(cc > 0, ch / cc.clamp_min(1), h)).clamp_min(0)
    return imp, dependence, cc


def _pair_information(importance: Tensor, count: Tensor, joint: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Plug-in ``I(m_i; m_j)`` in bits of the pairs ``(i[k], j[k])`` of one task ``[P]``.

    ``joint`` row ``u``: the sum, over the steps proposing unit ``u``, of ``m_v P(m_u = 1 | m_-u)``, whose mean
    estimates ``P(m_u = 1, m_v = 1)``; ``count``: those steps per unit. The two estimates of a pair's joint
    (rows ``i`` and ``j``) are averaged and clipped to the range the marginals allow.
    """
    n = count.clamp_min(1)
    pi, pj = importance[i], importance[j]
    j11 = (joint[j, i] / n[j] + joint[i, j] / n[i]) / 2
    j11 = torch.maximum(torch.minimum(j11, torch.minimum(pi, pj)), (pi + pj - 1).clamp_min(0))
    cells = torch.stack([j11, pi - j11, pj - j11, 1 - pi - pj + j11]).clamp_min(0)
    p = importance.clamp(0, 1)
    negentropy = torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)  # -H(m_u) in nats
    mi = torch.special.xlogy(cells, cells).sum(dim=0) - negentropy[i] - negentropy[j]  # H(m_i) + H(m_j) - H(m_i, m_j)
    return (mi / _LOG2).clamp_min(0)  # rounding can give -1e-17


@dataclass
class _Complexity:
    """The MCMC manifold complexity ``[T]``, its jackknife replicates ``[C, T]``, the pairs counted and left out."""

    value: Tensor
    replicates: Tensor | None
    pairs: Tensor
    left_out_bits: Tensor


def _pairwise_complexity(sums: _ChainSums, kept: int) -> _Complexity:
    """Sum of the pairwise informations ``I(m_i; m_j)`` of the mask posterior per task, resolved pairs only.

    Every pair's plug-in information is jackknife bias-corrected over the chains (it is biased upwards by
    ``O(1 / samples)``). On a wide layer most of the ``d (d - 1) / 2`` pairs carry almost no information
    while each corrected estimate keeps a noise of its own, and their sum is then noise (hundreds of bits,
    of either sign, at a few proposals per unit and chain). So a pair counts only where its information
    can be resolved: where its bound ``min(I(m_i; m_-i), I(m_j; m_-j))`` (the units' dependence on the rest,
    measured with little noise from the conditionals) exceeds the typical noise of a pair's estimate, the
    median jackknife standard error over the dependent pairs. A left-out pair's information is at most its
    bound, below that noise: leaving it out biases the sum downwards by at most ``left_out_bits`` (the sum
    of those bounds) and removes its noise. Where every dependent pair is resolved, as on small layers run
    long enough, nothing is left out and the sum is the jackknifed sum over all pairs. The replicates
    recompute the sum over the same pairs with one chain left out.
    """
    num_tasks, c, d = sums.cond_sum.shape
    device = sums.cond_sum.device
    value = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    pairs = torch.zeros(num_tasks, dtype=torch.long, device=device)
    left_out = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    replicates = torch.zeros(c, num_tasks, dtype=torch.float64, device=device) if c >= 2 else None
    if d * d > _MAX_JOINT_ELEMENTS:  # [d, d] matrices do not fit: no estimate
        nan = torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device)
        return _Complexity(nan, None if replicates is None else replicates.fill_(math.nan), pairs, nan.clone())
    imp, dep, cc = _chain_marginals(sums, range(c), c * kept)
    loo = [_chain_marginals(sums, _others(c, k), (c - 1) * kept) for k in range(c)] if c >= 2 else []
    for t in range(num_tasks):
        # the dependent pairs: a unit that depends on no other unit (I(m_u; m_-u) = 0) shares no information
        i, j = torch.nonzero(dep[t, :, None].gt(0) & dep[t, None, :].gt(0)).T
        i, j = i[i < j], j[i < j]
        if not i.numel():  # no unit depends on another: no pair carries information
            if replicates is not None:
                replicates[:, t] = 0.0
            continue
        bound = torch.minimum(dep[t, i], dep[t, j])
        joints = [sums.chain_joint(t, k) for k in range(c)]
        total = sum(joints, torch.zeros(d, d, dtype=torch.float64, device=device))
        mi = _pair_information(imp[t], cc[t], total, i, j)
        if replicates is None:  # one chain: the plug-in sum, with no error bar
            value[t], pairs[t] = mi.sum(), i.numel()
            continue

        def left_one_out(k: int, i: Tensor, j: Tensor, t: int = t, total: Tensor = total, joints: list = joints) -> Tensor:
            imp_k, dep_k, cc_k = loo[k]
            mi_k = _pair_information(imp_k[t], cc_k[t], total - joints[k], i, j)
            return torch.where((dep_k[t, i] > 0) & (dep_k[t, j] > 0), mi_k, torch.zeros_like(mi_k))

        s1, s2 = torch.zeros_like(mi), torch.zeros_like(mi)
        for k in range(c):
            mi_k = left_one_out(k, i, j)
            s1 += mi_k
            s2 += mi_k * mi_k
        corrected = c * mi - (c - 1) * s1 / c
        se = ((c - 1) / c * (s2 - s1 * s1 / c)).clamp_min(0).sqrt()  # the jackknife SE of each pair
        counted = bound > (se.median() if se.numel() else 0.0)
        value[t], pairs[t], left_out[t] = corrected[counted].sum(), counted.sum(), bound[~counted].sum()
        for k in range(c):
            replicates[k, t] = left_one_out(k, i[counted], j[counted]).sum()
    return _Complexity(value, replicates, pairs, left_out)
