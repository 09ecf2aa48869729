"""The ablation's entry function, :func:`measure_ablation`, its result, and the sizes a budget scales it to.

Part of :mod:`lightning_interp.ablation`. :func:`measure_ablation` fits :class:`BayesianAblation` on every layer and
computes every read-out :class:`~lightning_interp.callbacks.AblationProbeCallback` logs; the callback draws the
probe, calls it and logs :func:`~lightning_interp.results.flat_scalars` of the result. :func:`budget_sizes` and
:func:`budget_work_floor` are the sizes (MCMC steps, probe examples) a measurement scaled down by an overhead
budget runs at. Pure torch: no Lightning, no matplotlib (the figures are :mod:`lightning_interp.plotting`'s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_interp.ablation.core import MAX_EXACT_UNITS, BayesianAblation, choose_method, probe_tensors
from lightning_interp.ablation.likelihood import REST_PER_CHAIN, Likelihood
from lightning_interp.ablation.masked import MaskedForward
from lightning_interp.ablation.readouts import AblationFit, effective_sample_size, summarize
from lightning_interp.results import Scalar, Table

__all__ = [
    "MIN_KEPT_STEPS",
    "MIN_PROBE",
    "AblationResult",
    "budget_sizes",
    "budget_work_floor",
    "layer_readouts",
    "measure_ablation",
    "round_robin_order",
    "step_rows",
]

#: Fewest kept MCMC steps a measurement scaled down by the budget runs (or a quarter of the kept steps,
#: whichever is larger): a quarter of the steps doubles the jackknife error bars, and below ~100 steps a
#: chain proposes each unit of a 32-unit layer about 3 times, too few for the Rao-Blackwellised estimates.
MIN_KEPT_STEPS = 100
#: Fewest probe examples a measurement scaled down by the budget uses (and at least one per class present,
#: so that every class task keeps examples): 64 examples of 10 classes leave ~6 per class task, whose
#: smoothed sensitivity then still moves in steps of 1/8 rather than collapsing to the prior.
MIN_PROBE = 64

Tasks = Literal["classes", "all"] | Sequence[int]


@dataclass
class AblationResult:
    """What :func:`measure_ablation` returns: the fit of every layer and its read-outs.

    Attributes:
        results: the :class:`AblationFit` of every layer, by name (tensors on the model's device).
        readouts: ``{name: (value, se)}``, as :meth:`scalars` gives them.
        num_chains: MCMC chains per task.
        num_steps: MCMC steps per chain (burn-in included).
        probe_size: probe examples.
        top_units: rows of the table of most informative units.
        class_names: names of the classes, to label the tasks (``None``: ``"class <k>"``).
    """

    results: dict[str, AblationFit]
    readouts: dict[str, tuple[Scalar, Scalar | None]]
    num_chains: int
    num_steps: int
    probe_size: int
    top_units: int = 20
    class_names: list[str] | None = None

    def scalars(self) -> dict[str, tuple[Scalar, Scalar | None]]:
        """``num_steps`` and ``probe_size`` (sizes, no SE), then per layer ``<layer>/<name>``: :func:`layer_readouts`."""
        return dict(self.readouts)

    def tables(self) -> dict[str, Table]:
        """``top_units``: the ``top_units`` (unit, task) pairs of every layer with the most information."""
        rows = []
        for layer, r in self.results.items():
            info = r.information_bits.double().cpu()
            labels = self.task_labels(r)
            for idx in info.flatten().argsort(descending=True)[: self.top_units].tolist():
                t, unit = divmod(idx, info.shape[1])
                rows.append([layer, unit, labels[t], float(r.importance[t, unit]), float(info[t, unit])])
        return {"top_units": (["layer", "unit", "task", "importance", "information_bits"], rows)}

    def warnings(self, min_ess: float = 100.0, suggest_steps: int | None = None) -> dict[str, str]:
        """Warnings by tag: an MCMC ``ess`` below ``min_ess``; left-out pairs that could carry more than a bit.

        The second fires where ``manifold_complexity_left_out`` exceeds 1 bit and 3 standard errors of the
        manifold complexity (the bound is loose: a unit weakly tied to many others has a large one).
        ``suggest_steps``: the ``num_steps`` the ESS warning suggests (default ten times this run's).
        """
        out, scalars = {}, self.scalars()
        run = f"{self.num_chains} chains x {self.num_steps} steps"
        for layer, r in self.results.items():
            if r.method != "mcmc":
                continue
            ess, median = float(scalars[f"{layer}/ess"][0]), float(scalars[f"{layer}/ess_median"][0])
            if f"{layer}/manifold_complexity_left_out" in scalars and r.complexity_pairs is not None:
                left_out, se = scalars[f"{layer}/manifold_complexity_left_out"][0], scalars[f"{layer}/manifold_complexity"][1]
                if float(left_out) > max(1.0, 3 * float(se if se is not None else math.nan)):
                    out[f"complexity-{layer}"] = (
                        f"layer {layer!r}: the manifold complexity counts {float(r.complexity_pairs.double().mean()):.0f} "
                        f"unit pairs (mean over tasks); the dependent pairs whose information is below the noise of {run} "
                        f"are left out, and could add up to {float(left_out):.3g} bits (manifold_complexity_left_out, a "
                        "loose upper bound): read the value as a lower estimate, or raise num_steps."
                    )
            if ess < min_ess:  # (False for NaN)
                out[f"ess-{layer}"] = (
                    f"layer {layer!r}: the MCMC effective sample size is {ess:.0f} (median over units {median:.0f}), "
                    f"below min_ess={min_ess:g}, with {run}: the read-outs are noisy (their _se says how much; the "
                    "manifold complexity's is often as large as the value). Raise num_steps / num_chains (e.g. "
                    f"num_steps={suggest_steps or self.num_steps * 10}), or probe a layer of at most {MAX_EXACT_UNITS} "
                    "units (exact enumeration)."
                )
        return out

    def task_labels(self, r: AblationFit) -> list[str]:
        """The tasks of a result as figures and tables name them: class names where ``class_names`` has them."""
        if not self.class_names or not r.task_classes:
            return list(r.tasks)
        names = self.class_names
        return [names[c] if c < len(names) else name for c, name in zip(r.task_classes, r.tasks, strict=True)]


def layer_readouts(r: AblationFit, informative_bits: float, prior_keep: float) -> dict[str, tuple[Tensor, Tensor | None]]:
    """The read-outs of one layer's fit, ``{name: (value, se)}``.

    :func:`summarize` (``distributedness``, ``manifold_complexity``, ``polysemanticity``, ``max_importance``,
    ``informative_units`` with SEs; ``full_accuracy`` without) and, for MCMC runs, the diagnostics (no SE):
    ``acceptance_rate`` (mean over tasks), ``ess`` and ``ess_median`` (smallest and median
    :func:`effective_sample_size` over tasks and units; where no unit's estimate has a resolvable error, the
    draws, or NaN for a fit on non-finite logits), ``ess_indicator`` (the chains' smallest ESS of a 0/1 keep
    indicator) and ``manifold_complexity_left_out`` (mean over tasks of the bound on what the left-out pairs carry).
    """
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name, (value, se) in summarize(r, informative_bits, prior_keep).items():
        out[name] = (value, None if name == "full_accuracy" else se)
    if r.method == "mcmc":
        ess = effective_sample_size(r)  # [T, d]
        ess = ess[~ess.isnan()]
        if not ess.numel():
            bound = math.nan if r.full_accuracy.isnan().any() else float(r.num_draws)
            ess = torch.full((1,), bound, dtype=torch.float64, device=r.importance.device)
        assert r.acceptance_rate is not None and r.ess_per_unit is not None
        out["acceptance_rate"] = (r.acceptance_rate.mean(), None)
        out["ess"] = (ess.min(), None)
        out["ess_median"] = (ess.median(), None)
        out["ess_indicator"] = (r.ess_per_unit.min(), None)
        if r.complexity_left_out_bits is not None and r.complexity_pairs is not None:
            out["manifold_complexity_left_out"] = (r.complexity_left_out_bits.mean(), None)
    return out


def measure_ablation(
    model: nn.Module,
    inputs: Tensor | Iterable,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    layers: str | Sequence[str],
    tasks: Tasks = "classes",
    method: Literal["auto", "exact", "mcmc"] = "auto",
    prior_keep: float = 0.5,
    likelihood: Likelihood = "balanced",
    rest_per_chain: int = REST_PER_CHAIN,
    num_chains: int = 8,
    num_steps: int = 1000,
    burn_in: int = 100,
    max_batch: int = 65536,
    informative_bits: float = 0.05,
    top_units: int = 20,
    class_names: Sequence[str] | None = None,
    on_step: Callable[[], None] | None = None,
    forwards: Mapping[str, MaskedForward] | None = None,
) -> AblationResult:
    """Bayesian ablation of every layer on a labelled probe, with every read-out the callback logs.

    Each layer is fitted by :class:`BayesianAblation` (exact enumeration or MCMC: :func:`choose_method`) and read
    out by :func:`layer_readouts`. The model is used as it is (put it in eval mode); floating inputs are cast to
    its dtype and moved to its device.

    Args:
        model: a classifier returning logits.
        inputs: probe inputs ``[N, ...]``, or a dataloader of ``(inputs, labels)`` batches.
        labels: class labels ``[N]`` (required with tensor inputs).
        generator: every layer's fit starts from a copy of its state (the same draws for every layer; the
            generator itself is not advanced). ``None``: seeded with 0.
        layers: ``named_modules()`` path(s) of the layers.
        tasks: ``"classes"``, ``"all"`` or a list of class indices (:meth:`BayesianAblation.fit`).
        method: ``"auto"``, ``"exact"`` or ``"mcmc"``.
        prior_keep: prior probability that a unit is kept.
        likelihood: ``"balanced"`` or ``"sensitivity"`` (:class:`BayesianAblation`).
        rest_per_chain: MCMC, balanced likelihood: the other examples each chain of a class task scores.
        num_chains: MCMC chains per task.
        num_steps: MCMC steps per chain (burn-in included).
        burn_in: MCMC burn-in steps.
        max_batch: bound on ``masks * examples`` rows per forward pass.
        informative_bits: the threshold of ``informative_units`` (:func:`~lightning_interp.ablation.informative_units`).
        top_units: rows of the table of most informative units.
        class_names: names of the classes, to label the tasks in tables and figures.
        on_step: called after every MCMC step (no argument), e.g. to advance a progress bar.
        forwards: a :class:`MaskedForward` per layer of this model (built with ``max_batch``) to reuse, so that
            repeated measurements trace each ``torch.fx`` split once; missing layers get a new one.

    Returns:
        An :class:`AblationResult` (tensors on the model's device).

    Raises:
        ValueError: an unknown layer, method or likelihood, counts out of range, labels outside the model's
            classes, a task without examples, ``"exact"`` with more than 16 units.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
        >>> x = torch.randn(64, 4)
        >>> m = measure_ablation(model, x, model(x).argmax(1), layers="1")
        >>> m.results["1"].method, sorted(m.scalars())[:3]
        ('exact', ['1/distributedness', '1/full_accuracy', '1/informative_units'])
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers must name at least one layer (named_modules() paths)")
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None and param.is_floating_point() else (None, None)
    x, y = probe_tensors(model, inputs, labels)
    if dtype is not None and x.is_floating_point():
        x = x.to(device=device, dtype=dtype)
    state = (generator if generator is not None else torch.Generator().manual_seed(0)).get_state()
    readouts: dict[str, tuple[Scalar, Scalar | None]] = {"num_steps": (float(num_steps), None)}
    readouts["probe_size"] = (float(len(y)), None)
    results: dict[str, AblationFit] = {}
    for layer in names:
        g = torch.Generator()
        g.set_state(state)
        ablation = BayesianAblation(
            model,
            layer,
            method=method,
            prior_keep=prior_keep,
            num_chains=num_chains,
            num_steps=num_steps,
            burn_in=burn_in,
            generator=g,
            max_batch=max_batch,
            likelihood=likelihood,
            rest_per_chain=rest_per_chain,
            forward=(forwards or {}).get(layer),
        )
        ablation.on_step = on_step
        results[layer] = r = ablation.fit(x, y, tasks=tasks)
        for name, value in layer_readouts(r, informative_bits, prior_keep).items():
            readouts[f"{layer}/{name}"] = value
    return AblationResult(
        results, readouts, num_chains, num_steps, len(y), top_units, list(class_names) if class_names is not None else None
    )


# ---------------------------------------------------------------------------------------------
# the sizes of a measurement scaled down by an overhead budget
# ---------------------------------------------------------------------------------------------


def round_robin_order(labels: Tensor) -> Tensor:
    """The examples in class round-robin order: any first ``m >= classes`` of them cover every class.

    Example:
        >>> round_robin_order(torch.tensor([0, 0, 0, 1, 2, 2])).tolist()
        [0, 3, 4, 1, 5, 2]
    """
    y = labels.cpu()
    rank = torch.zeros_like(y)
    for c in y.unique():
        where = (y == c).nonzero().flatten()
        rank[where] = torch.arange(where.numel())
    return torch.argsort(rank * (int(y.max()) + 1) + y, stable=True)


def step_rows(labels: Tensor, tasks: Tasks, num_chains: int, likelihood: str, rest_per_chain: int) -> int:
    """(example, mask) rows of an MCMC step on a probe with these labels, all chains together.

    As :meth:`BayesianAblation.rows_per_step`, without its checks: every chain of a task scores the task's
    examples and, with the balanced likelihood, up to ``rest_per_chain`` others.

    Example:
        >>> step_rows(torch.tensor([0, 0, 1]), "classes", num_chains=2, likelihood="balanced", rest_per_chain=64)
        12
    """
    labels = labels.cpu()
    if tasks == "all":
        return num_chains * len(labels)
    classes = labels.unique().tolist() if tasks == "classes" else list(tasks)
    own = torch.stack([(labels == c).sum() for c in classes])
    rest = (len(labels) - own).clamp_max(rest_per_chain) if likelihood == "balanced" else torch.zeros_like(own)
    return num_chains * int((own + rest).sum())


def _kept_floor(num_steps: int, burn_in: int) -> int:
    kept = num_steps - burn_in
    return min(kept, max(MIN_KEPT_STEPS, math.ceil(kept / 4)))


def _probe_floor(labels: Tensor) -> int:
    return min(len(labels), max(MIN_PROBE, int(labels.unique().numel())))


def budget_sizes(
    labels: Tensor,
    work: float,
    *,
    num_steps: int,
    burn_in: int,
    num_chains: int,
    tasks: Tasks,
    likelihood: str,
    rest_per_chain: int,
) -> tuple[int, int]:
    """``(num_steps, probe examples)`` of a measurement at ``work`` (the fraction of a full one) on a probe of ``labels``.

    The cost of a measurement is taken as proportional to its MCMC steps times the rows of a step. The kept steps
    are scaled first, to ``work * num_steps - burn_in`` (down to :data:`MIN_KEPT_STEPS` or a quarter of them; the
    burn-in stays: mixing does not get faster); below that the probe (down to :data:`MIN_PROBE` examples, at least
    one per class, the first ones of :func:`round_robin_order` so every class task keeps examples), to the largest
    size whose rows per step leave the cost at most ``work`` of a full one.
    """
    n = len(labels)
    if work >= 1.0:
        return num_steps, n
    floor = _kept_floor(num_steps, burn_in)
    # the kept steps that make burn-in + kept = work * num_steps (the burn-in is paid at any size)
    kept = min(num_steps - burn_in, max(floor, math.ceil(work * num_steps - burn_in)))
    steps = burn_in + kept
    if kept > floor:
        return steps, n
    ordered = labels.cpu()[round_robin_order(labels)]

    def rows(size: int) -> int:
        return step_rows(ordered[:size], tasks, num_chains, likelihood, rest_per_chain)

    left = work * num_steps / steps  # the share of the rows per step that the budget still allows
    full_rows, low, high = rows(n), _probe_floor(labels), n
    while low < high:  # the largest size whose rows fit (rows grow with the size)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if rows(mid) <= left * full_rows else (low, mid - 1)
    return steps, low


def budget_work_floor(
    labels: Tensor,
    units: Iterable[int],
    *,
    method: str,
    num_steps: int,
    burn_in: int,
    num_chains: int,
    tasks: Tasks,
    likelihood: str,
    rest_per_chain: int,
) -> float:
    """The fraction of a full measurement at the floors (:data:`MIN_KEPT_STEPS`, :data:`MIN_PROBE`; :func:`budget_sizes`).

    ``(burn_in + kept floor) / num_steps`` times the rows of a step on the probe floor over those on the full probe
    (with the balanced likelihood each chain also scores up to ``rest_per_chain`` other examples, so the rows shrink
    less than the probe). Where a layer of ``units`` (the layers' unit counts) is enumerated exactly, the probe
    floor's share of the probe.
    """
    n, floor = len(labels), _probe_floor(labels)
    if any(choose_method(d, method, num_chains, num_steps) == "exact" for d in units):
        return min(1.0, floor / n)
    ordered = labels.cpu()[round_robin_order(labels)]
    rows = step_rows(ordered[:floor], tasks, num_chains, likelihood, rest_per_chain) / max(
        1, step_rows(ordered, tasks, num_chains, likelihood, rest_per_chain)
    )
    return min(1.0, (burn_in + _kept_floor(num_steps, burn_in)) / num_steps * rows)
