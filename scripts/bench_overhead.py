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
    .venv/bin/python scripts/bench_overhead.py --only user --repeats 3   # the user-style case (issue 21)

The user-style setup is a CNN written here (not from ``lightning_interp.models``): three conv blocks with
BatchNorm, ReLU and max-pooling (32 channels at the last conv, 7 x 7), global average pooling and a Linear
head, on scikit-learn's real digits upsampled to 28 x 28 (3,591 training images: the 1,497 training digits
and copies shifted by one pixel right and down; 300 validation digits), 4 epochs in batches of 32, plain
dataloaders to ``fit``, and the README's three image callbacks at their defaults on the last conv (the overhead
budget included). Its fits are timed by epochs (``--steps`` does not apply).

**Counted, not only timed.** For every instrumented fit the table gives how many measurements each callback
made and the step of its last one; a setup where a callback measured nothing, or not at the final step, is a
FAIL whatever its time (an observer that skips everything costs nothing).
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
QUICK_SETUPS = ("at conv3", "mlp on Potts")
#: ``--quick``: callback arguments that make the measurements cheap (small probes, short chains).
QUICK_CALLBACKS: dict[str, dict[str, Any]] = {
    "ablation": {"probe_size": 64, "num_chains": 2, "num_steps": 20, "burn_in": 5},
    "correlation": {"probe_size": 256},
    "posterior_gap": {"probe_size": 256, "grid_size": 50},
    "expansion": {"num_samples": 32},
}


#: Keyword arguments that make a callback idle: attached (Lightning dispatches all its hooks) but never measuring.
IDLE: dict[str, Any] = dict(every_n_epochs=None, every_n_steps=None, measure_at_start=False, measure_at_end=False)


class DigitCNN(pl.LightningModule):
    """The user's CNN of issue 21, written as a user would: conv-BN-ReLU-pool x 2, conv-BN-ReLU (32 ch), GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(nn.functional.relu(self.bn1(self.conv1(x))))
        x = self.pool(nn.functional.relu(self.bn2(self.conv2(x))))
        x = nn.functional.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, _: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), 1e-3)


def digits_loaders(quick: bool) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's real digits at 28 x 28: (training loader, validation loader), plain ``DataLoader`` objects.

    Training: the 1,497 digits after the first 300, each also shifted by one pixel right and one down (4,491
    images; ``quick``: 300). Validation: the first 300 digits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    train_x, train_y = x[300:], y[300:]
    train_x = torch.cat([train_x, train_x.roll(1, dims=3), train_x.roll(1, dims=2)])
    train_y = train_y.repeat(3)
    if quick:
        train_x, train_y = train_x[:300], train_y[:300]
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=32, shuffle=True)
    return train, DataLoader(TensorDataset(x[:300], y[:300]), batch_size=100)


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
        "user CNN on 28x28 digits, plain loaders: saliency + ablation + correlation at conv3 (defaults)": (
            DigitCNN,
            lambda: digits_loaders(quick),
            lambda **kw: [
                cbs.FinalLayerSaliencyCallback(**kw),
                cbs.AblationProbeCallback(layers=["conv3"], **ab, **kw),
                cbs.CorrelationOrderCallback(layers=["conv3"], **co, **kw),
            ],
        )
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


#: Epochs of the user-style fits (plain (train, val) loaders), timed by epochs rather than steps.
USER_EPOCHS = 4


def fit(
    model: Any, dm: Any, callbacks: list, steps: int, profiler: Any = None, epochs: int | None = None
) -> tuple[float, float, int]:
    """Train; return (wall seconds, CPU seconds of this process, the final step).

    ``dm``: a datamodule (``steps`` steps, no validation) or a ``(train, val)`` pair of plain loaders
    (``epochs`` epochs, validating after each, as a user's script does).
    """
    loaders = isinstance(dm, tuple)
    trainer = pl.Trainer(
        max_steps=-1 if loaders else steps,
        max_epochs=(epochs or USER_EPOCHS) if loaders else None,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if loaders else 0,
        profiler=profiler,
        accelerator="cpu",
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, *dm) if loaders else trainer.fit(model, dm)
    return time.perf_counter() - start, time.process_time() - cpu, trainer.global_step


def counts(callbacks: list, final_step: int) -> dict[str, tuple[int, bool]]:
    """Per callback: (measurements made in the fit, whether the last one is at ``final_step``)."""
    return {
        type(cb).__name__: (len(cb.history), bool(cb.history) and cb.history[-1]["step"] == final_step) for cb in callbacks
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "outputs/bench_overhead")
    parser.add_argument(
        "--steps", type=int, default=1874, help="training steps per fit (default: two epochs; one epoch is 937 steps)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="bare / instrumented / idle rounds per setup")
    parser.add_argument("--only", default="", help="run only the setups whose name contains this (e.g. 'user')")
    parser.add_argument(
        "--user-epochs",
        type=int,
        default=4,
        help="epochs of the user-style fits (4: the issue's fit, about 5 s bare on 2 cores here; 48: about 60 s)",
    )
    args = harness.parse(parser, argv, QUICK)
    global USER_EPOCHS
    USER_EPOCHS = args.user_epochs
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
        fit(make_model(), make_dm(), make_cbs(), min(args.steps, 50), epochs=1)  # untimed warm-up (thread pools, caches)
        measured: list[dict[str, tuple[int, bool]]] = []
        for _ in tqdm(range(args.repeats), desc=name):
            for kind in order:
                pl.seed_everything(0, verbose=False)
                callbacks = factories[kind]()
                wall, cpu, final = fit(make_model(), make_dm(), callbacks, args.steps)
                runs[kind].append((wall, cpu))
                if kind == "instrumented":
                    measured.append(counts(callbacks, final))
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
                # per callback: the fewest measurements in any instrumented fit, and whether every fit measured its end
                "measurements": {
                    cb: (min(m[cb][0] for m in measured), all(m[cb][1] for m in measured)) for cb in measured[0]
                },
            }
        )
    machine = run.stop()
    header = ["setup", "bare s", "with callbacks s", "median ratio (90% interval)", "target <= 1.10", "measured (min, at end)"]
    header += ["median paired ratio"]
    header += ["CPU-time ratio", "idle ratio", "1 + profiled / bare", "per-callback s (SimpleProfiler)"]
    rows = [
        [
            r["setup"],
            f"{r['bare_s']:.2f}",
            f"{r['instrumented_s']:.2f}",
            "{:.3f}x ({:.2f}-{:.2f})".format(r["median_ratio"], *r["median_ratio_interval"]),
            "PASS" if r["median_ratio"] <= 1.10 and observed(r) else "FAIL",
            ", ".join(
                f"{k.replace('Callback', '')} {n}{'' if end else ' (not at end)'}" for k, (n, end) in r["measurements"].items()
            ),
            f"{r['paired_ratio']:.3f}x",
            f"{r['cpu_ratio']:.3f}x",
            f"{r['idle_ratio']:.3f}x",
            f"{r['profiled_ratio']:.3f}x",
            ", ".join(f"{k} {v:.2f}" for k, v in r["per_callback_s"].items()),
        ]
        for r in results
    ]
    table = (
        f"{args.steps} steps per fit ({args.user_epochs} epochs for the user-style setup), {args.repeats} rounds of bare / "
        "instrumented / idle runs (order rotated), CPU "
        f"(load {run.loadavg_start[0]:.2f} -> {machine['loadavg_end'][0]:.2f}); callbacks at default cadence. Idle: the "
        "same callbacks attached but never measuring (Lightning's per-step hook dispatch alone).\n\n"
        + harness.markdown_table(header, rows, align="lrrrllrrrrl")
    )
    unobserved = [r["setup"] for r in results if not observed(r)]
    if unobserved:
        print(f"FAIL: a callback measured nothing, or not at the final step, in: {unobserved}", file=sys.stderr)
    print(table)
    out = harness.write_results(args.out, table, {"config": harness.config(args), "machine": machine, "results": results})
    if unobserved and __name__ == "__main__":
        sys.exit(1)
    return out


def observed(result: dict[str, Any]) -> bool:
    """Every callback measured in every instrumented fit, the last time at its final step."""
    return all(n >= 1 and end for n, end in result["measurements"].values())


if __name__ == "__main__":
    main()
