"""Overhead of the lightning-interp callbacks at their default cadence, against bare training.

Trains the small CNN on MNIST-like data (:class:`~lightning_interp.datamodules.PatchImageDataModule` at
28 x 28, 60,000 training images, batch 64: one epoch is 937 steps) for a fixed number of steps, bare
and with four callbacks (final-layer saliency, Bayesian ablation on the last conv block, correlation
orders, and the posterior gap against the task's exact posterior) at their default cadence,
alternating the two, plus a third run with the same callbacks attached but idle (never measuring: what
Lightning's per-step hook dispatch alone costs). The expansion needs categorical inputs: an MLP on
Potts sequences (60,000, batch 64) carries it with the posterior gap, ablation and correlation orders;
a third setup is the posterior gap alone on the 1-D Gaussian preset 3.

Prints the median wall-time ratio per setup (target: at most 1.10x; the median over rounds of
instrumented / bare), the same ratio of process CPU time, and the per-callback cost from Lightning's
``SimpleProfiler`` in a further run, with ``1 + (sum of the callbacks' profiled seconds) / (bare seconds)``:
on a noisy machine (run-to-run swings of 5-10% were seen on the 2-core development VM, in wall and CPU time
alike) this direct estimate is steadier than the ratio of two noisy totals.

The default cadence is per epoch, so the default run is two whole epochs (two measurements of each
per-epoch callback, one of the ablation at the end); a run that stops 63 steps into its second epoch
(``--steps 1000``) pays the same two measurements for about half the training.

Run (from the repository root)::

    .venv/bin/python scripts/bench_overhead.py            # two epochs per fit, about 7 minutes on 2 CPU cores
    .venv/bin/python scripts/bench_overhead.py --steps 1000
    .venv/bin/python scripts/bench_overhead.py --quick    # a smoke run: two setups, 20 steps, cheap callback settings
    .venv/bin/python scripts/bench_overhead.py --only user --steps 1500   # the user-style case: 5 epochs of 300 steps

The user-style setups are a CNN written here (not from ``lightning_interp.models``) on scikit-learn's real
digits through a plain dataloader, with saliency, ablation and correlation orders at their defaults
(overhead budget included) on the layer before the last conv block and on the last block.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import SimpleProfiler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from lightning_interp import callbacks as cbs
from lightning_interp.datamodules import PatchImageDataModule, PottsDataModule, SyntheticDataModule
from lightning_interp.models import MLPClassifier, SmallCNN
from lightning_interp.tasks import xie_task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

CALLBACK_NAMES = set(cbs.__all__)
#: ``--quick``: a smoke run; one thread, as tiny models on a shared machine are slower with two.
QUICK = {"steps": 20, "repeats": 1, "threads": 1}
#: ``--quick`` runs only the setups whose names contain these: between them all five callbacks, a plain loader
#: and a datamodule.
QUICK_SETUPS = ("at features.5", "mlp on Potts")
#: ``--quick``: callback arguments that make the measurements cheap (small probes, short chains).
QUICK_CALLBACKS: dict[str, dict[str, Any]] = {
    "ablation": {"probe_size": 64, "num_chains": 2, "num_steps": 20, "burn_in": 5},
    "correlation": {"probe_size": 256},
    "posterior_gap": {"probe_size": 256, "grid_size": 50},
    "expansion": {"num_samples": 32},
}


#: Keyword arguments that make a callback idle: attached (Lightning dispatches all its hooks) but never measuring.
IDLE: dict[str, Any] = dict(every_n_epochs=None, every_n_steps=None, measure_at_start=False, measure_at_end=False)


class UserCNN(pl.LightningModule):
    """A user's own CNN, written here rather than taken from lightning_interp.models: three conv blocks, GAP, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), 1e-3)


def digits_loader(quick: bool) -> DataLoader:
    """scikit-learn's real handwritten digits (8 x 8), 1500 training images in batches of 5: 300 steps an epoch."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    n = 300 if quick else 1500
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=5, shuffle=True)


def setups(quick: bool) -> dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[..., list]]]:
    """name -> (model factory, data factory, callbacks factory taking extra callback keyword arguments).

    The data factory returns a datamodule, or (the user-style setups) a plain training dataloader. ``quick``: small
    data sets and small probes / short chains (see :data:`QUICK_CALLBACKS`).
    """
    n_img = 1024 if quick else 60_000
    image_dm = PatchImageDataModule(image_size=28, grid=2, patch=5, n_train=n_img, n_val=1000, batch_size=64)
    image_dm.setup()
    gauss_dm = SyntheticDataModule(xie_task(3), n_train=100_000 if not quick else 2048, n_val=0, n_test=0, batch_size=64)
    gauss_dm.setup()
    potts_dm = PottsDataModule(n_train=60_000 if not quick else 2048, n_val=1000, n_test=0, batch_size=64)
    potts_dm.setup()
    ab, co, pg, ex = (QUICK_CALLBACKS[k] if quick else {} for k in ("ablation", "correlation", "posterior_gap", "expansion"))
    user = {
        f"user CNN on digits, plain loader: saliency + ablation + correlation at {layer} ({where})": (
            UserCNN,
            lambda: digits_loader(quick),
            lambda layer=layer, **kw: [
                cbs.FinalLayerSaliencyCallback(**kw),
                cbs.AblationProbeCallback(layers=[layer], **ab, **kw),
                cbs.CorrelationOrderCallback(layers=[layer], **co, **kw),
            ],
        )
        for layer, where in (("features.3", "before the last conv block"), ("features.5", "the last conv block"))
    }
    return {
        **user,
        "cnn on patch images: saliency + ablation + correlation + posterior gap": (
            lambda: SmallCNN(in_channels=1, num_classes=4, channels=(8, 12)),
            lambda: image_dm,
            lambda **kw: [
                cbs.FinalLayerSaliencyCallback(log_images=False, **kw),
                cbs.AblationProbeCallback(layers=["features.4"], log_images=False, **ab, **kw),
                cbs.CorrelationOrderCallback(log_images=False, **co, **kw),
                cbs.PosteriorGapCallback(log_images=False, **pg, **kw),
            ],
        ),
        "mlp on Potts: expansion + posterior gap + ablation + correlation": (
            lambda: MLPClassifier(32, 2, hidden=(64,)),
            lambda: potts_dm,
            lambda **kw: [
                cbs.LogitExpansionCallback(8, 4, log_images=False, **ex, **kw),
                cbs.PosteriorGapCallback(log_images=False, **pg, **kw),
                cbs.AblationProbeCallback(layers=["net.1"], log_images=False, **ab, **kw),
                cbs.CorrelationOrderCallback(log_images=False, **co, **kw),
            ],
        ),
        "mlp: posterior gap (preset 3)": (
            lambda: MLPClassifier(1, 2, hidden=(64, 64)),
            lambda: gauss_dm,
            lambda **kw: [cbs.PosteriorGapCallback(log_images=False, **pg, **kw)],
        ),
    }


def bootstrap_ratio_interval(
    instrumented: list[float], bare: list[float], draws: int = 2000, level: float = 0.9
) -> tuple[float, float]:
    """A percentile bootstrap interval for median(instrumented) / median(bare), resampling each side's rounds."""
    gen = torch.Generator().manual_seed(0)
    inst, base = torch.tensor(instrumented), torch.tensor(bare)
    i = torch.randint(len(inst), (draws, len(inst)), generator=gen)
    b = torch.randint(len(base), (draws, len(base)), generator=gen)
    ratios = inst[i].median(1).values / base[b].median(1).values
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ratios.dtype)
    lo, hi = torch.quantile(ratios, q).tolist()
    return lo, hi


def fit(model: Any, dm: Any, callbacks: list, steps: int, profiler: Any = None) -> tuple[float, float]:
    """Train; return (wall seconds, CPU seconds of this process)."""
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        profiler=profiler,
        accelerator="cpu",
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, dm)
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "outputs/bench_overhead")
    parser.add_argument(
        "--steps", type=int, default=1874, help="training steps per fit (default: two epochs; one epoch is 937 steps)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="bare / instrumented / idle rounds per setup")
    parser.add_argument("--only", default="", help="run only the setups whose name contains this (e.g. 'user')")
    args = harness.parse(parser, argv, QUICK)
    harness.quiet_lightning()
    warnings.filterwarnings("ignore")
    run = harness.start(args)
    results = []
    for name, (make_model, make_dm, make_cbs) in setups(args.quick).items():
        if args.only not in name or (args.quick and not any(k in name for k in QUICK_SETUPS)):
            continue
        runs: dict[str, list[tuple[float, float]]] = {"bare": [], "instrumented": [], "idle": []}
        factories = {"bare": lambda: [], "instrumented": make_cbs, "idle": lambda make_cbs=make_cbs: make_cbs(**IDLE)}
        order = list(runs)
        pl.seed_everything(0, verbose=False)
        fit(make_model(), make_dm(), make_cbs(), min(args.steps, 50))  # untimed warm-up (thread pools, caches)
        for _ in tqdm(range(args.repeats), desc=name):
            for kind in order:
                pl.seed_everything(0, verbose=False)
                runs[kind].append(fit(make_model(), make_dm(), factories[kind](), args.steps))
            order = order[1:] + order[:1]  # rotate, so no kind always runs first or last
        profiler = SimpleProfiler()
        pl.seed_everything(0, verbose=False)
        fit(make_model(), make_dm(), make_cbs(), args.steps, profiler)
        per_callback: dict[str, float] = {}
        for action, durations in profiler.recorded_durations.items():
            match = re.match(r"\[Callback\]([A-Za-z_]\w*)", action)
            if match and match.group(1) in CALLBACK_NAMES:
                per_callback[match.group(1)] = per_callback.get(match.group(1), 0.0) + float(sum(durations))

        def ratio(kind: str, clock: int, runs: dict[str, list[tuple[float, float]]] = runs) -> float:
            return statistics.median(r[clock] / b[clock] for r, b in zip(runs[kind], runs["bare"], strict=True))

        inst, bare = [r[0] for r in runs["instrumented"]], [r[0] for r in runs["bare"]]

        results.append(
            {
                "setup": name,
                "bare_s": statistics.median(r[0] for r in runs["bare"]),
                "instrumented_s": statistics.median(r[0] for r in runs["instrumented"]),
                # the machine's speed drifts by +-20% between fits, and not in step between neighbouring fits:
                # the ratio of the medians is the headline, with a bootstrap interval over the rounds
                "median_ratio": statistics.median(inst) / statistics.median(bare),
                "median_ratio_interval": bootstrap_ratio_interval(inst, bare),
                "paired_ratio": ratio("instrumented", 0),
                "cpu_ratio": ratio("instrumented", 1),
                "idle_ratio": ratio("idle", 0),
                "profiled_ratio": 1 + sum(per_callback.values()) / statistics.median(r[0] for r in runs["bare"]),
                "runs": runs,
                "per_callback_s": per_callback,
            }
        )
    machine = run.stop()
    header = ["setup", "bare s", "with callbacks s", "median ratio (90% interval)", "target <= 1.10", "median paired ratio"]
    header += ["CPU-time ratio", "idle ratio", "1 + profiled / bare", "per-callback s (SimpleProfiler)"]
    rows = [
        [
            r["setup"],
            f"{r['bare_s']:.2f}",
            f"{r['instrumented_s']:.2f}",
            "{:.3f}x ({:.2f}-{:.2f})".format(r["median_ratio"], *r["median_ratio_interval"]),
            "PASS" if r["median_ratio"] <= 1.10 else "FAIL",
            f"{r['paired_ratio']:.3f}x",
            f"{r['cpu_ratio']:.3f}x",
            f"{r['idle_ratio']:.3f}x",
            f"{r['profiled_ratio']:.3f}x",
            ", ".join(f"{k} {v:.2f}" for k, v in r["per_callback_s"].items()),
        ]
        for r in results
    ]
    table = (
        f"{args.steps} steps per fit, {args.repeats} rounds of bare / instrumented / idle runs (order rotated), CPU "
        f"(load {run.loadavg_start[0]:.2f} -> {machine['loadavg_end'][0]:.2f}); callbacks at default cadence. Idle: the "
        "same callbacks attached but never measuring (Lightning's per-step hook dispatch alone).\n\n"
        + harness.markdown_table(header, rows, align="lrrrlrrrrl")
    )
    print(table)
    return harness.write_results(args.out, table, {"config": harness.config(args), "machine": machine, "results": results})


if __name__ == "__main__":
    main()
