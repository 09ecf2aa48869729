"""Energy expansion of categorical-input classifiers: fields, couplings and gauges.

Reference:
    Stefano Zamuner and Paolo De Los Rios, "Interpretability of neural networks classifiers with
    categorical inputs", arXiv:2102.03202 (2021). Definitions follow docs/expansion.md; the paper's exact formulas are not
    reproduced here.

For inputs of ``L`` sites with ``q`` states (one-hot encoded), any logit ``f(sigma)`` is exactly a
generalised Potts energy ``E0 + sum_i h_i(sigma_i) + sum_{i<j} J_ij(sigma_i, sigma_j) + ...``. In the
zero-sum gauge the terms are the functional-ANOVA components under the uniform measure:
``h_i(a) = E[f | sigma_i = a] - E[f]`` and
``J_ij(a, b) = E[f | a, b] - E[f | sigma_i = a] - E[f | sigma_j = b] + E[f]``; being orthogonal, their
variances split ``Var f`` into orders. :func:`expand` computes them exactly (enumeration of all ``q^L``
sequences), by Monte Carlo (conditional expectations by substitution into background sequences, with
standard errors), or in closed form for one hidden layer with a quadratic activation. The paper expands
"each layer of the network, and the logits layer in particular": ``expand(..., layer=..., unit=...)``
expands the output (pre-activation) of any layer's unit the same way.

The entry point is :func:`measure_expansion`: the expansions and every read-out of
:class:`~lightning_interp.callbacks.LogitExpansionCallback`, as an :class:`ExpansionResult`. The one-hot
encoding and the gauges live in :mod:`lightning_interp.encoding`, the model's evaluation on sequences in
:mod:`lightning_interp.sequences`; their names are importable from here too.

The module is pure torch: it never imports Lightning.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_interp.checks import check_int
from lightning_interp.encoding import Quadratic, one_hot_flat, reference_gauge, zero_sum_gauge
from lightning_interp.results import Scalar, Table
from lightning_interp.sequences import Evaluator, Target, Units, check_layer
from lightning_interp.stats import replicate_standard_error

__all__ = [
    "Evaluator",
    "ExpansionResult",
    "PottsExpansion",
    "Square",
    "Target",
    "Units",
    "check_layer",
    "check_target",
    "expand",
    "measure_expansion",
    "one_hot_flat",
    "reference_gauge",
    "resolve_target",
    "unit_pairs",
    "zero_sum_gauge",
]


class Square(nn.Module):
    """The activation ``z^2`` (with one hidden layer, the logit ends exactly at order 2)."""

    def forward(self, z: Tensor) -> Tensor:
        return z * z


# ---------------------------------------------------------------------------------------------
# the expansion
# ---------------------------------------------------------------------------------------------


@dataclass
class PottsExpansion:
    """A logit written as a Potts energy ``E0 + sum_i h_i + sum_{i<j} J_ij (+ residual)``.

    Per output (when the model has several and no target was chosen) there is a leading ``K`` dim.

    Attributes:
        constant: ``E0`` (``[]`` or ``[K]``).
        fields: ``h`` ``[(K,) L, q]``.
        couplings: ``J`` ``[(K,) L, L, q, q]``, symmetric with zero diagonal blocks (zeros for order 1).
        variance_explained: fraction of ``Var f`` (uniform measure) per order: keys ``1``, ``2`` and
            ``"residual"`` (order >= 3, or >= 2 for an order-1 expansion); ``[]`` or ``[K]`` tensors.
        total_variance: ``Var f`` under the uniform measure.
        residual_variance: variance of what the expansion leaves out.
        method: ``"exact"``, ``"sampled"`` or ``"quadratic"``.
        gauge: ``"zero_sum"`` or ``"reference"``.
        fields_se: standard errors of ``fields`` (sampled method).
        couplings_se: standard errors of ``couplings`` (sampled method).
        variance_explained_se: standard errors of ``variance_explained`` (sampled method: a grouped
            jackknife over the background sequences, 20 groups); ``None`` for the exact methods.
    """

    constant: Tensor
    fields: Tensor
    couplings: Tensor
    variance_explained: dict[int | str, Tensor]
    total_variance: Tensor
    residual_variance: Tensor
    method: str
    gauge: str = "zero_sum"
    fields_se: Tensor | None = None
    couplings_se: Tensor | None = None
    variance_explained_se: dict[int | str, Tensor] | None = None

    @property
    def seq_len(self) -> int:
        return self.fields.shape[-2]

    @property
    def num_states(self) -> int:
        return self.fields.shape[-1]

    def energy(self, states: Tensor) -> Tensor:
        """The expansion's value ``E0 + sum h + sum_{i<j} J`` for sequences ``[N, L]`` -> ``[(K,) N]``."""
        c = self.contributions(states)
        return c["constant"][..., None] + c["fields"].sum(-1) + c["couplings"].sum(dim=(-2, -1))

    def contributions(self, states: Tensor) -> dict[str, Tensor]:
        """Per-site and per-pair terms of given sequences.

        Returns:
            ``constant`` (``[(K,)]``), ``fields`` ``[(K,) N, L]`` (``h_i(sigma_i)``) and ``couplings``
            ``[(K,) N, L, L]`` (``J_ij(sigma_i, sigma_j)`` for ``i < j``, zero elsewhere); they sum to the
            logit up to the residual.
        """
        s = states.long().to(self.fields.device)
        length = self.seq_len
        if s.ndim != 2 or s.shape[1] != length:
            raise ValueError(f"states must have shape [N, {length}], got {list(s.shape)}")
        sites = torch.arange(length, device=s.device)
        h = self.fields[..., sites[None, :], s]  # [(K,) N, L]
        j = self.couplings[..., sites[:, None], sites[None, :], :, :]  # [(K,) L, L, q, q]
        a = s[:, :, None].expand(-1, length, length)
        b = s[:, None, :].expand(-1, length, length)
        ii = sites[None, :, None].expand_as(a)
        jj = sites[None, None, :].expand_as(a)
        pair = j[..., ii, jj, a, b]  # [(K,) N, L, L]
        upper = torch.triu(torch.ones(length, length, dtype=torch.bool, device=s.device), diagonal=1)
        return {"constant": self.constant, "fields": h, "couplings": pair * upper}

    def to_gauge(self, gauge: Literal["zero_sum", "reference"] = "zero_sum", reference: Tensor | None = None) -> PottsExpansion:
        """The same energy in another gauge (``reference`` needs a reference sequence ``[L]``)."""
        if gauge == "zero_sum":
            c, h, j = zero_sum_gauge(self.fields, self.couplings, self.constant)
        elif gauge == "reference":
            if reference is None:
                raise ValueError("the reference gauge needs reference=<a sequence of states [L]>")
            c, h, j = reference_gauge(self.fields, self.couplings, reference, self.constant)
        else:
            raise ValueError(f"gauge must be 'zero_sum' or 'reference', got {gauge!r}")
        return replace(
            self, constant=c, fields=h, couplings=j, gauge=gauge, fields_se=None, couplings_se=None, variance_explained_se=None
        )

    def coupling_strength(self, apc: bool = True) -> Tensor:
        """Frobenius norm of each zero-sum-gauge coupling block ``[(K,) L, L]``.

        With ``apc`` the average-product correction of contact prediction is applied:
        ``F_ij - F_i. F_.j / F_..`` (means over off-diagonal pairs).
        """
        j = self.couplings if self.gauge == "zero_sum" else self.to_gauge("zero_sum").couplings
        f = j.pow(2).sum(dim=(-2, -1)).sqrt()
        if not apc:
            return f
        length = f.shape[-1]
        off = ~torch.eye(length, dtype=torch.bool, device=f.device)
        row = (f * off).sum(-1) / (length - 1)
        total = (f * off).sum(dim=(-2, -1)) / (length * (length - 1))
        corrected = f - row[..., :, None] * row[..., None, :] / total[..., None, None].clamp_min(1e-300)
        return corrected * off

    def select(self, index: int) -> PottsExpansion:
        """The single-output expansion of output ``index`` of a multi-output expansion (leading ``K`` dim).

        Args:
            index: position along the leading output dim (for ``expand(..., unit=[u0, u1])``, the position in
                that list, not the unit index).

        Returns:
            A :class:`PottsExpansion` without the leading dim.

        Raises:
            ValueError: the expansion has a single output already, or ``index`` is out of range.

        Example:
            >>> model = nn.Sequential(nn.Linear(3 * 2, 4), Square(), nn.Linear(4, 2))
            >>> expand(model, seq_len=3, num_states=2).select(1).fields.shape
            torch.Size([3, 2])
        """
        if self.fields.ndim != 3:
            raise ValueError("select needs an expansion with several outputs (a leading K dim); this one has a single output")
        k = self.fields.shape[0]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < k:
            raise ValueError(f"index must be an int in [0, {k}), got {index!r}")

        def pick(values: dict[int | str, Tensor] | None) -> dict[int | str, Tensor] | None:
            return None if values is None else {key: v[index] for key, v in values.items()}

        return replace(
            self,
            constant=self.constant[index],
            fields=self.fields[index],
            couplings=self.couplings[index],
            variance_explained=pick(self.variance_explained) or {},
            total_variance=self.total_variance[index],
            residual_variance=self.residual_variance[index],
            fields_se=None if self.fields_se is None else self.fields_se[index],
            couplings_se=None if self.couplings_se is None else self.couplings_se[index],
            variance_explained_se=pick(self.variance_explained_se),
        )

    def strongest_pairs(self, k: int = 10, apc: bool = True) -> list[tuple[int, int, float]]:
        """The ``k`` site pairs ``(i, j, strength)`` with the largest coupling strength (single output)."""
        s = self.coupling_strength(apc)
        if s.ndim != 2:
            raise ValueError("strongest_pairs needs a single-output expansion (choose a target)")
        iu = torch.triu_indices(s.shape[0], s.shape[1], offset=1)
        vals = s[iu[0], iu[1]]
        order = vals.argsort(descending=True)[:k]
        return [(int(iu[0, o]), int(iu[1, o]), float(vals[o])) for o in order]


def _anova_exact(f: Tensor, length: int, q: int, order: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero-sum terms from all ``q^L`` values ``f`` ``[q^L, K]`` (sequences in lexicographic order)."""
    k = f.shape[1]
    grid = f.T.reshape(k, *([q] * length))
    e0 = grid.mean(dim=tuple(range(1, length + 1)))
    fields = torch.stack([grid.mean(dim=tuple(d for d in range(1, length + 1) if d != i + 1)) for i in range(length)], dim=1)
    fields = fields - e0[:, None, None]
    couplings = torch.zeros(k, length, length, q, q, dtype=f.dtype, device=f.device)
    if order >= 2:
        for i, j in itertools.combinations(range(length), 2):
            keep = (i + 1, j + 1)
            m = grid.mean(dim=tuple(d for d in range(1, length + 1) if d not in keep))
            jij = m - fields[:, i, :, None] - fields[:, j, None, :] - e0[:, None, None]
            couplings[:, i, j] = jij
            couplings[:, j, i] = jij.transpose(-2, -1)
    return e0, fields, couplings, grid


#: groups of background samples in the jackknife of the sampled method's variance fractions
_JACKKNIFE_GROUPS = 20


def _variance_split(fields: Tensor, couplings: Tensor, total: Tensor) -> dict[int | str, Tensor]:
    v1 = fields.pow(2).mean(-1).sum(-1)
    v2 = 0.5 * couplings.pow(2).mean(dim=(-2, -1)).sum(dim=(-2, -1))
    tot = total.clamp_min(1e-300)
    return {1: v1 / tot, 2: v2 / tot, "residual": (1 - (v1 + v2) / tot).clamp_min(0)}


def expand(
    model: nn.Module,
    seq_len: int,
    num_states: int,
    order: int = 2,
    method: Literal["exact", "sampled", "quadratic"] = "exact",
    encode: Callable[[Tensor, int], Tensor] = one_hot_flat,
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
    target: Target = None,
    background: Tensor | None = None,
    max_evaluations: int = 2**20,
    batch_size: int = 65536,
    layer: str | None = None,
    unit: Units = None,
) -> PottsExpansion:
    """Expand a model's logit, or a unit of any layer, as a Potts energy in the zero-sum gauge.

    Args:
        model: maps ``encode(states)`` to logits ``[N]`` or ``[N, K]``.
        seq_len: number of sites ``L``.
        num_states: states per site ``q``.
        order: 1 (fields only) or 2 (fields and couplings).
        method: ``"exact"`` (all ``q^L`` sequences; refused above ``max_evaluations``), ``"sampled"``
            (Monte-Carlo conditional expectations by substitution into ``num_samples`` background
            sequences, uniform unless ``background`` is given; with standard errors), or
            ``"quadratic"`` (closed form for ``Linear -> Square/Quadratic -> Linear``).
        encode: states ``[N, L]`` -> model input (site-major one-hot by default).
        num_samples: background sequences of the sampled method.
        generator: ``torch.Generator`` of the background draws.
        target: an output index, a pair ``(a, b)`` for the logit difference ``z_a - z_b``, or ``None``
            for every output.
        background: background sequences ``[S, L]`` for the sampled method (a data distribution).
        max_evaluations: the largest number of model evaluations the exact method accepts.
        batch_size: sequences per forward pass.
        layer: ``named_modules()`` path of a layer whose output (for a Linear or conv layer, the
            pre-activation) is expanded instead of the logits; ``None``: the logits. The output is read with
            a forward hook on the whole model (at the layer's last call in a forward pass) and flattened per
            example, so a ``[N, C, H, W]`` output has units ``c * H * W + h * W + w``.
        unit: with ``layer``: a flattened unit index (a single-output expansion), a list of them (a leading
            output dim in that order), or ``None`` for every unit of the layer.

    Returns:
        A :class:`PottsExpansion` (float64) on the model's device.

    Raises:
        ValueError: ``num_states < 2``, ``seq_len < 1``, an unknown method or order, exact enumeration over
            the limit, a model that rejects the encoded input, or a non-quadratic model for
            ``method="quadratic"``; an unknown ``layer`` (the message lists close names), a ``unit``
            outside the layer's width (the message gives it), ``unit`` without ``layer``, ``target`` with
            ``layer``, or ``method="quadratic"`` with ``layer``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3 * 2, 4), Square(), nn.Linear(4, 1))
        >>> e = expand(model, seq_len=3, num_states=2, method="exact")
        >>> e.fields.shape, round(float(e.variance_explained["residual"]), 12)
        (torch.Size([3, 2]), 0.0)
        >>> hidden = expand(model, seq_len=3, num_states=2, layer="0", unit=2)  # a first-layer unit: order 1
        >>> round(float(hidden.variance_explained[1]), 6), float(hidden.couplings.abs().max()) < 1e-6  # float32 model
        (1.0, True)
    """
    check_int("num_states", num_states, 2)
    check_int("seq_len", seq_len, 1)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if method not in ("exact", "sampled", "quadratic"):
        raise ValueError(f"method must be 'exact', 'sampled' or 'quadratic', got {method!r}")
    if layer is not None and method == "quadratic":
        raise ValueError("method='quadratic' is the closed form of the logits; with layer= use method='exact' or 'sampled'")
    evaluate = Evaluator(model, num_states, encode, target, batch_size, layer=layer, unit=unit)
    device = evaluate.device
    length, q = seq_len, num_states
    single = target is not None or (layer is not None and isinstance(unit, numbers.Integral))
    if method == "exact":
        n = q**length
        if n > max_evaluations:
            raise ValueError(
                f"exact enumeration needs q^L = {q}^{length} = {n} model evaluations, over max_evaluations={max_evaluations}; "
                "use method='sampled' or raise max_evaluations"
            )
        states = torch.cartesian_prod(*[torch.arange(q, device=device)] * length).reshape(n, length)
        f = evaluate(states)
        e0, h, j, grid = _anova_exact(f, length, q, order)
        total = f.var(dim=0, unbiased=False)
        k = f.shape[1]
        expansion = PottsExpansion(e0, h, j, {}, total, total, "exact")
        recon = expansion.energy(states)  # [K, N]
        residual = f.T - recon
        expansion.residual_variance = residual.pow(2).mean(-1)
        expansion.variance_explained = _variance_split(h, j, total)
        del grid, k
    elif method == "quadratic":
        expansion = _quadratic(model, length, q, target, device)
    else:
        expansion = _sampled(evaluate, length, q, order, num_samples, generator, background, device)
    if single or (expansion.fields.shape[0] == 1 and unit is None and _single_output(model, evaluate, length)):
        expansion = expansion.select(0)
    return expansion


def _single_output(model: nn.Module, evaluate: Evaluator, length: int) -> bool:
    if evaluate.layer is not None:
        return True  # the caller saw one column and asked for every unit: the layer has width 1
    with torch.no_grad():
        out = model(evaluate.encode(torch.zeros(1, length, dtype=torch.long), evaluate.q).to(evaluate.device, evaluate.dtype))
    return out.ndim == 1 or out.shape[1] == 1


def _quadratic(model: nn.Module, length: int, q: int, target: Target, device: torch.device) -> PottsExpansion:
    mods = (
        [m for m in model.modules() if not isinstance(m, nn.Sequential) and m is not model]
        if isinstance(model, nn.Sequential)
        else []
    )
    lin1, act, lin2 = mods if len(mods) == 3 else (None, None, None)
    if not (isinstance(lin1, nn.Linear) and isinstance(act, (Square, Quadratic)) and isinstance(lin2, nn.Linear)):
        raise ValueError(
            "method='quadratic' needs nn.Sequential(Linear, Square() or Quadratic(alpha), Linear) on one-hot inputs; "
            "use method='exact' or 'sampled' for other models"
        )
    beta, alpha = (0.0, 1.0) if isinstance(act, Square) else (1.0, act.alpha)
    w = lin1.weight.detach().to(torch.float64).reshape(-1, length, q)  # W_k,i(a)
    b = lin1.bias.detach().to(torch.float64) if lin1.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    v = lin2.weight.detach().to(torch.float64)  # [K, H]
    c = lin2.bias.detach().to(torch.float64) if lin2.bias is not None else torch.zeros(v.shape[0], dtype=torch.float64)
    if target is not None:
        if isinstance(target, tuple):
            v, c = (v[target[0]] - v[target[1]])[None], (c[target[0]] - c[target[1]])[None]
        else:
            v, c = v[target : target + 1], c[target : target + 1]
    # f = sum_k v_k (beta z_k + alpha z_k^2) + c, z_k = b_k + sum_i W_k,i(sigma_i)
    e0 = v @ (beta * b + alpha * b * b) + c
    h = torch.einsum("oh,hia->oia", v, beta * w + alpha * (2 * b[:, None, None] * w + w * w))
    j = 2 * alpha * torch.einsum("oh,hia,hjb->oijab", v, w, w)
    e0, h, j = zero_sum_gauge(h, j, e0)  # which also zeroes the diagonal blocks i == j
    e0, h, j = e0.to(device), h.to(device), j.to(device)
    # orthogonal zero-sum terms: the variance of the (exactly order-2) energy is their sum
    total = h.pow(2).mean(-1).sum(-1) + 0.5 * j.pow(2).mean(dim=(-2, -1)).sum(dim=(-2, -1))
    return PottsExpansion(e0, h, j, _variance_split(h, j, total), total, torch.zeros_like(total), "quadratic")


def _sampled(
    evaluate: Evaluator,
    length: int,
    q: int,
    order: int,
    num_samples: int,
    generator: torch.Generator | None,
    background: Tensor | None,
    device: torch.device,
) -> PottsExpansion:
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if background is None:
        base = torch.randint(0, q, (num_samples, length), generator=g)
    else:
        if background.ndim != 2 or background.shape[1] != length:
            raise ValueError(f"background must have shape [S, {length}], got {list(background.shape)}")
        base = background.long().cpu()
    s = base.shape[0]
    f0 = evaluate(base.to(device))  # [S, K]
    k = f0.shape[1]
    # single-site substitutions: F1[s, i, a] = f(sigma_s with sigma_i = a)
    states = base[:, None, None, :].repeat(1, length, q, 1)
    for i in range(length):
        states[:, i, :, i] = torch.arange(q)
    f1 = evaluate(states.reshape(-1, length).to(device)).reshape(s, length, q, k)
    centred1 = f1 - f1.mean(dim=2, keepdim=True)  # per sample: f(i<-a) - mean_b f(i<-b)
    fields = centred1.mean(0).permute(2, 0, 1)  # [K, L, q]
    # grouped jackknife over the background samples: sums per group, read-outs recomputed without each group
    groups = min(_JACKKNIFE_GROUPS, s)
    group = torch.arange(s, device=device) % groups
    size = torch.bincount(group, minlength=groups).to(torch.float64)

    def group_sums(values: Tensor) -> Tensor:
        return torch.zeros(groups, *values.shape[1:], dtype=values.dtype, device=device).index_add_(0, group, values)

    fields_groups = group_sums(centred1)  # [G, L, q, K]
    couplings_groups = torch.zeros(groups, k, length, length, q, q, dtype=torch.float64, device=device) if order >= 2 else None
    fields_se = (centred1.std(0, unbiased=True) / math.sqrt(s)).permute(2, 0, 1)
    couplings = torch.zeros(k, length, length, q, q, dtype=torch.float64, device=device)
    couplings_se = torch.zeros_like(couplings)
    if order >= 2:
        for i, j in itertools.combinations(range(length), 2):
            st = base[:, None, None, :].repeat(1, q, q, 1)
            st[:, :, :, i] = torch.arange(q)[None, :, None]
            st[:, :, :, j] = torch.arange(q)[None, None, :]
            f2 = evaluate(st.reshape(-1, length).to(device)).reshape(s, q, q, k)
            dc = f2 - f2.mean(1, keepdim=True) - f2.mean(2, keepdim=True) + f2.mean((1, 2), keepdim=True)
            jij = dc.mean(0).permute(2, 0, 1)
            se = (dc.std(0, unbiased=True) / math.sqrt(s)).permute(2, 0, 1)
            couplings[:, i, j], couplings[:, j, i] = jij, jij.transpose(-2, -1)
            couplings_se[:, i, j], couplings_se[:, j, i] = se, se.transpose(-2, -1)
            assert couplings_groups is not None
            dg = group_sums(dc).permute(0, 3, 1, 2)  # [G, K, q, q]
            couplings_groups[:, :, i, j], couplings_groups[:, :, j, i] = dg, dg.transpose(-2, -1)
    e0 = f0.mean(0)
    total = f0.var(0, unbiased=True)
    e = PottsExpansion(
        e0,
        fields,
        couplings,
        _variance_split(fields, couplings, total),
        total,
        total,
        "sampled",
        "zero_sum",
        fields_se,
        couplings_se,
    )
    recon = e.energy(base.to(device))  # [K, S]
    e.residual_variance = (f0.T - recon - (f0.T - recon).mean(-1, keepdim=True)).pow(2).mean(-1)
    # The order-1 and order-2 variances come from the precise centred estimates; the sample variance of
    # num_samples logits is much noisier, so the total is their sum plus the measured residual variance.
    v1 = fields.pow(2).mean(-1).sum(-1)
    v2 = 0.5 * couplings.pow(2).mean(dim=(-2, -1)).sum(dim=(-2, -1))
    e.total_variance = v1 + v2 + e.residual_variance
    e.variance_explained = _variance_split(fields, couplings, e.total_variance)
    if groups >= 2:
        replicates: dict[int | str, list[Tensor]] = {1: [], 2: [], "residual": []}
        for g_out in range(groups):
            keep = group != g_out
            n = s - size[g_out]
            h_g = ((fields_groups.sum(0) - fields_groups[g_out]) / n).permute(2, 0, 1)
            j_g = couplings if couplings_groups is None else (couplings_groups.sum(0) - couplings_groups[g_out]) / n
            e_g = replace(e, constant=f0[keep].mean(0), fields=h_g, couplings=j_g)
            r = f0[keep].T - e_g.energy(base[keep.cpu()].to(device))
            resid = (r - r.mean(-1, keepdim=True)).pow(2).mean(-1)
            total_g = h_g.pow(2).mean(-1).sum(-1) + 0.5 * j_g.pow(2).mean(dim=(-2, -1)).sum(dim=(-2, -1)) + resid
            for key, value in _variance_split(h_g, j_g, total_g).items():
                replicates[key].append(value)
        e.variance_explained_se = {key: replicate_standard_error(torch.stack(v), "jackknife") for key, v in replicates.items()}
    return e


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------


def check_target(target: object) -> Target:
    """``target`` if it is ``None``, an output index ``>= 0`` or a pair of distinct indices (a list becomes a tuple).

    Raises:
        ValueError: any other form (the message gives the three).
    """

    def index(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if target is None or index(target):
        return target  # type: ignore[return-value]
    if isinstance(target, (tuple, list)) and len(target) == 2 and all(index(v) for v in target) and target[0] != target[1]:
        return (target[0], target[1])
    raise ValueError(
        f"target must be None, an output index >= 0, or a pair (a, b) of distinct output indices for z_a - z_b; got {target!r}"
    )


def resolve_target(model: nn.Module, seq_len: int, num_states: int, target: object = None) -> int | tuple[int, int]:
    """The output :func:`measure_expansion` expands: ``target``, else ``(1, 0)`` (``z_1 - z_0``) for two outputs, else 0.

    Raises:
        ValueError: a malformed ``target``, one naming an output the model does not have, or a model that rejects
            the encoded input.
    """
    checked = check_target(target)
    k = Evaluator(model, num_states, one_hot_flat, None, 2)(torch.zeros(2, seq_len, dtype=torch.long)).shape[1]
    if checked is None:
        return (1, 0) if k == 2 else 0
    top = max(checked) if isinstance(checked, tuple) else checked
    if top >= k:
        raise ValueError(
            f"target={checked!r} names output {top}, but {type(model).__name__} has {k} output(s) (0..{k - 1}); "
            f"choose indices below {k}"
        )
    return checked


def unit_pairs(units: object) -> dict[str, list[int]]:
    """``units`` (``(layer, unit)`` pairs) grouped by layer, in the order given (one expansion serves a layer's units).

    Raises:
        ValueError: ``units`` is not a list of pairs of a layer name and an index ``>= 0``, or names a pair twice.
    """
    form = (
        "units must be a list of (layer, unit) pairs: a named_modules() path (a non-empty string) and a flattened "
        "unit index >= 0, e.g. [('net.0', 3)]"
    )
    if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
        raise ValueError(f"{form}; got {units!r}")
    groups: dict[str, list[int]] = {}
    for item in units:
        ok = isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and item[0] != ""
        if not (ok and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
            raise ValueError(f"{form}; got {item!r} in units")
        if item[1] in groups.get(item[0], []):
            raise ValueError(f"units names {(item[0], item[1])!r} twice; list each (layer, unit) once")
        groups.setdefault(item[0], []).append(int(item[1]))
    return groups


def _corr(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten().double(), b.flatten().double().to(a.device)
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300)


def _order_scalars(e: PottsExpansion, strength: Tensor, prefix: str) -> dict[str, tuple[Scalar, Scalar | None]]:
    se = e.variance_explained_se
    out: dict[str, tuple[Scalar, Scalar | None]] = {
        f"{prefix}{name}": (e.variance_explained[key], None if se is None else se[key])
        for key, name in ((1, "var_order1"), (2, "var_order2"), ("residual", "var_residual"))
    }
    out[f"{prefix}max_coupling"] = (strength.max(), None)
    return out


@dataclass
class ExpansionResult:
    """What :func:`measure_expansion` measured.

    Attributes:
        expansion: the target logit's :class:`PottsExpansion` (single output).
        strength: its APC-corrected coupling strengths ``[L, L]`` (:meth:`PottsExpansion.coupling_strength`).
        units: per expanded hidden unit, ``"<layer>/unit<u>"`` to its expansion and coupling strengths.
        field_corr: correlation of the zero-sum fields with the planted field difference (``None``: none planted).
        coupling_corr: the same for the couplings.
        top_pairs: rows of the strongest-pairs tables.
    """

    expansion: PottsExpansion
    strength: Tensor
    units: dict[str, tuple[PottsExpansion, Tensor]] = field(default_factory=dict)
    field_corr: Tensor | None = None
    coupling_corr: Tensor | None = None
    top_pairs: int = 10

    def scalars(self) -> dict[str, tuple[Scalar, Scalar | None]]:
        """``var_order1``, ``var_order2``, ``var_residual`` (standard errors for the sampled method),
        ``max_coupling``, ``field_corr`` and ``coupling_corr`` (with planted parameters), and the first four for
        every unit under ``<layer>/unit<u>/``."""
        out = _order_scalars(self.expansion, self.strength, "")
        if self.field_corr is not None and self.coupling_corr is not None:
            out["field_corr"], out["coupling_corr"] = (self.field_corr, None), (self.coupling_corr, None)
        for key, (e, strength) in self.units.items():
            out.update(_order_scalars(e, strength, f"{key}/"))
        return out

    def tables(self) -> dict[str, Table]:
        """``strongest_pairs`` (``site_i``, ``site_j``, ``strength_apc``; ``top_pairs`` rows) of the logit and of each unit."""
        columns = ["site_i", "site_j", "strength_apc"]
        expansions = {"": self.expansion, **{f"{key}/": e for key, (e, _) in self.units.items()}}
        return {
            f"{key}strongest_pairs": (columns, [[i, j, s] for i, j, s in e.strongest_pairs(self.top_pairs, apc=True)])
            for key, e in expansions.items()
        }


def measure_expansion(
    model: nn.Module,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    seq_len: int | None = None,
    num_states: int,
    method: Literal["sampled", "exact", "quadratic"] = "sampled",
    order: int = 2,
    num_samples: int = 256,
    target: object = None,
    max_evaluations: int = 2**20,
    units: Sequence[tuple[str, int]] = (),
    planted: tuple[Tensor, Tensor] | None = None,
    top_pairs: int = 10,
) -> ExpansionResult:
    """The Potts expansion of a categorical-input classifier's logit (and of hidden units), with its read-outs.

    The model takes one-hot sequences (:func:`one_hot_flat`). The logit ``target`` is expanded by :func:`expand`
    (``None``: ``z_1 - z_0`` for two outputs, output 0 otherwise; :func:`resolve_target`), and so is every
    ``(layer, unit)`` of ``units`` (the units of a layer share one expansion). Every expansion draws the same
    background sequences (each starts from ``generator``'s state).

    Args:
        model: the classifier.
        inputs: background sequences of states ``[S, L]`` for the sampled method (a data distribution);
            ``None``: ``num_samples`` uniformly random ones, as the callback uses.
        labels: not used (the expansion describes the model's function, not labelled data).
        generator: the background draws (``None``: seed 0).
        seq_len: sites ``L`` (``None``: the width of ``inputs``).
        num_states: states per site ``q``.
        method: ``"sampled"``, ``"exact"`` or ``"quadratic"`` (see :func:`expand`).
        order: 1 or 2.
        num_samples: background sequences of the sampled method.
        target: an output index, ``(a, b)`` for ``z_a - z_b``, or ``None`` (the default above).
        max_evaluations: the exact method's limit.
        units: hidden units to expand as well: ``(layer, unit)`` pairs (see :func:`expand`'s ``layer``, ``unit``).
        planted: planted ``(field difference [L, q], coupling difference [L, L, q, q])`` (e.g. a
            :class:`~lightning_interp.datamodules.PottsDataModule`'s): adds ``field_corr`` and ``coupling_corr``,
            their correlations with the recovered zero-sum-gauge terms.
        top_pairs: rows of the strongest-pairs tables.

    Returns:
        An :class:`ExpansionResult` on the model's device.

    Raises:
        ValueError: as :func:`expand`, :func:`resolve_target` and :func:`unit_pairs`; no ``seq_len``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3 * 2, 4), Square(), nn.Linear(4, 2))
        >>> result = measure_expansion(model, seq_len=3, num_states=2, method="exact")
        >>> sorted(result.scalars()), float(result.scalars()["var_residual"][0]) < 1e-9
        (['max_coupling', 'var_order1', 'var_order2', 'var_residual'], True)
    """
    del labels
    length = seq_len if seq_len is not None or inputs is None or inputs.ndim != 2 else inputs.shape[1]
    if length is None:
        raise ValueError("measure_expansion needs seq_len=<the sites L> (or background sequences inputs [S, L])")
    resolved = resolve_target(model, length, num_states, target)
    state = None if generator is None else generator.get_state()

    def run(**which: object) -> PottsExpansion:
        gen = None if state is None else torch.Generator().set_state(state)
        kw = dict(order=order, method=method, num_samples=num_samples, generator=gen, background=inputs)
        return expand(model, length, num_states, max_evaluations=max_evaluations, **kw, **which)  # type: ignore[arg-type]

    e = run(target=resolved)
    result = ExpansionResult(e, e.coupling_strength(apc=True), top_pairs=top_pairs)
    if planted is not None:
        h = torch.as_tensor(planted[0], dtype=torch.float64)
        _, h0, j0 = zero_sum_gauge(h, torch.as_tensor(planted[1], dtype=torch.float64))
        result.field_corr, result.coupling_corr = _corr(e.fields, h0), _corr(e.couplings, j0)
    for layer, indices in unit_pairs(units).items():
        layer_expansion = run(layer=layer, unit=indices)
        for k, unit in enumerate(indices):
            eu = layer_expansion.select(k)
            result.units[f"{layer}/unit{unit}"] = (eu, eu.coupling_strength(apc=True))
    return result
