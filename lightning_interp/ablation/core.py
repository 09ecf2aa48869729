"""The Bayesian ablation engine: :class:`BayesianAblation` (probe, tasks, exact enumeration or MCMC, read-outs).

Part of :mod:`lightning_interp.ablation` (the method, its definitions and references are described there and
in docs/ablation.md). Which inference a layer gets is decided in one place, :func:`choose_method`. Pure torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.ablation.likelihood import (
    LIKELIHOODS,
    REST_PER_CHAIN,
    Likelihood,
    MaskOutcomes,
    TaskSet,
    mask_log_posterior,
    rest_per_task,
)
from lightning_interp.ablation.masked import MaskedForward, all_masks, predicted_class
from lightning_interp.ablation.mcmc import ChainScorer, MetropolisChains, chain_sums
from lightning_interp.ablation.readouts import (
    LOG2,
    AblationFit,
    Estimate,
    binary_entropy_bits,
    distributedness,
    information_bits,
    polysemanticity,
)
from lightning_interp.checks import check_choice, check_int, check_number
from lightning_interp.hooks import get_module
from lightning_interp.stats import replicate_standard_error as replicate_se

__all__ = ["AUTO_EXACT_MASKS", "MAX_EXACT_UNITS", "BayesianAblation", "choose_method", "probe_tensors"]

#: Most units a layer may have for exact enumeration of its ``2^d`` masks.
MAX_EXACT_UNITS = 16
#: ``method="auto"`` enumerates at least this many masks (d <= 12) exactly rather than sampling.
AUTO_EXACT_MASKS = 4096
#: bounds on what one block of class tasks holds during MCMC: the chains' masks (bool) and the rows' logits
_MAX_TRACE_BYTES = 1 << 28
_MAX_LOGIT_BYTES = 1 << 28


def choose_method(d: int, method: str, num_chains: int, num_steps: int, layer: str = "") -> str:
    """``"exact"`` or ``"mcmc"`` for a layer of ``d`` units: the one place the choice is made.

    ``"auto"`` enumerates exactly when ``d <= 12``, or when ``d <= 16`` and ``2^d`` is at most the MCMC budget
    ``num_chains * (num_steps + 1)`` masks; ``"exact"`` and ``"mcmc"`` are taken as asked.

    Args:
        d: the layer's units.
        method: ``"auto"``, ``"exact"`` or ``"mcmc"``.
        num_chains: MCMC chains per task.
        num_steps: MCMC steps per chain.
        layer: the layer's name, for the error message.

    Raises:
        ValueError: ``"exact"`` with more than :data:`MAX_EXACT_UNITS` units.

    Example:
        >>> [choose_method(d, "auto", num_chains=8, num_steps=1000) for d in (12, 14)], choose_method(14, "auto", 16, 1100)
        (['exact', 'mcmc'], 'exact')
    """
    if method == "auto":
        budget = max(AUTO_EXACT_MASKS, num_chains * (num_steps + 1))
        method = "exact" if d <= MAX_EXACT_UNITS and 2**d <= budget else "mcmc"
    if method == "exact" and d > MAX_EXACT_UNITS:
        raise ValueError(
            f"method='exact' enumerates 2^d masks and needs d <= {MAX_EXACT_UNITS}, but layer {layer!r} has {d} units; "
            "use method='mcmc' or 'auto'"
        )
    return method


def probe_tensors(model: nn.Module, inputs: Tensor | Iterable, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Probe inputs and long labels on the model's device, from tensors or a dataloader of ``(inputs, labels)`` batches.

    Raises:
        ValueError: tensor inputs without labels, an empty dataloader, inputs and labels of different lengths.
        TypeError: a dataloader whose batches are not ``(inputs, labels)``.
    """
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
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return x.to(device), y.to(device).long()


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
        forward: the :class:`MaskedForward` of this model's layer to reuse (built with ``max_batch``; its
            ``torch.fx`` split is traced once for many fits); ``None``: a new one (with ``split``).

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
        forward: MaskedForward | None = None,
    ) -> None:
        if method not in ("auto", "exact", "mcmc"):
            raise ValueError(f"method must be 'auto', 'exact' or 'mcmc', got {method!r}")
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_number("prior_keep", prior_keep, 0, 1, open_low=True, open_high=True)
        if num_steps <= burn_in or num_chains < 1:
            raise ValueError("num_steps must exceed burn_in and num_chains must be >= 1")
        check_int("num_bootstrap", num_bootstrap, 0)
        check_int("rest_per_chain", rest_per_chain, 1)
        get_module(model, layer)
        self.model, self.layer, self.method, self.likelihood = model, layer, method, likelihood
        self.prior_keep, self.num_chains, self.num_steps, self.burn_in = prior_keep, num_chains, num_steps, burn_in
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.max_batch, self.top_k, self.num_bootstrap, self.rest_per_chain = max_batch, top_k, num_bootstrap, rest_per_chain
        self.progress = progress
        #: Called after every MCMC step (no argument), e.g. to advance a progress bar while the chains run.
        self.on_step: Callable[[], None] | None = None
        if forward is not None and (forward.model is not model or forward.layer != layer or forward.max_batch != max_batch):
            raise ValueError(
                f"forward evaluates layer {forward.layer!r} of another model or with another max_batch; pass the "
                f"MaskedForward of this model's layer {layer!r} with max_batch={max_batch}, or None"
            )
        self.forward = forward if forward is not None else MaskedForward(model, layer, max_batch=max_batch, split=split)

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self,
        inputs: Tensor | Iterable,
        labels: Tensor | None = None,
        tasks: Literal["classes", "all"] | Sequence[int] = "classes",
    ) -> AblationFit:
        """Run the inference on probe data: score masks, the posterior of every task, its read-outs.

        Args:
            inputs: probe inputs ``[N, ...]``, or a dataloader of ``(inputs, labels)`` batches.
            labels: class labels ``[N]`` (with tensor inputs).
            tasks: ``"classes"`` (one task per class present: its examples classified correctly and, with
                the balanced likelihood, the others not classified as it), ``"all"`` (every example
                classified correctly), or a list of class indices.

        Returns:
            An :class:`AblationFit` (tensors on the model's device).

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
        full = predicted_class(full_logits)
        full_accuracy = MaskOutcomes(full, task_set, two_sided).probability()[0]
        if method == "exact":
            estimate = self._exact(prepared, task_set, two_sided, d)
        else:
            blocks = self._task_blocks(task_set, two_sided, d)
            head = self.forward.linear_head(prepared)
            chains = self.chains()
            parts = []
            for block in tqdm(blocks, desc=f"ablation {self.layer}", unit="block", disable=not self.progress or len(blocks) < 2):
                tasks_now = task_set.subset(block) if len(blocks) > 1 else task_set
                scorer = ChainScorer(
                    self.forward, prepared, tasks_now, self.num_chains, self.rest_per_chain, two_sided, self.generator, head
                )
                parts.append(chains.sample(scorer, len(tasks_now.names), d, x.device))
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
        # the pilot's own sampler (its steps, no burn-in, its own generator): this engine's settings are untouched
        pilot = MetropolisChains(self.num_chains, max(4, pilot_steps), 0, self.prior_keep, torch.Generator().manual_seed(0))
        chains, rest = self.num_chains, self.rest_per_chain
        scorer = ChainScorer(self.forward, prepared, block, chains, rest, two_sided, pilot.generator, head)
        once = time.perf_counter() - start
        step = pilot.run_chains(scorer, len(block.names), d, x.device).seconds_per_step
        # the read-outs of one task on synthetic chains of the fit's size
        g, c, kept = torch.Generator().manual_seed(1), self.num_chains, self.num_steps - self.burn_in
        flips = torch.randint(0, d, (1, c, kept), generator=g).to(x.device)
        conds = torch.rand(1, c, kept, generator=g, dtype=torch.float64).to(x.device)
        traces = (torch.randint(0, 256, (1, c, kept, d), generator=g, dtype=torch.uint8) < 128).to(x.device)
        begin = time.perf_counter()
        sums = chain_sums(flips, conds, traces, torch.zeros(1, dtype=torch.float64, device=x.device), 0.0)
        self.chains().estimate(sums, scorer, 1, x.device)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        readout = time.perf_counter() - begin
        return once + step * self.num_steps * len(task_set.names) / len(block.names) + readout * len(task_set.names)

    def _task_blocks(self, tasks: TaskSet, two_sided: bool, d: int) -> list[list[int]]:
        """Consecutive groups of tasks whose chains run together, each within the memory bounds.

        A block holds its chains' masks after every kept step (``chains * steps * d`` bytes per task) and,
        with an affine head, its rows' logits (``rows * K`` float64, three copies at a step).
        """
        kept = self.num_steps - self.burn_in
        per_task_trace = self.num_chains * kept * d
        rows = self.num_chains * (tasks.member.sum(dim=0) + rest_per_task(tasks, self.rest_per_chain, two_sided))
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
        return self.num_chains * int((own + rest_per_task(task_set, self.rest_per_chain, two_sided)).sum())

    def _probe(self, inputs: Tensor | Iterable, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        return probe_tensors(self.model, inputs, labels)

    def _num_classes(self, prepared: list[Tensor]) -> int:
        if self.forward.suffix is not None:
            return int(self.forward.suffix(*[v[:1] for v in prepared]).shape[-1])
        return int(self.model(prepared[0][:1]).shape[-1])

    def _tasks(self, labels: Tensor, tasks: str | Sequence[int], num_classes: int) -> TaskSet:
        """Task names, membership ``[N, T]`` and classes: one task per class, or ``"all"``."""
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) (the model's classes), got {labels.min().item()}..{labels.max().item()}"
            )
        if tasks == "all":
            return TaskSet(["all"], torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device), [], labels, num_classes)
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
        return TaskSet([f"class {c}" for c in classes], member, classes, labels, num_classes)

    def _method(self, d: int) -> str:
        """``"exact"`` or ``"mcmc"`` for a layer of ``d`` units (:func:`choose_method`)."""
        return choose_method(d, self.method, self.num_chains, self.num_steps, self.layer)

    def chains(self) -> MetropolisChains:
        """The Metropolis sampler at this engine's settings (its generator and :attr:`on_step`)."""
        return MetropolisChains(self.num_chains, self.num_steps, self.burn_in, self.prior_keep, self.generator, self.on_step)

    # ------------------------------------------------------------------ exact enumeration
    def _exact(self, prepared: list[Tensor], tasks: TaskSet, two_sided: bool, d: int) -> Estimate:
        """Enumerate all masks on all probe examples; error bars from a bootstrap over the probe examples."""
        masks = all_masks(d, tasks.labels.device)
        outcomes = MaskOutcomes(self.forward.predictions(prepared, masks), tasks, two_sided)
        logp = mask_log_posterior(outcomes.probability(), masks, self.prior_keep)  # [M, T]
        p = logp.exp()
        importance = _posterior_importance(p, masks)
        h_m = -(p * logp).sum(dim=0) / LOG2
        top = p.topk(min(self.top_k, p.shape[0]), dim=0)
        replicates = [self._bootstrap_replicate(outcomes, masks) for _ in range(self.num_bootstrap)]
        return Estimate(
            importance=importance,
            manifold_complexity=(binary_entropy_bits(importance).sum(dim=1) - h_m).clamp_min(0),
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

    def _bootstrap_replicate(self, outcomes: MaskOutcomes, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Importance ``[T, d]`` and total correlation ``[T]`` with the probe examples resampled."""
        n = outcomes.correct.shape[1]
        draw = torch.randint(0, n, (n,), generator=self.generator).to(masks.device)
        weights = torch.bincount(draw, minlength=n).to(torch.float64)
        logp = mask_log_posterior(outcomes.probability(weights), masks, self.prior_keep)
        p = logp.exp()
        importance = _posterior_importance(p, masks)
        return importance, binary_entropy_bits(importance).sum(dim=1) + (p * logp).sum(dim=0) / LOG2

    # ------------------------------------------------------------------ read-outs
    def _result(self, estimate: Estimate, tasks: TaskSet, full_accuracy: Tensor) -> AblationFit:
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

        return AblationFit(
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


def _nan_result(tasks: TaskSet, d: int, method: str, likelihood: str, split: bool) -> AblationFit:
    """The result of a fit whose unablated logits on the probe are not finite: every read-out NaN."""
    num_tasks, device = len(tasks.names), tasks.labels.device

    def nan(*shape: int) -> Tensor:
        return torch.full(shape, math.nan, dtype=torch.float64, device=device)

    mcmc = method == "mcmc"
    return AblationFit(
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


def _concat_estimates(parts: list[Estimate]) -> Estimate:
    """One MCMC estimate of all tasks from those of consecutive blocks of tasks."""

    def cat(name: str, dim: int = 0) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values, dim=dim)

    first = parts[0]
    per_task = ("importance", "manifold_complexity", "mask_entropy_bits", "acceptance_rate", "ess", "ess_per_unit")
    return Estimate(
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


def _posterior_importance(p: Tensor, masks: Tensor) -> Tensor:
    """``P(m_i = 1)`` ``[T, d]`` from the posterior ``[M, T]`` of all masks ``[M, d]``."""
    return (p.T @ masks.to(torch.float64)).clamp(0, 1)
