"""Correlation orders: how much of a layer's computation lives in class means, covariances and higher orders.

Reference:
    Fischer, René, Keup, Layer, Dahmen, Helias, "Decomposing neural networks as mappings of correlation
    functions", Physical Review Research 4, 043143 (2022). Definitions follow docs/correlation.md; the
    paper's exact formulas are not reproduced here.

A network maps the class-conditional input distributions layer by layer. Per layer and class ``c``,
with ``mu_c``, ``Sigma_c`` the class mean and covariance of the layer's output on probe data and
``Sigma_bar`` the pooled within-class covariance, Gaussian surrogates replace the layer's output for an
example of class ``c`` by a draw from ``N(mu_c, Sigma_c)`` (order 2), ``N(mu_c, Sigma_bar)`` (order 1)
or ``N(mu_bar, Sigma_bar)`` (order 0), and the forward pass continues: ``acc_real >= acc_2 >= acc_1 >=
acc_0 ~ chance`` up to noise, and ``higher_order_gap = acc_real - acc_2`` is what orders above two carry.

The entry point is :func:`measure_correlation` (every read-out of
:class:`~lightning_interp.callbacks.CorrelationOrderCallback`, as a :class:`CorrelationResult`). Its parts:
:func:`gaussian_surrogates` (exact surrogate draws from a layer's probe samples, no covariance matrix),
:class:`LayerReplacement` (the forward pass from a layer on), :func:`non_gaussianity` (with a jackknife
error). The theory side, :class:`ClassMoments` (streaming, mergeable float64 moments; a low-rank-plus-diagonal
mode for wide layers) and the analytic Gaussian closure (:func:`propagate_moments`, :func:`theory_accuracy`),
lives in :mod:`lightning_interp.gaussian_closure` and :class:`Quadratic` in :mod:`lightning_interp.encoding`;
all are importable from here. It is pure torch: it never imports Lightning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_interp.encoding import Quadratic
from lightning_interp.gaussian_closure import ClassMoments, propagate_moments, relu_moments, theory_accuracy
from lightning_interp.hooks import LayerSplit, forward_hooks, get_module, replace
from lightning_interp.results import Scalar, Table
from lightning_interp.stats import mean_and_se, replicate_standard_error

__all__ = [
    "ACTIVATIONS",
    "INPUT",
    "KURTOSIS_ELEMENTS",
    "ClassMoments",
    "CorrelationResult",
    "LayerReplacement",
    "Quadratic",
    "gaussian_surrogates",
    "layer_outputs",
    "measure_correlation",
    "non_gaussianity",
    "propagate_moments",
    "relu_moments",
    "resolve_layers",
    "theory_accuracy",
]


# ---------------------------------------------------------------------------------------------
# surrogates
# ---------------------------------------------------------------------------------------------

INPUT = "input"


def layer_outputs(model: nn.Module, layers: Sequence[str], inputs: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs of ``layers`` (``"input"`` is the model input) and the logits, in one forward pass."""
    store: dict[str, Tensor] = {}

    def make(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_m: nn.Module, _i: tuple, out: object) -> None:
            if not isinstance(out, Tensor) or not out.is_floating_point():
                raise TypeError(f"layer {name!r} outputs {getattr(out, 'dtype', type(out).__name__)}, not a float tensor")
            store[name] = out.detach().clone()

        return hook

    with forward_hooks(model, {name: make(name) for name in layers if name != INPUT}):
        logits = model(inputs)
    if INPUT in layers:
        store[INPUT] = inputs.detach().clone()
    return store, logits


def gaussian_surrogates(
    features: Tensor,
    labels: Tensor,
    order: Literal[0, 1, 2] | Sequence[int],
    generator: torch.Generator | None = None,
) -> Tensor | list[Tensor]:
    """Exact draws from the order-``order`` Gaussian surrogates of a layer, made from its own samples.

    For the probe examples ``x_i`` (``features`` ``[N, ...]``) of classes ``labels``, a draw for example
    ``i`` of class ``c`` is ``m + sum_j z_j v_j`` with ``z ~ N(0, I)`` and ``v_j`` the centred samples
    scaled so that ``sum_j v_j v_j^T`` is the unbiased covariance: the class's own samples
    (``(x_j - mu_c) / sqrt(n_c - 1)``) for order 2, all samples (``(x_j - mu_{y_j}) / sqrt(N - K)``, the
    pooled within-class covariance) for orders 1 and 0; ``m`` is ``mu_c`` (orders 2, 1) or the overall mean
    (order 0). The draws follow ``N(m, Sigma)`` exactly, with the sample moments of ``features``, for
    layers of any width (no covariance matrix, factorization or low-rank approximation): the cost is
    ``sum_c n_c^2 D`` (order 2) or ``N^2 D`` (orders 1, 0) multiply-adds in the features' dtype. Asked
    for orders 1 and 0 together, both use the same pooled noise (each is exactly distributed; their
    accuracies become common-random-number estimates) and the ``N^2 D`` product is paid once.

    Args:
        features: a layer's outputs on probe data ``[N, ...]`` (floating point).
        labels: their classes ``[N]``; each class present needs at least two examples.
        order: 2 ``N(mu_c, Sigma_c)``, 1 ``N(mu_c, Sigma_bar)``, 0 ``N(mu_bar, Sigma_bar)``, or a
            sequence of orders.
        generator: a CPU ``torch.Generator`` for ``z``.

    Returns:
        Draws with the shape, dtype and device of ``features`` (a list of them for a sequence of orders).

    Example:
        >>> x, y = torch.randn(200, 3), torch.arange(200) % 2
        >>> gaussian_surrogates(x, y, 2, torch.Generator().manual_seed(0)).shape
        torch.Size([200, 3])
    """
    orders = [order] if isinstance(order, int) else list(order)
    if any(o not in (0, 1, 2) for o in orders):
        raise ValueError(f"order must be 0, 1 or 2, got {order}")
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {getattr(features, 'dtype', type(features).__name__)}")
    x = features.detach().reshape(features.shape[0], -1)
    labels = labels.to(x.device).long()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"class(es) {classes[counts < 2].tolist()} have fewer than 2 examples; draw a larger probe set")
    # class sums by scatter-add, not a one-hot [K, N] x [N, D] product: O(N D) float64 work instead of O(K N D)
    means64 = x.new_zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x.to(torch.float64))
    means64 /= counts[:, None].to(torch.float64)  # [K, D]
    centred = x - means64.to(x.dtype)[inverse]
    draws: dict[int, Tensor] = {}
    if 2 in orders:
        out = torch.empty_like(x)
        for k in range(len(classes)):
            idx = torch.nonzero(inverse == k).flatten()
            z = torch.randn(len(idx), len(idx), generator=generator, dtype=x.dtype).to(x.device)
            out[idx] = means64[k].to(x.dtype) + (z @ centred[idx]) / math.sqrt(len(idx) - 1)
        draws[2] = out
    if 1 in orders or 0 in orders:
        n = x.shape[0]
        z = torch.randn(n, n, generator=generator, dtype=x.dtype).to(x.device)
        noise = (z @ centred) / math.sqrt(n - len(classes))
        if 1 in orders:
            draws[1] = means64.to(x.dtype)[inverse] + noise
        if 0 in orders:
            draws[0] = ((means64 * counts[:, None]).sum(0) / n).to(x.dtype) + noise
    shaped = [draws[o].reshape(features.shape) for o in orders]
    return shaped[0] if isinstance(order, int) else shaped


#: Elements (examples x units) per block of :func:`non_gaussianity`'s float64 work arrays.
KURTOSIS_ELEMENTS = 1 << 21


def _kurtosis(count: Tensor, centred2: Tensor, centred4: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Population excess kurtosis from centred power sums, and where it is defined (a unit that varies)."""
    var = centred2 / count
    kurt = centred4 * count / (centred2 * centred2) - 3
    # the threshold of ClassMoments.excess_kurtosis: a variance resolvable against the raw second moment
    valid = var > 1e-12 * (mean * mean + var + 1e-300)
    return kurt, valid


def non_gaussianity(features: Tensor, labels: Tensor, groups: int = 10) -> tuple[Tensor, Tensor]:
    """Mean absolute excess kurtosis over the classes present and the units, and its jackknife standard error.

    The value is :meth:`ClassMoments.non_gaussianity` of the same data (0 for Gaussian activity; units
    constant within a class are left out). The standard error is the delete-a-group jackknife's over the
    examples: example ``i`` is in group ``i mod groups``, and each group's replicate (the value without that
    group) is exact, from every class's centred power sums less the group's share. The whole costs a few
    float64 passes over ``[N, D]`` (in blocks of :data:`KURTOSIS_ELEMENTS`), not ``groups`` refits.

    Args:
        features: a layer's outputs ``[N, ...]`` (floating point).
        labels: their classes ``[N]``; each class present needs at least two examples.
        groups: jackknife groups (``>= N``: the leave-one-out jackknife).

    Returns:
        ``(value, se)``, 0-d float64 tensors; both NaN when a feature is non-finite.

    Example:
        >>> x, y = torch.randn(400, 3), torch.arange(400) % 2
        >>> value, se = non_gaussianity(x, y)
        >>> bool(value < 0.5), bool(0 < se < 0.5)
        (True, True)
    """
    x = features.detach().reshape(features.shape[0], -1)
    labels = labels.to(x.device).long()
    nan = torch.tensor(math.nan, dtype=torch.float64, device=x.device)
    if not bool(torch.isfinite(x).all()):
        return nan, nan.clone()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"class(es) {classes[counts < 2].tolist()} have fewer than 2 examples; draw a larger probe set")
    k, g = len(classes), max(2, min(groups, x.shape[0]))
    cell = inverse * g + torch.arange(x.shape[0], device=x.device) % g  # (class, group) of each example
    n = counts.to(torch.float64)[:, None]  # [K, 1]
    rest = n[:, None] - torch.bincount(cell, minlength=k * g).to(torch.float64).view(k, g, 1)  # [K, G, 1] without the group
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    count = torch.zeros((), dtype=torch.float64, device=x.device)
    rep_total = torch.zeros(g, dtype=torch.float64, device=x.device)
    rep_count = torch.zeros(g, dtype=torch.float64, device=x.device)
    step = max(1, KURTOSIS_ELEMENTS // max(x.shape[0], k * g))
    for start in range(0, x.shape[1], step):  # units are independent: blocks of columns bound the memory
        block = x[:, start : start + step].to(torch.float64)
        d = block.shape[1]
        mean = block.new_zeros(k, d).index_add_(0, inverse, block) / n  # [K, D]
        u = block - mean[inverse]
        u2 = u * u
        # the sums of u^p per (class, group), p = 1..4, and per class
        cells = [block.new_zeros(k * g, d).index_add_(0, cell, v).view(k, g, d) for v in (u, u2, u2 * u, u2 * u2)]
        s1, s2, s3, s4 = (c.sum(dim=1) for c in cells)
        kurt, valid = _kurtosis(n, s2, s4, mean)
        total += torch.where(valid, kurt.abs(), 0.0).sum()
        count += valid.sum()
        # without group j the class's mean moves by the mean m = a1 / rest of the rest's u, and the sums of
        # (u - m)^p over the rest follow from the class's sums a_p less the group's: with a1 = rest * m,
        # c2 = a2 - m a1 and c4 = a4 - 4 m a3 + 6 m^2 a2 - 3 m^3 a1 (Horner form below)
        a1, a2, a3, a4 = (s[:, None] - c for s, c in zip((s1, s2, s3, s4), cells, strict=True))
        m = a1 / rest
        ma1 = m * a1
        c2 = a2 - ma1
        c4 = a4 - m * (4 * a3 - m * (6 * a2 - 3 * ma1))
        kurt_g, valid_g = _kurtosis(rest, c2, c4, mean[:, None] + m)
        rep_total += torch.where(valid_g, kurt_g.abs(), 0.0).sum(dim=(0, 2))
        rep_count += valid_g.sum(dim=(0, 2))
    if count == 0:
        return nan, nan.clone()
    return total / count, replicate_standard_error(rep_total / rep_count, "jackknife")


class LayerReplacement:
    """Run a model with one layer's output replaced, computing the part before the layer once.

    Where ``torch.fx`` can split the model at ``layer`` (:func:`~lightning_interp.hooks.split_at`),
    :meth:`prepare` runs the part up to the layer once per probe batch and each call runs only the
    rest; otherwise each call is a whole forward pass with a forward hook that returns the replacement.
    ``layer="input"`` replaces the model input.

    Args:
        model: the classifier.
        layer: ``named_modules()`` path, or ``"input"``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> run = LayerReplacement(model, "1")
        >>> run.prepare(torch.randn(5, 3))
        >>> run(torch.zeros(5, 4)).shape
        torch.Size([5, 2])
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model, self.layer = model, layer
        self.split = LayerSplit(model, layer) if layer != INPUT else None
        self._inputs: Tensor | None = None
        self._rest: list[Tensor] = []

    def prepare(self, inputs: Tensor) -> None:
        """Fix the probe inputs (and compute what the rest of the model needs besides the layer).

        Also checks on (up to) 16 inputs that the split still computes the model's output
        (:meth:`~lightning_interp.hooks.LayerSplit.check`); if not, replacements go through a forward hook.
        """
        if self.split is not None:
            self.split.check(inputs[:16])
        self._inputs = inputs
        # only values other than the layer's output crossing the split (skip connections) need the part
        # before the layer to run on all the inputs
        split = self.split
        self._rest = split.prefix(inputs)[1:] if split is not None and split.is_split and split.crossing else []

    def __call__(self, replacement: Tensor) -> Tensor:
        """Logits with the layer's output replaced by ``replacement`` (the layer's output shape)."""
        if self._inputs is None:
            raise RuntimeError("call prepare(inputs) first")
        if self.layer == INPUT:
            return self.model(replacement.to(self._inputs.dtype).reshape(self._inputs.shape))
        if self.split is not None and self.split.is_split:
            return self.split.suffix(replacement, *self._rest)  # type: ignore[return-value]
        with replace(self.model, self.layer, lambda out: replacement.to(device=out.device, dtype=out.dtype).reshape(out.shape)):
            return self.model(self._inputs)


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------

#: Module types whose outputs ``layers="auto"`` reads (after the model input).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Softplus,
    nn.Hardswish,
    Quadratic,
)

#: The read-outs of every layer, in the order they are reported (each with a standard error).
READ_OUTS = ("acc_real", "acc_order2", "acc_order1", "acc_order0", "higher_order_gap", "non_gaussianity")


def resolve_layers(model: nn.Module, layers: str | Sequence[str] = "auto") -> list[str]:
    """The layers a measurement reads: ``"auto"`` is the input and every activation module (:data:`ACTIVATIONS`).

    Args:
        model: the classifier.
        layers: ``"auto"`` or ``named_modules()`` paths (``"input"`` for the model input).

    Raises:
        ValueError: a name that is none of the model's ``named_modules()`` paths (the message lists them).

    Example:
        >>> resolve_layers(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)))
        ['input', '1']
    """
    if layers == "auto":
        return [INPUT, *(name for name, m in model.named_modules() if name and isinstance(m, ACTIVATIONS))]
    names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        if name != INPUT:
            get_module(model, name)
    return names


def _hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Per example 1.0 where the prediction is the label, 0.0 where not, NaN where a logit is non-finite.

    ``argmax`` of NaN logits is the first NaN's class: it would count as a prediction of class 0.
    """
    hit = (logits.argmax(dim=-1) == labels).to(torch.float64)
    return torch.where(torch.isfinite(logits).all(dim=-1), hit, torch.full_like(hit, math.nan))


@dataclass
class CorrelationResult:
    """What :func:`measure_correlation` measured.

    Attributes:
        layers: per layer, :data:`READ_OUTS` by name, each ``(value, standard error)`` (0-d float64 tensors on
            the model's device). ``acc_real`` is the same for every layer.
        probe_size: the examples measured.
        seconds: wall time of the measurement without the surrogate draws, and of the draws (a cost model:
            the draws grow with the square of the examples, the rest linearly).
    """

    layers: dict[str, dict[str, tuple[Tensor, Tensor]]]
    probe_size: int
    seconds: tuple[float, float] = field(default=(0.0, 0.0), compare=False)

    def scalars(self) -> dict[str, tuple[Scalar, Scalar | None]]:
        """``probe_size`` and ``<layer>/<read-out>`` with standard errors (the keys the callback logs)."""
        out: dict[str, tuple[Scalar, Scalar | None]] = {"probe_size": (self.probe_size, None)}
        for layer, values in self.layers.items():
            out.update({f"{layer}/{name}": value for name, value in values.items()})
        return out

    def tables(self) -> dict[str, Table]:
        """None: the read-outs are all scalars."""
        return {}


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def measure_correlation(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    layers: str | Sequence[str] = "auto",
    replacements: dict[str, LayerReplacement] | None = None,
) -> CorrelationResult:
    """The correlation orders of every layer on labelled probe data.

    Per layer ``L``: ``acc_real``, the accuracies ``acc_order2``, ``acc_order1``, ``acc_order0`` with the
    layer's output replaced by one draw per example of its Gaussian surrogates (:func:`gaussian_surrogates`)
    and the forward pass continued from the layer (:class:`LayerReplacement`), ``higher_order_gap = acc_real -
    acc_order2`` and ``non_gaussianity`` (:func:`non_gaussianity`). The standard errors of the accuracies are
    over the examples (they carry the noise of the draw, one per example); the gap's is paired. A non-finite
    logit makes that example's hits NaN (so the accuracies and the gap are NaN), not a prediction of class 0.
    Run it on a model in eval mode (the callback does).

    Args:
        model: the classifier (logits ``[N, K]``).
        inputs: probe inputs ``[N, ...]`` (moved to the model's device and dtype).
        labels: their classes ``[N]``; each class present needs at least two examples.
        generator: a CPU ``torch.Generator`` for the surrogate draws (``None``: torch's global one).
        layers: ``"auto"`` (:func:`resolve_layers`) or ``named_modules()`` paths (``"input"``: the model input).
        replacements: a cache of :class:`LayerReplacement` by layer, filled and reused across calls on the same
            model (``torch.fx`` splits the model once).

    Returns:
        A :class:`CorrelationResult` on the model's device.

    Raises:
        ValueError: no labels, an unknown layer, or a class with fewer than two examples.
        TypeError: a layer whose output is not a float tensor.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x, y = torch.randn(64, 2), torch.arange(64) % 2
        >>> result = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0))
        >>> sorted(result.scalars())[:3]
        ['1/acc_order0', '1/acc_order1', '1/acc_order2']
    """
    if labels is None:
        raise ValueError("measure_correlation needs the class labels [N] of the inputs: measure_correlation(model, x, y)")
    draws_s = 0.0
    start = time.perf_counter()
    names = resolve_layers(model, layers)
    device, dtype = _device_dtype(model)
    x, y = inputs.to(device=device, dtype=dtype), labels.to(device)
    outputs, logits = layer_outputs(model, names, x)
    hit_real = _hits(logits, y)
    acc_real = mean_and_se(hit_real)
    cache = {} if replacements is None else replacements
    per_layer: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for layer in names:
        run = cache.get(layer)
        if run is None or run.model is not model:
            run = cache[layer] = LayerReplacement(model, layer)
        run.prepare(x)
        mark = time.perf_counter()
        # one surrogate draw per example: the spread over examples holds the probe's and the draw's noise
        draws = gaussian_surrogates(outputs[layer], y, (2, 1, 0), generator)
        draws_s += time.perf_counter() - mark
        hits = [_hits(run(d), y) for d in draws]
        values = {"acc_real": acc_real}
        values.update({f"acc_order{order}": mean_and_se(hit) for order, hit in zip((2, 1, 0), hits, strict=True)})
        # paired over the same examples: the SE of the per-example difference
        values["higher_order_gap"] = mean_and_se(hit_real - hits[0])
        # per-unit moments of the classes present only (memory at ImageNet scale), with a jackknife error bar
        values["non_gaussianity"] = non_gaussianity(outputs[layer], y)
        per_layer[layer] = values
    return CorrelationResult(per_layer, len(y), (time.perf_counter() - start - draws_s, draws_s))
