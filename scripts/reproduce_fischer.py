"""Reproduce the correlation-order decomposition of Fischer et al. on XOR, a higher-order task and MNIST.

Reference:
    Kirsten Fischer, Alexandre René, Christian Keup, Moritz Layer, David Dahmen, Moritz Helias,
    "Decomposing neural networks as mappings of correlation functions", Physical Review Research 4,
    043143 (2022). Paper's claim under test: "correlations up to second order predominantly capture the
    information processing in the internal layers, while the input layer also extracts higher-order
    correlations from the data". Definitions follow METHODS.md section 4 (not the paper's exact formulas).

Run (from the repository root)::

    .venv/bin/python scripts/reproduce_fischer.py

(defaults: ``--tasks xor higher_order mnist --activations quadratic relu --hidden 64 64 --alpha 0.5
--epochs 30 --n-train 8192 --probe-size 2048 --mnist-dir data --mnist-hidden 128 128 --mnist-epochs 2
--mnist-probe-size 10000 --seed 0 --out outputs/reproduce_fischer``); ``--quick`` is a smoke test of a few seconds.
MNIST runs only when its IDX files are under ``--mnist-dir`` (``<dir>/MNIST/raw``); otherwise it is
reported as skipped.

What is trained: for every activation in ``--activations`` and every task, an MLP
``Linear -> act -> Linear -> act -> Linear`` (``--hidden`` widths) where ``act`` is
:class:`~lightning_interp.correlation.Quadratic` (``z + alpha z^2``) or ``nn.ReLU``, trained with
Lightning (Adam, cross-entropy, batch 64) with the product's
:class:`~lightning_interp.callbacks.CorrelationOrderCallback` attached (layers ``input``, each hidden
activation and the logits, probe = the validation split, measured at the start, every few epochs and at
the end). Tasks: :class:`~lightning_interp.datamodules.XORDataModule` (``dim=2, noise=0.3``: the class
information sits in the input covariance) and :class:`~lightning_interp.datamodules.HigherOrderDataModule`
(``dim=8``, Gaussian vs Laplace coordinates: equal means and covariances, the classes differ only from the
fourth cumulant on), both with their default parameters, and flattened, normalised MNIST.

Measured per layer ``L`` (the final measurement of the callback, on the validation probe):
``real`` (the network's accuracy), ``order2`` / ``order1`` / ``order0`` (accuracy when the output of
``L`` is replaced by draws from ``N(mu_c, Sigma_c)`` / ``N(mu_c, Sigma_bar)`` / ``N(mu_bar, Sigma_bar)``
and the forward pass continues), ``gap = real - order2`` (what orders above two carry) and the mean
absolute excess kurtosis of the units (``nongauss``). ``theory``: the class Gaussians
``N(mu_c, Sigma_c)`` of ``L``, estimated on the *test* split, are propagated analytically through the
remaining modules to the logits (:func:`~lightning_interp.correlation.propagate_moments`, Gaussian closure
after every activation) and :func:`~lightning_interp.correlation.theory_accuracy` turns the logit
Gaussians into an accuracy; it is the analytic counterpart of ``order2`` at ``L``. For the logits layer no
propagation is involved. ``gauss-logit MC`` separates the two approximations in ``theory``: the same
Gaussians of ``L`` are pushed through the real remaining layers by Monte Carlo (``--theory-mc-draws`` per
class, no closure) and only the logits are read as Gaussian; so ``order2 - gauss-logit MC`` is the error of
the Gaussian read-out of the logits and ``gauss-logit MC - theory`` that of the Gaussian closure inside.
For the two synthetic tasks ``theory (exact input moments)`` is ``theory`` from the exact class mean and
covariance of the input (the datamodule's ``class_mean`` / ``class_covariance``). ``test`` is the
network's accuracy on the test split. Each surrogate accuracy is one draw per probe example: its binomial
standard error is ``sqrt(p (1 - p) / n_probe)`` (about 0.011 at ``p = 0.5`` with 2048 probes).

Outputs under ``--out``: ``README.md`` (what was measured, the table, the comparison with the paper's
claims, computed from the numbers), ``results.md`` (the table), ``results.json`` (every number, with the
callback's full history) and ``orders.png`` (accuracies per layer per network) and ``gap_vs_step.png``
(the higher-order gap per layer over training).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.callbacks import CorrelationOrderCallback
from lightning_interp.correlation import INPUT, ClassMoments, Quadratic, layer_outputs, propagate_moments, theory_accuracy
from lightning_interp.datamodules import HigherOrderDataModule, XORDataModule
from lightning_interp.datamodules.mnist import MNISTDataModule, missing_files
from lightning_interp.models import MLPClassifier
from lightning_interp.plotting import subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

TASKS = ("xor", "higher_order", "mnist")
ACTIVATIONS = ("quadratic", "relu")
COLUMNS = ("real", "order2", "order1", "order0", "gap", "theory", "gauss_logit_mc", "nongauss")
QUICK = {
    "hidden": [16, 16],
    "epochs": 2,
    "n_train": 512,
    "probe_size": 256,
    "mnist_hidden": [32, 32],
    "mnist_epochs": 1,
    "mnist_probe_size": 1000,
    "measurements": 1,
    "theory_samples": 5_000,
    "theory_mc_draws": 2_000,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(
        __doc__,
        "outputs/reproduce_fischer",
        seed="random seed",
        threads="torch intra-op threads (1 is fastest for these small MLPs)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to run")
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS, help="activations")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden widths (synthetic tasks)")
    parser.add_argument("--alpha", type=float, default=0.5, help="coefficient of the quadratic activation z + alpha z^2")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (synthetic tasks)")
    parser.add_argument("--n-train", type=int, default=8192, help="training-set size (synthetic tasks)")
    parser.add_argument("--probe-size", type=int, default=2048, help="validation probe = test split size (synthetic)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--measurements", type=int, default=5, help="callback measurements during training (plus start)")
    parser.add_argument(
        "--theory-samples", type=int, default=100_000, help="Monte-Carlo draws per class of theory_accuracy (K > 2)"
    )
    parser.add_argument("--theory-mc-draws", type=int, default=20_000, help="surrogate draws per class for gauss-logit MC")
    parser.add_argument("--mnist-dir", default="data", help="folder holding MNIST/raw/ (torchvision's root)")
    parser.add_argument("--mnist-hidden", type=int, nargs="+", default=[128, 128], help="hidden widths (MNIST)")
    parser.add_argument("--mnist-epochs", type=int, default=2, help="training epochs (MNIST)")
    parser.add_argument("--mnist-probe-size", type=int, default=10_000, help="MNIST validation probe and test-probe size")
    args = harness.parse(parser, argv, QUICK)
    if min(args.epochs, args.mnist_epochs, args.measurements) < 1 or args.probe_size < 64:
        parser.error("--epochs, --mnist-epochs and --measurements must be >= 1 and --probe-size >= 64")
    return args


def fischer_mlp(in_features: int, num_classes: int, hidden: list[int], activation: str, alpha: float, lr: float) -> MLPClassifier:
    """An ``MLPClassifier`` (``Linear -> act -> ... -> Linear``, layers ``net.<i>``), ``act`` ReLU or :class:`Quadratic`.

    ``MLPClassifier`` has no quadratic activation, so its ReLUs are swapped for ``Quadratic(alpha)``; activations
    hold no parameters, so the weights drawn are the same either way.
    """
    model = MLPClassifier(in_features, num_classes, hidden=tuple(hidden), activation="relu", lr=lr)
    if activation == "quadratic":
        for i, module in enumerate(model.net):
            if isinstance(module, nn.ReLU):
                model.net[i] = Quadratic(alpha)
    return model


def make_datamodule(task: str, args: argparse.Namespace) -> pl.LightningDataModule:
    common = {"batch_size": args.batch_size, "seed": args.seed}
    if task == "xor":
        return XORDataModule(n_train=args.n_train, n_val=args.probe_size, n_test=args.probe_size, **common)
    if task == "higher_order":
        return HigherOrderDataModule(n_train=args.n_train, n_val=args.probe_size, n_test=args.probe_size, **common)
    return MNISTDataModule(args.mnist_dir, flatten=True, val_size=args.mnist_probe_size, **common)


def test_probe(dm: pl.LightningDataModule, task: str, size: int) -> tuple[Tensor, Tensor]:
    """The first ``size`` examples of the test split (the whole split for the synthetic tasks)."""
    dm.setup("test")
    xs, ys, n = [], [], 0
    for x, y in dm.test_dataloader():
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= size:
            break
    return torch.cat(xs)[:size], torch.cat(ys)[:size]


def layer_names(model: MLPClassifier) -> list[str]:
    """``input``, every activation and the final Linear (the logits)."""
    acts = [f"net.{i}" for i, m in enumerate(model.net) if isinstance(m, (Quadratic, nn.ReLU))]
    return [INPUT, *acts, f"net.{len(model.net) - 1}"]


@torch.no_grad()
def theory_per_layer(
    model: MLPClassifier, layers: list[str], x: Tensor, y: Tensor, num_classes: int, samples: int, mc_draws: int, seed: int
) -> dict[str, dict[str, float]]:
    """Per layer: the class Gaussians of the layer (estimated on ``x, y``) mapped to the logits, two ways.

    ``theory``: analytic propagation (:func:`propagate_moments`, Gaussian closure after every activation), then
    :func:`theory_accuracy` (Gaussian logits). ``gauss_logit_mc``: the logits' mean and covariance estimated by
    Monte Carlo (``mc_draws`` surrogate draws per class pushed through the real remaining layers, no closure),
    then the same :func:`theory_accuracy`. ``order2 - gauss_logit_mc`` is the error of reading the accuracy
    off Gaussian logits; ``gauss_logit_mc - theory`` the error of the closure in the intermediate layers.
    """
    model.eval()
    outputs, _ = layer_outputs(model, layers, x)
    out: dict[str, dict[str, float]] = {}
    for li, layer in enumerate(layers):
        moments = ClassMoments(num_classes)
        moments.update(outputs[layer].flatten(1), y)
        start = 0 if layer == INPUT else int(layer.split(".")[1]) + 1
        rest = list(model.net)[start:]
        priors = moments.count / moments.count.sum()
        means, covs, mc_means, mc_covs = [], [], [], []
        draw_gen = torch.Generator().manual_seed(seed * 1000 + li)
        for c in range(num_classes):
            m, s = propagate_moments(rest, moments.mean(c), moments.covariance(c))
            means.append(m)
            covs.append(s)
            z = moments.sample(torch.full((mc_draws,), c), 2, draw_gen).to(x.dtype)
            logits = nn.Sequential(*rest)(z).double()
            mc_means.append(logits.mean(0))
            mc_covs.append(torch.cov(logits.T))
        gen = torch.Generator().manual_seed(seed)
        theory = float(theory_accuracy(means, covs, priors=priors, num_samples=samples, generator=gen))
        gl_mc = float(theory_accuracy(mc_means, mc_covs, priors=priors, num_samples=samples, generator=gen))
        out[layer] = {"theory": theory, "gauss_logit_mc": gl_mc}
    return out


@torch.no_grad()
def theory_exact_input(model: MLPClassifier, dm: pl.LightningDataModule, samples: int, seed: int) -> float:
    """Theory accuracy from the task's exact input class moments (synthetic tasks; equal priors)."""
    means, covs = [], []
    for c in range(2):
        m, s = propagate_moments(list(model.net), dm.class_mean(c), dm.class_covariance(c))  # type: ignore[attr-defined]
        means.append(m)
        covs.append(s)
    return float(theory_accuracy(means, covs, num_samples=samples, generator=torch.Generator().manual_seed(seed)))


def run_one(task: str, activation: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one network with the callback and collect every measure."""
    t0 = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    dm = make_datamodule(task, args)
    mnist = task == "mnist"
    in_features = 784 if mnist else dm.dim  # type: ignore[attr-defined]
    num_classes = 10 if mnist else 2
    hidden = args.mnist_hidden if mnist else args.hidden
    epochs = args.mnist_epochs if mnist else args.epochs
    probe_size = args.mnist_probe_size if mnist else args.probe_size
    model = fischer_mlp(in_features, num_classes, hidden, activation, args.alpha, args.lr)
    layers = layer_names(model)
    every = max(1, epochs // args.measurements)
    cb = CorrelationOrderCallback(
        layers=layers,
        probe_size=probe_size,
        every_n_epochs=every,
        measure_at_start=True,
        seed=args.seed,
        log_images=False,
        budget=None,  # the reproduction needs every measurement it schedules, whatever the overhead
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[cb, harness.epoch_bar(f"{task}/{activation}", epochs)],
    )
    trainer.fit(model, datamodule=dm)
    final = cb.history[-1]
    x_test, y_test = test_probe(dm, task, probe_size)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x_test).argmax(1) == y_test).double().mean())
    theory = theory_per_layer(model, layers, x_test, y_test, num_classes, args.theory_samples, args.theory_mc_draws, args.seed)
    rows = {}
    for layer in layers:
        rows[layer] = {
            "real": final[f"{layer}/acc_real"],
            "order2": final[f"{layer}/acc_order2"],
            "order1": final[f"{layer}/acc_order1"],
            "order0": final[f"{layer}/acc_order0"],
            "gap": final[f"{layer}/higher_order_gap"],
            "theory": theory[layer]["theory"],
            "gauss_logit_mc": theory[layer]["gauss_logit_mc"],
            "nongauss": final[f"{layer}/non_gaussianity"],
        }
    finite = all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())
    return {
        "task": task,
        "activation": activation,
        "hidden": hidden,
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "probe_size": probe_size,
        "layers": layers,
        "layer_roles": {
            layers[0]: "input",
            **{name: f"hidden {i + 1}" for i, name in enumerate(layers[1:-1])},
            layers[-1]: "logits",
        },
        "per_layer": rows,
        "test_acc": test_acc,
        "theory_exact_input": None if mnist else theory_exact_input(model, dm, args.theory_samples, args.seed),
        "finite_weights": finite,
        "history": cb.history,
        "seconds": time.perf_counter() - t0,
    }


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for layer in r["layers"]:
            v = r["per_layer"][layer]
            role = r["layer_roles"][layer]
            name = layer if role == "input" else f"{layer} ({role})"
            rows.append([r["task"], r["activation"], name, *(fmt(v[k]) for k in COLUMNS[:-1]), fmt(v["nongauss"], 2)])
    header = ["task", "act", "layer", "real", "order2", "order1", "order0", "gap", "theory", "gauss-logit MC", "nongauss"]
    summary = [
        [r["task"], r["activation"], fmt(r["test_acc"]), fmt(r["theory_exact_input"]), r["steps"], f"{r['seconds']:.1f}"]
        for r in results
    ]
    return "\n\n".join(
        [
            harness.markdown_table(header, rows),
            harness.markdown_table(["task", "act", "test acc", "theory (exact input moments)", "steps", "seconds"], summary),
        ]
    )


def compare_with_claims(results: list[dict[str, Any]]) -> str:
    """Plain statements of the numbers that bear on the paper's two claims.

    A gap is flagged when it exceeds 3 standard errors of the one-draw surrogate accuracy,
    ``sqrt(order2 (1 - order2) / n_probe)`` (the probe and the real accuracy are fixed; the estimation noise
    of the class moments is not included).
    """
    lines = []
    for r in results:
        n = r["probe_size"]

        def desc(layer: str, r: dict[str, Any] = r, n: int = n) -> str:
            v = r["per_layer"][layer]
            se = math.sqrt(max(v["order2"] * (1 - v["order2"]), 1e-12) / n)
            flag = " **> 3 s.e.**" if v["gap"] > 3 * se else ""
            return f"{fmt(v['gap'])} (order2 {fmt(v['order2'])}, s.e. {se:.3f}){flag}"

        hidden = [lay for lay in r["layers"] if r["layer_roles"][lay].startswith("hidden")]
        lines.append(
            f"- {r['task']} / {r['activation']} (real {fmt(r['per_layer'][INPUT]['real'])}): input gap {desc(INPUT)}; "
            + "; ".join(f"{r['layer_roles'][lay]} gap {desc(lay)}" for lay in hidden)
            + "."
        )
    return "\n".join(lines)


def plot_orders(results: list[dict[str, Any]], path: Path) -> None:
    n = len(results)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
    styles = (("real", "k"), ("order2", "C0"), ("order1", "C1"), ("order0", "C2"))
    for ax, r in zip(axes.flat, results, strict=False):
        layers = r["layers"]
        pos = torch.arange(len(layers)).float()
        for i, (key, color) in enumerate(styles):
            ax.bar(pos + (i - 1.5) * 0.2, [r["per_layer"][lay][key] for lay in layers], width=0.2, color=color, label=key)
        ax.plot(pos.tolist(), [r["per_layer"][lay]["theory"] for lay in layers], "r*", ms=11, label="theory (analytic)")
        gl = [r["per_layer"][lay]["gauss_logit_mc"] for lay in layers]
        ax.plot(pos.tolist(), gl, "mx", ms=8, mew=2, label="gauss-logit MC")
        chance = 1.0 / (10 if r["task"] == "mnist" else 2)
        ax.axhline(chance, color="gray", ls=":", lw=1)
        ticks = [lay if lay == INPUT else f"{lay}\n{r['layer_roles'][lay]}" for lay in layers]
        ax.set_xticks(pos.tolist(), ticks, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{r['task']}, {r['activation']} MLP {r['hidden']}", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("Gaussian surrogates per layer (Fischer et al. 2022): real vs order 2 / 1 / 0, and analytic theory", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    harness.save_figure(fig, path, dpi=110)


def plot_gap_history(results: list[dict[str, Any]], path: Path) -> None:
    n = len(results)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results, strict=False):
        for lay in r["layers"]:
            key = f"{lay}/higher_order_gap"
            pts = [(h["step"], h[key]) for h in r["history"] if key in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{lay} ({r['layer_roles'][lay]})")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("real - order2")
        ax.set_title(f"{r['task']}, {r['activation']}", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    harness.quiet_lightning()
    run = harness.start(args)
    torch.manual_seed(args.seed)
    tasks = list(args.tasks)
    skipped: dict[str, str] = {}
    if "mnist" in tasks and missing_files(args.mnist_dir):
        skipped["mnist"] = f"MNIST IDX files not found under {os.path.join(args.mnist_dir, 'MNIST', 'raw')}"
        print(f"mnist: skipped ({skipped['mnist']})")
        tasks.remove("mnist")
    jobs = [(t, a) for t in tasks for a in args.activations]
    results = []
    for task, act in tqdm(jobs, desc="networks", dynamic_ncols=True):
        try:
            results.append(run_one(task, act, args))
        except (RuntimeError, ValueError) as err:  # e.g. a diverged quadratic network (non-finite moments)
            skipped[f"{task}/{act}"] = f"failed: {type(err).__name__}: {err}"
            print(f"{task}/{act}: {skipped[f'{task}/{act}']}")
    if not results:
        raise SystemExit("no network finished")
    table = markdown_table(results)
    comparison = compare_with_claims(results)
    machine = run.stop()
    command = "scripts/reproduce_fischer.py" + (" --quick" if args.quick else "")
    readme = "\n".join(
        [
            "# Correlation orders per layer (Fischer et al., PRR 4, 043143, 2022)",
            "",
            f"Command: `.venv/bin/python {command}` ({run.describe()}).",
            "",
            "What was measured: see the docstring of `scripts/reproduce_fischer.py`. In short, per layer the probe accuracy of",
            "the trained network (`real`) and with that layer's output replaced by Gaussian surrogates of order 2",
            "(`N(mu_c, Sigma_c)`), 1 (`N(mu_c, Sigma_bar)`) and 0 (`N(mu_bar, Sigma_bar)`), measured by",
            "`CorrelationOrderCallback` on the validation split; `gap = real - order2`; `theory` = accuracy of the",
            "analytic Gaussian-closure propagation of that layer's class Gaussians (test split) to the logits;",
            "`gauss-logit MC` = the same Gaussians pushed through the real layers by Monte Carlo, only the logits read",
            "as Gaussian (so `order2 - gauss-logit MC` is the Gaussian-logit read-out error, `gauss-logit MC - theory`",
            "the closure error);",
            "`nongauss` = mean |excess kurtosis| of the layer's units.",
            *(f"Skipped: {k} ({v})." for k, v in skipped.items()),
            "",
            table,
            "",
            "## Numbers bearing on the paper's claims",
            "",
            "Claims: (1) hidden layers are captured to second order (small `gap` in hidden layers); (2) the input layer",
            "uses higher orders (large `gap` at the input where the data's class information is above order 2).",
            "",
            comparison,
            "",
        ]
    )
    print(table)
    print()
    print(comparison)
    if skipped:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    print(f"\n{run.describe()}")
    data = {"config": harness.config(args), "machine": machine, "skipped": skipped, "results": results}
    harness.write_results(args.out, table, data)
    (args.out / "README.md").write_text(readme)
    plot_orders(results, args.out / "orders.png")
    plot_gap_history(results, args.out / "gap_vs_step.png")
    return data


if __name__ == "__main__":
    main()
