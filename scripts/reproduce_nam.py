"""Per-layer distributedness and polysemanticity over training, by Bayesian ablation, on small trained networks.

Reference:
    Nam, Campbell, Griffiths, Cohen, Leslie, "Understanding Task Representations in Neural Networks via
    Bayesian Ablation", arXiv:2505.13742 (CogSci 2025). Definitions follow METHODS.md section 3 (the paper names
    distributedness, manifold complexity and polysemanticity but its formulas were not available; these are
    the project's, see :mod:`lightning_interp.ablation`).

Run (from the repository root)::

    .venv/bin/python scripts/reproduce_nam.py

(defaults: ``--experiments mlp cnn mnist --seeds 0 1 2 --epochs 10 --hidden 12 12 --cnn-channels 8 12
--classes 4 --n-train 2048 --n-val 512 --probe-size 512 --batch-size 32 --lr 1e-3 --cnn-lr 1e-2
--mnist-dir data --mnist-epochs 3 --mnist-probe-size 512 --max-batch 4096 --threads 1
--out outputs/reproduce_nam``); ``--quick`` is a smoke test of a few seconds after the imports (no ``cnn``).

What is trained (Lightning, Adam, cross-entropy), with the product's
:class:`~lightning_interp.callbacks.AblationProbeCallback` attached (``method="exact"``: all ``2^d`` masks of
each probed layer, ``tasks="classes"``, measured before training and after every epoch, probe = ``--probe-size``
examples of the validation split, drawn once by the callback):

* ``mlp``: ``MLPClassifier(144, 4, hidden=(12, 12))`` on :class:`~lightning_interp.datamodules.PatchImageDataModule`
  (4 classes: a bright 3x3 square in one of the four quadrants of a noisy 12x12 image, flattened by the model);
  probed layers ``net.1`` and ``net.3`` (the two ReLU outputs).
* ``cnn``: ``SmallCNN(1, 4, channels=(8, 12))`` (the setup of ``configs/ablation_patches.yaml``) on the same data;
  probed layers ``features.1`` and ``features.4`` (ReLU outputs of the two conv blocks; a unit is a channel).
* ``mnist`` (only when the IDX files are under ``--mnist-dir``/MNIST/raw; otherwise reported as skipped):
  ``MLPClassifier(784, 10, hidden=(12, 12))`` on flattened, normalised MNIST, one seed.

The data sets are the same for every seed (datamodule seed 0); ``--seeds`` changes the weight initialisation
and the batch order (``seed_everything``). Hyper-parameters are the library defaults / the config's, untuned.

Two settings for speed on a shared 2-core CPU, neither of which changes the numbers: ``--max-batch 4096``
(the callback's ``max_batch``, default 65536; with 65536 rows per masked forward an exact fit of the CNN's
``features.4`` took 6.5 s, with 4096 rows 0.7 s: the ``[rows, 12, 6, 6]`` chunks do not stay in cache) and
``--threads 1`` (an exact fit of one MLP layer took 0.15 s with 1 thread and 0.5-3.3 s with 2, the OpenMP
threads stalling while other jobs held the cores).

Read-outs per layer and measurement (see METHODS.md section 3), taken from the library's
:class:`~lightning_interp.ablation.AblationFit`: ``acc`` (the network's accuracy on the probe examples,
unsmoothed), ``distr`` (distributedness, mean over class tasks, in ``[1/d, 1]``), ``mc`` (manifold complexity:
total correlation of the mask posterior in bits, mean over tasks), ``poly`` (polysemanticity, plain mean over
units with any information; the callback logs a mean weighted by information instead), ``poly_inf`` (mean
polysemanticity over the informative units only: :func:`~lightning_interp.ablation.informative_units` with more
than 0.05 bits for some task; in ``[1, classes]``), ``inf_units`` (their number) and ``info`` (total
information of the layer's units, bits, mean over tasks). Table cells are ``mean ± sd`` over the seeds; a NaN
means no unit carries information.

Outputs under ``--out``: ``results.md`` (tables and the computed observations), ``results.json`` (every number,
per seed, with the final importance matrices), and per experiment ``<exp>_over_training.png`` (accuracy,
distributedness, manifold complexity and polysemanticity per layer over training) and
``<exp>_importance_final.png`` (final ``P(unit kept | task correct)``, tasks x units, per layer, seed 0).

Observed in the default run (balanced likelihood, the callback's default; see the printed "Observations" lines,
computed from the numbers, for the run at hand; docs/ablation.md has the table and the one-sided run before it):
* Both networks reach 100% probe accuracy by epoch 2-3, and the read-outs settle with the accuracy: after epoch 3
  nothing changes by more than the spread between seeds.
* MLP: the mask posterior carries little information once trained (about 0.15 bits per task summed over the 12
  units, 2-3 informative units per layer): 12 units are far more than this task needs, so most masks keep it
  correct. Distributedness ends at 0.45 (net.1) and 0.46 (net.3); the informative units inform about 2.4 (net.1)
  and 2.1 (net.3) of the 4 class tasks (one-sided: 1.15-1.17, nearly monosemantic), net.3 the lower in 3 of 3
  seeds.
* CNN: the second conv layer (features.4) is less distributed than the first (0.52 vs 0.73, 3 of 3 seeds); the
  polysemanticity of the informative channels is 3.5-3.6 in both (features.4 lower in 2 of 3 seeds; one-sided
  2.82 vs 2.23) and rises over training (features.1 2.77 -> 3.59, features.4 2.44 -> 3.49 after epoch 1, 3 of
  3 seeds). Caveat: information counts both signs, and a channel that must be kept for some classes and
  ablated for others (importance < 0.5: evidence against those classes) scores as several "tasks".
* Manifold complexity (total correlation) rises from about 0 at initialisation to 0.36-0.38 bits (MLP) and
  0.9-1.1 bits (CNN) and is flat after epoch 3-4; no consistent difference between layers.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
from torch import nn
from tqdm import tqdm

from lightning_interp.ablation import AblationFit, informative_units
from lightning_interp.callbacks import AblationProbeCallback
from lightning_interp.datamodules import MNISTDataModule, PatchImageDataModule
from lightning_interp.models import MLPClassifier, SmallCNN
from lightning_interp.plotting import subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

INFORMATIVE_BITS = 0.05
METRICS = ("acc", "distr", "mc", "poly", "poly_inf", "inf_units", "info")
QUICK = {
    "seeds": [0],
    "epochs": 2,
    "hidden": [6, 6],
    "cnn_channels": [4, 6],
    "n_train": 256,
    "n_val": 128,
    "probe_size": 128,
    "mnist_epochs": 1,
    "mnist_probe_size": 128,
    "mnist_train_batches": 5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, "outputs/reproduce_nam", threads="torch intra-op threads (see the module docstring)")
    parser.add_argument("--experiments", nargs="+", choices=["mlp", "cnn", "mnist"], default=["mlp", "cnn", "mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="model / batch-order seeds")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (patch task)")
    parser.add_argument("--hidden", nargs="+", type=int, default=[12, 12], help="MLP hidden widths (<= 16 each: exact)")
    parser.add_argument("--cnn-channels", nargs="+", type=int, default=[8, 12], help="SmallCNN channels (<= 16 each)")
    parser.add_argument("--classes", type=int, default=4, help="patch-task classes (<= 4 with the 2x2 grid)")
    parser.add_argument("--n-train", type=int, default=2048, help="patch-task training images")
    parser.add_argument("--n-val", type=int, default=512, help="patch-task validation images (the probe is drawn from them)")
    parser.add_argument("--probe-size", type=int, default=512, help="probe examples of the callback")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="MLP learning rate (the model default)")
    parser.add_argument("--cnn-lr", type=float, default=1e-2, help="CNN learning rate (configs/ablation_patches.yaml)")
    parser.add_argument("--mnist-dir", default="data", help="folder holding MNIST/raw/ (torchvision root)")
    parser.add_argument("--mnist-epochs", type=int, default=3, help="MNIST training epochs")
    parser.add_argument("--mnist-probe-size", type=int, default=512, help="MNIST probe examples")
    parser.add_argument("--mnist-train-batches", type=float, default=1.0, help="limit_train_batches of the MNIST run")
    parser.add_argument("--max-batch", type=int, default=4096, help="the callback's max_batch (rows per masked forward)")
    args = harness.parse(parser, argv, QUICK)
    if args.quick:
        args.experiments = [e for e in args.experiments if e != "cnn"]
    if max(args.hidden + args.cnn_channels) > 16:
        parser.error("probed widths must be <= 16 (exact enumeration)")
    if args.epochs < 1 or args.mnist_epochs < 1 or not args.seeds:
        parser.error("--epochs and --mnist-epochs must be >= 1 and --seeds non-empty")
    return args


# ---------------------------------------------------------------------------------------------
# training with the product callback
# ---------------------------------------------------------------------------------------------


class RecordingProbe(AblationProbeCallback):
    """:class:`AblationProbeCallback` that also keeps every measurement's results and the probe accuracy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []
        self._epochs_trained = 0

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, extra: dict[str, float] | None = None) -> Any:
        self._epochs_trained = 0 if trainer.global_step == 0 else trainer.current_epoch + 1
        return super().run(trainer, pl_module, extra)

    def measure(self, pl_module: nn.Module) -> Any:
        measurement = super().measure(pl_module)
        x, y = self.probe_inputs, self.probe_labels
        assert x is not None and y is not None  # drawn by the callback's setup
        p = next(pl_module.parameters())
        acc = float((pl_module(x.to(p.device, p.dtype)).argmax(1).cpu() == y).double().mean())
        results = {k: _cpu(r) for k, r in measurement.data["results"].items()}
        self.records.append({"epoch": self._epochs_trained, "acc": acc, "results": results})
        return measurement


def _cpu(r: AblationFit) -> AblationFit:
    for name in ("importance", "information_bits", "distributedness", "manifold_complexity", "polysemanticity"):
        setattr(r, name, getattr(r, name).detach().cpu().double())
    return r


def readouts(acc: float, r: AblationFit) -> dict[str, float]:
    """The table's read-outs of one layer's result (every task is a class task here: ``tasks="classes"``)."""
    informative = informative_units(r, INFORMATIVE_BITS)
    return {
        "acc": acc,
        "distr": float(r.distributedness.nanmean()),
        "mc": float(r.manifold_complexity.mean()),
        "poly": float(r.polysemanticity.nanmean()),
        "poly_inf": float(r.polysemanticity[informative].nanmean()),
        "inf_units": float(informative.sum()),
        "info": float(r.information_bits.sum(dim=1).mean()),
    }


@dataclass
class Experiment:
    name: str
    description: str
    layers: list[str]
    make_model: Callable[[], pl.LightningModule]
    make_data: Callable[[], pl.LightningDataModule]
    epochs: int
    probe_size: int
    seeds: list[int]
    limit_train_batches: float = 1.0


def experiments(args: argparse.Namespace) -> tuple[list[Experiment], dict[str, str]]:
    def patches() -> PatchImageDataModule:
        return PatchImageDataModule(num_classes=args.classes, n_train=args.n_train, n_val=args.n_val, batch_size=args.batch_size)

    mlp_layers = [f"net.{2 * i + 1}" for i in range(len(args.hidden))]
    found: list[Experiment] = []
    skipped: dict[str, str] = {}
    if "mlp" in args.experiments:
        found.append(
            Experiment(
                "mlp",
                f"MLPClassifier(144, {args.classes}, hidden={tuple(args.hidden)}, lr={args.lr}) on PatchImageDataModule",
                mlp_layers,
                lambda: MLPClassifier(144, args.classes, hidden=tuple(args.hidden), lr=args.lr),
                patches,
                args.epochs,
                args.probe_size,
                args.seeds,
            )
        )
    if "cnn" in args.experiments:
        cnn_layers = [f"features.{3 * i + 1}" for i in range(len(args.cnn_channels))]
        found.append(
            Experiment(
                "cnn",
                f"SmallCNN(1, {args.classes}, channels={tuple(args.cnn_channels)}, lr={args.cnn_lr}) on PatchImageDataModule",
                cnn_layers,
                lambda: SmallCNN(1, args.classes, channels=tuple(args.cnn_channels), lr=args.cnn_lr),
                patches,
                args.epochs,
                args.probe_size,
                args.seeds,
            )
        )
    if "mnist" in args.experiments:
        try:
            MNISTDataModule(args.mnist_dir).check_files()
        except FileNotFoundError as err:
            skipped["mnist"] = str(err).splitlines()[0]
        else:
            found.append(
                Experiment(
                    "mnist",
                    f"MLPClassifier(784, 10, hidden={tuple(args.hidden)}) on flattened MNIST",
                    mlp_layers,
                    lambda: MLPClassifier(784, 10, hidden=tuple(args.hidden)),
                    lambda: MNISTDataModule(args.mnist_dir, flatten=True, batch_size=128),
                    args.mnist_epochs,
                    args.mnist_probe_size,
                    args.seeds[:1],
                    args.mnist_train_batches,
                )
            )
    return found, skipped


def train(exp: Experiment, seed: int, max_batch: int) -> list[dict[str, Any]]:
    pl.seed_everything(seed, verbose=False)
    model = exp.make_model()
    probe = RecordingProbe(
        layers=exp.layers,
        probe_size=exp.probe_size,
        tasks="classes",
        method="exact",
        max_batch=max_batch,
        every_n_epochs=1,
        measure_at_start=True,
        log_images=False,
        seed=0,
        budget=None,  # the reproduction needs every measurement it schedules, whatever the overhead
    )
    trainer = pl.Trainer(
        max_epochs=exp.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[probe, harness.epoch_bar(f"{exp.name} seed {seed}", exp.epochs)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        limit_train_batches=exp.limit_train_batches,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=exp.make_data())
    return probe.records


# ---------------------------------------------------------------------------------------------
# tables, figures, observations
# ---------------------------------------------------------------------------------------------


def summarise(records: dict[int, list[dict[str, Any]]], layers: list[str]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """``layer -> epoch -> metric -> [value per seed]``."""
    out: dict[str, dict[int, dict[str, list[float]]]] = {layer: {} for layer in layers}
    for recs in records.values():
        for rec in recs:
            for layer in layers:
                values = readouts(rec["acc"], rec["results"][layer])
                slot = out[layer].setdefault(rec["epoch"], {m: [] for m in METRICS})
                for m in METRICS:
                    slot[m].append(values[m])
    return out


def _cell(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "nan"
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(finite):.{digits}f}"


def table(summary: dict[str, dict[int, dict[str, list[float]]]], units: dict[str, int]) -> str:
    rows = [
        [
            f"{layer} ({units[layer]})",
            epoch,
            _cell(m["acc"], 3),
            *(_cell(m[k]) for k in ("distr", "mc", "poly", "poly_inf")),
            _cell(m["inf_units"], 1),
            _cell(m["info"]),
        ]
        for layer, epochs in summary.items()
        for epoch, m in sorted(epochs.items())
    ]
    header = ["layer (d)", "epoch", "acc", "distr", "mc (bits)", "poly", "poly_inf", "inf_units", "info (bits)"]
    return harness.markdown_table(header, rows, align="lrrrrrrrr")


def final_per_seed(records: dict[int, list[dict[str, Any]]], layers: list[str]) -> str:
    rows = []
    for seed, recs in records.items():
        for layer in layers:
            v = readouts(recs[-1]["acc"], recs[-1]["results"][layer])
            rows.append(
                [seed, layer, f"{v['acc']:.3f}", *(f"{v[k]:.2f}" for k in ("distr", "mc", "poly_inf")), f"{v['inf_units']:.0f}"]
            )
    header = ["seed", "layer", "acc", "distr", "mc (bits)", "poly_inf", "inf_units"]
    return harness.markdown_table(header, rows, align="rlrrrrr")


def observations(name: str, records: dict[int, list[dict[str, Any]]], layers: list[str]) -> list[str]:
    """Comparisons computed from the numbers: later vs earlier layer at the end; first trained epoch vs the end."""
    lines = []
    first, last = layers[0], layers[-1]
    for metric, label in (
        ("distr", "distributedness"),
        ("poly_inf", "polysemanticity (informative units)"),
        ("mc", "manifold complexity"),
    ):
        final = {
            seed: {la: readouts(recs[-1]["acc"], recs[-1]["results"][la])[metric] for la in layers}
            for seed, recs in records.items()
        }
        lower = sum(final[s][last] < final[s][first] for s in final)
        mean = {la: statistics.fmean(final[s][la] for s in final) for la in layers}
        lines.append(
            f"{name}: final {label}: " + ", ".join(f"{la} {mean[la]:.2f}" for la in layers) + f"; {last} lower than {first} "
            f"in {lower}/{len(final)} seeds"
        )
        for la in layers:
            start = [readouts(recs[1]["acc"], recs[1]["results"][la])[metric] for recs in records.values() if len(recs) > 1]
            end = [readouts(recs[-1]["acc"], recs[-1]["results"][la])[metric] for recs in records.values()]
            up = sum(b > a for a, b in zip(start, end, strict=False))
            if start:
                lines.append(
                    f"{name}: {la} {label} after epoch 1 -> end: {statistics.fmean(start):.2f} -> {statistics.fmean(end):.2f} "
                    f"(up in {up}/{len(start)} seeds)"
                )
    return lines


def plot_over_training(
    name: str, summary: dict[str, dict[int, dict[str, list[float]]]], records: dict[int, list[dict[str, Any]]], path: Path
) -> None:
    panels = (
        ("acc", "probe accuracy"),
        ("distr", "distributedness (mean over tasks)"),
        ("mc", "manifold complexity (bits, mean over tasks)"),
        ("poly_inf", "polysemanticity (informative units)"),
    )
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for i, (layer, epochs) in enumerate(summary.items()):
            xs = sorted(epochs)
            per_seed = list(zip(*[epochs[e][metric] for e in xs], strict=True))
            for values in per_seed:
                ax.plot(xs, values, color=colors[i % len(colors)], alpha=0.25, lw=0.8)
            mean = [statistics.fmean([v for v in epochs[e][metric] if not math.isnan(v)] or [math.nan]) for e in xs]
            ax.plot(xs, mean, color=colors[i % len(colors)], lw=2, marker="o", ms=3, label=layer)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epochs trained")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: Bayesian ablation over training (thin: seeds {list(records)}, thick: mean)", fontsize=10)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=110)


def plot_importance(name: str, records: dict[int, list[dict[str, Any]]], layers: list[str], path: Path) -> None:
    seed = next(iter(records))
    final = records[seed][-1]
    fig, axes = subplots(1, len(layers), figsize=(4.5 * len(layers), 2.8), squeeze=False)
    im = None
    for ax, layer in zip(axes[0], layers, strict=True):
        r = final["results"][layer]
        imp = r.importance.numpy()
        im = ax.imshow(imp, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(r.tasks)), r.tasks, fontsize=7)
        ax.set_xticks(range(imp.shape[1]))
        ax.tick_params(axis="x", labelsize=6)
        poly = r.polysemanticity.numpy()
        ax.set_xlabel("unit (top: polysemanticity of informative units)", fontsize=7)
        informative = informative_units(r, INFORMATIVE_BITS)
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(imp.shape[1]), [f"{p:.1f}" if k else "" for p, k in zip(poly, informative.tolist(), strict=True)])
        top.tick_params(labelsize=6)
        ax.set_title(f"{layer}: P(unit kept | task correct)", fontsize=9, pad=14)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(f"{name}, seed {seed}, after {final['epoch']} epochs (acc {final['acc']:.3f})", fontsize=10, y=1.1)
    harness.save_figure(fig, path, dpi=110, bbox_inches="tight")


def _json_record(rec: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    return {
        "epoch": rec["epoch"],
        "acc": rec["acc"],
        "layers": {
            la: {
                **readouts(rec["acc"], rec["results"][la]),
                "tasks": rec["results"][la].tasks,
                "distributedness_per_task": rec["results"][la].distributedness.tolist(),
                "manifold_complexity_per_task": rec["results"][la].manifold_complexity.tolist(),
                "polysemanticity_per_unit": rec["results"][la].polysemanticity.tolist(),
                "importance": rec["results"][la].importance.tolist(),
            }
            for la in layers
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    harness.quiet_lightning()
    run = harness.start(args)
    print(f"loadavg at start: {harness.fmt_load(run.loadavg_start)}", flush=True)
    exps, skipped = experiments(args)
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    md = ["# Bayesian ablation over training (Nam et al. 2025, arXiv:2505.13742)", ""]
    payload: dict[str, Any] = {"config": harness.config(args), "skipped": skipped, "experiments": {}}
    all_obs: list[str] = []
    for exp in exps:
        t1 = time.perf_counter()
        records = {seed: train(exp, seed, args.max_batch) for seed in tqdm(exp.seeds, desc=exp.name, unit="seed")}
        wall = time.perf_counter() - t1
        units = {la: int(records[exp.seeds[0]][-1]["results"][la].importance.shape[1]) for la in exp.layers}
        summary = summarise(records, exp.layers)
        obs = observations(exp.name, records, exp.layers)
        all_obs += obs
        plot_over_training(exp.name, summary, records, args.out / f"{exp.name}_over_training.png")
        plot_importance(exp.name, records, exp.layers, args.out / f"{exp.name}_importance_final.png")
        text = [
            f"## {exp.name}: {exp.description}",
            "",
            f"layers {exp.layers} (units {list(units.values())}); seeds {exp.seeds}; {exp.epochs} epochs; probe "
            f"{exp.probe_size}; exact enumeration; wall {wall:.1f} s. Cells: mean ± sd over seeds; epoch 0 = initialisation.",
            "",
            table(summary, units),
            "",
            "Final measurement per seed:",
            "",
            final_per_seed(records, exp.layers),
            "",
            "Observations (computed):",
            "",
            *[f"- {line}" for line in obs],
            "",
        ]
        print("\n".join(text), flush=True)
        md += text
        payload["experiments"][exp.name] = {
            "description": exp.description,
            "layers": exp.layers,
            "units": units,
            "wall_s": wall,
            "observations": obs,
            "per_seed": {str(s): [_json_record(r, exp.layers) for r in recs] for s, recs in records.items()},
        }
    for name, why in skipped.items():
        md += [f"## {name}: skipped", "", why, ""]
    payload["machine"] = run.stop()
    md.append(run.describe())
    print(md[-1])
    return harness.write_results(args.out, "\n".join(md), payload)


if __name__ == "__main__":
    main()
