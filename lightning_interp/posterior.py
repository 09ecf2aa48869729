"""Posterior-gap metrics: how far a classifier's softmax is from the exact Bayesian posterior.

Reference:
    Yudi Xie, "How do we interpret the outputs of a neural network trained on classification?",
    ICLR 2025 Blogposts Track (https://hdl.handle.net/1721.1/159032).

Cross-entropy training is minimised by the Bayesian posterior,
``E_x[CE] = E_x[H(p(.|x))] + E_x[KL(p(.|x) || q(.|x))]``, so on a task whose generative model is known
the distance between the network's softmax ``q`` and the posterior ``p`` can be measured exactly.
The tasks with exact posteriors live in :mod:`lightning_interp.tasks`. This module provides

* :func:`measure_posterior_gap`, the one entry point: every read-out the callback logs, on a probe of a
  task whose exact posterior is known (:class:`PosteriorGapResult`; :func:`exact_posterior` computes that
  posterior once, to reuse);
* the functional gap measures :func:`posterior_gap`;
* the torchmetrics :class:`PosteriorGap` metric (imported on first use), which adds the excess cross-entropy, the accuracy
  gap, and the gap per bin of input density (*where* the network misses the posterior).

The module is pure torch: it never imports Lightning, and torchmetrics (which pulls torchvision, scipy and
matplotlib, seconds of import) only when :class:`PosteriorGap` is first used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_interp.results import Scalar, Table
from lightning_interp.tasks import GenerativeTask

if TYPE_CHECKING:
    from lightning_interp.posterior_metric import PosteriorGap

__all__ = [
    "GAP_MEASURES",
    "MEAN_READ_OUTS",
    "ExactPosterior",
    "PosteriorGap",
    "PosteriorGapResult",
    "batched_logits",
    "exact_posterior",
    "measure_posterior_gap",
    "per_sample_gap",
    "posterior_gap",
]

#: Names of the measures returned by :func:`posterior_gap`, in a fixed order.
GAP_MEASURES: tuple[str, ...] = ("kl", "reverse_kl", "js", "tv", "l2", "max_abs")


# ---------------------------------------------------------------------------------------------
# Gap measures
# ---------------------------------------------------------------------------------------------


def per_sample_gap(logits: Tensor, true_posterior: Tensor, log_target: bool = False) -> dict[str, Tensor]:
    """Every measure of :data:`GAP_MEASURES` per sample ``[N]`` (float64): :func:`posterior_gap` with ``reduction="none"``."""
    if not isinstance(logits, Tensor) or not isinstance(true_posterior, Tensor):
        raise TypeError("logits and true_posterior must be torch.Tensors")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {list(logits.shape)}")
    if true_posterior.shape != logits.shape:
        raise ValueError(f"true_posterior must have the shape of logits {list(logits.shape)}, got {list(true_posterior.shape)}")
    t = true_posterior.to(device=logits.device, dtype=torch.float64)
    q = torch.softmax(logits.to(torch.float64), dim=1)
    if log_target:
        lp, p = t, t.exp()
    else:
        p, lp = t, t.log()
    lq = torch.log_softmax(logits.to(torch.float64), dim=1)
    same = p == q  # exact zero where the distributions agree bit for bit

    def kl(a: Tensor, la: Tensor, lb: Tensor) -> Tensor:
        term = torch.where(a > 0, a * (la - lb), torch.zeros_like(a))
        return torch.where(same, torch.zeros_like(term), term).sum(dim=1)

    m = 0.5 * (p + q)
    lm = m.log()
    diff = p - q
    return {
        "kl": kl(p, lp, lq),
        "reverse_kl": kl(q, lq, lp),
        "js": 0.5 * kl(p, lp, lm) + 0.5 * kl(q, lq, lm),
        "tv": 0.5 * diff.abs().sum(dim=1),
        "l2": (diff * diff).sum(dim=1),
        "max_abs": diff.abs().max(dim=1).values,
    }


def posterior_gap(logits: Tensor, true_posterior: Tensor, log_target: bool = False, reduction: str = "mean") -> dict[str, Tensor]:
    """Distances between the softmax of ``logits`` and the true posterior.

    With ``q = softmax(logits)`` and ``p`` the true posterior, per sample:
    ``kl = KL(p||q)``, ``reverse_kl = KL(q||p)``, ``js`` (Jensen-Shannon, nats),
    ``tv = 0.5 * sum|p - q|``, ``l2 = sum (p - q)^2`` and ``max_abs = max_c |p - q|``.
    Accumulation is in float64 and every measure is exactly zero where ``q`` equals ``p``.

    Args:
        logits: network outputs ``[N, K]``.
        true_posterior: ``p(c|x)`` ``[N, K]`` (log-probabilities if ``log_target``).
        log_target: whether ``true_posterior`` holds log-probabilities (more precise in the tails).
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (per-sample values ``[N]``).

    Returns:
        A dict from the names in :data:`GAP_MEASURES` to float64 tensors on the device of ``logits``.

    Raises:
        TypeError: inputs that are not tensors.
        ValueError: shapes that are not matching ``[N, K]`` or an unknown reduction.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0]])
        >>> gap = posterior_gap(logits, torch.tensor([[0.75, 0.25]]))
        >>> round(gap["tv"].item(), 4)
        0.25
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    per = per_sample_gap(logits, true_posterior, log_target)
    if reduction == "none":
        return per
    if reduction == "sum":
        return {k: v.sum() for k, v in per.items()}
    return {k: v.mean() for k, v in per.items()}


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class ExactPosterior:
    """A task's exact posterior on a probe set (CPU tensors, as the task computes them).

    Attributes:
        inputs: ``x`` in the layout of ``task.sample`` ``[N, ...]``.
        labels: classes ``[N]`` (given, or drawn from ``p(c|x)``).
        log_posterior: ``log p(c|x)`` ``[N, K]``.
        log_density: ``log p(x)`` ``[N]``.
        density_edges: inner edges of the equal-count bins of ``log p(x)`` over the probe (``None``: no bins).
        grid: for a 1-D task, ``x`` points ``[G, 1]`` spanning the probe (5% padding), for the figure; else ``None``.
        grid_log_posterior: ``log p(c|x)`` on the grid ``[G, K]``.
        grid_log_density: ``log p(x)`` on the grid ``[G]``.
    """

    inputs: Tensor
    labels: Tensor
    log_posterior: Tensor
    log_density: Tensor
    density_edges: Tensor | None = None
    grid: Tensor | None = None
    grid_log_posterior: Tensor | None = None
    grid_log_density: Tensor | None = None


def exact_posterior(
    task: GenerativeTask,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    num_density_bins: int = 10,
    grid_size: int = 400,
) -> ExactPosterior:
    """The exact posterior of ``task`` on ``inputs``, the density bins of the probe, and the 1-D figure's grid.

    Args:
        task: the generative task the inputs follow.
        inputs: ``x`` ``[N, ...]`` (converted to the layout of ``task.sample``, float32 ``[N, dim]``).
        labels: classes ``[N]``; ``None``: drawn from ``p(c|x)`` with ``generator`` (so ``(x, c)`` follows the task
            when ``x`` follows its input distribution).
        generator: the CPU generator of the drawn labels (``None``: torch's global generator).
        num_density_bins: equal-count bins of ``log p(x)`` over the probe (0 or 1: none).
        grid_size: points of the grid of a 1-D task.

    Returns:
        An :class:`ExactPosterior`.
    """
    x = inputs.to(torch.float32).reshape(-1, task.dim)  # the layout of task.sample: float32 [N, dim]
    log_joint = task.log_joint(x)  # once: the density and the posterior both follow from it
    log_density = torch.logsumexp(log_joint, dim=1)
    log_posterior = log_joint - log_density[:, None]
    if labels is None:  # y ~ p(y|x): with x from the task's input distribution, (x, y) follows the task
        labels = torch.multinomial(log_posterior.exp(), 1, generator=generator)[:, 0]
    exact = ExactPosterior(inputs=x, labels=labels, log_posterior=log_posterior, log_density=log_density)
    if num_density_bins > 1:
        qs = torch.linspace(0, 1, num_density_bins + 1, dtype=torch.float64)[1:-1]
        exact.density_edges = torch.unique(torch.quantile(log_density, qs))
    if task.dim == 1:
        lo, hi = x.min().item(), x.max().item()
        pad = 0.05 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, grid_size)[:, None]
        exact.grid, exact.grid_log_posterior, exact.grid_log_density = grid, task.log_posterior(grid), task.log_density(grid)
    return exact


def batched_logits(model: nn.Module, inputs: Tensor, input_shape: tuple[int, ...], batch_size: int = 8192) -> Tensor:
    """``model`` on ``inputs`` reshaped to ``[n, *input_shape]``, in batches, on the model's device and dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    chunks = [
        model(inputs[i : i + batch_size].reshape(-1, *input_shape).to(device=device, dtype=dtype))
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(chunks)


#: The measures of :func:`measure_posterior_gap` that are means over the probe (with a standard error).
MEAN_READ_OUTS: tuple[str, ...] = (*GAP_MEASURES, "excess_ce", "accuracy", "bayes_accuracy", "accuracy_gap")


@dataclass
class PosteriorGapResult:
    """What :func:`measure_posterior_gap` measured (tensors on the model's device).

    Attributes:
        gap: :meth:`PosteriorGap.compute` on the probe (with labels, and per density bin where there are bins).
        logits: the model's logits on the probe ``[N, K]``.
        exact: the task's exact posterior on the probe.
        grid_logits: the logits on :attr:`ExactPosterior.grid` (``None`` without a grid).
    """

    gap: dict[str, Tensor]
    logits: Tensor
    exact: ExactPosterior
    grid_logits: Tensor | None = None

    def scalars(self) -> dict[str, tuple[Scalar, Scalar | None]]:
        """The means over the probe of :data:`MEAN_READ_OUTS` with standard errors, and the per-bin summaries.

        ``max_abs`` of :func:`posterior_gap` is logged as ``mean_max_abs`` (the mean of the per-example
        ``max_c |p - q|``); ``max_abs`` is the worst ``|p(c|x) - q(c|x)|`` over the probe (no error bar: a maximum);
        with density bins, ``kl_low_density`` / ``tv_low_density`` are the gaps in the lowest-density bin.
        """
        gap = self.gap
        out: dict[str, tuple[Scalar, Scalar | None]] = {}
        for k in MEAN_READ_OUTS:
            out["mean_max_abs" if k == "max_abs" else k] = (gap[k], gap[f"{k}_se"])
        out["max_abs"] = (gap["max_abs_worst"], None)
        if "kl_by_density" in gap:
            for k in ("kl", "tv"):
                out[f"{k}_low_density"] = (gap[f"{k}_by_density"][0], gap[f"{k}_se_by_density"][0])
        return out

    def tables(self) -> dict[str, Table]:
        """``by_density``: per input-density bin, its ``log p(x)`` range, count, mean gaps and KL / TV errors."""
        gap, edges = self.gap, self.exact.density_edges
        if "kl_by_density" not in gap or edges is None:
            return {}
        lows = [-math.inf, *edges.tolist()]
        highs = [*edges.tolist(), math.inf]
        rows = [
            [
                i,
                lows[i],
                highs[i],
                int(gap["count_by_density"][i]),
                *(float(gap[f"{k}_by_density"][i]) for k in GAP_MEASURES),
                *(float(gap[f"{k}_se_by_density"][i]) for k in ("kl", "tv")),
            ]
            for i in range(len(lows))
        ]
        means = ["mean_max_abs" if k == "max_abs" else k for k in GAP_MEASURES]
        return {"by_density": (["bin", "log_density_low", "log_density_high", "count", *means, "kl_se", "tv_se"], rows)}


def measure_posterior_gap(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    task: GenerativeTask,
    num_density_bins: int = 10,
    batch_size: int = 8192,
    grid_size: int = 400,
    exact: ExactPosterior | None = None,
) -> PosteriorGapResult:
    """How far ``model``'s softmax ``q(c|x)`` is from ``task``'s exact posterior ``p(c|x)`` on a probe (docs/posterior.md).

    The probe's read-outs (:meth:`PosteriorGapResult.scalars`): the means over the probe of ``kl``, ``reverse_kl``,
    ``js``, ``tv``, ``l2``, ``mean_max_abs`` (:func:`posterior_gap`), ``excess_ce`` (cross-entropy minus the
    posterior's conditional entropy, paired on the examples), ``accuracy``, ``bayes_accuracy`` and ``accuracy_gap``,
    each with its standard error; ``max_abs``, the worst ``|p - q|``; and with density bins ``kl_low_density`` /
    ``tv_low_density``, the gap in the lowest of ``num_density_bins`` equal-count bins of ``log p(x)``, where a
    network misses the posterior when data is scarce. Accumulated in float64 by :class:`PosteriorGap`.

    Args:
        model: a classifier of ``[N, *task.input_shape]`` inputs returning ``[N, K]`` logits (in ``eval()``).
        inputs: ``x`` ``[N, ...]`` following the task's input distribution.
        labels: classes ``[N]``; ``None``: drawn from ``p(c|x)`` with ``generator``.
        generator: the CPU generator of drawn labels (``None``: torch's global generator).
        task: the generative task (``K = task.num_classes``).
        num_density_bins: equal-count input-density bins (0 or 1: no per-bin gap).
        batch_size: forward-pass batch size.
        grid_size: points of the ``x`` grid of a 1-D task (for the figure).
        exact: :func:`exact_posterior` of these inputs, to reuse (then ``inputs``, ``labels``, ``generator``,
            ``num_density_bins`` and ``grid_size`` are its own); ``None``: computed here.

    Returns:
        A :class:`PosteriorGapResult`.

    Raises:
        TypeError: ``task`` is not a :class:`~lightning_interp.tasks.GenerativeTask`.
        ValueError: logits that are not ``[N, task.num_classes]``.

    Example:
        >>> from lightning_interp.models import MLPClassifier
        >>> from lightning_interp.results import flat_scalars
        >>> from lightning_interp.tasks import xie_task
        >>> task = xie_task(1)
        >>> x, y = task.sample(64, torch.Generator().manual_seed(0))
        >>> result = measure_posterior_gap(MLPClassifier(1, 2).eval(), x, y, task=task, num_density_bins=4)
        >>> list(flat_scalars(result))[:4]
        ['kl', 'kl_se', 'reverse_kl', 'reverse_kl_se']
    """
    if not isinstance(task, GenerativeTask):
        raise TypeError(f"task must be a lightning_interp.tasks.GenerativeTask, got {type(task).__name__}")
    if exact is None:
        exact = exact_posterior(task, inputs, labels, generator=generator, num_density_bins=num_density_bins, grid_size=grid_size)
    from lightning_interp.posterior_metric import PosteriorGap  # torchmetrics: seconds of import, on first use

    with torch.no_grad():  # read-outs, not a loss: no graph
        logits = batched_logits(model, exact.inputs, task.input_shape, batch_size)
    if logits.ndim != 2 or logits.shape[1] != task.num_classes:
        raise ValueError(
            f"the model returns logits of shape {list(logits.shape)}, not [N, {task.num_classes}] for the task's "
            f"{task.num_classes} classes; set the model's number of classes to task.num_classes"
        )
    device = logits.device
    # every process holds the whole probe: no sync across processes (it would count each example twice)
    metric = PosteriorGap(log_target=True, density_edges=exact.density_edges, sync_on_compute=False).to(device)
    metric.update(
        logits, exact.log_posterior.to(device), target=exact.labels.to(device), log_density=exact.log_density.to(device)
    )
    gap = metric.compute()
    grid_logits = None
    if exact.grid is not None:
        with torch.no_grad():
            grid_logits = batched_logits(model, exact.grid, task.input_shape, batch_size)
    return PosteriorGapResult(gap=gap, logits=logits, exact=exact, grid_logits=grid_logits)


def __getattr__(name: str) -> Any:
    """Import the torchmetrics metric :class:`PosteriorGap` on first use (PEP 562)."""
    if name == "PosteriorGap":
        from lightning_interp.posterior_metric import PosteriorGap

        globals()[name] = PosteriorGap
        return PosteriorGap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
