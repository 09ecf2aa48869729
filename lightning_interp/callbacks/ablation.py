"""Bayesian ablation probing callback: per layer, which units the tasks need, how distributed, how polysemantic.

Reference: Nam, Campbell, Griffiths, Cohen, Leslie, arXiv:2505.13742 (2025). The method and every read-out are
:mod:`lightning_interp.ablation`'s (:func:`~lightning_interp.ablation.measure_ablation`; definitions follow
docs/ablation.md; the paper's exact formulas are not reproduced here). This callback draws the probe, calls
the function and logs what it returns.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.ablation import LIKELIHOODS, REST_PER_CHAIN, BayesianAblation, Likelihood, choose_method, measure_ablation
from lightning_interp.ablation.measure import MIN_KEPT_STEPS, MIN_PROBE, budget_sizes, budget_work_floor, round_robin_order
from lightning_interp.callbacks.base import InterpretabilityCallback
from lightning_interp.callbacks.measurement import Measurement
from lightning_interp.checks import (
    check_choice,
    check_class_names,
    check_int,
    check_layers_run,
    check_logits,
    check_number,
    model_device_dtype,
)
from lightning_interp.hooks import get_module
from lightning_interp.plotting import ablation_figures
from lightning_interp.results import flat_scalars

__all__ = ["MIN_KEPT_STEPS", "MIN_PROBE", "AblationProbeCallback"]


class AblationProbeCallback(InterpretabilityCallback):
    """Log Bayesian-ablation read-outs of one or more layers on a fixed labelled probe set.

    It logs :func:`~lightning_interp.ablation.measure_ablation`'s scalars: per layer ``L``,
    ``ablation/<L>/distributedness``, ``manifold_complexity``, ``polysemanticity``, ``max_importance`` and
    ``informative_units``, each with ``<name>_se``, ``full_accuracy`` and, for MCMC runs, ``acceptance_rate``,
    ``ess``, ``ess_median``, ``ess_indicator`` and ``manifold_complexity_left_out``
    (:func:`~lightning_interp.ablation.measure.layer_readouts`); the sizes used, ``num_steps`` and ``probe_size``;
    its warnings (:meth:`~lightning_interp.ablation.AblationResult.warnings`), figures
    (:func:`~lightning_interp.plotting.ablation_figures`) and table of the most informative units. The MCMC
    generator is seeded from ``seed`` and the step, so every rank (and a resumed run) draws the same chains.

    Args:
        layers: ``named_modules()`` path(s) of the layers to probe.
        probe_size: number of labelled probe examples (drawn once, own generator).
        tasks: ``"classes"`` (a task per class), ``"all"``, or a list of class indices.
        method: ``"auto"``, ``"exact"`` (``d <= 16``) or ``"mcmc"``
            (:func:`~lightning_interp.ablation.choose_method`).
        prior_keep: prior probability that a unit is kept.
        likelihood: ``p_t(m)`` of a class task: ``"balanced"`` (smoothed sensitivity and specificity averaged) or
            ``"sensitivity"`` (one-sided: it favours answering the class for everything); task ``"all"``: the accuracy.
        rest_per_chain: MCMC, balanced likelihood: the other examples each chain of a class task scores (a
            sample drawn once per chain, without replacement, from the measurement's generator).
        num_chains: MCMC chains per task (at least 2 for error bars: the jackknife leaves one out).
        num_steps: MCMC steps per chain. The default (8 x 1000) gives importances that correlate
            r >= 0.95 between seeds on a 64-unit layer (``scripts/bench_stability.py``). The overhead budget may
            scale a measurement down (:func:`~lightning_interp.ablation.measure.budget_sizes`: fewer steps, then examples).
        burn_in: MCMC burn-in steps.
        max_batch: bound on ``masks * examples`` rows per forward pass.
        informative_bits: threshold for ``informative_units``.
        top_units: rows of the table of most informative units.
        class_names: names of the classes, to label the tasks in the figures and tables (default ``"class <k>"``).
        min_ess: warn (once per layer) when the smallest effective sample size of an importance estimate
            falls below this.
        **kwargs: the arguments every callback shares (``every_n_epochs``, ``run_on``, ``seed``, ``probe``, ...):
            see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`.

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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
        check_int("max_batch", max_batch, 1)
        check_int("top_units", top_units, 0)
        if burn_in >= num_steps:
            raise ValueError(f"burn_in ({burn_in}) must be smaller than num_steps ({num_steps})")
        check_number("informative_bits", informative_bits, 0)
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
        #: Per layer, the engine at the full size (its masked evaluation is reused by every measurement).
        self._ablations: dict[str, BayesianAblation] = {}
        self._model_ref: Any = None  # weak reference: a new model (even at a reused address) gets new ablations
        self._units: dict[str, int] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        # two callbacks on the same layers that differ in the likelihood measure different things
        return {"layers": self.layers, "probe_size": self.probe_size, "likelihood": self.likelihood}

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
            forward = self._ablation(pl_module, layer).forward
            self._units[layer] = d = forward.num_units(forward.prepare(x[:2].to(device=device, dtype=dtype)))
            choose_method(d, self.method, self.num_chains, self.num_steps, layer)  # 'exact' with d > 16: the error now

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds of a full measurement, figures apart: every layer's pilot (``None``: a layer is enumerated exactly)."""
        if self._probe is None:
            return None
        device, dtype = model_device_dtype(pl_module)
        x, y = self._probe
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        seconds = [self._ablation(pl_module, layer).estimate_seconds(x, y, tasks=self.tasks) for layer in self.layers]
        return None if None in seconds else sum(s for s in seconds if s is not None)

    def _sizing(self) -> dict[str, Any]:
        keys = ("num_steps", "burn_in", "num_chains", "tasks", "likelihood", "rest_per_chain")
        return {k: getattr(self, k) for k in keys}

    def _sizes(self) -> tuple[int, int]:
        """``(num_steps, probe examples)`` of the next measurement at the current :attr:`work` (:func:`budget_sizes`)."""
        assert self._probe is not None
        return budget_sizes(self._probe[1], self.work, **self._sizing())

    def work_floor(self) -> float:
        """The fraction of a full measurement at the floors (:func:`budget_work_floor`); 1.0 before the probe is drawn."""
        if self._probe is None:
            return 1.0
        return budget_work_floor(self._probe[1], self._units.values(), method=self.method, **self._sizing())

    def _ablation(self, module: nn.Module, layer: str) -> BayesianAblation:
        if self._model_ref is None or self._model_ref() is not module:
            self._ablations, self._model_ref = {}, weakref.ref(module)
        if layer not in self._ablations:
            self._ablations[layer] = BayesianAblation(
                module, layer, method=self.method, prior_keep=self.prior_keep, num_chains=self.num_chains,
                num_steps=self.num_steps, burn_in=self.burn_in, max_batch=self.max_batch, likelihood=self.likelihood,
                rest_per_chain=self.rest_per_chain,
            )  # fmt: skip
        return self._ablations[layer]

    def measure(self, pl_module: nn.Module) -> Measurement:
        """:func:`~lightning_interp.ablation.measure_ablation` on the probe, scaled down where :attr:`work` < 1 (NaN
        read-outs where the logits on the probe are not finite)."""
        if self._probe is None:
            raise RuntimeError("AblationProbeCallback.measure() called before setup()")
        steps, size = self._sizes()
        x, y = self._probe
        if size < len(y):
            keep = round_robin_order(y)[:size].to(y.device)
            x, y = x[keep], y[keep]
        settings = {k: getattr(self, k) for k in ("method", "prior_keep", "max_batch", "informative_bits", "top_units")}
        result = measure_ablation(
            pl_module, x, y, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.step), layers=self.layers,
            **{**self._sizing(), "num_steps": steps}, **settings, class_names=self.class_names, on_step=self.on_step,
            forwards={layer: self._ablation(pl_module, layer).forward for layer in self.layers},
        )  # fmt: skip
        for tag, message in result.warnings(self.min_ess, suggest_steps=self.num_steps * 10).items():
            self._warn_once(tag, f"AblationProbeCallback: {message}")
        return Measurement(scalars=flat_scalars(result), data={"result": result, "results": result.results})

    def figures(self, measurement: Measurement) -> dict[str, Any]:
        return ablation_figures(measurement.data["result"])

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        return measurement.data["result"].tables()
