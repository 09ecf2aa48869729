"""Benchmark: analytic Gaussian-closure propagation of moments against Monte-Carlo propagation.

Reference:
    Fischer, René, Keup, Layer, Dahmen, Helias, "Decomposing neural networks as mappings of correlation
    functions", Physical Review Research 4, 043143 (2022); propagation as in METHODS.md section 4 and
    :func:`lightning_interp.gaussian_closure.propagate_moments`.

Run (from the repository root)::

    .venv/bin/python scripts/bench_correlation.py

(defaults: ``--width 256 --mc-samples 100000 --ref-samples 2000000 --batch 100000 --alpha 0.5
--repeats 7 --mc-repeats 3 --threads 1 --seed 0 --out outputs/bench_correlation``); ``--quick`` is a
smoke test only (``--width 32 --mc-samples 4000 --ref-samples 40000 --batch 10000 --repeats 2
--mc-repeats 1``).

Setup. A 3-layer MLP of width ``W`` (``--width``): ``Linear(W, W) -> act -> Linear(W, W) -> act ->
Linear(W, W)`` with ``act`` = ``nn.ReLU`` or :class:`~lightning_interp.encoding.Quadratic` (``z + alpha
z^2``); weights ``N(0, g^2 / W)`` with gain ``g = sqrt(2)`` for ReLU and ``1`` for Quadratic, biases
``N(0, 0.1^2)``. Input ``x ~ N(mu, Sigma)`` with ``mu ~ N(0, 0.25 I)`` and ``Sigma = A A^T / W``, ``A``
standard normal ``W x W`` (a Wishart matrix, full rank, eigenvalues spread over ``(0, 4)``), so the
pre-activations have unit-order mean and variance. Everything in float64.

Two read-out points: ``after 1 act`` (output of the second Linear: one non-linearity, where the analytic
propagation is exact for Quadratic and exact up to the bivariate-normal quadrature for ReLU) and
``after 2 act`` (the network's output: the second non-linearity acts on a non-Gaussian input, so keeping
only mean and covariance, Gaussian closure, is an approximation for both activations).

Measured, in one run:

* time of :func:`~lightning_interp.gaussian_closure.propagate_moments` (median of ``--repeats`` after one
  warm-up) and of Monte-Carlo propagation with ``--mc-samples`` draws (median of ``--mc-repeats``:
  Cholesky factor of ``Sigma``, draws, forward pass, mean and covariance of the output), both float64
  (Monte Carlo also in float32, as a user might run it); ``speed-up`` = MC time / analytic time;
* relative errors against a reference: ``|m - m_ref| / |m_ref|`` for the output mean and
  ``||C - C_ref||_F / ||C_ref||_F`` for the output covariance, for the analytic result and for one
  ``--mc-samples`` Monte-Carlo estimate. The reference is Monte Carlo with ``--ref-samples`` draws in
  batches of ``--batch`` (float64, accumulated about a fixed shift), except for Quadratic after one
  activation, where the exact analytic moments are the reference (``exact``); the MC reference's own
  standard error (``ref s.e.``, from the spread of its batch estimates) is the floor below which an
  error cannot be resolved. For Quadratic after one activation the MC reference's error against the
  exact answer is also reported (a check of the reference).

Outputs under ``--out``: ``results.md`` (the printed table), ``results.json`` (every number, the load
average at start and end).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.encoding import Quadratic
from lightning_interp.gaussian_closure import propagate_moments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

ACTIVATIONS = ("relu", "quadratic")
QUICK = {"width": 32, "mc_samples": 4_000, "ref_samples": 40_000, "batch": 10_000, "repeats": 2, "mc_repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(
        __doc__, "outputs/bench_correlation", seed="random seed", threads="torch intra-op threads (shared machine: 1)"
    )
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS, help="activations")
    parser.add_argument("--width", type=int, default=256, help="input and layer width")
    parser.add_argument("--alpha", type=float, default=0.5, help="Quadratic coefficient")
    parser.add_argument("--mc-samples", type=int, default=100_000, help="Monte-Carlo samples of the timed estimate")
    parser.add_argument("--ref-samples", type=int, default=2_000_000, help="Monte-Carlo samples of the reference")
    parser.add_argument("--batch", type=int, default=100_000, help="batch size of the reference Monte Carlo")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats of the analytic propagation")
    parser.add_argument("--mc-repeats", type=int, default=3, help="timing repeats of the Monte-Carlo propagation")
    args = harness.parse(parser, argv, QUICK)
    if args.ref_samples < 2 * args.batch or args.ref_samples % args.batch:
        parser.error("--ref-samples must be a multiple of --batch and at least two batches")
    if min(args.repeats, args.mc_repeats) < 1 or args.mc_samples < 2:
        parser.error("--repeats and --mc-repeats must be >= 1, --mc-samples >= 2")
    return args


def build_net(activation: str, width: int, alpha: float, gen: torch.Generator) -> nn.Sequential:
    """``Linear -> act -> Linear -> act -> Linear``, float64, seeded weights (see the module docstring)."""
    gain = math.sqrt(2.0) if activation == "relu" else 1.0
    layers: list[nn.Module] = []
    for i in range(3):
        lin = nn.Linear(width, width, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, width, generator=gen, dtype=torch.float64) * gain / math.sqrt(width))
            lin.bias.copy_(0.1 * torch.randn(width, generator=gen, dtype=torch.float64))
        layers.append(lin)
        if i < 2:
            layers.append(nn.ReLU() if activation == "relu" else Quadratic(alpha))
    return nn.Sequential(*layers).requires_grad_(False)


def input_gaussian(width: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    mean = 0.5 * torch.randn(width, generator=gen, dtype=torch.float64)
    a = torch.randn(width, width, generator=gen, dtype=torch.float64)
    return mean, a @ a.T / width


def rel(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


@torch.no_grad()
def mc_propagate(
    net: nn.Sequential, mean: Tensor, cov: Tensor, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """One Monte-Carlo estimate of the output mean and covariance from ``n`` draws (what is timed).

    ``net`` must already be in ``dtype``; the Cholesky factor of ``cov`` is part of the timed work.
    """
    chol = torch.linalg.cholesky(cov).to(dtype)
    x = mean.to(dtype) + torch.randn(n, len(mean), generator=gen, dtype=dtype) @ chol.T
    y = net(x)
    m = y.mean(0)
    yc = y - m
    return m.double(), (yc.T @ yc).double() / (n - 1)


@torch.no_grad()
def mc_reference(
    net: nn.Sequential, taps: dict[str, int], mean: Tensor, cov: Tensor, n: int, batch: int, gen: torch.Generator, desc: str
) -> dict[str, dict[str, Any]]:
    """Reference moments at the outputs of modules ``taps`` (name -> module index), float64, in batches.

    Sums are accumulated about a fixed shift (the first batch's mean); the standard error of the result is
    estimated from the spread of the per-batch estimates: ``sqrt(sum_b ||e_b - e||^2 / (B (B - 1)))``.
    """
    chol = torch.linalg.cholesky(cov)
    acc: dict[str, dict[str, Any]] = {}
    n_batches = n // batch
    for _ in tqdm(range(n_batches), desc=desc, leave=False, dynamic_ncols=True):
        h = mean + torch.randn(batch, len(mean), generator=gen, dtype=torch.float64) @ chol.T
        for i, module in enumerate(net):
            h = module(h)
            for name, idx in taps.items():
                if idx != i:
                    continue
                a = acc.setdefault(name, {"shift": h.mean(0), "s1": 0.0, "s2": 0.0, "means": [], "covs": []})
                hc = h - a["shift"]
                s1, s2 = hc.sum(0), hc.T @ hc
                a["s1"] = a["s1"] + s1
                a["s2"] = a["s2"] + s2
                bm = s1 / batch
                a["means"].append(bm + a["shift"])
                a["covs"].append((s2 - batch * torch.outer(bm, bm)) / (batch - 1))
    out = {}
    for name, a in acc.items():
        m_shift = a["s1"] / n
        m = m_shift + a["shift"]
        c = (a["s2"] - n * torch.outer(m_shift, m_shift)) / (n - 1)
        nb = len(a["means"])
        se_m = math.sqrt(sum(float((bm - m).norm() ** 2) for bm in a["means"]) / (nb * (nb - 1)))
        se_c = math.sqrt(sum(float((bc - c).norm() ** 2) for bc in a["covs"]) / (nb * (nb - 1)))
        out[name] = {"mean": m, "cov": c, "se_mean_rel": se_m / float(m.norm()), "se_cov_rel": se_c / float(c.norm())}
    return out


def bench_activation(activation: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(args.seed * 7919 + ACTIVATIONS.index(activation))
    net = build_net(activation, args.width, args.alpha, gen)
    mean, cov = input_gaussian(args.width, gen)
    mods = list(net)
    taps = {"after 1 act": 2, "after 2 act": 4}
    ref = mc_reference(net, taps, mean, cov, args.ref_samples, args.batch, gen, f"{activation} reference")
    rows = []
    for name, idx in taps.items():
        sub = nn.Sequential(*mods[: idx + 1])
        t_an, t_an_all = median_time(lambda sub=sub: propagate_moments(sub, mean, cov), args.repeats)
        m_an, c_an = propagate_moments(sub, mean, cov)
        mc_gen = torch.Generator().manual_seed(args.seed * 7919 + 100 + idx)
        t_mc, t_mc_all = median_time(lambda sub=sub, g=mc_gen: mc_propagate(sub, mean, cov, args.mc_samples, g), args.mc_repeats)
        sub32 = copy.deepcopy(sub).to(torch.float32)
        t_mc32, _ = median_time(
            lambda sub=sub32, g=mc_gen: mc_propagate(sub, mean, cov, args.mc_samples, g, torch.float32), args.mc_repeats
        )
        m_mc, c_mc = mc_propagate(sub, mean, cov, args.mc_samples, torch.Generator().manual_seed(args.seed * 7919 + 200 + idx))
        exact = activation == "quadratic" and idx == 2
        r = ref[name]
        m_ref, c_ref = (m_an, c_an) if exact else (r["mean"], r["cov"])
        row: dict[str, Any] = {
            "activation": activation,
            "point": name,
            "reference": "exact (analytic)" if exact else f"MC {args.ref_samples:.0e}",
            "t_analytic_s": t_an,
            "t_analytic_all_s": t_an_all,
            "t_mc_s": t_mc,
            "t_mc_all_s": t_mc_all,
            "t_mc_float32_s": t_mc32,
            "speedup": t_mc / t_an,
            "analytic_mean_err": 0.0 if exact else rel(m_an, m_ref),
            "analytic_cov_err": 0.0 if exact else rel(c_an, c_ref),
            "mc_mean_err": rel(m_mc, m_ref),
            "mc_cov_err": rel(c_mc, c_ref),
            "ref_se_mean": None if exact else r["se_mean_rel"],
            "ref_se_cov": None if exact else r["se_cov_rel"],
            "mc_ref_vs_exact_mean_err": rel(r["mean"], m_an) if exact else None,
            "mc_ref_vs_exact_cov_err": rel(r["cov"], c_an) if exact else None,
            "mc_ref_se_mean": r["se_mean_rel"],
            "mc_ref_se_cov": r["se_cov_rel"],
        }
        rows.append(row)
    return rows


def sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["act", "read-out", "reference", "analytic [ms]", "MC f64 [ms]", "MC f32 [ms]", "speed-up (MC f64 / analytic)"]
    header += ["analytic mean err", "analytic cov err", "MC mean err", "MC cov err", "ref s.e. mean", "ref s.e. cov"]
    errors = ("analytic_mean_err", "analytic_cov_err", "mc_mean_err", "mc_cov_err", "ref_se_mean", "ref_se_cov")
    cells = [
        [
            r["activation"],
            r["point"],
            r["reference"],
            f"{1e3 * r['t_analytic_s']:.2f}",
            f"{1e3 * r['t_mc_s']:.0f}",
            f"{1e3 * r['t_mc_float32_s']:.0f}",
            f"{r['speedup']:.0f}x",
            *(sci(r[k]) for k in errors),
        ]
        for r in rows
    ]
    lines = [harness.markdown_table(header, cells)]
    checks = [r for r in rows if r["mc_ref_vs_exact_mean_err"] is not None]
    for r in checks:
        lines.append("")
        lines.append(
            f"Check of the MC reference ({r['activation']}, {r['point']}): MC reference vs exact: mean "
            f"{sci(r['mc_ref_vs_exact_mean_err'])} (its s.e. {sci(r['mc_ref_se_mean'])}), cov "
            f"{sci(r['mc_ref_vs_exact_cov_err'])} (its s.e. {sci(r['mc_ref_se_cov'])})."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run = harness.start(args)
    rows: list[dict[str, Any]] = []
    for act in tqdm(args.activations, desc="activations", dynamic_ncols=True):
        rows.extend(bench_activation(act, args))
    machine = run.stop()
    text = (
        f"Analytic vs Monte-Carlo moment propagation, 3-layer MLP of width {args.width}, MC {args.mc_samples:.0e} samples; "
        f"{run.describe()}.\n\n{markdown_table(rows)}"
    )
    print(text)
    return harness.write_results(args.out, text, {"config": harness.config(args), "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
