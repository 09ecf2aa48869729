"""Loggers: making and closing the run the demo, the audit and ``lightning-interp fit`` log into.

The one home of logger handling shared by the callbacks, the audit and the demo.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["finish_logger", "make_logger"]


def make_logger(kind: str, out: str, name: str) -> Any:
    """A wandb (offline unless ``WANDB_MODE=online``), TensorBoard or CSV logger.

    Raises:
        ModuleNotFoundError: ``kind="tensorboard"`` when neither ``tensorboard`` nor ``tensorboardX`` is
            installed (install the ``tensorboard`` extra: ``pip install 'lightning-interp[tensorboard]'``).
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if kind == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project="lightning-interp-demo", name=name, save_dir=out, offline=os.environ["WANDB_MODE"] != "online")
    if kind == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ModuleNotFoundError(
                "the tensorboard logger needs `tensorboard` (or `tensorboardX`), which is not installed: "
                "pip install 'lightning-interp[tensorboard]' (or pip install tensorboard)"
            )
        return TensorBoardLogger(save_dir=out, name=name)
    if kind == "csv":
        return CSVLogger(save_dir=out, name=name)
    raise ValueError(f"unknown logger {kind!r}: choose wandb, tensorboard or csv")


def finish_logger(logger: Any) -> None:
    """Close a logger's run so its files are complete."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        if logger._experiment is not None:
            logger.experiment.finish()
    else:
        logger.finalize("success")
