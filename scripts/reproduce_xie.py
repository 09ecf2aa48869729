"""Reproduce the 1-D posterior-matching experiments of Xie's ICLR 2025 blogpost.

Reference:
    Yudi Xie, "How do we interpret the outputs of a neural network trained on classification?",
    ICLR 2025 Blogposts Track, https://hdl.handle.net/1721.1/159032

Run (from the repository root)::

    .venv/bin/python scripts/reproduce_xie.py

(defaults: ``--presets 1 2 3 --steps 10 100 1000 10000 --seed 0 --n-train 100000 --n-probe 100000
--out outputs/reproduce_xie``); ``--quick`` is a smoke test of a few seconds (``--presets 1 2 --steps 0 5 20
--n-train 512 --n-probe 512 --grid-points 201``, one thread).

Setup, as in the post: an MLP 1-64-ReLU-64-ReLU-2 (``MLPClassifier(1, 2, hidden=(64, 64)).net``),
Adam (lr 1e-3), batch 64, cross-entropy, on a fixed train set of ``--n-train`` samples of one of the
three two-class 1-D Gaussian presets (:func:`lightning_interp.posterior.xie_task`). Training is a
plain PyTorch loop: each epoch is a fresh random permutation of the train set (its own
``torch.Generator``) cut into consecutive batches of 64; the incomplete last batch of an epoch is
dropped. The model is evaluated after the optimizer step counts given by ``--steps`` (one training
run per preset, evaluated along the way).

Seeding: for preset ``k`` and ``--seed s`` the base is ``b = 1000 s + 10 k``; the train set is drawn
with a generator seeded ``b``, the probe set with ``b + 1``, the shuffling generator is seeded
``b + 2`` and the network is initialised after ``torch.manual_seed(b + 3)``.

Evaluation at every checkpoint:

* on a fixed held-out probe of ``--n-probe`` labelled samples from the task: the six measures of
  :func:`~lightning_interp.posterior.posterior_gap` (kl = KL(p||q), reverse_kl, js, tv, l2, max_abs;
  all averaged over the probe), the excess cross-entropy, the network's accuracy and the Bayes
  accuracy (argmax of the exact posterior on the same probe labels), via
  :class:`~lightning_interp.posterior.PosteriorGap`, also per bin of log p(x) (JSON only).
  With two classes ``max_abs = |p(c1|x) - q(c1|x)| = tv`` per sample, so the table shows ``tv`` once
  and uses its ``max|q-p|`` column for the supremum over the grid instead (below);
* on a uniform grid of ``--grid-points`` x values from the smallest to the largest train input:
  ``max_x |q(c1|x) - p(c1|x)|`` and the model's decision boundaries, the sign changes of
  ``q(c1|x) - 0.5`` (located by linear interpolation between grid points), compared with the Bayes
  boundaries (closed-form roots of the log-odds). They *match* when there are as many model
  boundaries as Bayes boundaries and each lies within ``--boundary-tol`` (default 0.25, a quarter of
  the smallest class standard deviation) of its Bayes counterpart;
* the **tail gap**: the gap restricted to the region beyond the right-most Bayes boundary, for the
  presets with two boundaries: x > 2.8475 for preset 2 and x > 6.4183 for preset 3. This is the
  second class-1 region on the far side of class 2, which a single monotone boundary misses
  (about 5.5% of the data for preset 2, about 0.05% for preset 3). Reported: the mean KL(p||q) over
  the probe points in that region and ``max |q - p|`` over the grid points in it. Preset 1 has a
  single boundary and no tail ("-"). The JSON also holds, for presets 2 and 3, the gap on the whole
  region outside the two boundaries (where the Bayes decision is class 1).

Outputs under ``--out``: ``results.md`` (the printed table), ``results.json`` (every number),
``posterior_vs_model.png`` (per preset, p(c1|x) and q(c1|x) at each checkpoint, with log p(x) below)
and ``kl_vs_step.png`` (mean KL, and tail KL, against the step, log-log).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.models import MLPClassifier
from lightning_interp.plotting import subplots
from lightning_interp.posterior import GAP_MEASURES, PosteriorGap, posterior_gap
from lightning_interp.tasks import XieTask, xie_task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

#: Inner edges of the log p(x) bins for the per-density gap (JSON only).
DENSITY_EDGES: tuple[float, ...] = (-10.0, -8.0, -6.0, -4.0, -3.0, -2.0)
#: ``--quick``: both kinds of preset (one Bayes boundary, two), few steps; one thread, as tiny matmuls on a
#: shared machine are slower with two.
QUICK = {"presets": [1, 2], "steps": [0, 5, 20], "n_train": 512, "n_probe": 512, "grid_points": 201, "threads": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, "outputs/reproduce_xie", seed="base random seed")
    parser.add_argument("--presets", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3], help="Xie presets to run")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000, 10000], help="steps at which to evaluate")
    parser.add_argument("--n-train", type=int, default=100_000, help="size of the fixed train set")
    parser.add_argument("--n-probe", type=int, default=100_000, help="size of the held-out probe set")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--grid-points", type=int, default=4001, help="points of the x grid spanning the train data")
    parser.add_argument("--boundary-tol", type=float, default=0.25, help="max |model - Bayes| boundary distance for a match")
    args = harness.parse(parser, argv, QUICK)
    if any(s < 0 for s in args.steps):
        parser.error("--steps must be non-negative")
    if args.n_train < args.batch_size:
        parser.error("--n-train must be at least --batch-size")
    args.steps = sorted(set(args.steps))
    return args


def bayes_boundaries(task: XieTask) -> list[float]:
    """Real roots of the closed-form log-odds ``c0 + c1 x + c2 x^2``, increasing."""
    c0, c1, c2 = task.log_odds_coefficients()
    if abs(c2) < 1e-12:
        return [-c0 / c1]
    disc = c1 * c1 - 4 * c2 * c0
    if disc < 0:
        return []
    r = math.sqrt(disc)
    return sorted([(-c1 - r) / (2 * c2), (-c1 + r) / (2 * c2)])


def crossings(x: Tensor, f: Tensor) -> list[float]:
    """Where ``f`` changes sign on the grid ``x``, by linear interpolation (exact zeros counted once)."""
    s = torch.sign(f)
    out: list[float] = []
    for i in torch.nonzero(s[:-1] * s[1:] < 0).flatten().tolist():
        x0, x1, f0, f1 = x[i].item(), x[i + 1].item(), f[i].item(), f[i + 1].item()
        out.append(x0 + (x1 - x0) * f0 / (f0 - f1))
    out += [x[i].item() for i in torch.nonzero(s == 0).flatten().tolist()]
    return sorted(out)


def boundaries_match(model: list[float], bayes: list[float], tol: float) -> bool:
    return len(model) == len(bayes) and all(abs(m - b) <= tol for m, b in zip(model, bayes, strict=True))


def tail_mask(x: Tensor, bounds: list[float]) -> Tensor | None:
    """The region beyond the right-most Bayes boundary, for tasks with two boundaries; else ``None``."""
    return x > bounds[-1] if len(bounds) == 2 else None


def outside_mask(x: Tensor, bounds: list[float]) -> Tensor | None:
    """The region outside both Bayes boundaries (Bayes decision class 1), for tasks with two boundaries."""
    return (x < bounds[0]) | (x > bounds[-1]) if len(bounds) == 2 else None


def _num(value: Tensor | float) -> float:
    v = float(value)
    return v if math.isfinite(v) else float("nan")


@torch.no_grad()
def evaluate(
    net: nn.Module,
    task: XieTask,
    probe: tuple[Tensor, Tensor],
    probe_log_post: Tensor,
    probe_log_dens: Tensor,
    grid: Tensor,
    grid_post: Tensor,
    bounds: list[float],
    tol: float,
) -> dict[str, Any]:
    """All checkpoint measures; see the module docstring."""
    was_training = net.training
    net.eval()
    x_probe, y_probe = probe
    logits = net(x_probe)
    metric = PosteriorGap(log_target=True, density_edges=DENSITY_EDGES)
    metric.update(logits, probe_log_post, target=y_probe, log_density=probe_log_dens)
    res = metric.compute()
    out: dict[str, Any] = {k: _num(res[k]) for k in GAP_MEASURES}
    for k in ("cross_entropy", "conditional_entropy", "excess_ce", "accuracy", "bayes_accuracy", "accuracy_gap"):
        out[k] = _num(res[k])
    out["by_density"] = {
        "inner_edges_log_density": list(DENSITY_EDGES),
        "count": res["count_by_density"].tolist(),
        **{k: [_num(v) for v in res[f"{k}_by_density"]] for k in GAP_MEASURES},
    }

    per = posterior_gap(logits, probe_log_post, log_target=True, reduction="none")
    xp = x_probe[:, 0]
    for name, mask in (("tail", tail_mask(xp, bounds)), ("outside", outside_mask(xp, bounds))):
        if mask is None:
            out[name] = None
            continue
        n = int(mask.sum())
        gaps = {k: (_num(per[k][mask].mean()) if n else None) for k in GAP_MEASURES}
        out[name] = {"n_probe": n, "fraction": n / len(xp), **gaps}

    q_grid = torch.softmax(net(grid[:, None]).double(), dim=1)[:, 0]
    diff = (q_grid - grid_post).abs()
    out["grid_max_abs"] = _num(diff.max())
    out["grid_argmax_abs"] = grid[diff.argmax()].item()
    g_tail = tail_mask(grid, bounds)
    out["tail_grid_max_abs"] = _num(diff[g_tail].max()) if g_tail is not None and g_tail.any() else None
    model_b = crossings(grid.double(), q_grid - 0.5)
    out["model_boundaries"] = model_b
    out["boundaries_match"] = boundaries_match(model_b, bounds, tol)
    out["q_grid"] = q_grid.float().tolist()
    net.train(was_training)
    return out


def run_preset(preset: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one network on ``preset`` and evaluate it at ``args.steps``."""
    task = xie_task(preset)
    base = 1000 * args.seed + 10 * preset
    x_train, y_train = task.sample(args.n_train, torch.Generator().manual_seed(base))
    x_probe, y_probe = task.sample(args.n_probe, torch.Generator().manual_seed(base + 1))
    shuffle_gen = torch.Generator().manual_seed(base + 2)
    torch.manual_seed(base + 3)
    net = MLPClassifier(1, 2, hidden=(64, 64)).net
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)

    probe_log_post = task.log_posterior(x_probe)
    probe_log_dens = task.log_density(x_probe)
    grid = torch.linspace(x_train.min().item(), x_train.max().item(), args.grid_points)
    grid_post = task.posterior(grid[:, None])[:, 0]
    bounds = bayes_boundaries(task)
    g_tail = tail_mask(grid, bounds)

    def ev() -> dict[str, Any]:
        return evaluate(net, task, (x_probe, y_probe), probe_log_post, probe_log_dens, grid, grid_post, bounds, args.boundary_tol)

    checkpoints: dict[int, dict[str, Any]] = {}
    if 0 in args.steps:
        checkpoints[0] = ev()
    max_step = args.steps[-1]
    per_epoch = args.n_train // args.batch_size
    perm = torch.randperm(args.n_train, generator=shuffle_gen)
    pos = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    net.train()
    for step in tqdm(range(1, max_step + 1), desc=f"preset {preset}", unit="step", mininterval=0.5):
        if pos == per_epoch:
            perm = torch.randperm(args.n_train, generator=shuffle_gen)
            pos = 0
        idx = perm[pos * args.batch_size : (pos + 1) * args.batch_size]
        pos += 1
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in args.steps:
            checkpoints[step] = ev()
            checkpoints[step]["train_loss_last100"] = sum(losses[-100:]) / len(losses[-100:])
    train_seconds = time.perf_counter() - t0

    return {
        "preset": preset,
        "seeds": {"train": base, "probe": base + 1, "shuffle": base + 2, "init": base + 3},
        "log_odds_coefficients": list(task.log_odds_coefficients()),
        "bayes_boundaries": bounds,
        "tail_region": f"x > {bounds[-1]:.4f}" if len(bounds) == 2 else None,
        "train_fraction_in_tail": float((x_train[:, 0] > bounds[-1]).float().mean()) if len(bounds) == 2 else None,
        "grid_fraction_in_tail": float(g_tail.float().mean()) if g_tail is not None else None,
        "grid": grid.tolist(),
        "p_grid": grid_post.tolist(),
        "log_density_grid": task.log_density(grid[:, None]).tolist(),
        "train_seconds": train_seconds,
        "checkpoints": {str(k): v for k, v in sorted(checkpoints.items())},
    }


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = ["preset", "step", "kl", "tv", "max\\|q-p\\| (grid)", "acc", "bayes_acc", "tail kl", "tail max\\|q-p\\| (grid)"]
    header += ["model boundaries", "Bayes boundaries", "match"]
    rows = []
    for r in results:
        bayes = ", ".join(f"{b:.3f}" for b in r["bayes_boundaries"])
        for step, c in r["checkpoints"].items():
            tail = c["tail"]
            model_b = ", ".join(f"{b:.3f}" for b in c["model_boundaries"]) or "none"
            rows.append(
                [
                    r["preset"],
                    step,
                    *(_fmt(c[k]) for k in ("kl", "tv")),
                    _fmt(c["grid_max_abs"], ".3f"),
                    *(_fmt(c[k]) for k in ("accuracy", "bayes_accuracy")),
                    _fmt(tail["kl"] if tail else None),
                    _fmt(c["tail_grid_max_abs"], ".3f"),
                    model_b,
                    bayes,
                    "yes" if c["boundaries_match"] else "no",
                ]
            )
    return harness.markdown_table(header, rows)


def plot_posteriors(results: list[dict[str, Any]], path: Path) -> None:
    n = len(results)
    fig, axes = subplots(2, n, figsize=(5.2 * n, 5.6), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    cmap = matplotlib.colormaps["viridis"]
    for j, r in enumerate(results):
        ax, axd = axes[0, j], axes[1, j]
        grid = r["grid"]
        steps = list(r["checkpoints"])
        for i, step in enumerate(steps):
            color = cmap(i / max(1, len(steps) - 1) * 0.9)
            ax.plot(grid, r["checkpoints"][step]["q_grid"], color=color, lw=1.4, label=f"q, step {step}")
        ax.plot(grid, r["p_grid"], color="black", lw=2.0, ls="--", label="true p(c1|x)")
        for b in r["bayes_boundaries"]:
            for a in (ax, axd):
                a.axvline(b, color="red", lw=0.8, ls=":")
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.set_ylim(-0.03, 1.03)
        bayes = ", ".join(f"{b:.2f}" for b in r["bayes_boundaries"])
        ax.set_title(f"preset {r['preset']}  (Bayes boundaries: {bayes})", fontsize=10)
        ax.set_ylabel("p(c1|x), q(c1|x)")
        ax.legend(fontsize=7, loc="best")
        axd.plot(grid, [v / math.log(10) for v in r["log_density_grid"]], color="tab:blue")
        axd.set_ylabel("log10 p(x)")
        axd.set_xlabel("x")
    fig.suptitle("Xie (2025) presets: exact posterior vs MLP softmax during training", fontsize=11)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=130)


def plot_kl(results: list[dict[str, Any]], path: Path) -> None:
    fig, ax = subplots(figsize=(6.0, 4.2))
    for i, r in enumerate(results):
        color = f"C{i}"
        pts = [(int(s), c) for s, c in r["checkpoints"].items() if int(s) > 0]
        ax.plot([s for s, _ in pts], [c["kl"] for _, c in pts], "o-", color=color, label=f"preset {r['preset']}: mean KL(p||q)")
        tail = [(s, c["tail"]["kl"]) for s, c in pts if c["tail"] and c["tail"]["kl"] is not None]
        if tail:
            label = f"preset {r['preset']}: KL in tail {r['tail_region']}"
            ax.plot(*zip(*tail, strict=True), "s--", color=color, alpha=0.7, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(p || q)  [nats]")
    ax.set_title("Posterior gap vs training step", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=130)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run = harness.start(args)
    results = [run_preset(p, args) for p in args.presets]
    table = markdown_table(results)
    print(table)
    payload = {
        "reference": "Yudi Xie, ICLR 2025 Blogposts Track, https://hdl.handle.net/1721.1/159032",
        "config": harness.config(args),
        "machine": run.stop(),  # wall_s: training and evaluation, before the figures
        "results": results,
    }
    print(f"\n{run.describe()}")
    harness.write_results(args.out, table, payload)
    plot_posteriors(results, args.out / "posterior_vs_model.png")
    plot_kl(results, args.out / "kl_vs_step.png")
    return payload


if __name__ == "__main__":
    main()
