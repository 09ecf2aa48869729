"""Issue 21's last target: one default ablation measurement against one training epoch of the same CNN.

The CNN is ``DigitCNN`` of ``scripts/bench_overhead.py`` (conv-BN-ReLU-pool x 2, conv3 with 32 channels, BN,
ReLU, global mean, ``Linear(32, 10)``), trained with a plain torch loop (Adam, batch 32) on that script's
4,491 28x28 digits. The measurement is what ``AblationProbeCallback(layers=["conv3"])`` runs at its defaults
(read off its signature: probe size, chains, steps, burn-in, ``rest_per_chain``, likelihood): one
``BayesianAblation.fit`` on the first ``probe_size`` training digits, 10 class tasks (the ``BayesianAblation``
is built once, as the callback keeps it between measurements).

Timing: ``--warmup`` untimed epochs first (the model learns; the allocator warms up), then ``--repeats``
rounds of one training epoch and one measurement, their order alternating between rounds, in one process
on ``--threads`` torch threads (1 by default: the development machine is shared). Medians are reported, with
the load average at the start and the end. Counted as well (independent of the load): the MCMC steps, the
(mask, example) rows per step, and the step's time against its arithmetic alone (one ``addcmul`` and one
``argmax`` of ``[rows, 10]`` in the scorer's precision, the floor of an affine-head step).

Run (from the repository root)::

    .venv/bin/python scripts/bench_ablation_default.py            # about a minute
    .venv/bin/python scripts/bench_ablation_default.py --quick    # a smoke run (its ratio means nothing)

Outputs under ``--out`` (``outputs/bench_ablation_default``): ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from lightning_interp.ablation import BayesianAblation
from lightning_interp.callbacks import AblationProbeCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness
from bench_overhead import DigitCNN, digits_loaders

TARGET = 0.1
QUICK = {"warmup": 1, "repeats": 1, "quick_data": True}
DEFAULT_KEYS = ("probe_size", "num_chains", "num_steps", "burn_in", "rest_per_chain", "likelihood", "prior_keep")


def callback_defaults() -> dict[str, Any]:
    """The sizes ``AblationProbeCallback`` measures at unless told otherwise (its signature's defaults)."""
    params = inspect.signature(AblationProbeCallback.__init__).parameters
    return {k: params[k].default for k in DEFAULT_KEYS}


def train_epoch(model: DigitCNN, loader: Any, opt: torch.optim.Optimizer) -> float:
    """One plain-torch training epoch; its seconds."""
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def step_floor(rows: int, classes: int, dtype: torch.dtype, repeats: int = 41) -> float:
    """Median seconds of one ``addcmul`` + ``argmax`` of ``[rows, classes]`` in ``dtype``: an affine step's arithmetic."""
    logits = torch.randn(rows, classes, dtype=dtype)
    coef, column = torch.randn(rows, 1, dtype=dtype), torch.randn(rows, classes, dtype=dtype)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.addcmul(logits, coef, column).argmax(dim=-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(warmup: int, repeats: int, quick_data: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train, then alternate timed epochs and timed default measurements; the numbers behind the table."""
    torch.manual_seed(seed)
    loader, _ = digits_loaders(quick_data)
    model = DigitCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(warmup):
        train_epoch(model, loader, opt)
    d = callback_defaults()
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    probe = x[: d["probe_size"]], y[: d["probe_size"]]
    ablation = BayesianAblation(
        model,
        "conv3",
        num_chains=d["num_chains"],
        num_steps=d["num_steps"],
        burn_in=d["burn_in"],
        rest_per_chain=d["rest_per_chain"],
        likelihood=d["likelihood"],
        prior_keep=d["prior_keep"],
    )
    load_start = os.getloadavg()
    epochs, fits, steps_s = [], [], []
    result = None
    for r in range(repeats + 1):  # round 0 warms the measurement up (untimed)
        order = ("epoch", "fit") if r % 2 else ("fit", "epoch")
        for what in order:
            if what == "epoch":
                t = train_epoch(model, loader, opt)
                if r:
                    epochs.append(t)
            else:
                model.eval()
                ablation.generator = torch.Generator().manual_seed(seed + r)
                start = time.perf_counter()
                result = ablation.fit(*probe, tasks="classes")
                t = time.perf_counter() - start
                if r:
                    fits.append(t)
                    steps_s.append(result.seconds_per_step or float("nan"))
    assert result is not None
    rows = result.num_rows // (d["num_steps"] + 1)
    epoch, fit, step = statistics.median(epochs), statistics.median(fits), statistics.median(steps_s)
    floors = {str(dt).removeprefix("torch."): step_floor(rows, 10, dt) for dt in (torch.float64, torch.float32)}
    return {
        "defaults": d,
        "train_images": len(x),
        "tasks": len(result.tasks),
        "epochs_s": epochs,
        "fits_s": fits,
        "epoch_s": epoch,
        "fit_s": fit,
        "ratio": fit / epoch,
        "ratios": [f / e for f, e in zip(fits, epochs, strict=True)],
        "steps": d["num_steps"] + 1,
        "rows_per_step": rows,
        "rows": result.num_rows,
        "seconds_per_step": step,
        "steps_s": step * (d["num_steps"] + 1),
        "once_s": fit - step * (d["num_steps"] + 1),
        "arithmetic_s": floors,
        "acceptance_rate": float(result.acceptance_rate.mean()) if result.acceptance_rate is not None else None,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def report(out: dict[str, Any], run_: harness.Run) -> str:
    d, a = out["defaults"], out["arithmetic_s"]
    rows = [
        [
            "one training epoch (plain torch, Adam, batch 32), median s",
            f"{out['epoch_s']:.3f} ({', '.join(f'{t:.2f}' for t in out['epochs_s'])})",
        ],
        [
            "default measurement (BayesianAblation.fit), median s",
            f"{out['fit_s']:.3f} ({', '.join(f'{t:.3f}' for t in out['fits_s'])})",
        ],
        [
            "measurement / epoch (ratio of medians; per round)",
            f"{out['ratio']:.3f} ({', '.join(f'{t:.3f}' for t in out['ratios'])})",
        ],
        ["MCMC steps (incl. the start) x rows per step = rows", f"{out['steps']} x {out['rows_per_step']} = {out['rows']}"],
        ["s per step (median)", f"{out['seconds_per_step'] * 1e3:.3f} ms"],
        [
            "arithmetic alone (addcmul + argmax of [rows, 10]) float64 / float32",
            f"{a['float64'] * 1e3:.3f} / {a['float32'] * 1e3:.3f} ms",
        ],
        [
            "step / arithmetic (float64; float32)",
            f"{out['seconds_per_step'] / a['float64']:.1f}; {out['seconds_per_step'] / a['float32']:.1f}",
        ],
        ["steps x s per step; the rest of the fit (prepare, read-outs)", f"{out['steps_s']:.3f} s; {out['once_s']:.3f} s"],
        ["acceptance rate (mean over tasks)", f"{out['acceptance_rate']:.3f}"],
    ]
    return "\n".join(
        [
            f"## Default ablation measurement vs a training epoch (DigitCNN, conv3, {out['train_images']} digits)",
            "",
            f"Defaults: probe {d['probe_size']}, {out['tasks']} class tasks, {d['num_chains']} chains x {d['num_steps']} steps "
            f"(burn-in {d['burn_in']}), rest_per_chain {d['rest_per_chain']}, likelihood {d['likelihood']!r}. "
            f"Load average {harness.fmt_load(out['loadavg_start'])} -> {harness.fmt_load(out['loadavg_end'])}.",
            "",
            harness.markdown_table(["quantity", "value"], rows, align="lr"),
            "",
            f"**{'PASS' if out['ratio'] <= TARGET else 'FAIL'}** default measurement <= {TARGET} x a training epoch: "
            f"{out['ratio']:.3f}",
            "",
            run_.describe(),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(
        __doc__, "outputs/bench_ablation_default", seed="seed of the weights and the chains", threads="torch threads"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed training epochs first")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one epoch and one measurement each)")
    parser.set_defaults(quick_data=False)
    args = harness.parse(parser, argv, QUICK)
    clock = harness.start(args)
    out = run(args.warmup, args.repeats, args.quick_data, args.seed)
    text = report(out, clock)
    print(text)
    return harness.write_results(args.out, text, {"config": harness.config(args), "machine": clock.stop(), "result": out})


if __name__ == "__main__":
    main()
