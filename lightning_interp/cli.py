"""The ``lightning-interp`` command.

Subcommands:

* ``lightning-interp demo [--out DIR] [--max-steps N] [--epochs N] [--logger wandb|tensorboard|csv]``: the
  main job (:mod:`lightning_interp.demo`): every callback on the task it suits, logged into one offline
  wandb run (no account needed); writes ``DIR/summary.json``, ``DIR/report.html`` and PNG figures.
* ``lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N] [--wandb]``:
  the final-layer audit of a pretrained torchvision model (:mod:`lightning_interp.audit`).
* ``lightning-interp fit|validate|test|predict --config configs/....yaml``: Lightning's
  ``LightningCLI`` with any ``LightningModule`` / ``LightningDataModule`` (``class_path`` in YAML), so
  callbacks and datamodules are named in the config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

_USAGE = """usage: lightning-interp {demo,audit,fit,validate,test,predict} ...

  demo        every callback on the task it suits, one offline wandb run, summary.json and report.html
  audit       final-layer audit of a pretrained torchvision model on a folder of images:
              lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N]
  fit         LightningCLI: lightning-interp fit --config configs/posterior_gap_preset1.yaml
  validate, test, predict
              LightningCLI subcommands

Run `lightning-interp demo --help` or `lightning-interp fit --help` for the options.
"""


def _demo(argv: Sequence[str]) -> None:
    from lightning_interp.demo import PARTS, run_demo

    parser = argparse.ArgumentParser(prog="lightning-interp demo", description=run_demo.__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (summary.json, report.html, figures, logs)")
    parser.add_argument("--max-steps", type=int, default=3000, help="training steps per posterior preset")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the saliency, XOR and Potts parts")
    parser.add_argument("--logger", choices=("wandb", "tensorboard", "csv"), default="wandb")
    parser.add_argument("--presets", type=int, nargs="+", default=[1, 3], choices=(1, 2, 3))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    summary = run_demo(
        out=args.out,
        max_steps=args.max_steps,
        logger=args.logger,
        presets=args.presets,
        seed=args.seed,
        parts=args.parts,
        epochs=args.epochs,
    )
    for part, res in summary["parts"].items():
        final = {k: v for k, v in res["final"].items() if k not in ("step", "epoch")}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(final.items())[:6])
        print(f"{part:>18} ({res['wall_time_s']:5.1f} s): {shown}")
    print(f"\nwrote {os.path.join(args.out, 'summary.json')} and report.html ({summary['wall_time_s']:.1f} s)")


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
    from lightning_interp.demo import finish_logger

    for logger in cli.trainer.loggers:  # close wandb runs so their files are complete when main() returns
        finish_logger(logger)


if __name__ == "__main__":
    main()
