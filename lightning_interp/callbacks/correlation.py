"""Correlation-order tracking callback: per layer, accuracy carried by means, covariances and higher orders.

Reference: Fischer, René, Keup, Layer, Dahmen, Helias, Physical Review Research 4, 043143 (2022). See
:mod:`lightning_interp.correlation` (definitions follow docs/correlation.md; the paper's exact formulas
are not reproduced here).
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

from lightning_interp.callbacks.base import (
    InterpretabilityCallback,
    Measurement,
    RunOn,
    check_int,
    check_layers_run,
    check_logits,
    model_device_dtype,
)
from lightning_interp.callbacks.probe import ProbeSource, Unpack
from lightning_interp.correlation import INPUT, LayerReplacement, Quadratic, gaussian_surrogates, layer_outputs, non_gaussianity
from lightning_interp.hooks import get_module
from lightning_interp.plotting import subplots
from lightning_interp.stats import mean_and_se

__all__ = ["PILOT_WORK", "CorrelationOrderCallback"]

#: The fraction of the probe the cost pilot (:meth:`CorrelationOrderCallback.estimate_cost`) measures (at least the floor).
PILOT_WORK = 0.5

#: Module types whose outputs ``layers="auto"`` tracks (after the model input).
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


def _hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Per example 1.0 where the prediction is the label, 0.0 where not, NaN where a logit is non-finite.

    ``argmax`` of NaN logits is the first NaN's class: it would count as a prediction of class 0.
    """
    hit = (logits.argmax(dim=-1) == labels).to(torch.float64)
    return torch.where(torch.isfinite(logits).all(dim=-1), hit, torch.full_like(hit, math.nan))


class CorrelationOrderCallback(InterpretabilityCallback):
    """Track how much of each layer's classification is carried by order 1, order 2 and higher orders.

    At each measurement, for every tracked layer (``"input"`` is the model input), the layer's output on a
    fixed labelled probe set is replaced by Gaussian surrogates of order 2, 1 and 0 with the class means
    and covariances of that output (drawn exactly from the probe samples by
    :func:`~lightning_interp.correlation.gaussian_surrogates`, for layers of any width) and the forward
    pass continues from the layer (:class:`~lightning_interp.correlation.LayerReplacement`: the part
    before the layer runs once where ``torch.fx`` can split the model). Logged per layer ``L``:
    ``correlation/<L>/acc_real``, ``acc_order2``, ``acc_order1``, ``acc_order0``,
    ``higher_order_gap = acc_real - acc_order2`` (each with ``_se``: the standard error over the probe
    examples, which also carries the noise of the surrogate draw, one per example; the gap's is paired)
    and ``non_gaussianity`` (mean absolute excess kurtosis of the units, with ``_se``: the delete-a-group
    jackknife's over the examples, :func:`~lightning_interp.correlation.non_gaussianity`), and
    ``correlation/probe_size``, the examples measured. When the overhead budget scales a measurement down
    (:attr:`work` < 1) it uses a class-balanced prefix of the probe: the first ``ceil(work * n_c)`` examples
    of every class, never fewer than ``min_per_class`` (or the class's ``n_c``), so :meth:`work_floor` is
    ``min_per_class / n_min`` (``n_min``: the smallest class's probe examples). A non-finite logit makes that
    example's hits NaN (so the accuracies and the gap are NaN), not a prediction of class 0.
    Figures: the accuracies per layer now, and the higher-order gap per layer
    over training (the tracking).

    Args:
        layers: ``"auto"`` (the input and every activation module) or ``named_modules()`` paths
            (``"input"`` for the model input).
        probe_size: labelled probe examples (drawn once, own generator).
        min_per_class: fewest probe examples a class present in the probe must have.
        every_n_epochs: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`.
        every_n_steps: see the base class.
        run_on: see the base class.
        measure_at_start: see the base class.
        measure_at_end: see the base class.
        seed: seed of the probe draw and of the surrogate draws (with the step).
        log_images: see the base class.
        figure_dir: see the base class.
        key_prefix: see the base class.
        probe: labelled probe data instead of the trainer's; see the base class.
        unpack: how to read a batch; see the base class.
        prog_bar: scalars to show in the progress bar; see the base class.
        budget: the share of training time its scheduled measurements may use; see the base class.

    Raises:
        ValueError: in ``__init__``, for ``layers`` that are neither ``"auto"`` nor layer names,
            ``probe_size < 4`` or ``min_per_class < 2``; before the first training step, for unknown layer
            names or layers that do not run in ``forward``, unlabelled probe data, a model whose output is
            not ``[N, K >= 2]`` logits, or fewer than ``min_per_class`` probe examples of a class.
        TypeError: before the first training step, for a layer whose output is not a float tensor or a
            model that rejects the probe inputs.

    Example:
        >>> cb = CorrelationOrderCallback(layers="auto", probe_size=1024, every_n_epochs=1)
    """

    prefix = "correlation"

    def __init__(
        self,
        layers: str | Sequence[str] = "auto",
        probe_size: int = 512,
        min_per_class: int = 10,
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
        names = [layers] if isinstance(layers, str) else layers
        if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"layers must be 'auto' or a list of named_modules() paths ('input' for the input), got {layers!r}")
        check_int("probe_size", probe_size, 4)
        check_int("min_per_class", min_per_class, 2)
        self.layer_spec = layers
        self.probe_size, self.min_per_class = probe_size, min_per_class
        self._replacements: dict[str, LayerReplacement] = {}
        self._model_ref: Any = None  # weak reference: a new model (even at a reused address) gets new replacements
        self.layers: list[str] = []
        self._probe: tuple[Tensor, Tensor] | None = None
        self._num_classes = 0
        self._members: list[Tensor] = []  # probe positions of each class present, in probe order
        self._timing = (0.0, 0.0)  # seconds of the last measurement: all but the surrogate draws, the draws

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layer_spec, "probe_size": self.probe_size}

    # ------------------------------------------------------------------ setup
    def _resolve_layers(self, module: nn.Module) -> list[str]:
        if self.layer_spec == "auto":
            acts = [name for name, m in module.named_modules() if name and isinstance(m, ACTIVATIONS)]
            return [INPUT, *acts]
        names = [self.layer_spec] if isinstance(self.layer_spec, str) else list(self.layer_spec)
        for name in names:
            if name != INPUT:
                get_module(module, name)
        return names

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = self._resolve_layers(pl_module)
        if self._probe is None:
            self._probe = self.labelled_probe(trainer, self.probe_size)
        x, y = self._probe
        device, dtype = model_device_dtype(pl_module)
        head = x[:2].to(device=device, dtype=dtype)
        try:
            _, logits = layer_outputs(pl_module, [], head)
        except Exception as err:
            raise TypeError(
                f"{type(pl_module).__name__} failed on the probe inputs of shape {list(x.shape[1:])}: {type(err).__name__}: {err}"
            ) from err
        check_logits(logits, "CorrelationOrderCallback", pl_module)
        # a layer that exists but never runs in forward() has no output to replace: say so now, not at step 8
        check_layers_run(pl_module, [name for name in self.layers if name != INPUT], head, "CorrelationOrderCallback")
        layer_outputs(pl_module, self.layers, head)  # the layers' outputs are float tensors (else a TypeError)
        self._num_classes = logits.shape[1]
        if y.min() < 0 or y.max() >= self._num_classes:
            raise ValueError(
                f"probe labels lie in {int(y.min())}..{int(y.max())}, outside the model's {self._num_classes} classes"
            )
        counts = torch.bincount(y, minlength=self._num_classes)
        few = [c for c in range(self._num_classes) if 0 < counts[c] < self.min_per_class]
        if few:
            raise ValueError(
                f"classes {few} have fewer than min_per_class={self.min_per_class} probe examples "
                f"(counts {counts[few].tolist()}); increase probe_size or lower min_per_class"
            )
        # each class's probe positions in probe order: a scaled measurement takes the first ones of every class
        self._members = [torch.nonzero(y == c).flatten() for c in range(self._num_classes) if counts[c] > 0]
        # the torch.fx splits are set up here, once per model: a one-time cost that the pilot should not scale
        if self._model_ref is None or self._model_ref() is not pl_module:
            self._replacements, self._model_ref = {}, weakref.ref(pl_module)
        for layer in self.layers:
            if layer not in self._replacements:
                self._replacements[layer] = LayerReplacement(pl_module, layer)

    # ------------------------------------------------------------------ sizes and cost
    def _subset(self) -> Tensor:
        """Probe positions of a measurement at :attr:`work`: the first ``scaled(n_c, min_per_class)`` of each class.

        A class-balanced prefix: every class keeps its share of the probe and at least ``min_per_class``
        examples (or all of its ``n_c``), so the surrogates of every class stay defined.
        """
        parts = [members[: self.scaled(len(members), min(len(members), self.min_per_class))] for members in self._members]
        return torch.cat(parts).sort().values

    def work_floor(self) -> float:
        """The smallest fraction of a full measurement: ``min_per_class`` examples of the smallest class.

        At ``work >= min_per_class / n_min`` (``n_min``: the probe examples of the smallest class) every class
        takes ``ceil(work * n_c)`` examples, so the examples (and the cost, which grows at least as fast) scale
        with the work; below it the floors of the small classes would keep the cost up.
        """
        if not self._members:
            return 1.0
        return max(min(len(m), self.min_per_class) / len(m) for m in self._members)

    def forward_passes(self) -> float | None:
        # one pass to read the layers, then three surrogate orders per layer (at most a whole pass each)
        return 1.0 + 3 * len(self.layers) if isinstance(self.layers, list) else None

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds of a full measurement, from a pilot: the measurement itself on half of the probe.

        The forward passes and the read-outs scale with the examples; the surrogate draws combine every example
        with every other of its class (order 2) or of the probe (orders 1 and 0), ``N^2 D``: each part is timed
        in the pilot and scaled by its own power of ``N_full / N_pilot``. Half the probe (at least the floor)
        keeps the fixed costs of a measurement from being scaled up as if they grew with the examples.
        """
        if self._probe is None or not self._members:
            return None
        self.work = max(PILOT_WORK, self.work_floor())
        try:
            subset = self._subset()
        finally:
            self.work = 1.0
        self._evaluate(pl_module, subset)
        ratio = len(self._probe[1]) / len(subset)
        linear_s, draws_s = self._timing
        return linear_s * ratio + draws_s * ratio * ratio

    # ------------------------------------------------------------------ measurement
    def measure(self, pl_module: nn.Module) -> Measurement:
        """The orders of every layer on the probe, or (scaled by :attr:`work`) on its class-balanced prefix.

        ``probe_size`` logs the examples used.
        """
        if self._probe is None:
            raise RuntimeError("CorrelationOrderCallback.measure() called before setup()")
        full = len(self._probe[1])
        subset = self._subset() if self.work < 1 else torch.arange(full)
        return self._evaluate(pl_module, subset)

    def _evaluate(self, pl_module: nn.Module, subset: Tensor) -> Measurement:
        """The measurement on the probe examples at positions ``subset`` (in probe order)."""
        if self._probe is None:
            raise RuntimeError("CorrelationOrderCallback.measure() called before setup()")
        linear = draws_s = 0.0
        start = time.perf_counter()
        device, dtype = model_device_dtype(pl_module)
        x, y = self._probe
        x, y = x[subset].to(device=device, dtype=dtype), y[subset].to(device)
        outputs, logits = layer_outputs(pl_module, self.layers, x)
        hit_real = _hits(logits, y)
        acc_real, acc_real_se = mean_and_se(hit_real)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        scalars: dict[str, Tensor | float] = {"probe_size": float(len(y))}
        accs: dict[str, list[float]] = {}
        if self._model_ref is None or self._model_ref() is not pl_module:
            self._replacements, self._model_ref = {}, weakref.ref(pl_module)
        for layer in self.layers:
            if layer not in self._replacements:
                self._replacements[layer] = LayerReplacement(pl_module, layer)
            run = self._replacements[layer]
            run.prepare(x)
            mark = time.perf_counter()
            # one surrogate draw per example: the spread over examples holds the probe's and the draw's noise
            draws = gaussian_surrogates(outputs[layer], y, (2, 1, 0), gen)
            draws_s += time.perf_counter() - mark
            hits = [_hits(run(d), y) for d in draws]
            scalars[f"{layer}/acc_real"], scalars[f"{layer}/acc_real_se"] = acc_real, acc_real_se
            orders = []
            for order, hit in zip((2, 1, 0), hits, strict=True):
                acc, se = mean_and_se(hit)
                scalars[f"{layer}/acc_order{order}"], scalars[f"{layer}/acc_order{order}_se"] = acc, se
                orders.append(float(acc))
            # paired over the same examples: the SE of the per-example difference
            gap, gap_se = mean_and_se(hit_real - hits[0])
            scalars[f"{layer}/higher_order_gap"], scalars[f"{layer}/higher_order_gap_se"] = gap, gap_se
            # per-unit moments of the classes present only (memory at ImageNet scale), with a jackknife error bar
            kurt, kurt_se = non_gaussianity(outputs[layer], y)
            scalars[f"{layer}/non_gaussianity"], scalars[f"{layer}/non_gaussianity_se"] = kurt, kurt_se
            accs[layer] = [float(acc_real), *orders]
        linear = time.perf_counter() - start - draws_s
        self._timing = (linear, draws_s)
        return Measurement(scalars=scalars, data={"accs": accs})

    # ------------------------------------------------------------------ figures
    def figures(self, measurement: Measurement) -> dict[str, Any]:
        accs = measurement.data["accs"]
        fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.8))
        pos = torch.arange(len(accs)).float()
        names = ("acc_real", "acc_order2", "acc_order1", "acc_order0")
        for i, label in enumerate(("real", "order 2", "order 1", "order 0")):
            ses = [float(measurement.scalars.get(f"{layer}/{names[i]}_se", math.nan)) for layer in accs]
            ax1.bar(pos + (i - 1.5) * 0.2, [v[i] for v in accs.values()], width=0.2, label=label, yerr=ses, capsize=2)
        ax1.set_xticks(pos.tolist(), list(accs), rotation=30, fontsize=7)
        ax1.set_ylabel("probe accuracy (± 1 SE)")
        ax1.set_ylim(0, 1.02)
        ax1.legend(fontsize=7)
        ax1.set_title("Gaussian surrogates per layer")
        for layer in accs:
            key = f"{layer}/higher_order_gap"
            pts = [(h["step"], h[key], h.get(f"{key}_se", math.nan)) for h in self.history if key in h]
            if pts:
                steps, gaps, ses = (torch.tensor(v, dtype=torch.float64) for v in zip(*pts, strict=True))
                ax2.errorbar(steps, gaps, yerr=ses, marker="o", capsize=3, label=layer)
        ax2.set_xlabel("step")
        ax2.set_ylabel("acc_real - acc_order2 (± 1 SE)")
        ax2.set_title("higher-order gap over training")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        return {"orders": fig}
