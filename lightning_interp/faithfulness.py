"""How faithful saliency maps are: deletion curves, the target probability and the negative share.

A map is faithful when deleting the pixels it ranks highest (replaced by the image's mean) lowers the
probability of the explained class fast: the mean of that deletion curve (its AUC) is low, lower than for a
random map. :func:`deletion_curves` classifies the partially deleted images of several maps per image in
few batched forward passes. These are this project's scores (docs/saliency.md), not the paper's.

Pure torch: imports neither Lightning, captum nor matplotlib. Every public name is also importable from
:mod:`lightning_interp.saliency`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.checks import check_int

__all__ = [
    "DELETION_ELEMENTS",
    "deletion_curve",
    "deletion_curves",
    "deletion_rows",
    "negative_share",
    "target_probability",
]


def deletion_curve(model: nn.Module, inputs: Tensor, maps: Tensor, target: Tensor, steps: int = 10) -> Tensor:
    """Probability of ``target`` as the most salient pixels are deleted (set to the image's mean).

    One map per image; :func:`deletion_curves` takes several maps per image in the same batched passes.

    Args:
        model: the classifier.
        inputs: images ``[N, C, H, W]``.
        maps: saliency ``[N, H, W]`` at the input resolution (higher = deleted first).
        target: classes ``[N]``.
        steps: number of deletion fractions ``1/steps, ..., 1`` (plus the intact image).

    Returns:
        ``[N, steps + 1]`` target probabilities; the mean over fractions is the deletion AUC (lower is
        more faithful).
    """
    return deletion_curves(model, inputs, maps[:, None], target, steps)[:, 0]


#: Input elements (rows x C x H x W) per forward pass of :func:`deletion_curves`, unless ``batch_size`` is given.
DELETION_ELEMENTS = 1 << 22


def deletion_rows(steps: int, maps: int, intact: bool = False) -> int:
    """Images :func:`deletion_curves` passes through the model per probe image (``maps`` maps, ``steps`` steps).

    The intact image (unless given as ``intact``) and the fully deleted one (the image mean, the same for every
    map) are passed once; each map adds its ``steps - 1`` partial deletions.
    """
    return (0 if intact else 1) + (1 if steps > 0 else 0) + maps * max(0, steps - 1)


def deletion_curves(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: Tensor,
    steps: int = 10,
    intact: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Deletion curves of several maps per image (:func:`deletion_curve`), in few batched forward passes.

    The partially deleted images of every map and step are stacked and classified in batches of ``batch_size``
    (many small passes cost far more than one large one on a CPU, most with several threads). The intact image
    and the fully deleted one are the same for every map: each is classified once per image, and the intact
    image not at all when its probabilities are given (``intact``, e.g. from the forward pass that made the maps).

    Args:
        model: the classifier.
        inputs: images ``[N, C, H, W]``.
        maps: saliency ``[N, M, H, W]`` at the input resolution (higher = deleted first).
        target: classes ``[N]``.
        steps: number of deletion fractions ``1/steps, ..., 1`` (plus the intact image).
        intact: the target probabilities ``[N]`` of the intact images, if known.
        batch_size: images per forward pass (default: as many as :data:`DELETION_ELEMENTS` input elements allow,
            and at least ``N``).

    Returns:
        ``[N, M, steps + 1]`` target probabilities (NaN where the model's logits are non-finite).

    Example:
        >>> from lightning_interp.models import SmallCNN
        >>> model = SmallCNN(in_channels=1, num_classes=3).eval()
        >>> x, maps = torch.randn(2, 1, 8, 8), torch.rand(2, 3, 8, 8)
        >>> deletion_curves(model, x, maps, torch.tensor([0, 2]), steps=4).shape
        torch.Size([2, 3, 5])
    """
    n, c, h, w = inputs.shape
    m = maps.shape[1]
    if maps.shape != (n, m, h, w):
        raise ValueError(f"maps must have shape [N, M, H, W] = [{n}, M, {h}, {w}], got {list(maps.shape)}")
    check_int("steps", steps, 1)
    hw = h * w
    order = maps.reshape(n, m, hw).argsort(dim=2, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(2, order, torch.arange(hw, device=order.device).expand(n, m, hw))
    # the pixels kept at the partial deletions i = 1 .. steps - 1: rank >= round(i HW / steps), as one test
    cuts = torch.tensor([round(i * hw / steps) for i in range(1, steps)], device=rank.device)
    baseline = inputs.mean(dim=(2, 3), keepdim=True)
    per_image = deletion_rows(steps, m, intact is not None)
    rows_per_pass = batch_size or max(n, DELETION_ELEMENTS // max(1, c * hw))
    images_per_chunk = max(1, rows_per_pass // per_image)
    probs = []
    for start in range(0, n, images_per_chunk):
        sl = slice(start, start + images_per_chunk)
        b = len(inputs[sl])
        x, base = inputs[sl], baseline[sl].expand(b, c, h, w)
        keep = (rank[sl, :, None, :] >= cuts[None, None, :, None]).reshape(b, m * (steps - 1), 1, h, w)
        parts = [] if intact is not None else [x[:, None]]
        parts += [torch.where(keep, x[:, None], base[:, None]), base[:, None]]
        batch = torch.cat(parts, dim=1).reshape(b * per_image, c, h, w)
        tgt = target[sl].repeat_interleave(per_image)
        chunks = zip(batch.split(rows_per_pass), tgt.split(rows_per_pass), strict=True)
        probs.append(torch.cat([target_probability(model(rows), t) for rows, t in chunks]).view(b, per_image))
    p = torch.cat(probs)
    first = intact.to(p.dtype)[:, None] if intact is not None else p[:, :1]
    middle = p[:, (0 if intact is not None else 1) : per_image - 1].reshape(n, m, steps - 1)
    last = p[:, -1:]
    return torch.cat([first[:, None].expand(n, m, 1), middle, last[:, None].expand(n, m, 1)], dim=2)


def target_probability(logits: Tensor, target: Tensor) -> Tensor:
    """``softmax(logits)[target]`` per row ``[N]``, NaN for a row with a non-finite logit (its softmax means nothing).

    Example:
        >>> target_probability(torch.tensor([[0.0, 0.0], [float("nan"), 1.0]]), torch.tensor([1, 1]))
        tensor([0.5000,    nan])
    """
    prob = logits.softmax(dim=1).gather(1, target[:, None])[:, 0]
    return torch.where(torch.isfinite(logits).all(dim=1), prob, torch.full_like(prob, float("nan")))


def negative_share(policy_gradient: Tensor) -> Tensor:
    """Share of each map's policy-gradient mass that is negative (evidence against the class) ``[N]``.

    ``sum relu(-pg) / sum |pg|`` over the map; 0 for an all-zero map.
    """
    pg = policy_gradient.flatten(1)
    return F.relu(-pg).sum(dim=1) / pg.abs().sum(dim=1).clamp_min(torch.finfo(pg.dtype).tiny)
