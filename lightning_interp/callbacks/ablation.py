"""Bayesian ablation probing callback: per layer, which units the tasks need, how distributed, how polysemantic.

Reference: Nam, Campbell, Griffiths, Cohen, Leslie, arXiv:2505.13742 (2025). See
:mod:`lightning_interp.ablation` (definitions follow docs/ablation.md; the paper's exact formulas are
not reproduced here).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
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
    check_logits,
    check_number,
    model_device_dtype,
)
from lightning_interp.callbacks.probe import ProbeSource, Unpack
from lightning_interp.hooks import get_module
from lightning_interp.plotting import subplots

__all__ = ["AblationProbeCallback"]


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
            r >= 0.95 between seeds on a 64-unit layer (``scripts/bench_stability.py``); the overhead budget
            may lower the steps of a measurement to a quarter of the kept ones (logged as ``work``).
        burn_in: MCMC burn-in steps.
        max_batch: bound on ``masks * examples`` rows per forward pass.
        informative_bits: threshold for ``informative_units``.
        top_units: rows of the table of most informative units.
        class_names: names of the classes, to label the tasks in the figures and tables (default ``"class <k>"``).
        min_ess: warn (once per layer) when the smallest effective sample size of an importance estimate
            falls below this.
        every_n_epochs: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback` (default 5).
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
        >>> cb = AblationProbeCallback(layers=["net.1"], probe_size=256, every_n_epochs=5)
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
        every_n_epochs: int | None = 5,
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
        self._ablations: dict[str, BayesianAblation] = {}
        self._model_ref: Any = None  # weak reference: a new model (even at a reused address) gets new ablations
        self._steps_now: int | None = None  # MCMC steps of the next measurement when the budget lowered them
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
        try:
            out = pl_module(x[:2].to(device=device, dtype=dtype if x.is_floating_point() else x.dtype))
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
        """Seconds of one measurement, from a two-step, one-chain MCMC pilot on one task per layer.

        The pilot's own timing of a step, scaled by the (example, mask) rows a step of the full run
        evaluates (all tasks and chains, :meth:`BayesianAblation.rows_per_step`) over the pilot's, times the
        steps, plus the rest of the pilot (preparing the probe, read-outs): the fixed cost. One task keeps
        the pilot itself cheap: its cost counts against the budget too.

        ``None`` when a layer is enumerated exactly (``d <= 12`` under ``"auto"``: at most 4096 masks).
        """
        if self._probe is None:
            return None
        device, dtype = model_device_dtype(pl_module)
        x, y = self._probe
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        total = 0.0
        one_task = "all" if self.tasks == "all" else [int(y.min()) if self.tasks == "classes" else int(self.tasks[0])]
        for layer in self.layers:
            ablation = self._ablation(pl_module, layer)  # traced and split already: the pilot times the chains
            full_rows = ablation.rows_per_step(y, self.tasks)
            d = self._units.get(layer) or ablation.forward.num_units(ablation.forward.prepare(x[:2]))
            if self.method == "exact" or (self.method == "auto" and d <= MAX_EXACT_UNITS and 2**d <= self._exact_masks()):
                return None
            saved = ablation.method, ablation.num_chains, ablation.num_steps, ablation.burn_in, ablation.generator
            try:
                ablation.method, ablation.num_chains, ablation.num_steps, ablation.burn_in = "mcmc", 1, 2, 0
                ablation.generator = torch.Generator().manual_seed(self.seed)
                start = time.perf_counter()
                pilot = ablation.fit(x, y, tasks=one_task)
                seconds = time.perf_counter() - start
                pilot_rows = ablation.rows_per_step(y, one_task)
            finally:
                ablation.method, ablation.num_chains, ablation.num_steps, ablation.burn_in, ablation.generator = saved
            per_step = (pilot.seconds_per_step or 0.0) * full_rows / max(1, pilot_rows)
            total += max(0.0, seconds - 3 * (pilot.seconds_per_step or 0.0)) + per_step * (self.num_steps + 1)
        return total

    def reduce_work(self, fraction: float) -> float | None:
        """Fewer MCMC steps: down to a quarter of the kept steps (error bars at most twice as wide), at least 100.

        ``None`` for exact enumeration (its cost is fixed) or when even that floor costs more than ``fraction``.
        """
        if self._exact_layers():
            return None
        kept = self.num_steps - self.burn_in
        floor = min(kept, max(100, math.ceil(kept / 4)))
        steps = int(kept * fraction)
        if steps < floor:
            return None
        self._steps_now = self.burn_in + steps
        return self._steps_now / self.num_steps

    def restore_work(self) -> None:
        self._steps_now = None

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
        if self._probe is None:
            raise RuntimeError("AblationProbeCallback.measure() called before setup()")
        device, dtype = model_device_dtype(pl_module)
        x, y = self._probe
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        scalars: dict[str, Tensor | float] = {}
        results: dict[str, AblationResult] = {}
        for layer in self.layers:
            ablation = self._ablation(pl_module, layer)
            ablation.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
            ablation.num_steps = self._steps_now or self.num_steps
            r = ablation.fit(x, y, tasks=self.tasks)
            results[layer] = r
            for name, (value, se) in summarize(r, self.informative_bits, self.prior_keep).items():
                scalars[f"{layer}/{name}"] = value
                if name != "full_accuracy":
                    scalars[f"{layer}/{name}_se"] = se
            if r.method == "mcmc":
                ess = effective_sample_size(r)  # [T, d]
                ess = ess[~ess.isnan()]
                if not ess.numel():  # no unit's estimate has any error
                    ess = torch.full((1,), math.inf, dtype=torch.float64)
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
                if float(ess.min()) < self.min_ess:
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
