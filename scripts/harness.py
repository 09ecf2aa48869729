"""What the benchmark and reproduction scripts share: arguments, clock and machine metadata, tables, results files.

Every script in ``scripts/`` runs from the repository root (``.venv/bin/python scripts/<name>.py``), has
``main(argv: list[str] | None = None)``, writes ``results.md`` (its tables) and ``results.json`` (every number,
with ``config`` and ``machine``) into ``--out``, and has ``--quick``: a smoke run of a few seconds through the
real code path at tiny sizes, which ``tests/test_scripts.py`` runs in-process. Figures are built with
:func:`lightning_interp.plotting.subplots` (no pyplot, so no backend is chosen) and written with
:func:`save_figure`. A new script (add it to ``HEADERS`` in ``tests/test_scripts.py``)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
    import harness

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        parser = harness.parser(__doc__, "outputs/my_script", seed="seed of the weights", threads="torch threads")
        parser.add_argument("--size", type=int, default=4096, help="problem size")
        args = harness.parse(parser, argv, quick={"size": 16})
        run = harness.start(args)  # sets the threads; starts the clock and reads the load average
        table = harness.markdown_table(["size", "seconds"], [[args.size, f"{measure(args.size):.3f}"]], align="rr")
        print(table)
        return harness.write_results(args.out, table, {"config": harness.config(args), "machine": run.stop()})
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

#: Lightning's messages about data loaders, accelerators and loops that the scripts' setups trigger by design.
LIGHTNING_NOISE = (
    ".*does not have many workers.*",
    ".*The number of training batches.*",
    ".*GPU available.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
    ".*treespec.*",
)


def parser(doc: str, out: str, seed: str | None = None, threads: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--quick``, ``--out`` and, where their help is given, ``--seed`` (0) and ``--threads`` (1).

    Args:
        doc: the script's docstring (its first paragraph describes the script in ``--help``).
        out: the default output folder.
        seed: help of ``--seed`` (``None``: no ``--seed``).
        threads: help of ``--threads``, torch's intra-op threads (``None``: no ``--threads``).
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run of a few seconds: tiny sizes (overrides them), same outputs")
    p.add_argument("--out", type=Path, default=Path(out), help="output folder (results.md, results.json, figures)")
    if seed is not None:
        p.add_argument("--seed", type=int, default=0, help=seed)
    if threads is not None:
        p.add_argument("--threads", type=int, default=1, help=threads)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the attributes in ``quick`` replace the parsed values."""
    args = p.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    return args


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as a JSON-ready dict (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def fmt_load(load: Sequence[float]) -> str:
    """A load average ``(1, 5, 15 min)`` as ``"a/b/c"``."""
    return "/".join(f"{v:.2f}" for v in load)


class Run:
    """The clock of one run, with the machine and its load average at the start and at :meth:`stop`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loadavg_start = os.getloadavg()
        self.meta: dict[str, Any] = {}

    def seconds(self) -> float:
        """Wall seconds since the start."""
        return time.perf_counter() - self.start

    def stop(self) -> dict[str, Any]:
        """Freeze and return the metadata: torch version, threads, machine, load average at start and end, wall seconds."""
        self.meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "loadavg_start": self.loadavg_start,
            "loadavg_end": os.getloadavg(),
            "wall_s": self.seconds(),
        }
        return self.meta

    def describe(self) -> str:
        """One line of the metadata (stopping the run first if :meth:`stop` was not called)."""
        m = self.meta or self.stop()
        return (
            f"torch {m['torch']}, {m['threads']} thread(s), {m['machine']}; load average (1/5/15 min) "
            f"{fmt_load(m['loadavg_start'])} at start, {fmt_load(m['loadavg_end'])} at end; wall {m['wall_s']:.1f} s"
        )


def start(args: argparse.Namespace) -> Run:
    """Set torch's threads to ``args.threads`` (where the script has it) and start the clock."""
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return Run()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` (default) or ``r``; cells are ``str()``-ed."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align.ljust(len(header), "l")) + "|"
    return "\n".join([line(header), sep, *map(line, rows)])


def _jsonable(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)  # tensors and numpy values; else the text


def write_results(out: Path, table_md: str, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/results.md`` (``table_md``) and ``out/results.json`` (``data``; tensors as lists), creating ``out``.

    Returns:
        ``data``, for ``main`` to return.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table_md.rstrip("\n") + "\n")
    (out / "results.json").write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return data


def save_figure(fig: Any, path: Path, dpi: int = 110, **kwargs: Any) -> None:
    """Save a matplotlib figure to ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **kwargs)


def quiet_lightning() -> None:
    """Lightning's loggers at ERROR and its :data:`LIGHTNING_NOISE` warnings ignored (process-wide)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=message)


def epoch_bar(desc: str, total: int) -> Any:
    """A Lightning callback: one tqdm bar per fit, advanced every epoch, showing the last ``train/loss``."""
    import lightning.pytorch as pl

    class EpochBar(pl.Callback):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.3f}")
            self.bar.update(1)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.bar.close()

    return EpochBar()
