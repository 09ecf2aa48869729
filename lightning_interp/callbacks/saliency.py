"""Final-layer saliency callback: discriminative / confusing / policy-gradient maps during training.

Reference: Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022).
See :mod:`lightning_interp.saliency` (definitions in docs/saliency.md; the paper's exact formulas are not
reproduced here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import (
    InterpretabilityCallback,
    Measurement,
    RunOn,
    check_choice,
    check_class_names,
    check_int,
    check_layers_run,
    check_logits,
    model_device_dtype,
)
from lightning_interp.callbacks.probe import ProbeSource, Unpack
from lightning_interp.plotting import saliency_grid
from lightning_interp.saliency import (
    FinalLayerSaliency,
    bilinear_upsample,
    deletion_curves,
    deletion_rows,
    negative_share,
    target_probability,
)
from lightning_interp.stats import mean_and_se

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
    ``probe``, else the trainer's data: see
    :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`) and finds the final
    ``nn.Linear`` and the feature map pooled into it (see
    :class:`~lightning_interp.saliency.FinalLayerSaliency`). At each measurement it logs

    * ``saliency/neg_pg_share``: the share of negative policy-gradient mass (evidence for the
      competitors, the "confusing" regions), ``sum relu(-M) / sum |M|``, averaged over the probe;
    * ``saliency/deletion_auc_pg`` and ``saliency/deletion_auc_disc``: the mean target probability
      along a deletion curve that removes the pixels with the highest policy-gradient
      (discriminative) saliency first (replaced by the image mean); ``saliency/deletion_auc_random``
      the same for a fixed random map (drawn once from the callback's own generator); and
      ``saliency/faithfulness_pg`` / ``faithfulness_disc``, random minus ours (positive when the map
      finds the evidence better than chance). Each of these, ``neg_pg_share`` and ``target_prob`` is a
      mean over the probe images and comes with ``<name>_se``, its standard error over the images.
      Policy-gradient maps vanish as ``q(c|x) -> 1`` (``g = W[c] - E_q W``), so on confidently
      classified probes their deletion score is weak;
    * ``saliency/target_prob``, ``saliency/disc_channels`` and ``saliency/conf_channels`` (the mean
      size of the most discriminative / most confusing channel sets of the targets), each with ``_se``;
    * ``saliency/probe_size``: the probe images measured (fewer than ``probe_size`` when the overhead
      budget scales the measurement down: the first ``ceil(work * N)`` images and deletion-curve images,
      never fewer than :data:`MIN_IMAGES` (4) of each, so :meth:`work_floor` is ``4 / N`` for the larger
      ratio; the cost is about proportional to the images).

    An image whose logits (or maps) are non-finite makes every read-out NaN, not a number computed from
    ``argmax`` of NaN. The deletion curves of the three maps are classified in batched passes (the intact
    image from the maps' own pass, the fully deleted one once per image).

    and a figure grid with, per probe image, the image and its discriminative, confusing and
    policy-gradient maps.

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
        every_n_epochs: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`.
        every_n_steps: see the base class.
        run_on: see the base class.
        measure_at_start: see the base class.
        measure_at_end: see the base class.
        seed: seed of the probe draw and the random baseline maps.
        log_images: see the base class.
        figure_dir: see the base class.
        key_prefix: see the base class.
        probe: probe data instead of the trainer's (images ``[N, C, H, W]``, ``(images, labels)``, a
            ``Dataset`` or a ``DataLoader``); see the base class.
        unpack: how to read a batch; see the base class.
        prog_bar: scalars to show in the progress bar; see the base class.
        budget: the share of training time its scheduled measurements may use; see the base class.

    Raises:
        ValueError: in ``__init__``, for an unknown ``target``, ``probe_size < 1``, ``min_size < 1`` or
            ``deletion_steps < 0``; before the first training step, for unknown layer names or a
            ``feature_layer`` / ``classifier`` that does not run in ``forward``, a model without a final
            ``nn.Linear``, a single-logit output, no probe data, ``target="label"`` without labels or with
            labels outside ``[0, K)``, or a head that needs gradients (the autograd fallback) that do not reach
            the feature layer (a reentrant ``torch.utils.checkpoint``: use ``use_reentrant=False``).
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
        self._probe: Tensor | None = None
        self._labels: Tensor | None = None
        self._saliency: FinalLayerSaliency | None = None
        self._random_map: Tensor | None = None
        self._timing = (0.0, 0.0)  # seconds of the maps and of the deletion curves in the last measurement

    def _state_key_fields(self) -> dict[str, Any]:
        return {"probe_size": self.probe_size, "feature_layer": self.feature_layer}

    @property
    def saliency(self) -> FinalLayerSaliency | None:
        """The method object (its ``feature_layer`` and ``classifier`` are resolved), once the callback is prepared."""
        return self._saliency

    # ------------------------------------------------------------------ setup
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._probe is None:
            self._probe, self._labels = self.draw_probe(trainer, self.probe_size)
        probe = self._probe
        if not isinstance(probe, Tensor) or probe.ndim != 4 or not probe.is_floating_point():
            got = f"{probe.dtype} of shape {list(probe.shape)}" if isinstance(probe, Tensor) else type(probe).__name__
            raise TypeError(
                f"FinalLayerSaliencyCallback needs image inputs [N, C, H, W] (floating point), got {got}; "
                "final-layer saliency maps are spatial, so use it with image models."
            )
        if self.target == "label" and self._labels is None:
            raise ValueError(
                "target='label' needs labelled probe data, but the probe has no class labels [N]; use target='predicted', "
                "name the label key of dict batches with unpack=('image', 'label'), or pass probe=(images, labels)"
            )
        # one fixed random map per probe image: the baseline of the deletion curve, the same at every measurement
        if self._random_map is None or self._random_map.shape[0] != probe.shape[0]:
            self._random_map = torch.rand(probe.shape[0], *probe.shape[2:], generator=self.generator)
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
        if self.target == "label":
            labels = self._labels  # type: ignore[assignment]
            bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()  # type: ignore[operator]
            if len(bad):
                values = sorted({int(v) for v in labels[bad]})  # type: ignore[index]
                raise ValueError(
                    f"FinalLayerSaliencyCallback(target='label'): {len(bad)} probe label(s) {values[:5]} lie outside the "
                    f"model's {num_classes} classes [0, {num_classes - 1}], so they name no logit to explain. Check that "
                    "the labels are class indices 0..K-1 and that the model returns one logit per class, or use "
                    "target='predicted'."
                )
        self._saliency.resolve(head)
        # a tiny attribution now: a head that needs gradients (the autograd fallback) and cannot get them (a
        # reentrant activation checkpoint) fails here, before the first training step, with the fix
        target = self._labels[:2].to(device) if self.target == "label" else None  # type: ignore[index]
        self._saliency.attribute(head, target=target, method="policy_gradient")

    # ------------------------------------------------------------------ sizes and cost
    def _full_sizes(self) -> tuple[int, int]:
        """Probe images and deletion-curve images of a full measurement."""
        n = len(self._probe) if self._probe is not None else self.probe_size
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
        # the maps (one pass over the probe), then the deletion curves of the three maps, batched: as many passes
        # over the probe as the curves classify images per probe image
        n, k = self._full_sizes()
        return 1.0 + k * deletion_rows(self.deletion_steps, 3, intact=True) / n if self.deletion_steps else 1.0

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """Seconds of a full measurement, from a pilot: the measurement itself on half of the images.

        The maps and the deletion curves are timed apart and each is scaled by its images (full / pilot). The
        pilot runs the method's own passes at the batch shapes of a measurement, which a forward pass over the
        probe, repeated, does not (many small passes cost far more per image than one batched one); half the
        images (at least the floor) keeps the fixed costs from being scaled up as if they grew with the images.
        """
        if self._saliency is None or self._probe is None:
            return None
        n, k = self._full_sizes()
        pilot_n = min(n, max(MIN_IMAGES, math.ceil(n * PILOT_WORK)))
        pilot_k = min(k, max(MIN_IMAGES, math.ceil(k * PILOT_WORK)))
        self._evaluate(pl_module, pilot_n, pilot_k)
        maps_s, deletion_s = self._timing
        return maps_s * n / pilot_n + (deletion_s * k / pilot_k if pilot_k else 0.0)

    # ------------------------------------------------------------------ measurement
    def measure(self, pl_module: nn.Module) -> Measurement:
        """Maps, channel-set sizes and deletion curves of the first ``probe_size`` images scaled by :attr:`work`.

        The budget may scale a measurement down to the first ``ceil(work * N)`` probe images and deletion
        images (at least :data:`MIN_IMAGES`, or all when fewer); ``probe_size`` logs the images used.
        """
        n_full, k_full = self._full_sizes()
        n = self.scaled(n_full, min(n_full, MIN_IMAGES))
        k = self.scaled(k_full, min(k_full, MIN_IMAGES)) if k_full else 0
        return self._evaluate(pl_module, n, k)

    def _evaluate(self, pl_module: nn.Module, n: int, k: int) -> Measurement:
        """The measurement on the first ``n`` probe images, deletion curves on the first ``k`` of them."""
        if self._saliency is None or self._saliency.model is not pl_module:
            raise RuntimeError("FinalLayerSaliencyCallback.measure() called before setup()")
        start = time.perf_counter()
        device, dtype = model_device_dtype(pl_module)
        x = self._probe[:n].to(device=device, dtype=dtype)  # type: ignore[index]
        target = self._labels[:n].to(device) if self.target == "label" else None  # type: ignore[index]
        out = self._saliency.attribute_all(x, target=target)
        pg, tgt, logits = out["policy_gradient"], out["target"], out["logits"]
        # a non-finite logit (or feature) makes that image's read-outs NaN: argmax and softmax of NaN mean nothing
        finite = torch.isfinite(logits).all(dim=1) & torch.isfinite(pg.flatten(1)).all(dim=1)
        nan = torch.full((n,), float("nan"), dtype=torch.float64, device=logits.device)

        def checked(values: Tensor) -> Tensor:
            return torch.where(finite, values.to(torch.float64), nan)

        weight = self._saliency_weight(pl_module)
        per_image = {
            "neg_pg_share": checked(negative_share(pg)),
            "target_prob": checked(target_probability(logits, tgt)),
            "disc_channels": checked(self._chain_sizes(weight, tgt, "+")),
            "conf_channels": checked(self._chain_sizes(weight, tgt, "-")),
        }
        used = dict.fromkeys(per_image, n)
        maps_done = time.perf_counter()
        if k:
            xs, ts = x[:k], tgt[:k]
            # the random, policy-gradient and discriminative maps of each image in the same batched passes
            up = bilinear_upsample(torch.stack([pg[:k], out["discriminative"][:k]], dim=1), x.shape[-2:])
            maps = torch.cat([self._random_map[:k, None].to(device=x.device, dtype=up.dtype), up], dim=1)  # type: ignore[index]
            intact = per_image["target_prob"][:k]
            curves = deletion_curves(pl_module, xs, maps, ts, self.deletion_steps, intact=intact)
            aucs = curves.mean(dim=2).to(torch.float64)
            rand, pg_auc, disc_auc = nan.clone(), nan.clone(), nan.clone()
            rand[:k], pg_auc[:k], disc_auc[:k] = aucs[:, 0], aucs[:, 1], aucs[:, 2]
            per_image["deletion_auc_random"] = rand
            per_image["deletion_auc_pg"], per_image["faithfulness_pg"] = pg_auc, rand - pg_auc  # paired on the image
            per_image["deletion_auc_disc"], per_image["faithfulness_disc"] = disc_auc, rand - disc_auc
            used.update(dict.fromkeys(list(per_image)[4:], k))
        scalars: dict[str, Tensor | float] = {"probe_size": float(n)}
        # per-image values, then their mean and its standard error over the images measured (NaN stays NaN)
        for name, values in per_image.items():
            scalars[name], scalars[f"{name}_se"] = mean_and_se(values[: used[name]])
        self._timing = (maps_done - start, time.perf_counter() - maps_done)
        return Measurement(scalars=scalars, data={"maps": out, "inputs": x, "per_image": per_image})

    def _saliency_weight(self, module: nn.Module) -> Tensor | None:
        s = self._saliency
        if s is None or not s.uses_closed_form:
            return None
        return dict(module.named_modules())[s.classifier].weight  # type: ignore[index]

    def _chain_sizes(self, weight: Tensor | None, target: Tensor, side: str) -> Tensor:
        """Size of the last chain subset of each image's target class ``[N]`` (NaN for the autograd fallback)."""
        if weight is None:
            return torch.full(target.shape, float("nan"), dtype=torch.float64, device=target.device)
        masks = self._saliency.class_chain_mask(target, side, weight)  # type: ignore[union-attr]
        return masks.sum(dim=1).to(torch.float64)

    # ------------------------------------------------------------------ figures
    def figures(self, measurement: Measurement) -> dict[str, Any]:
        maps = measurement.data["maps"]
        labels = None
        if self.class_names is not None:
            names = self.class_names
            labels = [names[int(t)] if int(t) < len(names) else f"class {int(t)}" for t in maps["target"]]
        return {"maps": saliency_grid(maps, measurement.data["inputs"], labels=labels)}
