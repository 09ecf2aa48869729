"""The ``lightning-interp`` command.

Subcommands:

* ``lightning-interp demo [--out DIR] [--max-steps N] [--epochs N] [--logger wandb|tensorboard|csv]``: the
  main job (:mod:`lightning_interp.demo`): every callback on the task it suits, logged into one offline
  wandb run (no account needed); writes ``DIR/summary.json``, ``DIR/report.html`` and PNG figures.
* ``lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N] [--wandb]``
  (or ``--arch timm:NAME``, ``--model pkg.Class --ckpt FILE``, ``--config audit.yaml``;
  ``--mean/--std/--resize/--crop`` for the model's own preprocessing): every method that applies to a trained
  classifier, one report (:mod:`lightning_interp.audit`). ``--out`` must be new, empty or an earlier audit's;
  a refused ``--out``, weights of another architecture or a bad argument exit with status 2 and one line.
* ``lightning-interp fit|validate|test|predict --config configs/....yaml``: Lightning's
  ``LightningCLI`` with any ``LightningModule`` / ``LightningDataModule`` (``class_path`` in YAML), so
  callbacks and datamodules are named in the config. The configs ship with the package: a ``--config``
  that is not a file is looked up by name among them (``--config posterior_gap_preset3``), from any folder.
* ``lightning-interp --version``.

``--help`` and ``--version`` import neither torch nor Lightning, so they answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["COMMANDS", "config_path", "main", "packaged_configs"]

#: The subcommands, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "audit", "fit", "validate", "test", "predict")
_LIGHTNING_COMMANDS = COMMANDS[2:]
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

_USAGE = """usage: lightning-interp [--version] {demo,audit,fit,validate,test,predict} ...

  demo        every callback on the task it suits, one offline wandb run, summary.json and report.html
  audit       every method on a trained classifier and a folder of images, one report:
              lightning-interp audit --arch resnet50 --weights FILE --images DIR --out OUT [--limit N]
              (--arch timm:NAME, --model pkg.Class --ckpt FILE, or --config audit.yaml;
              --mean M --std S --resize N|none --crop N|none: the model's own preprocessing)
  fit         LightningCLI: lightning-interp fit --config posterior_gap_preset1
  validate, test, predict
              LightningCLI subcommands

Configs installed with the package (--config NAME works from any folder; a path to your own YAML too):
  {configs}

Run `lightning-interp demo --help`, `lightning-interp audit --help` or `lightning-interp fit --help` for the options.
"""


def packaged_configs() -> list[str]:
    """Names (without ``.yaml``) of the LightningCLI configs installed with the package."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(_CONFIG_DIR) if f.endswith(".yaml"))


def config_path(name: str) -> str:
    """The file of ``--config name``: ``name`` itself when it exists, else the packaged config of that name.

    ``configs/posterior_gap_preset3.yaml``, ``posterior_gap_preset3.yaml`` and ``posterior_gap_preset3`` all
    name the packaged ``lightning_interp/configs/posterior_gap_preset3.yaml``, so the commands of the docs
    work from any folder, not only from a checkout.

    Examples:
        >>> os.path.basename(config_path("configs/posterior_gap_preset3.yaml"))
        'posterior_gap_preset3.yaml'
        >>> config_path("no_such_config.yaml")
        'no_such_config.yaml'
    """
    if os.path.exists(name):
        return name
    stem = os.path.basename(name)
    stem = stem[: -len(".yaml")] if stem.endswith(".yaml") else stem
    packaged = os.path.join(_CONFIG_DIR, f"{stem}.yaml")
    return packaged if os.path.isfile(packaged) else name  # unknown: LightningCLI reports the missing file


def _resolve_configs(args: list[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value mapped through :func:`config_path`."""
    out: list[str] = []
    take = False
    for arg in args:
        if take:
            out.append(config_path(arg))
            take = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            take = True
        elif arg.startswith("--config="):
            out.append("--config=" + config_path(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the descriptions' line breaks and appends every option's default to its help."""


def demo_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-interp demo`` (every option with its help and default)."""
    from lightning_interp.demo import PARTS

    parser = argparse.ArgumentParser(
        prog="lightning-interp demo",
        formatter_class=_HelpFormatter,
        description="Run every callback on the task it suits, logged into one run (offline wandb by default, no "
        "account needed); writes OUT/summary.json, OUT/report.html and PNG figures. The same --seed gives the same "
        "numbers. A quick run: lightning-interp demo --max-steps 100 --epochs 1 --logger csv",
    )
    parser.add_argument("--out", default="demo_out", help="output folder (summary.json, report.html, figures, logs)")
    parser.add_argument("--max-steps", type=int, default=3000, help="training steps per posterior preset")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the saliency, XOR and Potts parts")
    parser.add_argument("--logger", choices=("wandb", "tensorboard", "csv"), default="wandb", help="where the run logs")
    parser.add_argument(
        "--presets",
        type=int,
        nargs="+",
        default=[1, 3],
        choices=(1, 2, 3),
        metavar="P",
        help="posterior-gap presets of Xie (2025): 1, 2 or 3",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
        metavar="PART",
        help=f"which parts to run, of {', '.join(PARTS)}",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models and probes (same seed, same numbers)")
    return parser


def _demo(argv: Sequence[str]) -> None:
    from lightning_interp.demo import run_demo

    parser = demo_parser()
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


_AUDIT_USAGE = (
    "lightning-interp audit (--arch ARCH --weights FILE | --model PKG.CLASS --ckpt FILE | --config YAML [--ckpt FILE])\n"
    "                              --images DIR --out OUT [options]"
)


def audit_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-interp audit``: a flag per field of :class:`~lightning_interp.audit_options.AuditOptions`."""
    from lightning_interp.audit_options import add_arguments

    parser = argparse.ArgumentParser(
        prog="lightning-interp audit",
        usage=_AUDIT_USAGE,
        formatter_class=_HelpFormatter,
        description="Audit a trained classifier on a folder of images with every method that applies; writes "
        "report.html, report.json, CSV tables and PNG figures into --out.",
        epilog="Model forms: --arch resnet50 --weights r50.pth | --arch timm:convnext_tiny --weights m.safetensors | "
        "--model my_pkg.MyModule --ckpt last.ckpt | --config audit.yaml [--ckpt last.ckpt].",
    )
    add_arguments(parser)  # one flag per field of AuditOptions, the keywords of run_audit
    return parser


def _audit(argv: Sequence[str]) -> None:
    from lightning_interp.audit import run_audit
    from lightning_interp.audit_options import AuditOptions

    parser = audit_parser()
    if not argv:  # the whole usage, required groups first, rather than argparse's "--out is required"
        parser.print_help(sys.stderr)
        parser.exit(2, "\nlightning-interp audit: error: give a model (one form), --images and --out\n")
    args = parser.parse_args(list(argv))
    try:
        report = run_audit(AuditOptions.from_cli(args))  # with --config: run_config_audit
    except (FileNotFoundError, ValueError, ModuleNotFoundError, AttributeError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        parser.exit(2, f"lightning-interp audit: error: {message}\n")
    print(summary_lines(report, args.out))


def summary_lines(report: dict, out: str) -> str:
    """The end-of-audit summary: where the files are and the main findings."""
    meta = report["meta"]
    lines = [f"audit of {meta['model']}: wrote {os.path.join(out, 'report.html')} and report.json ({meta['wall_time_s']} s)"]
    if meta.get("preprocessing"):
        lines.append(f"  preprocessing: {meta['preprocessing']}")
    lines += [f"  WARNING: {w}" for w in report.get("warnings", [])]
    if "num_images" in meta:
        acc = meta.get("accuracy")
        lines.append(
            f"  {meta['num_images']} images ({meta['num_skipped']} skipped), {meta['num_classes']} classes"
            + (f", accuracy {acc:.3f}" if acc is not None else ", no labels")
            + f"; feature layer {meta['feature_layer']!r} -> {meta['classifier']!r}"
        )
    for key, section in report.items():
        if key in ("meta", "skipped", "images", "warnings") or not isinstance(section, dict):
            continue
        scalars = section.get("scalars", {})
        shown = ", ".join(f"{k}={v:.3g}" for k, v in list(scalars.items())[:4] if isinstance(v, float) and not k.endswith("_se"))
        note = section.get("notes", [])
        lines.append(f"  {key}: {shown or (note[0] if note else 'no numbers')}")
    return "\n".join(lines)


@contextmanager
def _argv(args: list[str]) -> Iterator[None]:
    """``sys.argv`` set to ``args`` for LightningCLI, which then reads them itself.

    Passing ``args=`` to LightningCLI when ``sys.argv`` also holds arguments (always, under the console
    script) makes Lightning warn about "the args parameter" on every run; reading ``sys.argv`` does not.
    """
    saved = sys.argv
    sys.argv = ["lightning-interp", *args]
    try:
        yield
    finally:
        sys.argv = saved


def _unknown_command(name: str) -> None:
    """Exit 2 naming every subcommand and the closest one to ``name``."""
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    choices = ", ".join(repr(c) for c in COMMANDS)
    sys.stderr.write(
        f"usage: lightning-interp [--version] {{{','.join(COMMANDS)}}} ...\n"
        f"lightning-interp: error: unknown command {name!r}{hint}; choose from {choices}\n"
    )
    raise SystemExit(2)


def _lightning_cli(args: list[str]) -> None:
    """Lightning's ``LightningCLI`` with the project's callbacks, models and datamodules known to ``--help``."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    # Imported so that jsonargparse lists them as known subclasses in `fit --help` (it lists imported ones).
    import lightning_interp.callbacks
    import lightning_interp.datamodules as dms
    import lightning_interp.models  # noqa: F401

    for name in dms.__all__:  # the lazy package: import every datamodule class
        getattr(dms, name)
    # Lightning 2.6's own pytree code warns on torch >= 2.10 on every fit; nothing a user of the command can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    with _argv(_resolve_configs(args)):
        cli = LightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
        )
    from lightning_interp.loggers import finish_logger

    for logger in cli.trainer.loggers:  # close wandb runs so their files are complete when main() returns
        finish_logger(logger)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-interp`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE.replace("{configs}", ", ".join(packaged_configs())))
        return
    if args[0] in ("-V", "--version"):
        from lightning_interp import __version__

        print(f"lightning-interp {__version__}")
        return
    if args[0] == "demo":
        _demo(args[1:])
        return
    if args[0] == "audit":
        _audit(args[1:])
        return
    if args[0] not in _LIGHTNING_COMMANDS:
        _unknown_command(args[0])
    _lightning_cli(args)


if __name__ == "__main__":
    main()
