"""Final-layer saliency callback: discriminative / confusing / policy-gradient maps during training.

Reference: Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022).
See :mod:`lightning_interp.saliency` (definitions in docs/saliency.md; the paper's exact formulas are not
reproduced here).
"""

from __future__ import annotations

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
    check_logits,
    model_device_dtype,
)
from lightning_interp.callbacks.probe import ProbeSource, Unpack
from lightning_interp.plotting import saliency_grid
from lightning_interp.saliency import FinalLayerSaliency, bilinear_upsample, deletion_curve, negative_share
from lightning_interp.stats import mean_and_se

__all__ = ["FinalLayerSaliencyCallback"]


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
      size of the most discriminative / most confusing channel sets of the targets);

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
            ``deletion_steps < 0``; before the first training step, for unknown layer names, a model
            without a final ``nn.Linear``, a single-logit output, no probe data, or ``target="label"``
            without labels.
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
        if self._random_map is None:
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
        self._saliency.resolve(head)

    # ------------------------------------------------------------------ measurement
    def forward_passes(self) -> float | None:
        # the maps (one pass and a backward), then each deletion curve: random, policy gradient, discriminative
        return 3.0 + 3 * (self.deletion_steps + 1) if self.deletion_steps else 3.0

    def measure(self, pl_module: nn.Module) -> Measurement:
        if self._saliency is None or self._saliency.model is not pl_module:
            raise RuntimeError("FinalLayerSaliencyCallback.measure() called before setup()")
        device, dtype = model_device_dtype(pl_module)
        x = self._probe.to(device=device, dtype=dtype)  # type: ignore[union-attr]
        target = self._labels.to(device) if self.target == "label" else None  # type: ignore[union-attr]
        out = self._saliency.attribute_all(x, target=target)
        pg, tgt = out["policy_gradient"], out["target"]
        weight = self._saliency_weight(pl_module)
        scalars: dict[str, Tensor | float] = {
            "disc_channels": self._chain_size(weight, tgt, "+"),
            "conf_channels": self._chain_size(weight, tgt, "-"),
        }
        # per-image values, then their mean and its standard error over the probe images
        per_image = {
            "neg_pg_share": negative_share(pg),
            "target_prob": out["logits"].softmax(dim=1).gather(1, tgt[:, None])[:, 0],
        }
        if self.deletion_steps:
            k = len(x) if self.deletion_images is None else min(len(x), self.deletion_images)

            def padded(values: Tensor) -> Tensor:  # NaN for the images without deletion curves
                return torch.cat([values, values.new_full((len(x) - k,), float("nan"))])

            xs, ts = x[:k], tgt[:k]
            rand = deletion_curve(pl_module, xs, self._random_map[:k].to(x.device), ts, self.deletion_steps).mean(dim=1)  # type: ignore[index]
            per_image["deletion_auc_random"] = padded(rand)
            for method, short in (("policy_gradient", "pg"), ("discriminative", "disc")):
                up = bilinear_upsample(out[method][:k, None], x.shape[-2:])[:, 0]
                auc = deletion_curve(pl_module, xs, up, ts, self.deletion_steps).mean(dim=1)
                per_image[f"deletion_auc_{short}"] = padded(auc)
                per_image[f"faithfulness_{short}"] = padded(rand - auc)  # paired on the same image
        for name, values in per_image.items():
            scalars[name], scalars[f"{name}_se"] = mean_and_se(values[~values.isnan()])
        return Measurement(scalars=scalars, data={"maps": out, "inputs": x, "per_image": per_image})

    def _saliency_weight(self, module: nn.Module) -> Tensor | None:
        s = self._saliency
        if s is None or not s.uses_closed_form:
            return None
        return dict(module.named_modules())[s.classifier].weight  # type: ignore[index]

    def _chain_size(self, weight: Tensor | None, target: Tensor, side: str) -> float:
        if weight is None:
            return float("nan")
        masks = self._saliency.class_chain_mask(target, side, weight)  # type: ignore[union-attr]
        return float(masks.sum(dim=1).double().mean())

    # ------------------------------------------------------------------ figures
    def figures(self, measurement: Measurement) -> dict[str, Any]:
        maps = measurement.data["maps"]
        labels = None
        if self.class_names is not None:
            names = self.class_names
            labels = [names[int(t)] if int(t) < len(names) else f"class {int(t)}" for t in maps["target"]]
        return {"maps": saliency_grid(maps, measurement.data["inputs"], labels=labels)}
