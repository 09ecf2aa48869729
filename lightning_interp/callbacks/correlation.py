"""Correlation-order tracking callback: per layer, accuracy carried by means, covariances and higher orders.

Reference: Fischer, René, Keup, Layer, Dahmen, Helias, Physical Review Research 4, 043143 (2022). See
:mod:`lightning_interp.correlation` (definitions follow docs/correlation.md; the paper's exact formulas
are not reproduced here). Every logged number comes from :func:`~lightning_interp.correlation.measure_correlation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import InterpretabilityCallback
from lightning_interp.callbacks.measurement import Measurement
from lightning_interp.checks import check_int, check_layers_run, check_logits, model_device_dtype
from lightning_interp.correlation import INPUT, LayerReplacement, layer_outputs, measure_correlation, resolve_layers
from lightning_interp.plotting import correlation_orders_figure
from lightning_interp.results import flat_scalars

__all__ = ["PILOT_WORK", "CorrelationOrderCallback"]

#: The fraction of the probe the cost pilot (:meth:`CorrelationOrderCallback.estimate_cost`) measures (at least the floor).
PILOT_WORK = 0.5


class CorrelationOrderCallback(InterpretabilityCallback):
    """Track how much of each layer's classification is carried by order 1, order 2 and higher orders.

    At each measurement, :func:`~lightning_interp.correlation.measure_correlation` runs on a fixed labelled
    probe set: for every tracked layer (``"input"`` is the model input), the layer's output is replaced by
    Gaussian surrogates of order 2, 1 and 0 with the class means and covariances of that output and the
    forward pass continues from the layer. Logged per layer ``L``: ``correlation/<L>/acc_real``,
    ``acc_order2``, ``acc_order1``, ``acc_order0``, ``higher_order_gap = acc_real - acc_order2`` (each with
    ``_se``: the standard error over the probe examples, which also carries the noise of the surrogate draw,
    one per example; the gap's is paired) and ``non_gaussianity`` (mean absolute excess kurtosis of the units,
    with ``_se``: the delete-a-group jackknife's over the examples), and ``correlation/probe_size``, the
    examples measured. The surrogate draws come from :meth:`draw_generator` (the seed and the step). When the
    overhead budget scales a measurement down (:attr:`work` < 1) it uses a class-balanced prefix of the probe:
    the first ``ceil(work * n_c)`` examples of every class, never fewer than ``min_per_class`` (or the class's
    ``n_c``), so :meth:`work_floor` is ``min_per_class / n_min`` (``n_min``: the smallest class's probe
    examples). Figures: the accuracies per layer now, and the higher-order gap per layer over training (the
    tracking).

    Args:
        layers: ``"auto"`` (the input and every activation module) or ``named_modules()`` paths
            (``"input"`` for the model input).
        probe_size: labelled probe examples (drawn once, own generator).
        min_per_class: fewest probe examples a class present in the probe must have.
        **kwargs: the arguments every callback shares (``every_n_epochs``, ``every_n_steps``, ``run_on``,
            ``measure_at_start``, ``measure_at_end``, ``seed`` (of the probe and of the surrogate draws),
            ``log_images``, ``figure_dir``, ``key_prefix``, ``probe``, ``unpack``, ``prog_bar``, ``budget``): see
            :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`.

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
        self, layers: str | Sequence[str] = "auto", probe_size: int = 512, min_per_class: int = 10, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        names = [layers] if isinstance(layers, str) else layers
        if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"layers must be 'auto' or a list of named_modules() paths ('input' for the input), got {layers!r}")
        check_int("probe_size", probe_size, 4)
        check_int("min_per_class", min_per_class, 2)
        self.layer_spec = layers
        self.probe_size, self.min_per_class = probe_size, min_per_class
        self._replacements: dict[str, LayerReplacement] = {}  # the torch.fx splits, reused while the model stays
        self.layers: list[str] = []
        self._probe: tuple[Tensor, Tensor] | None = None
        self._members: list[Tensor] = []  # probe positions of each class present, in probe order

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layer_spec, "probe_size": self.probe_size}

    # ------------------------------------------------------------------ setup
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = resolve_layers(pl_module, self.layer_spec)
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
        num_classes = logits.shape[1]
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"probe labels lie in {int(y.min())}..{int(y.max())}, outside the model's {num_classes} classes")
        counts = torch.bincount(y, minlength=num_classes)
        few = [c for c in range(num_classes) if 0 < counts[c] < self.min_per_class]
        if few:
            raise ValueError(
                f"classes {few} have fewer than min_per_class={self.min_per_class} probe examples "
                f"(counts {counts[few].tolist()}); increase probe_size or lower min_per_class"
            )
        # each class's probe positions in probe order: a scaled measurement takes the first ones of every class
        self._members = [torch.nonzero(y == c).flatten() for c in range(num_classes) if counts[c] > 0]
        # the torch.fx splits are set up here, once per model: a one-time cost that the pilot should not scale
        for layer in self.layers:
            run = self._replacements.get(layer)
            if run is None or run.model is not pl_module:
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
        linear_s, draws_s = self._measure_at(pl_module, subset).data["result"].seconds
        ratio = len(self._probe[1]) / len(subset)
        return linear_s * ratio + draws_s * ratio * ratio

    # ------------------------------------------------------------------ measurement
    def draw_generator(self) -> torch.Generator:
        """The generator of the surrogate draws of the measurement at :attr:`step`: seeded by ``seed`` and the step."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)

    def measure(self, pl_module: nn.Module) -> Measurement:
        """The orders of every layer on the probe, or (scaled by :attr:`work`) on its class-balanced prefix.

        ``probe_size`` logs the examples used.
        """
        if self._probe is None:
            raise RuntimeError("CorrelationOrderCallback.measure() called before setup()")
        subset = self._subset() if self.work < 1 else torch.arange(len(self._probe[1]))
        return self._measure_at(pl_module, subset)

    def _measure_at(self, pl_module: nn.Module, subset: Tensor) -> Measurement:
        """:func:`~lightning_interp.correlation.measure_correlation` on the probe examples at positions ``subset``."""
        if self._probe is None:
            raise RuntimeError("CorrelationOrderCallback.measure() called before setup()")
        x, y = self._probe
        result = measure_correlation(
            pl_module, x[subset], y[subset], generator=self.draw_generator(), layers=self.layers, replacements=self._replacements
        )
        return Measurement(scalars=flat_scalars(result), data={"result": result})

    def figures(self, measurement: Measurement) -> dict[str, Any]:
        return {"orders": correlation_orders_figure(measurement.data["result"], self.history)}

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        return measurement.data["result"].tables() if "result" in measurement.data else {}
