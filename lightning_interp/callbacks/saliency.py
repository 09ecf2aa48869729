"""Final-layer saliency callback: discriminative / confusing / policy-gradient maps during training.

Reference: Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022).
The read-outs are :func:`lightning_interp.saliency.measure_saliency`'s (definitions in docs/saliency.md; the
paper's exact formulas are not reproduced here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import InterpretabilityCallback
from lightning_interp.callbacks.measurement import Measurement
from lightning_interp.checks import check_choice, check_class_names, check_int, check_layers_run, check_logits, model_device_dtype
from lightning_interp.plotting import saliency_figures
from lightning_interp.results import flat_scalars
from lightning_interp.saliency import FinalLayerSaliency, deletion_rows, measure_saliency

__all__ = ["MIN_IMAGES", "PILOT_WORK", "FinalLayerSaliencyCallback"]

#: Fewest probe images (and deletion-curve images) a measurement scaled down by the budget uses: a mean and
#: its standard error over the images need a few of them.
MIN_IMAGES = 4
#: The fraction of the images the cost pilot (:meth:`FinalLayerSaliencyCallback.estimate_cost`) measures (at least
#: :data:`MIN_IMAGES`).
PILOT_WORK = 0.5


class FinalLayerSaliencyCallback(InterpretabilityCallback):
    """Log final-layer saliency maps of a fixed probe batch and how faithful they are.

    Before the first training step the callback draws ``probe_size`` images with its own generator (from
    ``probe``, else the trainer's data: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`)
    and finds the final ``nn.Linear`` and the feature map pooled into it (see
    :class:`~lightning_interp.saliency.FinalLayerSaliency`). At each measurement it logs, under ``saliency/``,
    what :func:`~lightning_interp.saliency.measure_saliency` returns for the probe: ``neg_pg_share``,
    ``target_prob``, ``disc_channels``, ``conf_channels`` and (with deletion curves) ``deletion_auc_random``,
    ``deletion_auc_pg``, ``faithfulness_pg``, ``deletion_auc_disc`` and ``faithfulness_disc``, each a mean over
    the probe images with ``<name>_se``, and ``probe_size``, the images measured (fewer than ``probe_size``
    when the overhead budget scales the measurement down: the first ``ceil(work * N)`` images and
    deletion-curve images, never fewer than :data:`MIN_IMAGES` (4) of each, so :meth:`work_floor` is ``4 / N``
    for the larger ratio). The random baseline maps come from the generator state after the probe draw
    (:attr:`baseline_state`): the same at every measurement. The figure: per image, its three maps.

    Args:
        probe_size: number of probe images (a bounded, fixed batch).
        target: ``"predicted"`` (the model's class) or ``"label"`` (the probe labels).
        feature_layer: ``named_modules()`` path of the feature map (found when ``None``).
        classifier: ``named_modules()`` path of the final ``nn.Linear`` (found when ``None``).
        min_size: ``min_size`` of the recursive channel split.
        deletion_steps: deletion-curve resolution (0 disables the faithfulness scalars).
        deletion_images: measure the deletion curves on the first this many probe images only (``None``: all).
            Each of the three curves costs ``deletion_steps + 1`` forward passes of those images, the bulk of
            a measurement on a large probe (an audit of many images); the per-image values of the others are NaN.
        class_names: names of the classes, to label the figure's rows (default ``"class <k>"``).
        **kwargs: the arguments every callback shares (``every_n_epochs``, ``seed``, ``probe``, ``budget``, ...):
            see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`. ``seed`` seeds the probe
            draw and the random baseline maps.

    Raises:
        ValueError: in ``__init__``, for an unknown ``target``, ``probe_size < 1``, ``min_size < 1`` or
            ``deletion_steps < 0``; before the first training step, for unknown layer names or layers that do not
            run in ``forward``, no final ``nn.Linear``, a single-logit output, no probe data, ``target="label"``
            without labels or with labels outside ``[0, K)``, or a head that needs gradients (the autograd
            fallback) that do not reach the feature layer (a reentrant checkpoint: use ``use_reentrant=False``).
        TypeError: before the first training step, for probe data that is not an image batch ``[N, C, H, W]``.

    Example:
        >>> cb = FinalLayerSaliencyCallback(probe_size=8, every_n_epochs=1)
    """

    prefix = "saliency"

    def __init__(
        self,
        probe_size: int = 8,
        target: Literal["predicted", "label"] = "predicted",
        feature_layer: str | None = None,
        classifier: str | None = None,
        min_size: int = 20,
        deletion_steps: int = 10,
        deletion_images: int | None = None,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("target", target, ("predicted", "label"))
        check_int("probe_size", probe_size, 1)
        check_int("min_size", min_size, 1)
        check_int("deletion_steps", deletion_steps, 0)
        check_int("deletion_images", deletion_images, 1, allow_none=True)
        for name, layer in (("feature_layer", feature_layer), ("classifier", classifier)):
            if layer is not None and not isinstance(layer, str):
                raise TypeError(f"{name} must be a named_modules() path (a string) or None, got {layer!r}")
        self.probe_size = probe_size
        self.target = target
        self.feature_layer = feature_layer
        self.classifier = classifier
        self.min_size = min_size
        self.deletion_steps, self.deletion_images = deletion_steps, deletion_images
        self.class_names = check_class_names(class_names)
        self._saliency: FinalLayerSaliency | None = None
        #: State of the generator the random baseline maps are drawn from (``None`` until the probe is drawn).
        self.baseline_state: Tensor | None = None
        self._timing = (0.0, 0.0)  # seconds of the maps and of the deletion curves in the last measurement

    def _state_key_fields(self) -> dict[str, Any]:
        return {"probe_size": self.probe_size, "feature_layer": self.feature_layer}

    @property
    def saliency(self) -> FinalLayerSaliency | None:
        """The method object (its ``feature_layer`` and ``classifier`` are resolved), once the callback is prepared."""
        return self._saliency

    # ------------------------------------------------------------------ setup
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_inputs is None:
            self.draw_probe(trainer, self.probe_size)
        probe, labels = self.probe_inputs, self.probe_labels
        if not isinstance(probe, Tensor) or probe.ndim != 4 or not probe.is_floating_point():
            got = f"{probe.dtype} of shape {list(probe.shape)}" if isinstance(probe, Tensor) else type(probe).__name__
            raise TypeError(
                f"FinalLayerSaliencyCallback needs image inputs [N, C, H, W] (floating point), got {got}; "
                "final-layer saliency maps are spatial, so use it with image models."
            )
        if self.target == "label" and labels is None:
            raise ValueError(
                "target='label' needs labelled probe data, but the probe has no class labels [N]; use target='predicted', "
                "name the label key of dict batches with unpack=('image', 'label'), or pass probe=(images, labels)"
            )
        if self.baseline_state is None:
            # the random baseline maps follow the probe draw in the callback's generator, the same at every measurement
            self.baseline_state = self.generator.get_state()
            torch.rand(probe.shape[0], *probe.shape[2:], generator=self.generator)
        self._saliency = FinalLayerSaliency(pl_module, self.feature_layer, self.classifier, self.min_size)
        device, dtype = model_device_dtype(pl_module)
        head = probe[:2].to(device=device, dtype=dtype)
        try:
            out = pl_module(head)
        except Exception as err:
            raise TypeError(
                f"{type(pl_module).__name__} failed on the probe inputs of shape {list(probe.shape[1:])}: "
                f"{type(err).__name__}: {err}"
            ) from err
        check_logits(out, "FinalLayerSaliencyCallback", pl_module)
        named = [layer for layer in (self.feature_layer, self.classifier) if layer is not None]
        if named:
            check_layers_run(pl_module, named, head, "FinalLayerSaliencyCallback")
        num_classes = out.shape[1]
        if self.target == "label" and labels is not None:
            bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
            if len(bad):
                values = sorted({int(v) for v in labels[bad]})
                raise ValueError(
                    f"FinalLayerSaliencyCallback(target='label'): {len(bad)} probe label(s) {values[:5]} lie outside the "
                    f"model's {num_classes} classes [0, {num_classes - 1}], so they name no logit to explain. Check that "
                    "the labels are class indices 0..K-1 and that the model returns one logit per class, or use "
                    "target='predicted'."
                )
        self._saliency.resolve(head)
        # a tiny attribution: a head that needs gradients it cannot get (a reentrant checkpoint) fails now, with the fix
        target = labels[:2].to(device) if self.target == "label" and labels is not None else None
        self._saliency.attribute(head, target=target, method="policy_gradient")

    # ------------------------------------------------------------------ sizes and cost
    def _full_sizes(self) -> tuple[int, int]:
        """Probe images and deletion-curve images of a full measurement."""
        n = len(self.probe_inputs) if self.probe_inputs is not None else self.probe_size
        k = n if self.deletion_images is None else min(n, self.deletion_images)
        return n, k if self.deletion_steps else 0

    def work_floor(self) -> float:
        """The smallest fraction of a full measurement: :data:`MIN_IMAGES` probe and deletion-curve images.

        The cost of a measurement is about proportional to the images (the deletion curves dominate), so the
        floor is the larger of the two ratios ``min(full, MIN_IMAGES) / full``.
        """
        n, k = self._full_sizes()
        return max(min(n, MIN_IMAGES) / n, min(k, MIN_IMAGES) / k if k else 0.0)

    def forward_passes(self) -> float | None:
        # the maps (one pass), then the batched deletion curves of three maps: their images per probe image
        n, k = self._full_sizes()
        return 1.0 + k * deletion_rows(self.deletion_steps, 3, intact=True) / n if self.deletion_steps else 1.0

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds of a full measurement, from a pilot: the measurement itself on half of the images.

        The maps and the deletion curves are timed apart and each is scaled by its images (full / pilot): the
        method's own passes at a measurement's batch shapes (many small passes cost far more per image than one
        batched one), on half the images (at least the floor) so that fixed costs are not scaled up.
        """
        if self._saliency is None or self.probe_inputs is None:
            return None
        n, k = self._full_sizes()
        pilot_n = min(n, max(MIN_IMAGES, math.ceil(n * PILOT_WORK)))
        pilot_k = min(k, max(MIN_IMAGES, math.ceil(k * PILOT_WORK)))
        self._evaluate(pl_module, pilot_n, pilot_k)
        maps_s, deletion_s = self._timing
        return maps_s * n / pilot_n + (deletion_s * k / pilot_k if pilot_k else 0.0)

    # ------------------------------------------------------------------ measurement
    def measure(self, pl_module: nn.Module) -> Measurement:
        """:func:`~lightning_interp.saliency.measure_saliency` of the first probe images, scaled by :attr:`work`.

        The budget may scale a measurement down to the first ``ceil(work * N)`` probe images and deletion
        images (at least :data:`MIN_IMAGES`, or all when fewer); ``probe_size`` logs the images used.
        """
        n_full, k_full = self._full_sizes()
        n = self.scaled(n_full, min(n_full, MIN_IMAGES))
        k = self.scaled(k_full, min(k_full, MIN_IMAGES)) if k_full else 0
        return self._evaluate(pl_module, n, k)

    def _evaluate(self, pl_module: nn.Module, n: int, k: int) -> Measurement:
        """The measurement on the first ``n`` probe images, deletion curves on the first ``k`` of them."""
        if self._saliency is None or self._saliency.model is not pl_module or self.probe_inputs is None:
            raise RuntimeError("FinalLayerSaliencyCallback.measure() called before setup()")
        generator, labels = torch.Generator().set_state(self.baseline_state), self.probe_labels  # type: ignore[arg-type]
        result = measure_saliency(
            pl_module,
            self.probe_inputs[:n],
            None if labels is None else labels[:n],
            generator=generator,
            target=self.target,
            min_size=self.min_size,
            deletion_steps=self.deletion_steps if k else 0,
            deletion_images=k or None,
            saliency=self._saliency,
        )
        self._timing = result.seconds
        data = {"result": result, "maps": result.maps, "inputs": result.inputs, "per_image": result.per_image}
        return Measurement(scalars=dict(flat_scalars(result)), data=data)

    # ------------------------------------------------------------------ figures
    def figures(self, measurement: Measurement) -> dict[str, Any]:
        return saliency_figures(measurement.data["result"], class_names=self.class_names)
