"""The audit's cost at ImageNet scale: ResNet-50 (random weights, 1000 classes) on synthetic 224x224 images.

Runs ``lightning_interp.audit.run_audit`` on a folder of generated images with one sub-folder per class, named
like the model's (ImageNet) classes so that the images are labelled, and reports the seconds of every method,
per image and per class task, next to one forward pass of the same images. It then extrapolates to an
ImageNet-validation-like audit of 1000 class tasks with 50 images each on this CPU. A GPU figure is an
extrapolation (stated as such), never a measurement.

    .venv/bin/python scripts/bench_audit.py --classes 10 --per-class 5
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

from lightning_interp.ablation import REST_PER_CHAIN
from lightning_interp.audit import AUDIT_METHODS, run_audit
from lightning_interp.saliency import FinalLayerSaliency


def write_images(folder: Path, names: list[str], per_class: int, size: int, seed: int) -> None:
    """``per_class`` random RGB images in a sub-folder per class name."""
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size + 32, size + 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"img{i:04d}.png")


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        model(x[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    return time.perf_counter() - start


def maps_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int) -> tuple[float, float]:
    """Seconds of the four maps of every class (``attribute_all``) of ``x``, and of the one-time resolution.

    The first call on all classes resolves every class's channel chains (cached afterwards); the timed
    calls are the maps alone.
    """
    saliency = FinalLayerSaliency(model)
    every = torch.arange(1000)[None]
    with torch.no_grad():
        start = time.perf_counter()
        saliency.attribute_all(x[:2], target=every.expand(2, -1))  # resolution of every class, and a warm-up
        one_time = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            saliency.attribute_all(chunk, target=every.expand(len(chunk), -1))
    return time.perf_counter() - start, one_time


def class_folders(weights_meta: dict[str, Any], count: int) -> list[str]:
    """The first ``count`` class names usable as folder names (unique, no path separator)."""
    names = [n for n in weights_meta["categories"] if "/" not in n]
    unique = [n for i, n in enumerate(names) if n not in names[:i]]
    return unique[:count]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "outputs/bench_audit", seed="seed of the weights and images", threads="torch threads")
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture (random weights, 1000 classes)")
    parser.add_argument("--classes", type=int, default=10, help="class sub-folders (= ablation class tasks)")
    parser.add_argument("--per-class", type=int, default=5, help="synthetic images per class")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--ablation-steps", type=int, default=1000, help="MCMC steps per chain")
    parser.add_argument("--methods", default=",".join(AUDIT_METHODS), help="comma-separated audit methods")
    args = harness.parse(
        parser,
        argv,
        quick={
            "arch": "resnet18",
            "classes": 2,
            "per_class": 1,
            "size": 64,
            "ablation_steps": 10,
            "methods": "weights,ablation,saliency",
        },
    )
    run = harness.start(args)
    harness.quiet_lightning()
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=1000).eval()
    names = class_folders(torchvision.models.get_model_weights(args.arch).DEFAULT.meta, args.classes)
    images = len(names) * args.per_class
    with tempfile.TemporaryDirectory() as tmp:
        folder, weights = Path(tmp) / "images", Path(tmp) / "weights.pth"
        write_images(folder, names, args.per_class, args.size, args.seed)
        torch.save(model.state_dict(), weights)
        report = run_audit(
            arch=args.arch,
            weights=str(weights),
            images=str(folder),
            out=str(args.out / "audit"),
            image_size=args.size,
            max_tasks=len(names),
            min_per_class=min(5, args.per_class),
            ablation_steps=args.ablation_steps,
            methods=args.methods.split(","),
            progress=False,
            seed=args.seed,
        )
    x = torch.randn(min(images, 64), 3, args.size, args.size)
    fwd = forward_seconds(model, x, 16) * images / len(x)
    maps, resolution = maps_seconds(model, x, 16) if "saliency" in args.methods else (0.0, 0.0)
    maps *= images / len(x)
    seconds = report["meta"]["method_seconds"]
    tasks = max(1, len(report["meta"]["ablation_tasks"]))
    rows = []
    for method in AUDIT_METHODS:
        if method not in seconds:
            continue
        s = seconds[method]
        per_task = f"{s / tasks:.2f}" if method == "ablation" else ""
        rows.append([method, f"{s:.2f}", f"{s / images:.3f}", per_task, f"{s / fwd:.1f}"])
    rows.append(["one forward pass", f"{fwd:.2f}", f"{fwd / images:.3f}", "", "1.0"])
    # ImageNet validation: 1000 classes x 50 images. The maps and the report's forward pass scale with the images;
    # the deletion curves run on the first 50 images (deletion_images) and the correlation orders on at most 500
    # (correlation_images) whatever the folder's size; a class task's chains score its own images plus a fixed
    # sample of the others, so the ablation scales with the tasks times (own + rest) rows per chain.
    target_images, target_tasks = 50_000, 1000
    rest = min(REST_PER_CHAIN, images - args.per_class)
    row_scale = (50 + REST_PER_CHAIN) / (args.per_class + rest)
    deletion = max(0.0, seconds.get("saliency", 0.0) - maps)
    parts = {
        "forward pass (rows)": fwd / images * target_images,
        "saliency maps of every class": maps / images * target_images + resolution,
        "deletion curves (50 images)": deletion * 50 / min(images, 50) if "saliency" in seconds else 0.0,
        "correlation (500 images)": seconds.get("correlation", 0.0) / images * min(500, target_images),
        "ablation (1000 class tasks)": seconds.get("ablation", 0.0) / tasks * row_scale * target_tasks,
    }
    rows.append(
        [
            "saliency maps of every class (attribute_all, 1000 classes)",
            f"{maps:.2f}",
            f"{maps / images:.3f}",
            "",
            f"{maps / fwd:.2f}",
        ]
    )
    rows.append(["one-time resolution of every class's channel chains", f"{resolution:.2f}", "", "", ""])
    table = harness.markdown_table(
        ["method", "seconds", "per image", "per class task", "x one forward pass"], rows, align="lrrrr"
    )
    extrapolated = harness.markdown_table(
        ["part", "CPU hours"],
        [[k, f"{v / 3600:.2f}"] for k, v in parts.items()] + [["total", f"{sum(parts.values()) / 3600:.2f}"]],
        align="lr",
    )
    table += (
        f"\n\n{images} images ({len(names)} classes x {args.per_class}) of {args.size}x{args.size}, {args.arch} (random "
        f"weights, 1000 classes), {torch.get_num_threads()} torch thread(s); {tasks} ablation class tasks x 8 chains x "
        f"{args.ablation_steps} steps. Saliency includes its deletion curves (33 forward passes of each of the first 50 "
        "images). Extrapolated to an ImageNet-validation audit (1000 classes x 50 images, `--max-tasks 1000`) on this "
        f"CPU (the ablation linear in tasks x rows per chain, {50 + REST_PER_CHAIN} rows there against "
        f"{args.per_class + rest} here; the correlation linear in its images):\n\n{extrapolated}\n\nA GPU run is not "
        "measured here."
    )
    print(table)
    data = {
        "config": harness.config(args),
        "machine": run.stop(),
        "meta": report["meta"],
        "forward_s": fwd,
        "maps_s": maps,
        "resolution_s": resolution,
        "extrapolated_cpu_s": parts,
    }
    return harness.write_results(args.out, table, data)


if __name__ == "__main__":
    main()
