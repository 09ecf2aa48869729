"""Reproduce the final-layer weight fits of Siddhartha (2022) on your own trained weights (torchvision or timm).

Reference:
    Siddhartha (2022). "An interpretation of the final fully connected layer." arXiv 2205.11908. Definitions
    follow METHODS.md section 2 (a) and docs/saliency.md: the paper's analysis as reconstructed from the author's
    public summary and notebooks; the paper's exact formulas are not reproduced here.

Run (from the repository root; weights are local files only, nothing is downloaded)::

    .venv/bin/python scripts/reproduce_siddhartha.py --weights resnet18.pth resnet50.pth --arch resnet18 resnet50
    .venv/bin/python scripts/reproduce_siddhartha.py --weights a.pth b.safetensors --arch timm:convnext_tiny
    .venv/bin/python scripts/reproduce_siddhartha.py --weights mine.pth --arch resnet18 --classes 0 7 cat

``--arch`` is one architecture for every file or one per file: a torchvision classification model name
(``resnet18``, ``densenet121``, ...) or ``timm:<name>`` (timm is the optional extra ``timm``). Each file is
loaded with :func:`lightning_interp.loading.load_classifier` (``torch.load(weights_only=True)`` or safetensors;
the number of classes is read from the weights; an empty, truncated, non-finite or mismatched file stops the
script with a message naming it). ``--quick`` without ``--weights`` saves two small random-weight models
(timm ``test_vit`` with a 1000-class head, torchvision ``mobilenet_v3_small`` with 10 classes) to a temporary
folder and runs on them.

What is measured, per model, on the weight matrix ``W`` ``[K, D]`` of its final ``nn.Linear`` (the last
``nn.Linear`` of the model, the one whose width is the number of classes), with
:func:`lightning_interp.saliency.fit_ald`: the joint fits (every positive weight of ``W``, and the magnitudes of
every negative one, sorted and fitted as ``log y ~ a * (i / L) + b`` by least squares) with their ``R^2``; the
median of the per-class ``R^2`` on each side; and for a few named classes (``--classes``: indices or class
names; default ``tricycle``, ``web site`` and ``whiptail`` for a head with the 1000 ImageNet classes, else
classes 0, 1 and 2) the per-class ``R^2`` of each side with the slope, intercept and asymmetric-Laplace
``kappa``.

Reference values printed beside them, as reported for the paper (quoted from the project's issue 15; the
paper's text could not be checked here, and which side of the weights the per-class values refer to is not
stated there): joint ``R^2`` between 0.75 and 0.89 over 75 timm models; per-class ``R^2`` of about 0.88-0.90
for ``tricycle``, ``web site`` and ``whiptail`` in ResNet-18.

Outputs under ``--out`` (``outputs/reproduce_siddhartha``): ``results.md`` (the two tables), ``results.json``
(every fit of every model, the reference values, the configuration and the machine).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.loading import LoadedClassifier, load_classifier
from lightning_interp.saliency import ALDSide, fit_ald

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

#: joint R^2 reported over 75 timm models (lowest, highest)
PAPER_JOINT_R2 = (0.75, 0.89)
#: ImageNet classes whose per-class R^2 is reported for ResNet-18, and that range
PAPER_CLASSES = ("tricycle", "web site", "whiptail")
PAPER_CLASS_R2 = (0.88, 0.90)
#: ``--quick`` without ``--weights``: (architecture, library that builds it, file name) of the random-weight models
QUICK_MODELS = (
    ("timm:test_vit", "timm", "test_vit_random.pth"),
    ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small_random_10.pth"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring); without ``--quick``, ``--weights`` and ``--arch`` are required."""
    parser = harness.parser(__doc__, "outputs/reproduce_siddhartha", seed="seed of the --quick random weights")
    parser.add_argument(
        "--weights", nargs="+", type=Path, default=None, help="local weight files (.pth, .pt, .ckpt, .safetensors)"
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        default=None,
        help="one architecture for every file, or one per file: torchvision name or timm:<name>",
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="classes to show per model, as indices or class names (default: tricycle, web site, whiptail for ImageNet heads, "
        "else 0 1 2)",
    )
    args = harness.parse(parser, argv, quick={})
    if args.weights is None and not args.quick:
        parser.error("--weights FILE [FILE ...] is required (with --arch NAME [NAME ...])")
    if args.weights is not None:
        if args.arch is None:
            parser.error("--arch is required: one architecture for every file, or one per file (torchvision name or timm:<name>)")
        if len(args.arch) not in (1, len(args.weights)):
            parser.error(
                f"--arch takes one name for every file or one per file: got {len(args.arch)} for {len(args.weights)} files"
            )
    return args


def save_quick_models(folder: Path, seed: int) -> tuple[list[Path], list[str]]:
    """Save the random-weight models of :data:`QUICK_MODELS` to ``folder``; their files and architectures."""
    import timm
    import torchvision

    torch.manual_seed(seed)
    paths, archs = [], []
    for arch, library, name in QUICK_MODELS:
        if library == "timm":
            model = timm.create_model(arch.removeprefix("timm:"), pretrained=False)
        else:
            model = torchvision.models.get_model(arch, weights=None, num_classes=10)
        torch.save(model.state_dict(), folder / name)
        paths.append(folder / name)
        archs.append(arch)
    return paths, archs


def head(model: nn.Module) -> tuple[str, Tensor]:
    """Name and weight ``[K, D]`` of the model's final ``nn.Linear`` (the last one, as the loader counts classes)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    name, linear = linears[-1]  # load_classifier refuses models without one
    return name, linear.weight.detach()


def resolve_classes(spec: list[str] | None, names: list[str] | None, k: int, what: str) -> list[tuple[int, str]]:
    """``(index, name)`` of the classes to show: ``spec`` (indices or names) or the default of the module docstring.

    Raises:
        ValueError: an index outside ``0..k-1``, or a name that is not one of the model's class names.
    """
    if spec is None:
        named = names is not None and all(c in names for c in PAPER_CLASSES)
        spec = list(PAPER_CLASSES) if named else [str(i) for i in range(min(3, k))]
    out = []
    for item in spec:
        if item.isdigit():
            index = int(item)
            if index >= k:
                raise ValueError(f"--classes {item}: {what} has {k} classes (indices 0..{k - 1})")
        elif names is not None and item in names:
            index = names.index(item)
        elif names is None:
            raise ValueError(f"--classes {item!r}: {what} has no class names ({k} classes): give class indices")
        else:
            raise ValueError(f"--classes {item!r} is not a class name of {what} (e.g. {', '.join(names[:3])}, ...)")
        out.append((index, names[index] if names is not None else str(index)))
    return out


def side(fit: ALDSide, index: int | None = None) -> dict[str, float]:
    """One side's fit (the joint fit, or class ``index``) as plain floats."""
    keys = ("slope", "intercept", "r2", "kappa", "lam", "mean", "count")
    return {k: float(getattr(fit, k) if index is None else getattr(fit, k)[index]) for k in keys}


def nan_median(values: Tensor) -> float:
    """Median of the finite values (NaN when there are none)."""
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if finite.numel() else math.nan


def audit(path: Path, arch: str, classes: list[str] | None) -> dict[str, Any]:
    """Load one weight file and fit its final layer (module docstring)."""
    loaded: LoadedClassifier = load_classifier(arch=arch, weights=path)
    layer, weight = head(loaded.model)
    fit = fit_ald(weight)
    shown = resolve_classes(classes, loaded.class_names, loaded.num_classes, f"{path} ({loaded.source})")
    return {
        "file": str(path),
        "arch": arch,
        "source": loaded.source,
        "layer": layer,
        "num_classes": int(weight.shape[0]),
        "features": int(weight.shape[1]),
        "joint_positive": side(fit.joint_positive),
        "joint_negative": side(fit.joint_negative),
        "median_r2_positive": nan_median(fit.positive.r2),
        "median_r2_negative": nan_median(fit.negative.r2),
        "classes": [
            {"index": i, "name": name, "positive": side(fit.positive, i), "negative": side(fit.negative, i)} for i, name in shown
        ],
    }


def fmt(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals, ``-`` for NaN."""
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def in_range(v: float, bounds: tuple[float, float]) -> str:
    """Where ``v`` lies relative to ``bounds``: ``within``, ``below`` or ``above`` (``-`` for NaN)."""
    if math.isnan(v):
        return "-"
    return "below" if v < bounds[0] else "above" if v > bounds[1] else "within"


def tables(models: list[dict[str, Any]]) -> str:
    """The per-model table (joint fits) and the per-class table, with the paper's values as a reference column."""
    joint_ref = f"{PAPER_JOINT_R2[0]:.2f}-{PAPER_JOINT_R2[1]:.2f} (75 timm models)"
    rows = []
    for m in models:
        pos, neg = m["joint_positive"]["r2"], m["joint_negative"]["r2"]
        rows.append(
            [
                Path(m["file"]).name,
                m["arch"],
                m["num_classes"],
                m["features"],
                fmt(pos),
                fmt(neg),
                f"{in_range(pos, PAPER_JOINT_R2)} / {in_range(neg, PAPER_JOINT_R2)}",
                fmt(m["median_r2_positive"]),
                fmt(m["median_r2_negative"]),
                joint_ref,
            ]
        )
    header = [
        "model", "arch", "classes", "features", "joint R^2 (+)", "joint R^2 (-)", "vs paper (+ / -)",
        "median class R^2 (+)", "median class R^2 (-)", "paper: joint R^2",
    ]  # fmt: skip
    class_ref = f"~{PAPER_CLASS_R2[0]:.2f}-{PAPER_CLASS_R2[1]:.2f} (ResNet-18)"
    class_rows = [
        [
            Path(m["file"]).name,
            m["arch"],
            c["index"],
            c["name"],
            fmt(c["positive"]["r2"]),
            fmt(c["negative"]["r2"]),
            fmt(c["positive"]["slope"]),
            fmt(c["positive"]["kappa"]),
            fmt(c["negative"]["slope"]),
            fmt(c["negative"]["kappa"]),
            class_ref if c["name"] in PAPER_CLASSES else "-",
        ]
        for m in models
        for c in m["classes"]
    ]
    class_header = [
        "model", "arch", "class", "name", "R^2 (+)", "R^2 (-)", "slope (+)", "kappa (+)", "slope (-)", "kappa (-)",
        "paper: class R^2",
    ]  # fmt: skip
    return "\n\n".join(
        [
            harness.markdown_table(header, rows, align="llrrrrlrrl"),
            harness.markdown_table(class_header, class_rows, align="llrlrrrrrrl"),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fit the final layer of every weight file, print and write the tables; return the data.

    Raises:
        SystemExit: bad arguments (argparse), or a file that cannot be loaded or classes that do not resolve (the
            message names the file).
    """
    args = parse_args(argv)
    run = harness.start(args)
    with tempfile.TemporaryDirectory() as scratch:
        if args.weights is None:  # --quick without files: small random-weight models
            args.weights, args.arch = save_quick_models(Path(scratch), args.seed)
        archs = args.arch * len(args.weights) if len(args.arch) == 1 else args.arch
        models = []
        for path, arch in zip(args.weights, archs, strict=True):
            try:
                models.append(audit(path, arch, args.classes))
            except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:  # the loader's messages name the file
                raise SystemExit(f"{path} (--arch {arch}): {err}") from err
            m = models[-1]
            print(f"{path}: {m['source']}, final layer {m['layer']!r}, {m['num_classes']} x {m['features']}")
    table = tables(models)
    print(table)
    print(f"\n{run.describe()}")
    reference = {
        "joint_r2_range_75_timm_models": list(PAPER_JOINT_R2),
        "resnet18_class_r2_range": list(PAPER_CLASS_R2),
        "resnet18_classes": list(PAPER_CLASSES),
        "source": "issue 15 of this project, quoting the paper",
    }
    config = harness.config(args)
    config["weights"] = [os.fspath(p) for p in args.weights]
    return harness.write_results(
        args.out, table, {"config": config, "machine": run.stop(), "reference": reference, "models": models}
    )


if __name__ == "__main__":
    main()
