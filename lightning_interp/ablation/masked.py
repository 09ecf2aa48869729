"""Masked evaluation: a model's logits with a layer's units masked, for many masks per forward pass.

Part of :mod:`lightning_interp.ablation`. Where the model can be split at the layer with ``torch.fx``
(:class:`~lightning_interp.hooks.LayerSplit`), the part before it runs once per probe batch and only the part
after it runs on the ``[masks * examples]`` batch; the mask is moved past the channel-wise ops that follow the
layer where that gives the same logits bit for bit. Pure torch: no Lightning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.hooks import LayerSplit, as_list, forward_hooks, get_module, replace, same_logits, split_graph

__all__ = ["MAX_ELEMENTS", "MaskedForward", "all_masks", "predicted_class"]

#: Bound on the layer-output elements of one forward pass over (mask, example) rows (wide rows stay in cache).
MAX_ELEMENTS = 4_000_000


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
        per = max(1, min(self.max_batch, MAX_ELEMENTS // row_elems) // n)
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

                def mask_rows(h: Tensor, chunk: Tensor = chunk, k: int = k) -> Tensor:
                    return (h.reshape(k, n, *h.shape[1:]) * _mask_view(h, chunk)).reshape(h.shape)

                with replace(self.model, self.layer, mask_rows):
                    logits = self.model(big)
            yield logits.reshape(k, n, -1)

    @torch.no_grad()
    def logits(self, prepared: list[Tensor], masks: Tensor) -> Tensor:
        """Logits ``[M, N, K]`` for every mask ``[M, d]`` and probe example (of ``prepared``)."""
        return torch.cat(list(self._chunks(prepared, masks)))

    @torch.no_grad()
    def predictions(self, prepared: list[Tensor], masks: Tensor) -> Tensor:
        """Predicted class ``[M, N]`` for every mask ``[M, d]`` and probe example (of ``prepared``)."""
        return torch.cat([predicted_class(logits) for logits in self._chunks(prepared, masks)])

    @torch.no_grad()
    def paired_predictions(self, prepared: list[Tensor], rows: Tensor, masks: Tensor) -> Tensor:
        """Predicted class ``[R]`` of probe example ``rows[r]`` (of ``prepared``) under mask ``masks[r]`` ``[R, d]``.

        One mask per row rather than every mask on every example (:meth:`predictions`): the rows of many
        masks, each on its own examples, run in one forward pass.
        """
        per = max(1, min(self.max_batch, MAX_ELEMENTS // max(1, prepared[0][0].numel())))
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

                def mask_row(h: Tensor, chunk: Tensor = chunk) -> Tensor:
                    return h * _row_mask_view(h, chunk)

                with replace(self.model, self.layer, mask_row):
                    logits = self.model(prepared[0].index_select(0, idx))
            out.append(predicted_class(logits))
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

        def count(_m: nn.Module, _i: tuple[Any, ...], h: object) -> None:
            assert isinstance(h, Tensor)
            store.append(h.shape[_unit_dim(h)])

        with forward_hooks(self.model, {self.layer: count}), torch.no_grad():
            self.model(prepared[0][:1])
        return store[0]


def predicted_class(logits: Tensor) -> Tensor:
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


def all_masks(d: int, device: torch.device) -> Tensor:
    """All ``2^d`` masks ``[2^d, d]`` (bool), mask ``k`` keeping the units whose bit is set in ``k``."""
    idx = torch.arange(2**d, device=device)
    return ((idx[:, None] >> torch.arange(d, device=device)) & 1).bool()
