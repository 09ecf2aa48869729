"""Are the callbacks' read-outs at their defaults stable and unbiased? Seed-to-seed and against a long run.

Trains a small CNN written here (not from ``lightning_interp.models``) on scikit-learn's real handwritten
digits (``load_digits``: 1,797 images of 8 x 8) with a plain dataloader, then measures it with
``trainer.validate`` (one measurement each) on a fixed probe of 512 held-out digits:

- :class:`~lightning_interp.callbacks.AblationProbeCallback` at its defaults with two seeds (the MCMC
  chains differ, the probe is the same), and a long-run reference (``--ref-chains`` x ``--ref-steps``,
  default 16 x 3000 with 300 burn-in, same probe), on a 32-channel conv layer and a 64-unit hidden layer.
  Printed per read-out: the two seeds and the reference with their standard errors, the relative
  difference of seed 0 from the reference, and that difference in units of the combined standard error;
  and the correlation of the importance matrices (units x tasks) between the seeds and with the reference.
- :class:`~lightning_interp.callbacks.CorrelationOrderCallback` with two seeds (the Gaussian surrogate
  draws differ): the higher-order gap per layer, the seed-to-seed difference and its size in reported SEs.

Checks (printed as PASS/FAIL): importance correlation between seeds >= 0.9 for both layers; every ablation
read-out at the defaults within 3 combined SEs of the reference; the correlation gaps' seed-to-seed
differences within 3 reported SEs.

Run (from the repository root)::

    .venv/bin/python scripts/bench_stability.py             # 16 CPU-minutes (22 minutes on a busy 2-core machine)
    .venv/bin/python scripts/bench_stability.py --quick     # a smoke run of a few seconds (its checks mean nothing)

(defaults: ``--epochs 10 --layers features.3 head.2 --ref-chains 16 --ref-steps 3000 --ref-burn-in 300
--out outputs/bench_stability``). ``tests/test_stability.py`` calls :func:`run` at a reduced size (3 epochs,
layer ``head.2``, reference 16 x 1000 with 100 burn-in). ``--quick`` also shrinks the probe to 256 digits and
the seed runs' chains (4 x 100 steps, 10 burn-in), so it no longer measures the defaults.

Outputs under ``--out``: ``results.md`` (the printed tables and checks) and ``results.json`` (every number).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import AblationProbeCallback, CorrelationOrderCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

READOUTS = ("distributedness", "manifold_complexity", "polysemanticity", "max_importance", "informative_units")
QUICK = {
    "epochs": 1,
    "layers": ["head.2"],
    "ref_chains": 4,
    "ref_steps": 200,
    "ref_burn_in": 20,
    "probe_size": 256,
    "chains": {"num_chains": 4, "num_steps": 100, "burn_in": 10},
    "threads": 1,  # tiny models on a shared machine are slower with two
}


class DigitsCNN(pl.LightningModule):
    """Two conv blocks, max-pool, a 64-unit hidden layer, ten logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def digits(seed: int = 0, probe_size: int = 512) -> tuple[TensorDataset, TensorDataset]:
    """Training set (1,285 digits) and probe set (``probe_size`` of the 512 held-out digits), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[perm[512:]], y[perm[512:]]), TensorDataset(x[perm[:probe_size]], y[perm[:probe_size]])


def _trainer(**kw: Any) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def measure(model: DigitsCNN, probe: TensorDataset, callback: Any) -> dict[str, float]:
    """One measurement through ``trainer.validate``: the callback's history entry (and its ``last`` data)."""
    _trainer(callbacks=[callback]).validate(model, DataLoader(probe, batch_size=128), verbose=False)
    return callback.history[-1]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def run(
    epochs: int,
    layers: list[str],
    ref_chains: int,
    ref_steps: int,
    ref_burn_in: int,
    seed: int = 0,
    probe_size: int = 512,
    chains: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Train, measure, compare; returns the numbers behind the printed tables.

    Args:
        epochs: training epochs.
        layers: the probed layers.
        ref_chains: MCMC chains of the long-run reference.
        ref_steps: MCMC steps of the reference.
        ref_burn_in: burn-in of the reference.
        seed: seed of the training and of the data split.
        probe_size: held-out digits in the probe (at most 512).
        chains: ``AblationProbeCallback`` arguments of the two seed runs (``None``: its defaults).

    Returns:
        ``accuracy``, ``ablation`` (per layer: read-outs, importance correlations) and ``correlation`` (per layer).
    """
    pl.seed_everything(seed, verbose=False)
    train, probe = digits(seed, probe_size)
    model = DigitsCNN()
    _trainer(max_epochs=epochs).fit(model, DataLoader(train, batch_size=32, shuffle=True))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(probe.tensors[0]).argmax(1) == probe.tensors[1]).float().mean())
    probe_size = len(probe)
    out: dict[str, Any] = {"accuracy": accuracy, "probe_size": probe_size, "ablation": {}, "correlation": {}}
    runs = {}
    for name, kw in (
        ("seed 0", dict(seed=0, **(chains or {}))),
        ("seed 1", dict(seed=1, **(chains or {}))),
        (f"reference {ref_chains}x{ref_steps}", dict(seed=0, num_chains=ref_chains, num_steps=ref_steps, burn_in=ref_burn_in)),
    ):
        cb = AblationProbeCallback(layers=layers, probe_size=probe_size, **kw)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ESS warning at the defaults is expected; its numbers are printed
            history = measure(model, probe, cb)
        runs[name] = (history, cb.last.data["results"])
    names = list(runs)
    for layer in layers:
        rows = {}
        for key in (*READOUTS, "ess", "ess_median"):
            rows[key] = {n: (runs[n][0][f"{layer}/{key}"], runs[n][0].get(f"{layer}/{key}_se", math.nan)) for n in names}
        imp = {n: runs[n][1][layer].importance for n in names}
        out["ablation"][layer] = {
            "readouts": rows,
            "r_seeds": corr(imp[names[0]], imp[names[1]]),
            "r_reference": corr(imp[names[0]], imp[names[2]]),
            "units": int(imp[names[0]].shape[1]),
            "names": names,
        }
    gaps = []
    for s in (0, 1):
        cb = CorrelationOrderCallback(probe_size=probe_size, seed=s)
        gaps.append(measure(model, probe, cb))
    for key in gaps[0]:
        if key.endswith("/higher_order_gap"):
            (a, sa), (b, sb) = ((g[key], g[f"{key}_se"]) for g in gaps)
            out["correlation"][key.removesuffix("/higher_order_gap")] = (a, sa, b, sb)
    return out


def checks(out: dict[str, Any]) -> list[tuple[str, bool]]:
    """The PASS/FAIL lines."""
    result = []
    for layer, res in out["ablation"].items():
        result.append((f"{layer}: importance r between seeds {res['r_seeds']:.3f} >= 0.9", res["r_seeds"] >= 0.9))
        ref = res["names"][2]
        for key in READOUTS:
            (v, se), (rv, rse) = res["readouts"][key][res["names"][0]], res["readouts"][key][ref]
            z = abs(v - rv) / math.hypot(se, rse) if math.hypot(se, rse) > 0 else (0.0 if v == rv else math.inf)
            if key == "informative_units":
                continue  # a conservative count (units beyond 2 SE of no information): it grows with precision
            result.append((f"{layer}: {key} within 3 SE of the reference ({z:.1f} SE)", z <= 3 or math.isnan(v - rv)))
    for layer, (a, sa, b, sb) in out["correlation"].items():
        z = abs(a - b) / math.hypot(sa, sb)
        result.append((f"correlation {layer}: gap seed 0 vs 1 within 3 SE ({z:.2f} SE)", z <= 3))
    return result


def report(out: dict[str, Any], epochs: int) -> str:
    """The tables and the PASS/FAIL lines, as markdown."""
    lines = [f"DigitsCNN after {epochs} epochs: probe accuracy {out['accuracy']:.3f} ({out['probe_size']} held-out digits)", ""]
    for layer, res in out["ablation"].items():
        names = res["names"]
        rows = []
        for key, vals in res["readouts"].items():
            cells = [f"{v:.3f} ± {se:.3f}" if not math.isnan(se) else f"{v:.0f}" for v, se in (vals[n] for n in names)]
            (v, _), (rv, _) = vals[names[0]], vals[names[2]]
            rows.append([key, *cells, f"{100 * (v - rv) / abs(rv):+.0f}%" if rv else "-"])
        lines += [
            f"AblationProbeCallback, layer {layer} ({res['units']} units), defaults vs {names[2]}:",
            "",
            harness.markdown_table(["read-out", *names, "seed 0 vs ref"], rows),
            "",
            f"importance r: seeds {res['r_seeds']:.3f}, seed 0 vs reference {res['r_reference']:.3f}",
            "",
        ]
    rows = [
        [layer, f"{a:.4f} ± {sa:.4f}", f"{b:.4f} ± {sb:.4f}", f"{abs(a - b) / math.hypot(sa, sb):.2f}"]
        for layer, (a, sa, b, sb) in out["correlation"].items()
    ]
    lines += [
        "CorrelationOrderCallback, higher-order gap (acc_real - acc_order2) with two seeds:",
        "",
        harness.markdown_table(["layer", "seed 0", "seed 1", "difference / SE"], rows),
        "",
        *(("PASS " if ok else "FAIL ") + line for line, ok in checks(out)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__, "outputs/bench_stability")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--layers", nargs="+", default=["features.3", "head.2"], help="probed layers")
    parser.add_argument("--ref-chains", type=int, default=16, help="MCMC chains of the reference")
    parser.add_argument("--ref-steps", type=int, default=3000, help="MCMC steps of the reference")
    parser.add_argument("--ref-burn-in", type=int, default=300, help="MCMC burn-in of the reference")
    parser.set_defaults(probe_size=512, chains=None)
    args = harness.parse(parser, argv, QUICK)
    harness.quiet_lightning()
    clock = harness.start(args)
    out = run(args.epochs, args.layers, args.ref_chains, args.ref_steps, args.ref_burn_in, 0, args.probe_size, args.chains)
    text = report(out, args.epochs)
    print(text)
    data = {"config": harness.config(args), "machine": clock.stop(), "result": out}
    data["checks"] = [{"check": line, "pass": ok} for line, ok in checks(out)]
    return harness.write_results(args.out, text, data)


if __name__ == "__main__":
    main()
