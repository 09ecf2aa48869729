"""The ``lightning-interp`` command.

Subcommands:

* ``lightning-interp demo [--out DIR] [--max-steps N] [--logger wandb|tensorboard|csv]``: the main job.
  Trains the post's MLP (1-64-64-2) on presets 1 and 3 of Xie (2025) with the
  :class:`~lightning_interp.callbacks.PosteriorGapCallback`, logs to wandb in offline mode by default
  (no account needed), and writes ``DIR/summary.json`` and PNG figures.
* ``lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N] [--wandb]``:
  the final-layer audit of a pretrained torchvision model (:mod:`lightning_interp.audit`).
* ``lightning-interp fit|validate|test|predict --config configs/....yaml``: Lightning's
  ``LightningCLI`` with any ``LightningModule`` / ``LightningDataModule`` (``class_path`` in YAML), so
  callbacks and datamodules are named in the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "run_demo"]

_USAGE = """usage: lightning-interp {demo,audit,fit,validate,test,predict} ...

  demo        train the post's MLP on presets 1 and 3 with the posterior-gap callback (wandb offline)
  audit       final-layer audit of a pretrained torchvision model on a folder of images:
              lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N]
  fit         LightningCLI: lightning-interp fit --config configs/posterior_gap_preset1.yaml
  validate, test, predict
              LightningCLI subcommands

Run `lightning-interp demo --help` or `lightning-interp fit --help` for the options.
"""


def _make_logger(kind: str, out: str, name: str) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if kind == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project="lightning-interp-demo", name=name, save_dir=out, offline=os.environ["WANDB_MODE"] != "online")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=out, name=name)
    if kind == "csv":
        return CSVLogger(save_dir=out, name=name)
    raise ValueError(f"unknown logger {kind!r}: choose wandb, tensorboard or csv")


def _finish(logger: Any) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        if logger._experiment is not None:
            logger.experiment.finish()
    else:
        logger.finalize("success")


def run_demo(
    out: str = "demo_out",
    max_steps: int = 3000,
    logger: str = "wandb",
    presets: Sequence[int] = (1, 3),
    seed: int = 0,
    n_train: int = 100_000,
    probe_size: int = 4096,
) -> dict[str, Any]:
    """Train the post's MLP on the given presets with the posterior-gap callback.

    Returns:
        The summary written to ``out/summary.json``.
    """
    import lightning.pytorch as pl
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_interp.callbacks import PosteriorGapCallback
    from lightning_interp.datamodules import SyntheticDataModule
    from lightning_interp.models import MLPClassifier
    from lightning_interp.posterior import xie_task

    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, Any] = {"max_steps": max_steps, "logger": logger, "seed": seed, "presets": {}}
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in presets:
        t0 = time.perf_counter()
        pl.seed_everything(seed, verbose=False)
        task = xie_task(preset)
        callback = PosteriorGapCallback(
            probe_size=probe_size,
            every_n_epochs=None,
            every_n_steps=max(1, max_steps // 20),
            measure_at_start=True,
            seed=seed,
            figure_dir=os.path.join(out, "figures", f"preset{preset}"),
        )
        run_logger = _make_logger(logger, out, f"preset{preset}")
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=[callback],
            logger=run_logger,
            accelerator="auto",
            devices=1,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=sys.stderr.isatty(),
            limit_val_batches=0,
            default_root_dir=out,
        )
        trainer.fit(
            MLPClassifier(1, 2, hidden=(64, 64), lr=1e-3), SyntheticDataModule(task, n_train, 0, 0, batch_size=64, seed=seed)
        )
        _finish(run_logger)
        final = callback.history[-1]
        summary["presets"][str(preset)] = {
            "final": final,
            "history": callback.history,
            "wall_time_s": round(time.perf_counter() - t0, 2),
        }
        steps = [h["step"] for h in callback.history]
        ax.plot([max(s, 1) for s in steps], [h["kl"] for h in callback.history], marker="o", label=f"preset {preset}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean KL(p || q) on the probe set")
    ax.set_title("Posterior gap during training")
    ax.legend()
    fig.savefig(os.path.join(out, "gap_vs_step.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _demo(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-interp demo", description=run_demo.__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder (summary.json, figures, logs)")
    parser.add_argument("--max-steps", type=int, default=3000, help="training steps per preset")
    parser.add_argument("--logger", choices=("wandb", "tensorboard", "csv"), default="wandb")
    parser.add_argument("--presets", type=int, nargs="+", default=[1, 3], choices=(1, 2, 3))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    summary = run_demo(out=args.out, max_steps=args.max_steps, logger=args.logger, presets=args.presets, seed=args.seed)
    print(f"\n{'preset':>6} {'kl':>9} {'tv':>9} {'max_abs':>9} {'acc':>7} {'bayes':>7} {'kl_low_dens':>11}")
    for preset, res in summary["presets"].items():
        f = res["final"]
        print(
            f"{preset:>6} {f['kl']:9.5f} {f['tv']:9.5f} {f['max_abs']:9.5f} {f['accuracy']:7.4f} {f['bayes_accuracy']:7.4f}"
            f" {f.get('kl_low_density', float('nan')):11.5f}"
        )
    print(f"\nwrote {os.path.join(args.out, 'summary.json')} and figures in {args.out} ({summary['wall_time_s']:.1f} s)")


def _audit(argv: Sequence[str]) -> None:
    from lightning_interp.audit import run_audit

    parser = argparse.ArgumentParser(
        prog="lightning-interp audit",
        description="Final-layer weight audit (ALD fits) and saliency maps of a torchvision model with local weights.",
    )
    parser.add_argument("--arch", required=True, help="torchvision model name, e.g. resnet50, densenet121, vit_b_16")
    parser.add_argument("--weights", required=True, help="local weights: a state_dict or Lightning checkpoint (.pth/.ckpt)")
    parser.add_argument("--images", required=True, help="a folder of images (flat, or one sub-folder per class)")
    parser.add_argument("--out", required=True, help="output folder: report.json, CSV tables, PNG grids")
    parser.add_argument("--limit", type=int, default=None, help="audit at most N images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-size", type=int, default=20, help="min_size of the recursive channel split")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--wandb", action="store_true", help="also log to wandb (offline unless WANDB_MODE=online)")
    args = parser.parse_args(list(argv))
    try:
        report = run_audit(
            args.arch,
            args.weights,
            args.images,
            args.out,
            limit=args.limit,
            batch_size=args.batch_size,
            min_size=args.min_size,
            use_wandb=args.wandb,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"lightning-interp audit: error: {err}\n")
    path = "closed form (GAP + Linear)" if report["closed_form"] else "autograd fallback"
    print(
        f"{args.arch}: {report['num_images']} images, feature layer {report['feature_layer']!r} -> {report['classifier']!r} "
        f"({path}); joint R^2 +{report['ald']['joint_positive']['r2']:.3f} / -{report['ald']['joint_negative']['r2']:.3f}; "
        f"wrote {os.path.join(args.out, 'report.json')}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-interp`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return
    if args[0] == "demo":
        _demo(args[1:])
        return
    if args[0] == "audit":
        _audit(args[1:])
        return
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    for logger in cli.trainer.loggers:  # close wandb runs so their files are complete when main() returns
        _finish(logger)


if __name__ == "__main__":
    main()
