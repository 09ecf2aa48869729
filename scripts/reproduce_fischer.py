"""Reproduce the correlation-order decomposition of Fischer et al. on real digits, XOR, a higher-order task and MNIST.

Reference:
    Fischer, René, Keup, Layer, Dahmen, Helias (2022). "Decomposing neural networks as mappings of correlation
    functions." Physical Review Research 4, 043143. Paper's claim under test: "correlations up to second
    order predominantly capture the information processing in the internal layers, while the input layer also
    extracts higher-order correlations from the data" (shown there on XOR and MNIST). Definitions follow
    METHODS.md section 4 (not the paper's exact formulas).

Run (from the repository root)::

    .venv/bin/python scripts/reproduce_fischer.py                               # real digits, 5 seeds
    .venv/bin/python scripts/reproduce_fischer.py --data xor higher_order --seeds 1
    .venv/bin/python scripts/reproduce_fischer.py --data mnist --data-dir DIR    # DIR/MNIST/raw/ holds the IDX files

(defaults: ``--data digits --seeds 5 --seed 0 --activations quadratic relu --alpha 0.5 --batch-size 64 --lr 1e-3
--measurements 5 --out outputs/reproduce_fischer``; per data set, unless ``--hidden`` / ``--epochs`` /
``--probe-size`` are given: digits ``64 64``, 60 epochs, the whole validation split as the probe; xor and
higher_order ``64 64``, 30 epochs, 2048; mnist ``128 128``, 2 epochs, 10000); ``--quick`` is a smoke test of a
few seconds. ``--data mnist`` stops before any training, with the message of
:class:`~lightning_interp.datamodules.MNISTDataModule` (which files are missing or damaged, how to get them),
when the files under ``--data-dir`` are absent or damaged.

What is trained: for every data set in ``--data``, every activation in ``--activations`` and every seed
(``--seed``, ``--seed + 1``, ... ``--seeds`` of them: the seed sets the weights, the data split and the
surrogate draws), an MLP ``Linear -> act -> Linear -> act -> Linear`` where ``act`` is
:class:`~lightning_interp.encoding.Quadratic` (``z + alpha z^2``) or ``nn.ReLU``, trained with Lightning
(Adam, cross-entropy) with the product's :class:`~lightning_interp.callbacks.CorrelationOrderCallback`
attached (layers ``input``, each hidden activation and the logits, probe = the validation split, measured at
the start, every few epochs and at the end). Data:

* ``digits``: scikit-learn's real handwritten digits (:class:`~lightning_interp.datamodules.DigitsDataModule`,
  1797 images of 8 x 8 pixels in ``[0, 1]``, flattened to 64 inputs, 10 classes; scikit-learn is the optional
  extra ``digits``), split per seed, stratified by class, into ``--digits-val-fraction`` (the probe, 0.25),
  ``--digits-test-fraction`` (0.25) and the rest for training;
* ``xor`` (:class:`~lightning_interp.datamodules.XORDataModule`, ``dim=2, noise=0.3``: the class information
  sits in the input covariance) and ``higher_order``
  (:class:`~lightning_interp.datamodules.HigherOrderDataModule`, ``dim=8``, Gaussian vs Laplace coordinates:
  equal means and covariances, the classes differ only from the fourth cumulant on), ``--n-train`` training
  examples;
* ``mnist``: flattened, normalised MNIST (:class:`~lightning_interp.datamodules.MNISTDataModule`).

Measured per layer ``L`` (the final measurement of the callback, on the validation probe):
``real`` (the network's accuracy), ``order2`` / ``order1`` / ``order0`` (accuracy when the output of
``L`` is replaced by draws from ``N(mu_c, Sigma_c)`` / ``N(mu_c, Sigma_bar)`` / ``N(mu_bar, Sigma_bar)``
and the forward pass continues), ``gap = real - order2`` (what orders above two carry) and the mean
absolute excess kurtosis of the units (``nongauss``). ``theory``: the class Gaussians
``N(mu_c, Sigma_c)`` of ``L``, estimated on the *test* split, are propagated analytically through the
remaining modules to the logits (:func:`~lightning_interp.gaussian_closure.propagate_moments`, Gaussian closure
after every activation) and :func:`~lightning_interp.gaussian_closure.theory_accuracy` turns the logit
Gaussians into an accuracy; it is the analytic counterpart of ``order2`` at ``L``. For the logits layer no
propagation is involved. ``gauss-logit MC`` separates the two approximations in ``theory``: the same
Gaussians of ``L`` are pushed through the real remaining layers by Monte Carlo (``--theory-mc-draws`` per
class, no closure) and only the logits are read as Gaussian; so ``order2 - gauss-logit MC`` is the error of
the Gaussian read-out of the logits and ``gauss-logit MC - theory`` that of the Gaussian closure inside.
For the two synthetic tasks ``theory (exact input moments)`` is ``theory`` from the exact class mean and
covariance of the input (the datamodule's ``class_mean`` / ``class_covariance``). ``test acc`` is the
network's accuracy on the test split.

Every number in the table is the mean over the seeds. The gap has two standard errors: ``SE seeds``, the
standard deviation of the seeds' gaps over ``sqrt(seeds)`` (it holds every source of noise: weights, split,
probe, surrogate draws; ``-`` with one seed), and ``SE probe``, ``sqrt(sum_s se_s^2) / seeds`` from the
callback's own ``higher_order_gap_se`` of each seed (the paired standard error over the probe examples, which
holds the probe's and the draws' noise only). A gap is called *above zero* when it exceeds 3 times the larger
of the two (the orders above two carry accuracy), *below zero* when it is under -3 times it (the Gaussian
surrogates are classified better than the real data), *consistent with zero* when it is within 2 times it.
``input gap, train-split moments`` repeats the input's gap with the class moments estimated on the training
split instead of the probe (the digits' probe has fewer examples per class than pixels, so its class
covariances are singular; the training split has about 90 per class).

Outputs under ``--out``: ``README.md`` (what was measured, the tables, the numbers bearing on the paper's
claims, computed from the results), ``results.md`` (the tables), ``results.json`` (every number: the
summary over seeds, and per network the per-layer values and the callback's full history),
``orders.png`` (mean accuracies per layer, with their SE over seeds) and ``gap_vs_step.png`` (the higher-order
gap per layer over training, mean over seeds).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.callbacks import CorrelationOrderCallback
from lightning_interp.correlation import INPUT, layer_outputs
from lightning_interp.datamodules import DigitsDataModule, HigherOrderDataModule, MNISTDataModule, XORDataModule
from lightning_interp.encoding import Quadratic
from lightning_interp.gaussian_closure import ClassMoments, propagate_moments, theory_accuracy
from lightning_interp.models import MLPClassifier
from lightning_interp.plotting import subplots
from lightning_interp.stats import mean_and_se

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

DATA = ("digits", "xor", "higher_order", "mnist")
ACTIVATIONS = ("quadratic", "relu")
COLUMNS = ("real", "order2", "order1", "order0", "gap", "theory", "gauss_logit_mc", "nongauss")
#: per data set: hidden widths, epochs and probe size (``None``: the whole validation split) unless given
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"hidden": [64, 64], "epochs": 60, "probe_size": None},
    "xor": {"hidden": [64, 64], "epochs": 30, "probe_size": 2048},
    "higher_order": {"hidden": [64, 64], "epochs": 30, "probe_size": 2048},
    "mnist": {"hidden": [128, 128], "epochs": 2, "probe_size": 10_000},
}
QUICK = {
    "seeds": 2,
    "hidden": [16, 16],
    "epochs": 2,
    "n_train": 512,
    "probe_size": 256,
    "measurements": 1,
    "theory_samples": 5_000,
    "theory_mc_draws": 2_000,
}
#: a gap is "above zero" beyond this many standard errors, "consistent with zero" within CONSISTENT of them
ABOVE, CONSISTENT = 3.0, 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring); ``--quick`` replaces the sizes with :data:`QUICK`."""
    parser = harness.parser(
        __doc__,
        "outputs/reproduce_fischer",
        seed="first random seed (the runs use --seed ... --seed + --seeds - 1)",
        threads="torch intra-op threads (1 is fastest for these small MLPs)",
    )
    parser.add_argument("--data", "--tasks", nargs="+", default=["digits"], choices=DATA, help="data sets to run")
    parser.add_argument("--seeds", type=int, default=5, help="networks per data set and activation (consecutive seeds)")
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS, help="activations")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths (default: per data set)")
    parser.add_argument("--alpha", type=float, default=0.5, help="coefficient of the quadratic activation z + alpha z^2")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: per data set)")
    parser.add_argument("--probe-size", type=int, default=None, help="validation probe size (default: per data set)")
    parser.add_argument("--n-train", type=int, default=8192, help="training-set size (xor, higher_order)")
    parser.add_argument("--digits-val-fraction", type=float, default=0.25, help="share of each digit in the probe split")
    parser.add_argument("--digits-test-fraction", type=float, default=0.25, help="share of each digit in the test split")
    parser.add_argument(
        "--data-dir", "--mnist-dir", default="data", help="folder holding MNIST/raw/ (torchvision's root; --data mnist)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--measurements", type=int, default=5, help="callback measurements during training (plus start)")
    parser.add_argument(
        "--theory-samples", type=int, default=100_000, help="Monte-Carlo draws per class of theory_accuracy (K > 2)"
    )
    parser.add_argument("--theory-mc-draws", type=int, default=20_000, help="surrogate draws per class for gauss-logit MC")
    args = harness.parse(parser, argv, QUICK)
    if min(args.seeds, args.measurements, args.epochs or 1) < 1 or (args.probe_size is not None and args.probe_size < 64):
        parser.error("--seeds, --epochs and --measurements must be >= 1 and --probe-size >= 64")
    return args


def settings(data: str, args: argparse.Namespace) -> dict[str, Any]:
    """Hidden widths, epochs and probe size of ``data``: the arguments where given, else :data:`DEFAULTS`."""
    given = {"hidden": args.hidden, "epochs": args.epochs, "probe_size": args.probe_size}
    return {k: v if given[k] is None else given[k] for k, v in DEFAULTS[data].items()}


def check_mnist(data_dir: str) -> None:
    """Stop before any training when the MNIST files are missing or damaged, with the datamodule's message."""
    dm = MNISTDataModule(data_dir)
    try:
        dm.check_files()
        dm.check_split("train")
        dm.check_split("t10k")
    except (FileNotFoundError, ValueError) as err:  # MNISTFileError is a ValueError
        raise SystemExit(f"--data mnist: {err}") from err


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


def make_datamodule(data: str, args: argparse.Namespace, seed: int, probe_size: int | None) -> pl.LightningDataModule:
    """The datamodule of ``data`` with the split of ``seed``, set up for fitting."""
    common = {"batch_size": args.batch_size, "seed": seed}
    dm: pl.LightningDataModule
    if data == "digits":
        dm = DigitsDataModule(
            val_fraction=args.digits_val_fraction, test_fraction=args.digits_test_fraction, flatten=True, **common
        )
    elif data == "mnist":
        dm = MNISTDataModule(args.data_dir, flatten=True, val_size=probe_size or 10_000, **common)
    else:
        size = probe_size or 2048
        cls = XORDataModule if data == "xor" else HigherOrderDataModule
        dm = cls(n_train=args.n_train, n_val=size, n_test=size, **common)
    dm.setup("fit")
    return dm


def shape_of(dm: pl.LightningDataModule, data: str) -> tuple[int, int]:
    """``(in_features, num_classes)`` of the flattened inputs of ``dm``."""
    if data in ("digits", "mnist"):
        return int(math.prod(dm.input_shape)), dm.num_classes  # type: ignore[attr-defined]
    return dm.dim, 2  # type: ignore[attr-defined]


def test_probe(dm: pl.LightningDataModule, size: int | None) -> tuple[Tensor, Tensor]:
    """The first ``size`` examples of the test split (all of it for ``None``)."""
    dm.setup("test")
    xs, ys, n = [], [], 0
    for x, y in dm.test_dataloader():
        xs.append(x)
        ys.append(y)
        n += len(y)
        if size is not None and n >= size:
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


def split_tensors(loader: Any) -> tuple[Tensor, Tensor]:
    """Every ``(x, y)`` of ``loader``, concatenated."""
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def input_gap_other_moments(
    model: nn.Module, source: tuple[Tensor, Tensor], probe: tuple[Tensor, Tensor], num_classes: int, seed: int
) -> dict[str, float]:
    """The input's gap on ``probe`` when its order-2 surrogates take their class moments from ``source``.

    The callback estimates each class's mean and covariance on the probe itself; with fewer probe examples of a
    class than input dimensions (the digits: about 45 per class for 64 pixels) that covariance is singular.
    Here the moments come from ``source`` (the training split: about 90 per class, full rank), one draw per
    probe example, so that the input's gap can be checked against the estimation of the moments.

    Returns:
        ``order2`` (surrogate accuracy), ``gap`` (``real - order2`` on the probe), ``gap_se`` (paired over the probe
        examples) and ``min_per_class`` (fewest ``source`` examples of a class).
    """
    x, y = probe
    moments = ClassMoments(num_classes)
    moments.update(source[0].flatten(1).double(), source[1])
    draws = moments.sample(y, 2, torch.Generator().manual_seed(seed), dtype=x.dtype).reshape(x.shape)
    hit_real, hit_order2 = model(x).argmax(1) == y, model(draws).argmax(1) == y
    gap, gap_se = mean_and_se(hit_real.double() - hit_order2.double())
    return {
        "order2": float(hit_order2.double().mean()),
        "gap": float(gap),
        "gap_se": float(gap_se),
        "min_per_class": int(moments.count.min()),
    }


@torch.no_grad()
def theory_exact_input(model: MLPClassifier, dm: pl.LightningDataModule, samples: int, seed: int) -> float:
    """Theory accuracy from the task's exact input class moments (synthetic tasks; equal priors)."""
    means, covs = [], []
    for c in range(2):
        m, s = propagate_moments(list(model.net), dm.class_mean(c), dm.class_covariance(c))  # type: ignore[attr-defined]
        means.append(m)
        covs.append(s)
    return float(theory_accuracy(means, covs, num_samples=samples, generator=torch.Generator().manual_seed(seed)))


def run_one(data: str, activation: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one network with the callback and collect every measure."""
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    cfg = settings(data, args)
    dm = make_datamodule(data, args, seed, cfg["probe_size"])
    # the callback's probe is the validation split, all of it when it is smaller than the probe size asked for
    n_val = len(dm.val_dataloader().dataset)  # type: ignore[arg-type]
    probe_size = n_val if cfg["probe_size"] is None else min(cfg["probe_size"], n_val)
    in_features, num_classes = shape_of(dm, data)
    model = fischer_mlp(in_features, num_classes, cfg["hidden"], activation, args.alpha, args.lr)
    layers = layer_names(model)
    every = max(1, cfg["epochs"] // args.measurements)
    cb = CorrelationOrderCallback(
        layers=layers,
        probe_size=probe_size,
        every_n_epochs=every,
        measure_at_start=True,
        seed=seed,
        log_images=False,
        budget=None,  # the reproduction needs every measurement it schedules, whatever the overhead
    )
    trainer = pl.Trainer(
        max_epochs=cfg["epochs"],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[cb, harness.epoch_bar(f"{data}/{activation}/seed {seed}", cfg["epochs"])],
    )
    trainer.fit(model, datamodule=dm)
    final = cb.history[-1]
    x_test, y_test = test_probe(dm, cfg["probe_size"] if data == "mnist" else None)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x_test).argmax(1) == y_test).double().mean())
    theory = theory_per_layer(model, layers, x_test, y_test, num_classes, args.theory_samples, args.theory_mc_draws, seed)
    train_moments = input_gap_other_moments(
        model, split_tensors(dm.train_dataloader()), split_tensors(dm.val_dataloader()), num_classes, seed
    )
    rows = {}
    for layer in layers:
        rows[layer] = {
            "real": final[f"{layer}/acc_real"],
            "order2": final[f"{layer}/acc_order2"],
            "order1": final[f"{layer}/acc_order1"],
            "order0": final[f"{layer}/acc_order0"],
            "gap": final[f"{layer}/higher_order_gap"],
            "gap_se": final[f"{layer}/higher_order_gap_se"],
            "theory": theory[layer]["theory"],
            "gauss_logit_mc": theory[layer]["gauss_logit_mc"],
            "nongauss": final[f"{layer}/non_gaussianity"],
        }
    finite = all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())
    synthetic = data in ("xor", "higher_order")
    return {
        "task": data,
        "activation": activation,
        "seed": seed,
        "hidden": cfg["hidden"],
        "epochs": cfg["epochs"],
        "steps": int(trainer.global_step),
        "probe_size": probe_size,
        "test_size": len(y_test),
        "layers": layers,
        "layer_roles": {
            layers[0]: "input",
            **{name: f"hidden {i + 1}" for i, name in enumerate(layers[1:-1])},
            layers[-1]: "logits",
        },
        "per_layer": rows,
        "test_acc": test_acc,
        "input_train_moments": train_moments,
        "theory_exact_input": theory_exact_input(model, dm, args.theory_samples, seed) if synthetic else None,
        "finite_weights": finite,
        "history": cb.history,
        "seconds": time.perf_counter() - t0,
    }


def fmt(v: float | None, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; ``-`` for ``None`` and NaN."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def mean_and_seed_se(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error over them (``std / sqrt(n)``, unbiased variance; NaN for one)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data set and activation, the mean over seeds of every measure, with standard errors (module docstring)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["activation"]), []).append(r)
    summary = []
    for (task, act), runs in groups.items():
        first = runs[0]
        per_layer: dict[str, dict[str, Any]] = {}
        for layer in first["layers"]:
            row: dict[str, Any] = {}
            for col in COLUMNS:
                row[col], row[f"{col}_se_seeds"] = mean_and_seed_se([float(r["per_layer"][layer][col]) for r in runs])
            row["gap_se_probe"] = math.sqrt(math.fsum(float(r["per_layer"][layer]["gap_se"]) ** 2 for r in runs)) / len(runs)
            row["gaps"] = [float(r["per_layer"][layer]["gap"]) for r in runs]
            per_layer[layer] = row
        test_acc, test_acc_se = mean_and_seed_se([r["test_acc"] for r in runs])
        checks = [r["input_train_moments"] for r in runs]
        check_gap, check_se = mean_and_seed_se([c["gap"] for c in checks])
        train_moments = {
            "order2": math.fsum(c["order2"] for c in checks) / len(checks),
            "gap": check_gap,
            "gap_se_seeds": check_se,
            "gap_se_probe": math.sqrt(math.fsum(c["gap_se"] ** 2 for c in checks)) / len(checks),
            "min_per_class": min(c["min_per_class"] for c in checks),
        }
        exact = [r["theory_exact_input"] for r in runs]
        summary.append(
            {
                "task": task,
                "activation": act,
                "seeds": [r["seed"] for r in runs],
                "hidden": first["hidden"],
                "epochs": first["epochs"],
                "steps": first["steps"],
                "probe_size": first["probe_size"],
                "test_size": first["test_size"],
                "num_classes": 10 if task in ("digits", "mnist") else 2,
                "layers": first["layers"],
                "layer_roles": first["layer_roles"],
                "per_layer": per_layer,
                "test_acc": test_acc,
                "test_acc_se_seeds": test_acc_se,
                "input_train_moments": train_moments,
                "theory_exact_input": None if None in exact else math.fsum(exact) / len(exact),
                "seconds_per_network": math.fsum(r["seconds"] for r in runs) / len(runs),
            }
        )
    return summary


def gap_se(row: dict[str, Any]) -> float:
    """The larger of the gap's two standard errors (the probe's alone with one seed)."""
    seeds = row["gap_se_seeds"]
    return row["gap_se_probe"] if math.isnan(seeds) else max(seeds, row["gap_se_probe"])


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The per-layer table and the per-network table, means over seeds."""
    rows = []
    for g in summary:
        for layer in g["layers"]:
            v = g["per_layer"][layer]
            role = g["layer_roles"][layer]
            name = layer if role == "input" else f"{layer} ({role})"
            rows.append(
                [
                    g["task"],
                    g["activation"],
                    name,
                    *(fmt(v[k]) for k in ("real", "order2", "order1", "order0", "gap", "gap_se_seeds", "gap_se_probe")),
                    *(fmt(v[k]) for k in ("theory", "gauss_logit_mc")),
                    fmt(v["nongauss"], 2),
                ]
            )
    header = [
        "task", "act", "layer", "real", "order2", "order1", "order0", "gap", "SE seeds", "SE probe", "theory",
        "gauss-logit MC", "nongauss",
    ]  # fmt: skip
    networks = [
        [
            g["task"],
            g["activation"],
            len(g["seeds"]),
            " ".join(map(str, g["hidden"])),
            g["epochs"],
            g["steps"],
            g["probe_size"],
            fmt(g["test_acc"]),
            fmt(g["test_acc_se_seeds"]),
            f"{fmt(g['input_train_moments']['gap'])} ± {fmt(gap_se(g['input_train_moments']))}",
            fmt(g["theory_exact_input"]),
            f"{g['seconds_per_network']:.1f}",
        ]
        for g in summary
    ]
    network_header = [
        "task", "act", "seeds", "hidden", "epochs", "steps", "probe", "test acc", "SE seeds",
        "input gap, train-split moments", "theory (exact input moments)", "seconds per network",
    ]  # fmt: skip
    return "\n\n".join(
        [
            harness.markdown_table(header, rows, align="lll" + "r" * 10),
            harness.markdown_table(network_header, networks, align="ll" + "r" * 10),
        ]
    )


def describe_gap(g: dict[str, Any], layer: str) -> tuple[str, str, float]:
    """``(text, verdict, z)`` of one layer's gap: value, SE, z-score, share of the above-chance accuracy, verdict.

    Verdicts: *above zero* (``z > ABOVE``: the orders above two carry accuracy), *below zero* (``z < -ABOVE``: the
    Gaussian surrogates are classified better than the real data), *consistent with zero* (``|z| <= CONSISTENT``),
    else *between* the two thresholds.
    """
    v = g["per_layer"][layer]
    se = gap_se(v)
    z = v["gap"] / se if se > 0 else math.inf
    chance = 1.0 / g["num_classes"]
    share = v["gap"] / (v["real"] - chance) if v["real"] > chance else math.nan
    if z > ABOVE:
        verdict = "above zero"
    elif z < -ABOVE:
        verdict = "below zero"
    elif abs(z) <= CONSISTENT:
        verdict = "consistent with zero"
    else:
        verdict = f"between {CONSISTENT:g} and {ABOVE:g} SE {'above' if z > 0 else 'below'} zero"
    share_text = "real at chance" if math.isnan(share) else f"{100 * share:.1f}% of real - chance"
    text = f"{fmt(v['gap'])} ± {fmt(se)} ({z:+.1f} SE; {share_text}; order2 {fmt(v['order2'])}) **{verdict}**"
    return text, verdict, z


def compare_with_claims(summary: list[dict[str, Any]]) -> str:
    """Plain statements of the numbers that bear on the paper's two claims, one network type per paragraph.

    A gap is *above zero* beyond :data:`ABOVE` standard errors (the larger of the seeds' and the probe's, see the
    module docstring) and *consistent with zero* within :data:`CONSISTENT` of them. Claim (1) holds for a network
    type when no hidden layer's gap exceeds :data:`CONSISTENT` SE (a negative gap, surrogates classified better than
    the real data, means the orders above two add nothing), and fails when one is above zero; claim (2) holds
    when the input's gap is above zero and larger than every hidden layer's.
    """
    lines = []
    for g in summary:
        hidden = [lay for lay in g["layers"] if g["layer_roles"][lay].startswith("hidden")]
        input_text, input_verdict, _ = describe_gap(g, INPUT)
        hidden_described = {lay: describe_gap(g, lay) for lay in hidden}
        z_hidden = {lay: hidden_described[lay][2] for lay in hidden}
        if all(z <= CONSISTENT for z in z_hidden.values()):
            claim1 = f"holds (no hidden gap above {CONSISTENT:g} SE: the orders above two add no accuracy there)"
        elif any(z > ABOVE for z in z_hidden.values()):
            above = [g["layer_roles"][lay] for lay, z in z_hidden.items() if z > ABOVE]
            claim1 = f"does not hold strictly ({', '.join(above)}: gap above zero)"
        else:
            claim1 = f"undecided (a hidden gap between {CONSISTENT:g} and {ABOVE:g} SE)"
        top_hidden = max(g["per_layer"][lay]["gap"] for lay in hidden) if hidden else -math.inf
        uses = input_verdict == "above zero" and g["per_layer"][INPUT]["gap"] > top_hidden
        claim2 = "holds" if uses else "does not hold"
        check = g["input_train_moments"]
        lines += [
            f"- **{g['task']} / {g['activation']}** ({len(g['seeds'])} seeds, probe {g['probe_size']}, real "
            f"{fmt(g['per_layer'][INPUT]['real'])}, test {fmt(g['test_acc'])}):",
            f"  input gap {input_text};",
            *(f"  {g['layer_roles'][lay]} gap {hidden_described[lay][0]};" for lay in hidden),
            f"  input gap with the class moments of the training split (at least {check['min_per_class']} per class) "
            f"{fmt(check['gap'])} ± {fmt(gap_se(check))} (order2 {fmt(check['order2'])});",
            f"  claim (1), hidden layers captured to second order: {claim1}; claim (2), the input layer uses higher "
            f"orders: {claim2}.",
        ]
    return "\n".join(lines)


def plot_orders(summary: list[dict[str, Any]], path: Path) -> None:
    """Mean accuracies per layer (bars, SE over seeds) and the two theory read-outs, one panel per network type."""
    n = len(summary)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
    styles = (("real", "k"), ("order2", "C0"), ("order1", "C1"), ("order0", "C2"))
    for ax, g in zip(axes.flat, summary, strict=False):
        layers = g["layers"]
        pos = torch.arange(len(layers)).float()
        for i, (key, color) in enumerate(styles):
            means = [g["per_layer"][lay][key] for lay in layers]
            errs = [0.0 if math.isnan(e) else e for e in (g["per_layer"][lay][f"{key}_se_seeds"] for lay in layers)]
            ax.bar(pos + (i - 1.5) * 0.2, means, width=0.2, color=color, label=key, yerr=errs, capsize=2)
        ax.plot(pos.tolist(), [g["per_layer"][lay]["theory"] for lay in layers], "r*", ms=11, label="theory (analytic)")
        gl = [g["per_layer"][lay]["gauss_logit_mc"] for lay in layers]
        ax.plot(pos.tolist(), gl, "mx", ms=8, mew=2, label="gauss-logit MC")
        ax.axhline(1.0 / g["num_classes"], color="gray", ls=":", lw=1)
        ticks = [lay if lay == INPUT else f"{lay}\n{g['layer_roles'][lay]}" for lay in layers]
        ax.set_xticks(pos.tolist(), ticks, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{g['task']}, {g['activation']} MLP {g['hidden']}, {len(g['seeds'])} seed(s)", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("Gaussian surrogates per layer (Fischer et al. 2022): real vs order 2 / 1 / 0, and analytic theory", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    harness.save_figure(fig, path, dpi=110)


def plot_gap_history(results: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
    """The higher-order gap per layer over training: every seed (thin) and their mean (thick), per network type."""
    n = len(summary)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False)
    for ax, g in zip(axes.flat, summary, strict=False):
        runs = [r for r in results if r["task"] == g["task"] and r["activation"] == g["activation"]]
        for li, lay in enumerate(g["layers"]):
            key = f"{lay}/higher_order_gap"
            curves = [[(h["step"], h[key]) for h in r["history"] if key in h] for r in runs]
            for pts in curves:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{li}", lw=0.6, alpha=0.35)
            length = min(len(c) for c in curves)
            mean = [math.fsum(c[i][1] for c in curves) / len(curves) for i in range(length)]
            steps = [curves[0][i][0] for i in range(length)]
            ax.plot(steps, mean, color=f"C{li}", marker="o", ms=3, lw=1.6, label=f"{lay} ({g['layer_roles'][lay]})")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("real - order2")
        ax.set_title(f"{g['task']}, {g['activation']}", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=100)


def check_data(args: argparse.Namespace) -> None:
    """Stop before any training when a data set asked for cannot be read, with its datamodule's message."""
    if "digits" in args.data:
        try:
            DigitsDataModule()
        except ModuleNotFoundError as err:
            raise SystemExit(f"--data digits: {err}") from err
    if "mnist" in args.data:
        check_mnist(args.data_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every network, summarise over seeds, print and write the tables, README and figures; return the data.

    Raises:
        SystemExit: a data set that cannot be read (the datamodule's message), or no network finished.
    """
    args = parse_args(argv)
    harness.quiet_lightning()
    check_data(args)
    run = harness.start(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    jobs = [(d, a, s) for d in args.data for a in args.activations for s in seeds]
    results, skipped = [], {}
    for data, act, seed in tqdm(jobs, desc="networks", dynamic_ncols=True):
        try:
            results.append(run_one(data, act, seed, args))
        except (RuntimeError, ValueError) as err:  # e.g. a diverged quadratic network (non-finite moments)
            name = f"{data}/{act}/seed {seed}"
            skipped[name] = f"failed: {type(err).__name__}: {err}"
            print(f"{name}: {skipped[name]}")
    if not results:
        raise SystemExit("no network finished")
    summary = summarize(results)
    table = markdown_table(summary)
    comparison = compare_with_claims(summary)
    machine = run.stop()
    command = " ".join(["scripts/reproduce_fischer.py", *(sys.argv[1:] if argv is None else argv)])
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
            "the closure error); `nongauss` = mean |excess kurtosis| of the layer's units. Every value is the mean over",
            "the seeds; `SE seeds` is the gap's standard error over the seeds, `SE probe` the one from the callback's",
            "per-seed standard errors.",
            *(f"Skipped: {k} ({v})." for k, v in skipped.items()),
            "",
            table,
            "",
            "## Numbers bearing on the paper's claims",
            "",
            "Claims: (1) hidden layers are captured to second order (small `gap` in hidden layers); (2) the input layer",
            f"uses higher orders (a `gap` at the input). A gap is *above zero* beyond {ABOVE:g} SE, *consistent with zero*",
            f"within {CONSISTENT:g} SE (SE: the larger of `SE seeds` and `SE probe`); the share is the gap over",
            "`real - chance`, the part of the above-chance accuracy that the orders above two carry.",
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
    data = {"config": harness.config(args), "machine": machine, "skipped": skipped, "summary": summary, "results": results}
    harness.write_results(args.out, table, data)
    (args.out / "README.md").write_text(readme)
    plot_orders(summary, args.out / "orders.png")
    plot_gap_history(results, summary, args.out / "gap_vs_step.png")
    return data


if __name__ == "__main__":
    main()
