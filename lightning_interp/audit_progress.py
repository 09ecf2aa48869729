"""What an audit shows while it runs: a bar per method in a terminal, one line per method in a log, or nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

__all__ = ["Progress", "Tick", "progress_mode", "say"]


def say(message: str) -> None:
    """One line on stderr (where the bars go), so a log of the audit shows what it is doing."""
    print(f"lightning-interp audit: {message}", file=sys.stderr, flush=True)


class Progress:
    """What the audit shows while it runs: bars in a terminal, one line per method in a log, or nothing.

    In a terminal each method has its own bar, advanced by the images that pass through the network (a forward
    pre-hook on its first layer with parameters), so it moves while the method measures.

    Args:
        mode: ``"bar"``, ``"log"`` or ``"off"``.
        methods: the methods, in the order they run.
    """

    def __init__(self, mode: str, methods: Sequence[str]) -> None:
        self.mode, self.methods = mode, list(methods)
        self.current: str | None = None
        self.started = 0.0
        self.seconds: dict[str, float] = {}
        self.bar: Any = None
        self.handle: Any = None

    def attach(self, model: nn.Module) -> None:
        """Count the images through ``model``'s first layer with parameters (bars only)."""
        if self.mode != "bar":
            return
        first = next((m for m in model.modules() if next(m.children(), None) is None and any(True for _ in m.parameters())), None)
        if first is not None:
            self.handle = first.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.bar is not None and args and isinstance(args[0], Tensor) and args[0].ndim > 0:
            self.bar.update(int(args[0].shape[0]))

    def mcmc_step(self) -> None:
        """One MCMC step of the ablation: its chains pass no images, so from its first step the bar counts steps."""
        if self.bar is None:
            return
        if self.bar.unit != "step":
            self.bar.unit = "step"
            self.bar.reset(total=None)
        self.bar.update(1)

    def start(self, name: str, counted: bool = True) -> None:
        """``name`` begins: a new bar (when it passes images through the network), or nothing until its end in a log."""
        self.current, self.started = name, time.perf_counter()
        if self.mode == "bar" and counted:
            from tqdm import tqdm

            position = self.methods.index(name) + 1 if name in self.methods else 0
            self.bar = tqdm(desc=f"{name} ({position}/{len(self.methods)})", unit="image", leave=True)

    def end(self) -> None:
        """The method begun last is done: its time, and its line in a log."""
        if self.current is None:
            return
        name, seconds = self.current, time.perf_counter() - self.started
        self.seconds[name] = round(seconds, 3)
        if self.bar is not None:
            self.bar.set_postfix_str(f"done in {seconds:.1f} s")
            self.bar.close()
            self.bar = None
        if self.mode == "log":
            position = self.methods.index(name) + 1 if name in self.methods else 0
            say(f"{name} done in {seconds:.1f} s ({position}/{len(self.methods)} methods)")
        self.current = None

    def close(self) -> None:
        """Remove the hook and close a bar left open (an error mid-method)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Tick(pl.Callback):
    """Between two methods in the callback list: end the one before, start the next (Lightning keeps list order)."""

    def __init__(self, progress: Progress, after: str | None, before: str | None) -> None:
        self.progress, self.after, self.before = progress, after, before

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.after is not None:
            self.progress.end()
        if self.before is not None:
            self.progress.start(self.before)


def progress_mode(progress: bool | None) -> str:
    """``"bar"``, ``"log"`` or ``"off"`` for ``run_audit(progress=...)`` (``None``: bars in a terminal, else lines)."""
    if progress is None:
        return "bar" if sys.stderr.isatty() else "log"
    return "bar" if progress else "off"
