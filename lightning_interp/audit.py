"""Pretrained-model audit: the final layer's weight distribution and saliency maps on a folder of images.

``lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N] [--wandb]``

Reference: Siddhartha, arXiv:2205.11908 (2022); see :mod:`lightning_interp.saliency`.

The audit builds a torchvision architecture, loads *local* weights with ``torch.load(weights_only=True)``
(a plain ``state_dict``, a dict holding one under ``"state_dict"`` / ``"model"``, or a Lightning
checkpoint whose keys carry a module prefix), then writes into ``OUT``:

* ``ald_per_class.csv``: the asymmetric-Laplace fit of every class row of the final layer (slope,
  intercept, R^2, kappa, lambda, mean, count; positive and negative side);
* ``ald_histogram.png``: the weight histogram and the log-rank fits of the pooled ("joint") weights;
* ``maps.csv``: per image the predicted class, its probability, the negative policy-gradient share
  and the sizes of the most discriminative / confusing channel sets;
* ``maps_XXX.png``: grids of image, discriminative, confusing and policy-gradient maps;
* ``report.json``: everything above in one file, plus the layers used and whether the closed form
  (GAP + Linear head) or the autograd fallback was used.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["build_model", "load_weights", "run_audit"]


def load_weights(path: str) -> dict[str, Tensor]:
    """A ``state_dict`` from a local file, loaded with ``weights_only=True``.

    Accepts a plain ``state_dict``, ``{"state_dict": ...}`` (Lightning checkpoints) or ``{"model": ...}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds pickled objects other than tensors and containers (refused), or no
            ``state_dict``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file not found: {path}. Save the model's weights locally, e.g. "
            "torch.save(model.state_dict(), 'resnet50.pth'), and pass --weights resnet50.pth"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it contains pickled Python objects other than tensors, and weights are loaded "
            f"with torch.load(weights_only=True) so that a file cannot run code. Re-save only the state_dict "
            f"(torch.save(model.state_dict(), path)). Details: {str(err).splitlines()[0]}"
        ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors), nor a checkpoint with a 'state_dict' entry")
    return obj


def _match_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Strip a common module prefix (``model.``, ``net.``, ``module.``) so keys match ``model``."""
    expected = set(model.state_dict())
    if set(state) >= expected or not state:
        return state
    for key in state:
        for target in expected:
            if key.endswith("." + target):
                prefix = key[: -len(target)]
                stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if set(stripped) >= expected:
                    return stripped
    return state


def build_model(arch: str, weights_path: str) -> nn.Module:
    """A torchvision architecture with local weights; the number of classes is read from the weights.

    Raises:
        ValueError: an unknown architecture or weights that do not fit it (the message lists the
            mismatched keys).
    """
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown architecture {arch!r}: use a torchvision classification model name, e.g. resnet50, densenet121, "
            "efficientnet_b0, mobilenet_v3_large, vit_b_16"
        )
    state = load_weights(weights_path)
    probe = torchvision.models.get_model(arch, weights=None)
    state = _match_keys(state, probe)
    num_classes = None
    linears = [name for name, m in probe.named_modules() if isinstance(m, nn.Linear)]
    if linears and f"{linears[-1]}.weight" in state:
        num_classes = state[f"{linears[-1]}.weight"].shape[0]
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes) if num_classes else probe
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the weights in {weights_path} do not fit {arch}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Check --arch."
        )
    return model.eval()


def _class_names(num_classes: int) -> list[str]:
    if num_classes == 1000:
        from torchvision.models import ResNet18_Weights

        return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    return [f"class {i}" for i in range(num_classes)]


def _side_dict(side: Any) -> dict[str, float]:
    from dataclasses import fields

    return {f.name: float(getattr(side, f.name)) for f in fields(side)}


def run_audit(
    arch: str,
    weights: str,
    images: str,
    out: str,
    limit: int | None = None,
    batch_size: int = 8,
    min_size: int = 20,
    use_wandb: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the audit and write its files into ``out``; returns the report (also ``out/report.json``)."""
    import torchvision.transforms as T
    from tqdm import tqdm

    from lightning_interp.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD, load_images
    from lightning_interp.plotting import ald_figure, figure_to_png, png_to_array, saliency_grid
    from lightning_interp.saliency import FinalLayerSaliency, fit_ald, negative_share

    os.makedirs(out, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(arch, weights).to(dev)
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = load_images(images, transform)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    num_classes = _num_classes(model)
    names = _class_names(num_classes)
    # folder labels are class indices only when the folder has one sub-folder per model class
    folder_classes: list[str] = list(getattr(dataset, "classes", []))
    aligned = len(folder_classes) == num_classes
    saliency = FinalLayerSaliency(model, min_size=min_size)

    run = None
    if use_wandb:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run = wandb.init(
            project="lightning-interp-audit", name=f"audit-{arch}", dir=out, config={"arch": arch, "weights": weights}
        )

    rows: list[dict[str, Any]] = []
    pngs = []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=f"audit {arch}", disable=not progress, unit="batch"):
            idx = list(range(start, min(n, start + batch_size)))
            items = [dataset[i] for i in idx]
            x = torch.stack([it[0] for it in items]).to(dev)
            maps = saliency.attribute_all(x)
            probs = maps["logits"].softmax(dim=1)
            pg = maps["policy_gradient"]
            neg = negative_share(pg)
            classifier_w = dict(model.named_modules())[saliency.classifier].weight if saliency.uses_closed_form else None
            for j, i in enumerate(idx):
                c = int(maps["target"][j])
                row = {
                    "file": os.path.relpath(dataset.samples[i][0], images),
                    "folder": folder_classes[items[j][1]] if items[j][1] >= 0 else "",
                    "label": int(items[j][1]) if aligned else -1,
                    "predicted": c,
                    "class_name": names[c],
                    "probability": float(probs[j, c]),
                    "neg_pg_share": float(neg[j]),
                }
                if classifier_w is not None:
                    row["disc_channels"] = int(saliency.class_chain_mask(maps["target"][j : j + 1], "+", classifier_w).sum())
                    row["conf_channels"] = int(saliency.class_chain_mask(maps["target"][j : j + 1], "-", classifier_w).sum())
                rows.append(row)
            png = figure_to_png(saliency_grid(maps, x))
            path = os.path.join(out, f"maps_{start // batch_size:03d}.png")
            with open(path, "wb") as f:
                f.write(png)
            pngs.append(path)
            if run is not None:
                import wandb

                run.log({"audit/maps": wandb.Image(png_to_array(png))})

    weight = dict(model.named_modules())[saliency.classifier].weight.detach().cpu()  # type: ignore[index]
    fit = fit_ald(weight)
    class_rows = fit.rows()
    for r in class_rows:
        r["class_name"] = names[int(r["class"])]
    _write_csv(os.path.join(out, "ald_per_class.csv"), class_rows)
    _write_csv(os.path.join(out, "maps.csv"), rows)
    png = figure_to_png(ald_figure(weight, fit))
    with open(os.path.join(out, "ald_histogram.png"), "wb") as f:
        f.write(png)

    pos_r2 = fit.positive.r2[~fit.positive.r2.isnan()]
    neg_r2 = fit.negative.r2[~fit.negative.r2.isnan()]
    labelled = [r for r in rows if r["label"] >= 0]
    report: dict[str, Any] = {
        "arch": arch,
        "weights": os.path.abspath(weights),
        "images": os.path.abspath(images),
        "num_images": len(rows),
        "num_classes": int(weight.shape[0]),
        "feature_layer": saliency.feature_layer,
        "classifier": saliency.classifier,
        "closed_form": bool(saliency.uses_closed_form),
        "feature_transform": saliency.feature_transform,
        "ald": {
            "joint_positive": _side_dict(fit.joint_positive),
            "joint_negative": _side_dict(fit.joint_negative),
            "median_r2_positive": float(pos_r2.median()) if pos_r2.numel() else float("nan"),
            "median_r2_negative": float(neg_r2.median()) if neg_r2.numel() else float("nan"),
        },
        "mean_neg_pg_share": sum(r["neg_pg_share"] for r in rows) / max(1, len(rows)),
        "accuracy": sum(r["label"] == r["predicted"] for r in labelled) / len(labelled) if labelled else None,
        "images_table": rows,
        "files": {
            "ald_per_class": "ald_per_class.csv",
            "maps": "maps.csv",
            "ald_histogram": "ald_histogram.png",
            "map_grids": [os.path.basename(p) for p in pngs],
        },
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    if run is not None:
        import wandb

        run.log(
            {
                "audit/ald_histogram": wandb.Image(png_to_array(png)),
                "audit/ald_per_class": wandb.Table(columns=list(class_rows[0]), data=[list(r.values()) for r in class_rows]),
                "audit/maps_table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
                "audit/mean_neg_pg_share": report["mean_neg_pg_share"],
                "audit/median_r2_positive": report["ald"]["median_r2_positive"],
            }
        )
        run.finish()
    return report


def _num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
