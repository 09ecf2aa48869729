"""Bayesian ablation probing callback: per layer, which units the tasks need, how distributed, how polysemantic.

Reference: Nam, Campbell, Griffiths, Cohen, Leslie, arXiv:2505.13742 (2025). See
:mod:`lightning_interp.ablation` (definitions follow docs/ablation.md; the paper's exact formulas are
not reproduced here).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.ablation import (
    AUTO_EXACT_MASKS,
    LIKELIHOODS,
    MAX_EXACT_UNITS,
    REST_PER_CHAIN,
    AblationResult,
    BayesianAblation,
    Likelihood,
    effective_sample_size,
    summarize,
)
from lightning_interp.callbacks.base import (
    InterpretabilityCallback,
    Measurement,
    RunOn,
    check_choice,
    check_class_names,
    check_int,
    check_layers_run,
    check_logits,
    check_number,
    model_device_dtype,
)
from lightning_interp.callbacks.probe import ProbeSource, Unpack
from lightning_interp.hooks import get_module
from lightning_interp.plotting import subplots

__all__ = ["MIN_KEPT_STEPS", "MIN_PROBE", "AblationProbeCallback"]

#: Fewest kept MCMC steps a measurement scaled down by the budget runs (or a quarter of the kept steps,
#: whichever is larger): a quarter of the steps doubles the jackknife error bars, and below ~100 steps a
#: chain proposes each unit of a 32-unit layer about 3 times, too few for the Rao-Blackwellised estimates.
MIN_KEPT_STEPS = 100
#: Fewest probe examples a measurement scaled down by the budget uses (and at least one per class present,
#: so that every class task keeps examples): 64 examples of 10 classes leave ~6 per class task, whose
#: smoothed sensitivity then still moves in steps of 1/8 rather than collapsing to the prior.
MIN_PROBE = 64


class AblationProbeCallback(InterpretabilityCallback):
    """Log Bayesian-ablation read-outs of one or more layers on a fixed labelled probe set.

    Per layer ``L`` it logs ``ablation/<L>/distributedness`` and ``ablation/<L>/manifold_complexity``
    (means over the tasks), ``ablation/<L>/polysemanticity`` (mean over informative units),
    ``ablation/<L>/max_importance``, ``ablation/<L>/informative_units`` (units with more than
    ``informative_bits`` of information for some task, beyond MCMC noise:
    :func:`~lightning_interp.ablation.informative_units`), each with ``<name>_se`` (jackknife over chains
    for MCMC, bootstrap over probe examples for exact runs: :func:`~lightning_interp.ablation.summarize`),
    ``ablation/<L>/full_accuracy`` and, for MCMC runs, ``acceptance_rate``, ``ess`` and ``ess_median``
    (the smallest and median effective sample size of the importance estimates over tasks and units:
    :func:`~lightning_interp.ablation.effective_sample_size`; a warning fires when ``ess`` is below
    ``min_ess``), ``ess_indicator`` (the chains' smallest ESS of a 0/1 keep indicator: how well they
    mix; the Rao-Blackwellised estimates are more precise than it suggests) and
    ``manifold_complexity_left_out`` (bits the unit pairs left out of the MCMC manifold complexity, whose
    information is below the run's noise, could carry at most: a loose bound, mean over tasks; a warning
    fires when it exceeds 1 bit and 3 standard errors of the complexity); an image of unit importance (units x tasks)
    per layer, a plot of the importances with error bars, and a table of the most informative units.
    The MCMC generator is seeded from ``seed`` and the step, so
    every rank (and a resumed run) draws the same chains.

    Args:
        layers: ``named_modules()`` path(s) of the layers to probe.
        probe_size: number of labelled probe examples (drawn once, own generator).
        tasks: ``"classes"`` (a task per class), ``"all"``, or a list of class indices.
        method: ``"auto"``, ``"exact"`` (``d <= 16``) or ``"mcmc"``.
        prior_keep: prior probability that a unit is kept.
        likelihood: ``p_t(m)`` of a class task: ``"balanced"`` (the mean of the Beta(1, 1)-smoothed
            sensitivity and specificity, the default) or ``"sensitivity"`` (one-sided; it favours a mask that
            makes the network answer the class for everything). Task ``"all"`` uses the accuracy either way.
        rest_per_chain: MCMC, balanced likelihood: the other examples each chain of a class task scores (a
            sample drawn once per chain, without replacement, from the measurement's generator).
        num_chains: MCMC chains per task (at least 2 for error bars: the jackknife leaves one out).
        num_steps: MCMC steps per chain. The default (8 x 1000) gives importances that correlate
            r >= 0.95 between seeds on a 64-unit layer (``scripts/bench_stability.py``). Under the overhead
            budget a measurement may be scaled down (see :meth:`measure`; sizes logged as ``num_steps`` and
            ``probe_size``).
        burn_in: MCMC burn-in steps.
        max_batch: bound on ``masks * examples`` rows per forward pass.
        informative_bits: threshold for ``informative_units``.
        top_units: rows of the table of most informative units.
        class_names: names of the classes, to label the tasks in the figures and tables (default ``"class <k>"``).
        min_ess: warn (once per layer) when the smallest effective sample size of an importance estimate
            falls below this.
        every_n_epochs: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback` (default 1: the
            budget decides which of those points run, and at what size).
        every_n_steps: see the base class.
        run_on: see the base class.
        measure_at_start: see the base class.
        measure_at_end: see the base class.
        seed: seed of the probe draw and the chains.
        log_images: see the base class.
        figure_dir: see the base class.
        key_prefix: see the base class.
        probe: labelled probe data instead of the trainer's; see the base class.
        unpack: how to read a batch; see the base class.
        prog_bar: scalars to show in the progress bar; see the base class.
        budget: the share of training time its scheduled measurements may use; see the base class.

    Raises:
        ValueError: in ``__init__``, for an empty or non-string ``layers``, a ``tasks`` that is not
            ``"classes"``, ``"all"`` or a list of class indices, an unknown ``method`` or ``likelihood``,
            ``prior_keep`` outside (0, 1), or counts out of range (``burn_in >= num_steps``, ...); before the first
            training step, for unknown layer names, ``exact`` with more than 16 units, unlabelled probe data,
            task classes or labels outside the model's classes, or a model whose output is not logits.
        TypeError: before the first training step, when the model rejects the probe inputs.

    Example:
        >>> cb = AblationProbeCallback(layers=["net.1"], probe_size=256)
    """

    prefix = "ablation"

    def __init__(
        self,
        layers: str | Sequence[str],
        probe_size: int = 512,
        tasks: Literal["classes", "all"] | Sequence[int] = "classes",
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
        min_ess: float = 100.0,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        run_on: RunOn = "train_epoch_end",
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        seed: int = 0,
        log_images: bool = True,
        figure_dir: str | None = None,
        key_prefix: str | None = None,
        probe: ProbeSource | None = None,
        unpack: Unpack = None,
        prog_bar: Sequence[str] = (),
        budget: float | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            run_on=run_on,
            measure_at_start=measure_at_start,
            measure_at_end=measure_at_end,
            seed=seed,
            log_images=log_images,
            figure_dir=figure_dir,
            key_prefix=key_prefix,
            probe=probe,
            unpack=unpack,
            prog_bar=prog_bar,
            budget=budget,
        )
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers or not all(isinstance(layer, str) and layer for layer in self.layers):
            raise ValueError(f"layers must name at least one layer (named_modules() paths, strings), got {layers!r}")
        check_int("probe_size", probe_size, 2)
        if isinstance(tasks, str):
            check_choice("tasks", tasks, ("classes", "all"))
        elif (
            not isinstance(tasks, Sequence)
            or not tasks
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tasks)
            or len(set(tasks)) != len(tasks)
        ):
            raise ValueError(f"tasks must be 'classes', 'all' or a list of distinct class indices >= 0, got {tasks!r}")
        check_choice("method", method, ("auto", "exact", "mcmc"))
        check_number("prior_keep", prior_keep, 0, 1, open_low=True, open_high=True)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_int("rest_per_chain", rest_per_chain, 1)
        check_int("num_chains", num_chains, 1)
        check_int("num_steps", num_steps, 1)
        check_int("burn_in", burn_in, 0)
        if burn_in >= num_steps:
            raise ValueError(f"burn_in ({burn_in}) must be smaller than num_steps ({num_steps})")
        check_int("max_batch", max_batch, 1)
        check_number("informative_bits", informative_bits, 0)
        check_int("top_units", top_units, 0)
        check_number("min_ess", min_ess, 0)
        self.min_ess = min_ess
        self.probe_size, self.tasks, self.method = probe_size, tasks, method
        self.likelihood, self.rest_per_chain = likelihood, rest_per_chain
        self.prior_keep, self.num_chains, self.num_steps, self.burn_in = prior_keep, num_chains, num_steps, burn_in
        self.max_batch, self.informative_bits, self.top_units = max_batch, informative_bits, top_units
        self.class_names = check_class_names(class_names)
        self._probe: tuple[Tensor, Tensor] | None = None
        #: Called after every MCMC step of a measurement (no argument), e.g. by the audit's progress bar.
        self.on_step: Callable[[], None] | None = None
        self._ablations: dict[str, BayesianAblation] = {}
        self._model_ref: Any = None  # weak reference: a new model (even at a reused address) gets new ablations
        self._units: dict[str, int] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        # two callbacks on the same layers that differ in the likelihood measure different things
        return {"layers": self.layers, "probe_size": self.probe_size, "likelihood": self.likelihood}

    # ------------------------------------------------------------------ setup
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in self.layers:
            get_module(pl_module, layer)
        if self._probe is None:
            self._probe = self.labelled_probe(trainer, self.probe_size)
        x, y = self._probe
        device, dtype = model_device_dtype(pl_module)
        head = x[:2].to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        # a layer that exists but never runs in forward(): a clear error now, not an IndexError at the first measurement
        check_layers_run(pl_module, self.layers, head, "AblationProbeCallback")
        try:
            out = pl_module(head)
        except Exception as err:
            raise TypeError(
                f"{type(pl_module).__name__} failed on the probe inputs of shape {list(x.shape[1:])}: {type(err).__name__}: {err}"
            ) from err
        check_logits(out, "AblationProbeCallback", pl_module)
        if y.min() < 0 or y.max() >= out.shape[1]:
            raise ValueError(f"probe labels lie in {int(y.min())}..{int(y.max())}, outside the model's {out.shape[1]} classes")
        if not isinstance(self.tasks, str):
            outside = [t for t in self.tasks if t >= out.shape[1]]
            if outside:
                raise ValueError(
                    f"tasks {outside} are not classes of the model, which has {out.shape[1]} (0..{out.shape[1] - 1}); "
                    "use class indices below that, or tasks='classes'"
                )
            absent = [t for t in self.tasks if not (y == t).any()]
            if absent:
                raise ValueError(f"tasks {absent} have no examples in the probe set; increase probe_size or drop them")
        for layer in self.layers:
            ablation = self._ablation(pl_module, layer)
            d = ablation.forward.num_units(ablation.forward.prepare(x[:2].to(device=device, dtype=dtype)))
            self._units[layer] = d
            if self.method == "exact" and d > MAX_EXACT_UNITS:
                raise ValueError(
                    f"method='exact' enumerates 2^d masks and needs d <= {MAX_EXACT_UNITS}, but layer {layer!r} has {d} units; "
                    "use method='mcmc' or 'auto'"
                )

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds of one full measurement (``work = 1``), from a short pilot per layer.

        :meth:`BayesianAblation.estimate_seconds` per layer: the part done once per fit (the probe through the
        part before the layer, the head), 16 MCMC steps of every chain of all tasks (the full rows of a step:
        its time is the full run's, whatever the model), and the read-outs timed on synthetic chains of one
        task at the full size, once per task. Figures and tables are not counted.

        ``None`` when a layer is enumerated exactly (``d <= 12`` under ``"auto"``: at most 4096 masks).
        """
        if self._probe is None:
            return None
        device, dtype = model_device_dtype(pl_module)
        x, y = self._probe
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        total = 0.0
        for layer in self.layers:
            ablation = self._ablation(pl_module, layer)
            ablation.num_steps = self.num_steps
            seconds = ablation.estimate_seconds(x, y, tasks=self.tasks)
            if seconds is None:
                return None
            total += seconds
        return total

    def _subsample_order(self) -> Tensor:
        """The probe's examples in class round-robin order: any first ``m >= classes`` of them cover every class."""
        assert self._probe is not None
        y = self._probe[1].cpu()
        rank = torch.zeros_like(y)
        for c in y.unique():
            where = (y == c).nonzero().flatten()
            rank[where] = torch.arange(where.numel())
        return torch.argsort(rank * (int(y.max()) + 1) + y, stable=True)

    def _probe_floor(self) -> int:
        assert self._probe is not None
        y = self._probe[1]
        return min(len(y), max(MIN_PROBE, int(y.unique().numel())))

    def _kept_floor(self) -> int:
        kept = self.num_steps - self.burn_in
        return min(kept, max(MIN_KEPT_STEPS, math.ceil(kept / 4)))

    def _rows(self, size: int) -> int:
        """(example, mask) rows of an MCMC step on the first ``size`` examples of the round-robin order.

        As :meth:`BayesianAblation.rows_per_step`: every chain of a task scores the task's examples and, with
        the balanced likelihood, up to ``rest_per_chain`` others.
        """
        assert self._probe is not None
        labels = self._probe[1].cpu()[self._subsample_order()[:size]]
        if self.tasks == "all":
            return self.num_chains * size
        classes = labels.unique().tolist() if self.tasks == "classes" else list(self.tasks)
        own = torch.stack([(labels == c).sum() for c in classes])
        rest = (size - own).clamp_max(self.rest_per_chain) if self.likelihood == "balanced" else torch.zeros_like(own)
        return self.num_chains * int((own + rest).sum())

    def _sizes(self) -> tuple[int, int]:
        """``(num_steps, probe examples)`` of the next measurement at the current :attr:`work`.

        The cost of a measurement is taken as proportional to its MCMC steps times the rows of a step. The
        kept steps are scaled first, to ``work * num_steps - burn_in`` (down to :data:`MIN_KEPT_STEPS` or a
        quarter of them; the burn-in stays: mixing does not get faster); below that the probe (down to
        :data:`MIN_PROBE` examples, at least one per class, taken class by class so every class task keeps
        examples), to the largest size whose rows per step leave the cost at most ``work`` of a full one.
        """
        assert self._probe is not None
        n = len(self._probe[1])
        if self.work >= 1.0:
            return self.num_steps, n
        # the kept steps that make burn-in + kept = work * num_steps (the burn-in is paid at any size)
        floor = self._kept_floor()
        kept = min(self.num_steps - self.burn_in, max(floor, math.ceil(self.work * self.num_steps - self.burn_in)))
        steps = self.burn_in + kept
        if kept > floor:
            return steps, n
        left = self.work * self.num_steps / steps  # the share of the rows per step that the budget still allows
        full_rows, low, high = self._rows(n), self._probe_floor(), n
        while low < high:  # the largest size whose rows fit (rows grow with the size)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self._rows(mid) <= left * full_rows else (low, mid - 1)
        return steps, low

    def work_floor(self) -> float:
        """The fraction of a full measurement at the floors: ``MIN_KEPT_STEPS`` and ``MIN_PROBE`` (see :meth:`_sizes`).

        ``(burn_in + kept floor) / num_steps`` times the rows of a step on the probe floor over those on the
        full probe (with the balanced likelihood each chain also scores up to ``rest_per_chain`` other
        examples, so the rows shrink less than the probe). 1.0 before the probe is drawn.
        """
        if self._probe is None:
            return 1.0
        n = len(self._probe[1])
        rows = self._rows(self._probe_floor()) / max(1, self._rows(n))
        steps = (self.burn_in + self._kept_floor()) / self.num_steps
        return min(1.0, steps * rows) if not self._exact_layers() else min(1.0, self._probe_floor() / n)

    def _exact_layers(self) -> bool:
        if self.method == "exact":
            return True
        return self.method == "auto" and any(d <= MAX_EXACT_UNITS and 2**d <= self._exact_masks() for d in self._units.values())

    def _exact_masks(self) -> int:
        return max(AUTO_EXACT_MASKS, self.num_chains * (self.num_steps + 1))

    def _ablation(self, module: nn.Module, layer: str) -> BayesianAblation:
        if self._model_ref is None or self._model_ref() is not module:
            self._ablations, self._model_ref = {}, weakref.ref(module)
        if layer not in self._ablations:
            self._ablations[layer] = BayesianAblation(
                module,
                layer,
                method=self.method,
                prior_keep=self.prior_keep,
                num_chains=self.num_chains,
                num_steps=self.num_steps,
                burn_in=self.burn_in,
                max_batch=self.max_batch,
                likelihood=self.likelihood,
                rest_per_chain=self.rest_per_chain,
            )
        return self._ablations[layer]

    # ------------------------------------------------------------------ measurement
    def measure(self, pl_module: nn.Module) -> Measurement:
        """Fit every layer's ablation on the probe; its read-outs as scalars, the results for the figures.

        At :attr:`work` below 1 (the budget scales the measurement down) it runs fewer MCMC kept steps, at
        least ``max(MIN_KEPT_STEPS, kept / 4)`` (100 or a quarter: at most twice the error bars), then fewer
        probe examples, at least ``MIN_PROBE`` (64, and one per class present), taken class by class so
        every class task keeps examples (:meth:`_sizes`). The sizes used are logged as ``num_steps`` (burn-in
        included) and ``probe_size``. Where the model's logits on the probe are not finite, every read-out
        is NaN.
        """
        if self._probe is None:
            raise RuntimeError("AblationProbeCallback.measure() called before setup()")
        device, dtype = model_device_dtype(pl_module)
        steps, size = self._sizes()
        x, y = self._probe
        if size < len(y):
            keep = self._subsample_order()[:size].to(y.device)
            x, y = x[keep], y[keep]
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        scalars: dict[str, Tensor | float] = {"num_steps": float(steps), "probe_size": float(size)}
        results: dict[str, AblationResult] = {}
        for layer in self.layers:
            ablation = self._ablation(pl_module, layer)
            ablation.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
            ablation.num_steps = steps
            ablation.on_step = self.on_step
            r = ablation.fit(x, y, tasks=self.tasks)
            results[layer] = r
            for name, (value, se) in summarize(r, self.informative_bits, self.prior_keep).items():
                scalars[f"{layer}/{name}"] = value
                if name != "full_accuracy":
                    scalars[f"{layer}/{name}_se"] = se
            if r.method == "mcmc":
                ess = effective_sample_size(r)  # [T, d]
                ess = ess[~ess.isnan()]
                if not ess.numel():
                    # no unit's estimate has a resolvable error: the bound (the draws), or NaN for a fit on
                    # non-finite logits (nothing measured)
                    bound = math.nan if r.full_accuracy.isnan().any() else float(r.num_draws)
                    ess = torch.full((1,), bound, dtype=torch.float64)
                scalars[f"{layer}/acceptance_rate"] = r.acceptance_rate.mean()  # type: ignore[union-attr]
                scalars[f"{layer}/ess"] = ess.min()
                scalars[f"{layer}/ess_median"] = ess.median()
                scalars[f"{layer}/ess_indicator"] = r.ess_per_unit.min()  # type: ignore[union-attr]
                if r.complexity_left_out_bits is not None and r.complexity_pairs is not None:
                    left_out = r.complexity_left_out_bits.mean()
                    scalars[f"{layer}/manifold_complexity_left_out"] = left_out
                    # the bound is loose (a unit weakly tied to many others has a large one), so warn only past a bit
                    if float(left_out) > max(1.0, 3 * float(scalars[f"{layer}/manifold_complexity_se"])):
                        self._warn_once(
                            f"complexity-{layer}",
                            f"AblationProbeCallback: layer {layer!r}: the manifold complexity counts "
                            f"{float(r.complexity_pairs.double().mean()):.0f} unit pairs (mean over tasks); the "
                            f"dependent pairs whose information is below the noise of {self.num_chains} chains x "
                            f"{ablation.num_steps} steps are left out, and could add up to {float(left_out):.3g} bits "
                            "(manifold_complexity_left_out, a loose upper bound): read the value as a lower estimate, "
                            "or raise num_steps.",
                        )
                if float(ess.min()) < self.min_ess:  # (False for NaN)
                    self._warn_once(
                        f"ess-{layer}",
                        f"AblationProbeCallback: layer {layer!r}: the MCMC effective sample size is {float(ess.min()):.0f} "
                        f"(median over units {float(ess.median()):.0f}), below min_ess={self.min_ess:g}, with "
                        f"{self.num_chains} chains x {ablation.num_steps} steps: the read-outs are noisy (their _se "
                        "says how much; the manifold complexity's is often as large as the value). Raise num_steps / "
                        f"num_chains (e.g. num_steps={self.num_steps * 10}), or probe a layer of at most "
                        f"{MAX_EXACT_UNITS} units (exact enumeration).",
                    )
        return Measurement(scalars=scalars, data={"results": results})

    # ------------------------------------------------------------------ figures and tables
    def task_labels(self, r: AblationResult) -> list[str]:
        """The tasks of a result as figures and tables name them: class names where ``class_names`` has them."""
        if not self.class_names or not r.task_classes:
            return list(r.tasks)
        return [
            self.class_names[c] if c < len(self.class_names) else name for c, name in zip(r.task_classes, r.tasks, strict=True)
        ]

    def figures(self, measurement: Measurement) -> dict[str, Any]:
        figs = {}
        for layer, r in measurement.data["results"].items():
            imp = r.importance.double().cpu()
            labels = self.task_labels(r)
            # wide layers (a ResNet's 2048 channels) and many tasks: the figure stays a readable size
            width, height = min(14.0, max(4, 0.25 * imp.shape[1] + 2)), min(12.0, max(2.5, 0.3 * imp.shape[0] + 1.5))
            fig, ax = subplots(figsize=(width, height))
            im = ax.imshow(imp, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            if len(labels) <= 40:
                ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_ylabel("task")
            ax.set_xlabel("unit")
            ax.set_title(f"{layer}: P(unit kept | task correct) ({r.method})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05, label="importance")
            figs[f"{layer}/importance"] = fig
            if r.importance_se is not None:
                figs[f"{layer}/importance_errors"] = _importance_errorbars(layer, r, labels)
        return figs

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        rows = []
        for layer, r in measurement.data["results"].items():
            info = r.information_bits.double().cpu()
            labels = self.task_labels(r)
            flat = info.flatten()
            for idx in flat.argsort(descending=True)[: self.top_units].tolist():
                t, unit = divmod(idx, info.shape[1])
                rows.append([layer, unit, labels[t], float(r.importance[t, unit]), float(info[t, unit])])
        return {"top_units": (["layer", "unit", "task", "importance", "information_bits"], rows)}


def _importance_errorbars(layer: str, r: AblationResult, labels: list[str], max_units: int = 64) -> Any:
    """Importance with +-2 SE bars, one line per task (at most 10 tasks); on a wide layer the ``max_units``
    units with the most information (summed over the tasks), labelled by their index."""
    imp, se = r.importance.double().cpu(), r.importance_se.double().cpu()  # type: ignore[union-attr]
    shown = torch.arange(imp.shape[1])
    if imp.shape[1] > max_units:
        shown = r.information_bits.double().cpu().nan_to_num().sum(0).argsort(descending=True)[:max_units].sort().values
    fig, ax = subplots(figsize=(max(5, 0.12 * len(shown) + 3), 3.2))
    units = torch.arange(len(shown))
    for t in range(min(10, imp.shape[0])):
        offset = 0.6 * (t / max(1, imp.shape[0]) - 0.3)
        ax.errorbar(units + offset, imp[t, shown], yerr=2 * se[t, shown], fmt=".", ms=3, lw=0.8, label=labels[t])
    which = ""
    if len(shown) < imp.shape[1]:
        ax.set_xticks(units.tolist(), [str(u) for u in shown.tolist()], fontsize=5, rotation=90)
        which = f", the {len(shown)} most informative of {imp.shape[1]} units"
    ax.axhline(0.5, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("unit")
    ax.set_ylabel("P(unit kept | task correct)")
    kind = {"jackknife": "jackknife over chains", "bootstrap": "bootstrap over probe"}.get(r.replicate_kind, r.replicate_kind)
    ax.set_title(f"{layer}: importance +- 2 SE ({kind}){which}", fontsize=9)
    ax.legend(fontsize=6, ncol=5, loc="lower right")
    fig.tight_layout()
    return fig
