"""Reproduce the energy-expansion experiment of Zamuner & De Los Rios on a planted Potts task.

Reference:
    Stefano Zamuner and Paolo De Los Rios, "Interpretability of neural networks classifiers with categorical
    inputs", arXiv:2102.03202 (2021). Definitions follow METHODS.md section 5 (the paper's exact formulas are
    not reproduced).

Run (from the repository root)::

    .venv/bin/python scripts/reproduce_zamuner.py

(defaults: ``--sizes 2000 20000 100000 --steps 4000 --hidden 64 64 --lr 1e-3 --weight-decay 1e-3
--batch-size 128 --seed 0 --out outputs/reproduce_zamuner``; ``--quick`` is a smoke test of a few seconds).

Task: :class:`~lightning_interp.datamodules.PottsDataModule` with its defaults (``L = 8`` sites, ``q = 4``
states, ``num_pairs = 4`` planted class-specific coupled pairs, seed ``--seed``). The Bayes log-odds
``log P(y=1|sigma) / P(y=0|sigma)`` is a pairwise Potts energy with fields ``h^1 - h^0`` and couplings
``J^1 - J^0`` (the latter non-zero only on the planted pairs); in the zero-sum gauge these are the targets a
classifier's logit expansion should recover.

For each training-set size of ``--sizes`` an ``MLPClassifier(L*q, 2, hidden=--hidden)`` (ReLU, Adam) is
trained with ``pl.Trainer`` for ``--steps`` optimizer steps (batch ``--batch-size``; the number of epochs is
``ceil(steps / steps_per_epoch)``, so small sets see many epochs). A :class:`LogitExpansionCallback`
(``method="sampled"``, ``--callback-samples`` uniform background sequences) measures the expansion of the
logit difference ``z_1 - z_0`` ``--measurements`` times during training (and at the start and the end),
logging the correlations of the recovered fields / couplings with the planted ones. Every
``steps / --measurements`` steps the validation loss is computed; with ``--select best_val`` (default) the
weights of the lowest validation loss are restored after training (early stopping), with ``last`` the final
weights are kept.

The trained network's logit difference is then expanded with ``expand(..., target=(1, 0))``, ``method="exact"``
(all ``4^8 = 65536`` sequences) and ``method="sampled"`` (``--num-samples`` uniform background sequences).
Baselines: the exact Bayes log-odds (a parameter-free module wrapping
:meth:`PottsDataModule.bayes_log_odds`, expanded exactly: it must recover the planted terms with
correlation 1, a sanity row) and logistic regression (``MLPClassifier(L*q, 2, hidden=())`` trained like the
MLP on the largest set; expanded at order 1: its couplings are zero).

Reported per row: test accuracy (``--n-test`` held-out sequences, the same for every size), the correlation
of the recovered zero-sum fields with the gauge-fixed planted field difference (``field r``), the same for all
coupling entries (``coupling r``), the relative error ``||J - J*|| / ||J*||`` (``J rel err``), the least-squares
slope of the recovered on the planted coupling entries (``J slope``: below 1 means shrunken couplings), top-pair recall
(the fraction of the ``num_pairs`` planted pairs among the ``num_pairs`` strongest pairs by Frobenius coupling
strength, with and without the average-product correction, APC; chance is ``num_pairs / (L (L-1) / 2)``)
and the fractions of the logit's variance (uniform measure) of order 1, 2 and higher (``residual``).

Outputs under ``--out``: ``results.md`` (the printed table), ``results.json`` (every number, the callback
histories and the strongest pairs), ``coupling_scatter.png`` (recovered vs planted coupling entries),
``coupling_maps.png`` (coupling-strength maps, planted and recovered, side by side) and
``recovery_over_training.png`` (the callback's field / coupling correlation and order-2 variance over training).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.callbacks.expansion import LogitExpansionCallback
from lightning_interp.datamodules.potts import PottsDataModule
from lightning_interp.encoding import zero_sum_gauge
from lightning_interp.expansion import PottsExpansion, expand
from lightning_interp.models import MLPClassifier
from lightning_interp.plotting import subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

COLUMNS: tuple[str, ...] = (
    "model",
    "n_train",
    "method",
    "test acc",
    "field r",
    "coupling r",
    "J rel err",
    "J slope",
    "recall",
    "recall APC",
    "var1",
    "var2",
    "var res",
)
QUICK = {
    "sizes": [1000],
    "steps": 40,
    "hidden": [16, 16],
    "measurements": 2,
    "callback_samples": 32,
    "num_samples": 100,
    "n_val": 500,
    "n_test": 1000,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(
        __doc__,
        "outputs/reproduce_zamuner",
        seed="seed of the planted model, the data and the networks",
        threads="torch CPU threads (1 is fastest for this tiny MLP)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000], help="training-set sizes to sweep")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps per training run")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden widths of the MLP")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="Adam (L2) weight decay")
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    parser.add_argument("--n-val", type=int, default=2000, help="validation-set size (weight selection)")
    parser.add_argument("--n-test", type=int, default=10000, help="test-set size (accuracy)")
    parser.add_argument("--select", choices=["best_val", "last"], default="best_val", help="weights kept after training")
    parser.add_argument("--measurements", type=int, default=10, help="callback measurements (and validations) per run")
    parser.add_argument("--callback-samples", type=int, default=256, help="background sequences of the callback's expansion")
    parser.add_argument("--num-samples", type=int, default=1000, help="background sequences of the final sampled expansion")
    parser.add_argument("--no-baseline", action="store_true", help="skip the logistic-regression baseline")
    args = harness.parse(parser, argv, QUICK)
    if min(args.sizes) < 1 or args.steps < 1 or args.measurements < 1:
        parser.error("--sizes, --steps and --measurements must be positive")
    return args


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class StepBar(pl.Callback):
    """A tqdm bar over the optimizer steps of one run, showing the last training loss."""

    def __init__(self, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, unit="step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self.bar.update(1)
        if trainer.global_step % 50 == 0:
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bar.close()


class BestWeights(pl.Callback):
    """Keep a copy of the weights with the lowest ``val/loss`` (restored by the caller after ``fit``)."""

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_step = 0
        self.state: dict[str, Tensor] | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and float(loss) < self.best_loss:
            self.best_loss, self.best_step = float(loss), trainer.global_step
            self.state = copy.deepcopy(pl_module.state_dict())


class BayesLogOdds(nn.Module):
    """The exact Bayes log-odds of a :class:`PottsDataModule`, as a module on one-hot inputs ``[N, L*q]``."""

    def __init__(self, dm: PottsDataModule) -> None:
        super().__init__()
        self.dm = dm

    def forward(self, x: Tensor) -> Tensor:
        states = x.reshape(x.shape[0], self.dm.seq_len, self.dm.num_states).argmax(-1)
        return self.dm.bayes_log_odds(states)


def corr(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of all entries (``nan`` when either is constant)."""
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 1e-12 else math.nan


def top_pair_recall(e: PottsExpansion, planted: set[tuple[int, int]], apc: bool) -> float:
    """Fraction of the planted pairs among the ``len(planted)`` strongest pairs of ``e``."""
    top = {(i, j) for i, j, _ in e.strongest_pairs(len(planted), apc=apc)}
    return len(top & planted) / len(planted)


def upper_entries(j: Tensor) -> Tensor:
    """The ``J_ij(a, b)`` entries with ``i < j``, flattened ``[L (L-1)/2 * q^2]``."""
    iu = torch.triu_indices(j.shape[0], j.shape[1], offset=1)
    return j[iu[0], iu[1]].flatten()


def make_dm(args: argparse.Namespace, n_train: int) -> PottsDataModule:
    dm = PottsDataModule(n_train=n_train, n_val=args.n_val, n_test=args.n_test, batch_size=args.batch_size, seed=args.seed)
    dm.setup()
    return dm


def test_accuracy(model: nn.Module, dm: PottsDataModule) -> float:
    model.eval()
    with torch.no_grad():
        x = dm.encode(dm.states["test"])
        return float((model(x).argmax(1) == dm.labels["test"]).double().mean())


def compare(
    name: str,
    n_train: int | None,
    method: str,
    e: PottsExpansion,
    acc: float,
    planted: tuple[Tensor, Tensor],
    pairs: set[tuple[int, int]],
    order: int = 2,
) -> dict[str, Any]:
    """One table row: recovery of the planted (zero-sum) fields and couplings by the expansion ``e``."""
    h0, j0 = planted
    has_j = order >= 2
    row: dict[str, Any] = {
        "model": name,
        "n_train": n_train,
        "method": method,
        "test acc": acc,
        "field r": corr(e.fields, h0),
        "coupling r": corr(upper_entries(e.couplings), upper_entries(j0)) if has_j else math.nan,
        "J rel err": float((e.couplings - j0).norm() / j0.norm()) if has_j else math.nan,
        "J slope": float((e.couplings * j0).sum() / j0.pow(2).sum()) if has_j else math.nan,
        "recall": top_pair_recall(e, pairs, apc=False) if has_j else math.nan,
        "recall APC": top_pair_recall(e, pairs, apc=True) if has_j else math.nan,
        "var1": float(e.variance_explained[1]),
        "var2": float(e.variance_explained[2]),
        "var res": float(e.variance_explained["residual"]),
        "field rel err": float((e.fields - h0).norm() / h0.norm()),
        "strongest_pairs_apc": [list(p) for p in e.strongest_pairs(len(pairs), apc=True)] if has_j else [],
    }
    if e.couplings_se is not None:
        row["mean coupling se"] = float(upper_entries(e.couplings_se).mean())
    return row


def train(
    model: pl.LightningModule, dm: PottsDataModule, args: argparse.Namespace, desc: str, expansion_cb: bool
) -> tuple[LogitExpansionCallback | None, BestWeights, dict[str, Any]]:
    """Fit ``model`` for ``args.steps`` steps; returns the expansion callback, the best-weights tracker and run facts."""
    steps_per_epoch = math.ceil(dm.n_train / args.batch_size)
    epochs = math.ceil(args.steps / steps_per_epoch)
    every = max(1, args.steps // args.measurements)
    best = BestWeights()
    callbacks: list[pl.Callback] = [best, StepBar(desc, args.steps)]
    cb = None
    if expansion_cb:
        cb = LogitExpansionCallback(
            dm.seq_len,
            dm.num_states,
            method="sampled",
            num_samples=args.callback_samples,
            every_n_epochs=None,
            every_n_steps=every,
            measure_at_start=True,
            measure_at_end=True,
            seed=args.seed,
            log_images=False,
            budget=None,  # the reproduction needs every measurement it schedules, whatever the overhead
        )
        callbacks.insert(0, cb)
    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=every,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    facts = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "fit_seconds": time.perf_counter() - start}
    if args.select == "best_val" and best.state is not None:
        model.load_state_dict(best.state)
    facts["selected_step"] = best.best_step if args.select == "best_val" and best.state is not None else trainer.global_step
    facts["best_val_loss"] = best.best_loss
    return cb, best, facts


# ---------------------------------------------------------------------------------------------
# figures and table
# ---------------------------------------------------------------------------------------------


def fig_scatter(planted_j: Tensor, recovered: dict[str, Tensor], pairs: set[tuple[int, int]], path: Path) -> None:
    length, q = planted_j.shape[0], planted_j.shape[-1]
    iu = torch.triu_indices(length, length, offset=1)
    on_pair = torch.tensor([(int(i), int(j)) in pairs for i, j in zip(iu[0], iu[1], strict=True)])
    mask = on_pair[:, None].expand(-1, q * q).flatten()
    x = upper_entries(planted_j)
    n = len(recovered)
    fig, axes = subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    lim = float(max(x.abs().max(), *(upper_entries(j).abs().max() for j in recovered.values()))) * 1.05
    for ax, (name, j) in zip(axes[0], recovered.items(), strict=True):
        y = upper_entries(j)
        ax.scatter(x[~mask], y[~mask], s=6, alpha=0.5, color="tab:gray", label="other pairs")
        ax.scatter(x[mask], y[mask], s=10, alpha=0.8, color="tab:red", label="planted pairs")
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="planted $J^1-J^0$ (zero-sum)", ylabel="recovered $J_{ij}(a,b)$")
        ax.set_title(f"{name}\nr = {corr(y, x):.3f}", fontsize=9)
        ax.set_aspect("equal")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=120)


def fig_maps(strengths: dict[str, Tensor], pairs: set[tuple[int, int]], path: Path) -> None:
    n = len(strengths)
    fig, axes = subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], strengths.items(), strict=True):
        im = ax.imshow(s.double().cpu(), cmap="viridis")
        for i, j in pairs:
            for a, b in ((i, j), (j, i)):
                ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("site j")
        ax.set_ylabel("site i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("coupling strength ||J_ij||_F (red boxes: planted pairs)", fontsize=10)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=120)


def fig_recovery(histories: dict[int, list[dict[str, float]]], path: Path) -> None:
    keys = (("coupling_corr", "coupling correlation"), ("field_corr", "field correlation"), ("var_order2", "order-2 variance"))
    fig, axes = subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for size, hist in histories.items():
        steps = [h["step"] for h in hist]
        for ax, (key, _) in zip(axes, keys, strict=True):
            ax.plot(steps, [h[key] for h in hist], "o-", ms=3, label=f"n_train={size}")
    for ax, (_, label) in zip(axes, keys, strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_title(f"callback: {label}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.8, color="k", ls=":", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("LogitExpansionCallback (sampled) during training", fontsize=10)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=120)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [harness.markdown_table(COLUMNS, [[_cell(r[c]) for c in COLUMNS] for r in rows])]
    lines += [
        "",
        f"Bayes accuracy: {info['bayes_accuracy_exact']:.4f} exact (enumeration), {info['bayes_accuracy_test']:.4f} on the "
        f"{info['n_test']} test sequences. Planted pairs: {info['planted_pairs']}; recall = fraction of them among the "
        f"top-{info['num_pairs']} pairs by ||J_ij||_F (chance {info['chance_recall']:.3f}).",
        "field r / coupling r: Pearson correlation with the zero-sum-gauge planted h^1-h^0 / J^1-J^0 (couplings: all "
        "entries of pairs i<j); J rel err = ||J - J*|| / ||J*||; J slope = <J, J*> / <J*, J*>; "
        "var1/var2/var res: fractions of Var(z_1 - z_0) under the uniform measure. MLP weights: "
        + ("lowest validation loss" if info["select"] == "best_val" else "last step")
        + f" (selected steps: {info['selected_steps']}).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    harness.quiet_lightning()
    run = harness.start(args)

    base = make_dm(args, min(args.sizes))  # planted model, val/test sets: identical for every size
    h_raw, j_raw = base.planted_field_difference(), base.planted_coupling_difference()
    _, h0, j0 = zero_sum_gauge(h_raw, j_raw)
    planted = (h0, j0)
    pairs = {(int(i), int(j)) for i, j in base.pairs.tolist()}
    length, q = base.seq_len, base.num_states
    num_pairs = len(pairs)
    bayes_exact = base.bayes_accuracy()
    x_test, y_test = base.states["test"], base.labels["test"]
    bayes_test = float(((base.bayes_log_odds(x_test) > 0).long() == y_test).double().mean())

    rows: list[dict[str, Any]] = []
    # sanity row: the exact Bayes log-odds must give back the planted terms
    e_bayes = expand(BayesLogOdds(base), length, q, method="exact")
    rows.append(compare("Bayes log-odds", None, "exact", e_bayes, bayes_test, planted, pairs))
    bayes_max_err = max(float((e_bayes.fields - h0).abs().max()), float((e_bayes.couplings - j0).abs().max()))

    histories: dict[int, list[dict[str, float]]] = {}
    runs: dict[str, Any] = {}
    recovered_j: dict[str, Tensor] = {}
    strengths: dict[str, Tensor] = {"planted": torch.linalg.matrix_norm(j0)}
    gen = torch.Generator().manual_seed(args.seed + 12345)
    for size in tqdm(args.sizes, desc="sizes", unit="run", disable=len(args.sizes) < 2):
        dm = base if size == min(args.sizes) else make_dm(args, size)
        pl.seed_everything(args.seed, verbose=False)
        model = MLPClassifier(length * q, 2, hidden=tuple(args.hidden), lr=args.lr, weight_decay=args.weight_decay)
        cb, _, facts = train(model, dm, args, f"MLP n={size}", expansion_cb=True)
        assert cb is not None
        histories[size] = cb.history
        acc = test_accuracy(model, dm)
        e_exact = expand(model, length, q, method="exact", target=(1, 0))
        e_sampled = expand(model, length, q, method="sampled", num_samples=args.num_samples, generator=gen, target=(1, 0))
        rows.append(compare("MLP", size, "exact", e_exact, acc, planted, pairs))
        rows.append(compare("MLP", size, "sampled", e_sampled, acc, planted, pairs))
        facts["sampled_vs_exact_coupling_r"] = corr(upper_entries(e_sampled.couplings), upper_entries(e_exact.couplings))
        runs[f"mlp_{size}"] = facts
        recovered_j[f"MLP n={size} (exact)"] = e_exact.couplings
        strengths[f"MLP n={size}"] = e_exact.coupling_strength(apc=False)

    if not args.no_baseline:
        size = max(args.sizes)
        dm = make_dm(args, size)
        pl.seed_everything(args.seed, verbose=False)
        lr_model = MLPClassifier(length * q, 2, hidden=(), lr=args.lr, weight_decay=0.0)
        _, _, facts = train(lr_model, dm, args, f"logistic n={size}", expansion_cb=False)
        runs[f"logistic_{size}"] = facts
        e_lr = expand(lr_model, length, q, order=1, method="exact", target=(1, 0))
        rows.append(compare("logistic regression", size, "exact (order 1)", e_lr, test_accuracy(lr_model, dm), planted, pairs, 1))

    info = {
        "bayes_accuracy_exact": bayes_exact,
        "bayes_accuracy_test": bayes_test,
        "n_test": args.n_test,
        "planted_pairs": sorted(pairs),
        "num_pairs": num_pairs,
        "chance_recall": num_pairs / (length * (length - 1) / 2),
        "select": args.select,
        "selected_steps": {k: v["selected_step"] for k, v in runs.items() if k.startswith("mlp")},
    }
    table = markdown(rows, info)
    print()
    print(table)

    fig_scatter(j0, recovered_j, pairs, args.out / "coupling_scatter.png")
    fig_maps(strengths, pairs, args.out / "coupling_maps.png")
    fig_recovery(histories, args.out / "recovery_over_training.png")
    machine = run.stop()
    wall = machine["wall_s"]
    header = (
        "# Zamuner & De Los Rios (arXiv:2102.03202): logit expansion on a planted Potts task\n\n"
        f"L={length}, q={q}, num_pairs={num_pairs}, seed={args.seed}; MLP hidden={args.hidden}, {args.steps} steps, "
        f"batch {args.batch_size}, Adam lr={args.lr}, weight decay={args.weight_decay}. Wall time {wall:.0f} s.\n\n"
    )
    result = {
        "config": harness.config(args),
        "machine": machine,
        "info": info,
        "bayes_expansion_max_abs_error": bayes_max_err,
        "rows": rows,
        "runs": runs,
        "histories": {str(k): v for k, v in histories.items()},
    }
    print(f"\nBayes sanity: max |recovered - planted| = {bayes_max_err:.2e}. {run.describe()}")
    return harness.write_results(args.out, header + table, result)


if __name__ == "__main__":
    main()
