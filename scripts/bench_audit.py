"""The audit's cost at ImageNet scale: ResNet-50 (random weights, 1000 classes) on synthetic 224x224 images.

Runs ``lightning_interp.audit.run_audit`` on a flat folder of generated images (no labels: the methods use the
model's predictions) and reports the seconds of every method, per image and per class task, next to one forward
pass of the same images, then extrapolates to 50 images x 1000 classes on this CPU. A GPU figure is an
extrapolation from the measured forward-pass ratio (stated as such), never a measurement.

    .venv/bin/python scripts/bench_audit.py --images 24 --tasks 10
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

from lightning_interp.audit import METHODS, run_audit


def write_images(folder: Path, n: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size + 32, size + 16, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        model(x[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "outputs/bench_audit", seed="seed of the weights and images", threads="torch threads")
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture (random weights)")
    parser.add_argument("--images", type=int, default=24, help="synthetic images")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--tasks", type=int, default=10, help="ablation class tasks (max_tasks)")
    parser.add_argument("--ablation-steps", type=int, default=1000, help="MCMC steps per chain")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated audit methods")
    args = harness.parse(
        parser,
        argv,
        quick={"arch": "resnet18", "images": 2, "size": 32, "tasks": 1, "ablation_steps": 10, "methods": "weights,ablation"},
    )
    run = harness.start(args)
    harness.quiet_lightning()
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=1000).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder, weights = Path(tmp) / "images", Path(tmp) / "weights.pth"
        write_images(folder, args.images, args.size, args.seed)
        torch.save(model.state_dict(), weights)
        report = run_audit(
            arch=args.arch,
            weights=str(weights),
            images=str(folder),
            out=str(args.out / "audit"),
            image_size=args.size,
            max_tasks=args.tasks,
            ablation_steps=args.ablation_steps,
            methods=args.methods.split(","),
            progress=False,
            seed=args.seed,
        )
    x = torch.randn(args.images, 3, args.size, args.size)
    fwd = forward_seconds(model, x, 16)
    seconds = report["meta"]["method_seconds"]
    tasks = max(1, len(report["meta"]["ablation_tasks"]))
    rows = []
    for method in METHODS:
        if method not in seconds:
            continue
        s = seconds[method]
        per_task = f"{s / tasks:.3f}" if method == "ablation" else ""
        rows.append([method, f"{s:.2f}", f"{s / args.images:.3f}", per_task, f"{s / fwd:.1f}"])
    rows.append(["one forward pass", f"{fwd:.2f}", f"{fwd / args.images:.3f}", "", "1.0"])
    # 50 images x 1000 class tasks: saliency and correlation scale with the images, the ablation with the images
    # and the class tasks (every chain scores its task's images plus a fixed sample of others)
    scale = 50 / args.images
    cpu = seconds.get("saliency", 0.0) * scale + seconds.get("correlation", 0.0) * scale
    cpu += seconds.get("ablation", 0.0) * scale * 1000 / tasks
    table = harness.markdown_table(
        ["method", "seconds", "per image", "per class task", "x one forward pass"], rows, align="lrrrr"
    )
    table += (
        f"\n\n{args.images} images of {args.size}x{args.size}, {args.arch} (random weights, 1000 classes), "
        f"{tasks} ablation class tasks x 8 chains x {args.ablation_steps} steps. Extrapolation to 50 images x 1000 class "
        f"tasks on this CPU: {cpu / 60:.1f} min (saliency and correlation linear in the images, the ablation linear in "
        "images x tasks). On one GPU the same work is expected to scale with the forward pass: divide by the GPU's "
        "forward-pass speed-up over this CPU (an extrapolation, not a measurement)."
    )
    print(table)
    data = {
        "config": harness.config(args),
        "machine": run.stop(),
        "meta": report["meta"],
        "forward_s": fwd,
        "extrapolated_cpu_s": cpu,
    }
    return harness.write_results(args.out, table, data)


if __name__ == "__main__":
    main()
