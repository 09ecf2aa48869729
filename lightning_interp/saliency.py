"""Final-layer saliency: discriminative and confusing regions from the last fully connected layer.

Reference:
    Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022).
    Definitions follow docs/saliency.md: (a) is the paper's own analysis as reconstructed from the
    author's public summary and notebooks (the paper's exact formulas are not reproduced here); (b), the
    policy-gradient map, is this project's named extension.

Cross-entropy training is a one-step policy gradient with policy ``pi(c|x) = softmax(W a + b)_c`` over
the pooled feature ``a = mean_ij A[:, i, j]``. From the final ``nn.Linear`` alone:

* :func:`measure_saliency` is the one entry point: the maps of a probe batch and every read-out the
  callback logs (:class:`SaliencyResult`);
* :func:`fit_ald` audits each class row of ``W``: on each side (positive weights, magnitudes of
  negative weights) ``log sort(y) ~ slope * r + intercept`` on the normalised rank ``r = i / L``, with
  ``R^2`` and the asymmetric-Laplace parameters ``kappa = sqrt(e^b / (a - e^b))``,
  ``lambda = a * kappa``, ``mean = (1 - kappa^2) / (lambda * kappa)``; plus pooled ("joint") fits;
* :func:`split_chain` is the recursive mean split of a class row: the last ``"+"`` subset is the most
  discriminative channel set, the last ``"-"`` subset the most confusing one;
* :class:`FinalLayerSaliency` (a ``captum.attr.Attribution``) turns those into maps on the spatial
  feature map ``A`` that is globally average-pooled into the final layer, in one forward pass:
  ``policy_gradient`` ``M = sum_k g_k A_k`` with ``g = W[c] - sum_j q_j W[j]`` (the score-function
  gradient ``d log pi(c|x) / d a``), ``cam`` ``M = sum_k W[c, k] A_k``, and the paper's
  ``discriminative`` / ``confusing`` maps ``relu(sum_{k in S} HW / (2 + sum_ab A_k) A_k)``, min-max
  normalised, for the last chain subset ``S``.

For a global-average-pool + Linear head no backward pass is needed; ``policy_gradient / (h * w)``
equals captum's ``LayerGradCam`` of ``log_softmax(model(x))[c]`` with ``relu_attributions=False``.
Other heads (flatten + Linear, an MLP after the pool, token models such as ViT) go through an
autograd fallback that computes the same quantities from gradients at the feature layer: the
effective weight of channel ``k`` for logit ``c`` is ``sum_ij d z_c / d A[k, i, j]`` (which is exactly
``W[c, k]`` for a GAP head).

The definitions live in :mod:`lightning_interp.final_layer` (weights, chains, map arithmetic),
:mod:`lightning_interp.saliency_maps` (the maps) and :mod:`lightning_interp.faithfulness` (deletion curves);
every public name of those is importable from here as well.

The module is pure torch (plus captum, imported on first use of :class:`FinalLayerSaliency` or
:func:`measure_saliency`): it never imports Lightning, and importing it pulls neither captum nor matplotlib.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.checks import check_choice, check_int
from lightning_interp.faithfulness import (
    DELETION_ELEMENTS,
    deletion_curve,
    deletion_curves,
    deletion_rows,
    negative_share,
    target_probability,
)
from lightning_interp.final_layer import (
    ALDFit,
    ALDSide,
    bilinear_upsample,
    channel_set_map,
    fit_ald,
    full_tensor,
    split_chain,
)
from lightning_interp.results import Scalar, Table
from lightning_interp.saliency_maps import METHODS, check_images
from lightning_interp.stats import mean_and_se

if TYPE_CHECKING:
    from lightning_interp.saliency_maps import FinalLayerSaliency

__all__ = [
    "DELETION_ELEMENTS",
    "METHODS",
    "READ_OUTS",
    "ALDFit",
    "ALDSide",
    "FinalLayerSaliency",
    "SaliencyResult",
    "bilinear_upsample",
    "channel_set_map",
    "deletion_curve",
    "deletion_curves",
    "deletion_rows",
    "fit_ald",
    "full_tensor",
    "measure_saliency",
    "negative_share",
    "split_chain",
    "target_probability",
]

#: The per-image read-outs of :class:`SaliencyResult`, in the order they are logged (the last five only with
#: deletion curves).
READ_OUTS: tuple[str, ...] = (
    "neg_pg_share",
    "target_prob",
    "disc_channels",
    "conf_channels",
    "deletion_auc_random",
    "deletion_auc_pg",
    "faithfulness_pg",
    "deletion_auc_disc",
    "faithfulness_disc",
)


@dataclass
class SaliencyResult:
    """What :func:`measure_saliency` measured on a probe batch (tensors on the model's device).

    Attributes:
        per_image: each read-out of :data:`READ_OUTS` per image ``[N]`` (float64; NaN for an image with
            non-finite logits or maps, and for the deletion read-outs of the images past ``deletion_images``).
        used: the images each read-out is a mean over (the first ``used[name]``).
        maps: :meth:`FinalLayerSaliency.attribute_all` of the images (maps at the feature resolution,
            ``logits``, ``target``).
        inputs: the images ``[N, C, H, W]`` as the model saw them.
        seconds: wall seconds of the maps and of the deletion curves.
    """

    per_image: dict[str, Tensor]
    used: dict[str, int]
    maps: dict[str, Tensor]
    inputs: Tensor
    seconds: tuple[float, float] = field(default=(0.0, 0.0))

    def scalars(self) -> dict[str, tuple[Scalar, Scalar | None]]:
        """``probe_size`` (the images measured), then each read-out's mean over its images and standard error.

        A NaN image makes its read-outs' means NaN (logged, not dropped).
        """
        out: dict[str, tuple[Scalar, Scalar | None]] = {"probe_size": (len(self.inputs), None)}
        for name, values in self.per_image.items():
            out[name] = mean_and_se(values[: self.used[name]])
        return out

    def tables(self) -> dict[str, Table]:
        """No tables: the per-image values are in :attr:`per_image`."""
        return {}


def measure_saliency(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    target: Literal["predicted", "label"] = "predicted",
    feature_layer: str | None = None,
    classifier: str | None = None,
    min_size: int = 20,
    deletion_steps: int = 10,
    deletion_images: int | None = None,
    saliency: FinalLayerSaliency | None = None,
) -> SaliencyResult:
    """Final-layer saliency maps of a probe batch and how faithful they are (docs/saliency.md).

    Per image, with ``c`` the predicted class (``target="predicted"``) or the label:

    * ``neg_pg_share``: the share of negative policy-gradient mass (evidence for the competitors, the
      "confusing" regions), ``sum relu(-M) / sum |M|`` (:func:`negative_share`);
    * ``target_prob``: ``q(c|x)``;
    * ``disc_channels`` / ``conf_channels``: the sizes of the most discriminative / most confusing channel
      sets of ``c`` (NaN for the autograd fallback, which has per-image effective weights);
    * with ``deletion_steps > 0``, on the first ``deletion_images`` images: ``deletion_auc_pg``,
      ``deletion_auc_disc`` and ``deletion_auc_random``, the mean target probability along a deletion curve
      (:func:`deletion_curves`) that removes the pixels with the highest policy-gradient, discriminative or
      random saliency first, and ``faithfulness_pg`` / ``faithfulness_disc``, random minus ours (positive
      when the map finds the evidence better than chance). Policy-gradient maps vanish as ``q(c|x) -> 1``,
      so on confidently classified probes their deletion score is weak.

    The random baseline maps are ``torch.rand(N, H, W, generator=generator)``: image ``i`` gets the ``i``-th
    map whatever ``N`` (on the CPU, a draw of fewer images is the first images' maps). An image whose logits
    (or maps) are non-finite makes its read-outs NaN, not numbers computed from ``argmax`` of NaN.

    Args:
        model: a classifier returning logits ``[N, K]``, in the mode to measure (``eval()``).
        inputs: images ``[N, C, H, W]`` (floating point); moved to the model's device and dtype.
        labels: classes ``[N]``; needed for ``target="label"``.
        generator: the CPU generator of the random baseline maps (``None``: torch's global generator).
        target: ``"predicted"`` (the model's class) or ``"label"``.
        feature_layer: ``named_modules()`` path of the feature map (found when ``None``).
        classifier: ``named_modules()`` path of the final ``nn.Linear`` (found when ``None``).
        min_size: ``min_size`` of the recursive channel split (:func:`split_chain`).
        deletion_steps: deletion-curve resolution (0: no deletion read-outs).
        deletion_images: deletion curves on the first this many images only (``None``: all).
        saliency: a :class:`FinalLayerSaliency` of ``model`` to reuse (its resolved layers and cached channel
            sets; ``feature_layer``, ``classifier`` and ``min_size`` are then its own); ``None``: one is made
            and resolved on the first two images.

    Returns:
        A :class:`SaliencyResult`.

    Raises:
        ValueError: an unknown ``target``, ``target="label"`` without labels, a bad size, or a ``saliency`` of
            another model (and :class:`FinalLayerSaliency`'s errors: unknown layers, no final ``nn.Linear``).
        TypeError: inputs that are not an image batch ``[N, C, H, W]``.

    Example:
        >>> from lightning_interp.models import SmallCNN
        >>> from lightning_interp.results import flat_scalars
        >>> model = SmallCNN(in_channels=1, num_classes=3).eval()
        >>> result = measure_saliency(model, torch.randn(4, 1, 12, 12), min_size=4, deletion_steps=4,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> list(flat_scalars(result))[:5]
        ['probe_size', 'neg_pg_share', 'neg_pg_share_se', 'target_prob', 'target_prob_se']
    """
    check_choice("target", target, ("predicted", "label"))
    check_int("min_size", min_size, 1)
    check_int("deletion_steps", deletion_steps, 0)
    check_int("deletion_images", deletion_images, 1, allow_none=True)
    if target == "label" and labels is None:
        raise ValueError(
            "target='label' needs the labels [N]: pass measure_saliency(model, inputs, labels, ...), or use target='predicted'"
        )
    if saliency is None:
        from lightning_interp.saliency_maps import FinalLayerSaliency

        saliency = FinalLayerSaliency(model, feature_layer, classifier, min_size)
    elif saliency.model is not model:
        raise ValueError("saliency is a FinalLayerSaliency of another model: pass one made for this model, or None")
    start = time.perf_counter()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    check_images(inputs)
    x = inputs.to(device=device, dtype=dtype)
    if saliency.uses_closed_form is None:
        # resolved on two finite images (a probe drawn by a callback has no others): NaN logits match no nn.Linear
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        saliency.resolve(x[finite][:2] if bool(finite.any()) else x[:2])
    tgt = labels.to(device) if target == "label" and labels is not None else None
    n = len(x)
    k = 0 if not deletion_steps else (n if deletion_images is None else min(n, deletion_images))
    with torch.no_grad():  # the deletion curves' forward passes need no graph (the fallback makes its own)
        return _measure(model, saliency, x, tgt, generator, deletion_steps, k, start)


def _measure(
    model: nn.Module,
    saliency: FinalLayerSaliency,
    x: Tensor,
    target: Tensor | None,
    generator: torch.Generator | None,
    deletion_steps: int,
    k: int,
    start: float,
) -> SaliencyResult:
    """:func:`measure_saliency` of checked arguments, deletion curves on the first ``k`` images."""
    n = len(x)
    out = saliency.attribute_all(x, target=target)
    pg, tgt, logits = out["policy_gradient"], out["target"], out["logits"]
    # a non-finite logit (or feature) makes that image's read-outs NaN: argmax and softmax of NaN mean nothing
    finite = torch.isfinite(logits).all(dim=1) & torch.isfinite(pg.flatten(1)).all(dim=1)
    nan = torch.full((n,), float("nan"), dtype=torch.float64, device=logits.device)

    def checked(values: Tensor) -> Tensor:
        return torch.where(finite, values.to(torch.float64), nan)

    per_image = {
        "neg_pg_share": checked(negative_share(pg)),
        "target_prob": checked(target_probability(logits, tgt)),
        "disc_channels": checked(_chain_sizes(saliency, model, tgt, "+")),
        "conf_channels": checked(_chain_sizes(saliency, model, tgt, "-")),
    }
    used = dict.fromkeys(per_image, n)
    maps_done = time.perf_counter()
    if k:
        random_maps = torch.rand(n, *x.shape[2:], generator=generator)
        # the random, policy-gradient and discriminative maps of each image in the same batched passes
        up = bilinear_upsample(torch.stack([pg[:k], out["discriminative"][:k]], dim=1), x.shape[-2:])
        maps = torch.cat([random_maps[:k, None].to(device=x.device, dtype=up.dtype), up], dim=1)
        curves = deletion_curves(model, x[:k], maps, tgt[:k], deletion_steps, intact=per_image["target_prob"][:k])
        aucs = curves.mean(dim=2).to(torch.float64)
        rand, pg_auc, disc_auc = nan.clone(), nan.clone(), nan.clone()
        rand[:k], pg_auc[:k], disc_auc[:k] = aucs[:, 0], aucs[:, 1], aucs[:, 2]
        per_image["deletion_auc_random"] = rand
        per_image["deletion_auc_pg"], per_image["faithfulness_pg"] = pg_auc, rand - pg_auc  # paired on the image
        per_image["deletion_auc_disc"], per_image["faithfulness_disc"] = disc_auc, rand - disc_auc
        used.update(dict.fromkeys(READ_OUTS[4:], k))
    seconds = (maps_done - start, time.perf_counter() - maps_done)
    return SaliencyResult(per_image=per_image, used=used, maps=out, inputs=x, seconds=seconds)


def _chain_sizes(saliency: FinalLayerSaliency, model: nn.Module, target: Tensor, side: str) -> Tensor:
    """Size of the last chain subset of each image's target class ``[N]`` (NaN for the autograd fallback)."""
    if not saliency.uses_closed_form:
        return torch.full(target.shape, float("nan"), dtype=torch.float64, device=target.device)
    weight = dict(model.named_modules())[saliency.classifier].weight
    return saliency.class_chain_mask(target, side, weight).sum(dim=1).to(torch.float64)


def __getattr__(name: str) -> Any:
    # FinalLayerSaliency is a captum Attribution, and importing captum.attr imports matplotlib.pyplot: it is made
    # on first use (PEP 562) by lightning_interp.saliency_maps, so that importing this module stays light
    if name == "FinalLayerSaliency":
        from lightning_interp.saliency_maps import FinalLayerSaliency

        globals()[name] = FinalLayerSaliency
        return FinalLayerSaliency
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
