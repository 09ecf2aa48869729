"""Loggers: making and closing the run the demo, the audit and ``lightning-interp fit`` log into, and logging to it.

The one home of logger handling shared by the callbacks, the audit and the demo:

* :func:`make_logger` / :func:`finish_logger` open and close a wandb, TensorBoard or CSV run;
* :func:`log_scalars` sends scalars to every logger and to ``trainer.callback_metrics`` (where
  ``EarlyStopping`` and ``ModelCheckpoint`` read them) and the chosen ones to the progress bar;
* :func:`log_figure` and :func:`log_table` send a figure or a table to the loggers that take them (wandb,
  TensorBoard; :func:`takes_images`), and call ``warn`` for the others; :func:`write_figure` writes a PNG
  into a folder or URL (:func:`figure_filesystem`).

Lightning, matplotlib and fsspec are imported on first use, so ``lightning-interp --help`` stays fast.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import numpy as np

__all__ = [
    "figure_filesystem",
    "finish_logger",
    "log_figure",
    "log_media",
    "log_scalars",
    "log_table",
    "make_logger",
    "markdown_table",
    "no_images_message",
    "no_tables_message",
    "takes_images",
    "warn_now",
    "write_figure",
]

#: Called with ``(tag, message)`` for a logger that cannot take a figure or a table (a caller warns once per tag).
Warn = Callable[[str, str], None]


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


def warn_now(tag: str, message: str) -> None:
    """A :data:`Warn` for one-off logging (the audit's): every message as a ``UserWarning``, the tag unused."""
    warnings.warn(message, stacklevel=3)


def takes_images(logger: Any) -> bool:
    """Whether ``logger`` takes images and tables (a ``WandbLogger`` or a ``TensorBoardLogger``)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    return isinstance(logger, (WandbLogger, TensorBoardLogger))


def no_images_message(who: str, logger: Any) -> tuple[str, str]:
    """``(tag, message)`` of the warning that ``logger`` cannot take ``who``'s figures."""
    return (
        f"img-{type(logger).__name__}",
        f"{who}: {type(logger).__name__} cannot take images, so figures are not logged to it"
        " (use WandbLogger or TensorBoardLogger, or set figure_dir=... to write PNG files).",
    )


def no_tables_message(who: str, logger: Any) -> tuple[str, str]:
    """``(tag, message)`` of the warning that ``logger`` cannot take ``who``'s tables."""
    return (
        f"table-{type(logger).__name__}",
        f"{who}: {type(logger).__name__} cannot take tables, so tables are not logged to it"
        " (use WandbLogger or TensorBoardLogger).",
    )


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int, prog_bar: Iterable[str] = ()) -> None:
    """Log ``metrics`` (full keys) to every logger at ``step``, to ``trainer.callback_metrics`` and, for the keys
    in ``prog_bar``, to the progress bar.

    A NaN is a result: it is logged as NaN, so ``EarlyStopping(check_finite=True)`` sees it.
    """
    import torch

    metrics = dict(metrics)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    # the same numbers on every rank, so monitors (EarlyStopping, ModelCheckpoint) agree across ranks
    callback_metrics, bar = trainer.callback_metrics, trainer.progress_bar_metrics
    for key, value in metrics.items():
        callback_metrics[key] = torch.tensor(value)
    for key in prog_bar:
        if key in metrics:
            bar[key] = metrics[key]


def figure_filesystem(figure_dir: str, who: str = "figure_dir") -> tuple[Any, str]:
    """The fsspec filesystem and path of ``figure_dir`` (a local path, or a URL such as ``s3://bucket/run``).

    Raises:
        ValueError: a URL whose protocol fsspec does not know or whose package is not installed (``s3://``
            needs ``s3fs``, ``gs://`` needs ``gcsfs``); the message names it.
    """
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(figure_dir)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"{who}: cannot write figures to figure_dir={figure_dir!r}: {err}. Install the filesystem's package "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://) or give a local folder."
        ) from err


def write_figure(figure_dir: str, key: str, image: np.ndarray, step: int, who: str = "figure_dir") -> None:
    """Write ``image`` (``[H, W, C]`` uint8) as ``<key>_step<step>.png`` into ``figure_dir`` (a folder or a URL).

    The key's characters other than letters, digits, ``_``, ``.`` and ``-`` become ``_``.
    """
    from lightning_interp.plotting import array_to_png

    # through fsspec, so a URL (s3://, gs://, memory://) writes there rather than to a local folder "s3:"
    fs, root = figure_filesystem(str(figure_dir), who)
    fs.makedirs(root, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
    with fs.open(f"{root.rstrip('/')}/{name}_step{step:06d}.png", "wb") as f:
        f.write(array_to_png(image))


def log_figure(loggers: Iterable[Any], key: str, image: np.ndarray, step: int | None, who: str, warn: Warn) -> None:
    """Send ``image`` (``[H, W, C]`` uint8, e.g. :func:`~lightning_interp.plotting.figure_to_array`) to the loggers
    that take images under ``key``; ``warn`` for each other logger (:func:`no_images_message`)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
        else:
            warn(*no_images_message(who, logger))


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (floats with 4 significant digits), as TensorBoard's text panel shows it."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_table(
    loggers: Iterable[Any], key: str, columns: list[str], rows: list[list[Any]], step: int | None, who: str, warn: Warn
) -> None:
    """Send a table to the loggers that take tables (wandb's table, TensorBoard's text as :func:`markdown_table`)
    under ``key``; ``warn`` for each other logger (:func:`no_tables_message`)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
        else:
            warn(*no_tables_message(who, logger))


def log_media(
    loggers: Sequence[Any],
    prefix: str,
    step: int,
    figures: Callable[[], Mapping[str, Any]] | None,
    tables: Callable[[], Mapping[str, tuple[list[str], list[list[Any]]]]],
    *,
    figure_dir: str | None,
    log_images: bool,
    who: str,
    warn: Warn,
) -> float:
    """Log a measurement's figures and tables under ``prefix/<key>``; the seconds the figures took.

    Figures cost far more than most measurements: ``figures()`` is called (and its figures rendered) only when
    something takes them (``figure_dir``, or ``log_images`` and a logger that takes images); ``figures=None``
    renders none (the budget's choice). Without rendering, ``log_images`` warns for each logger. Tables are
    built only when there is a logger.

    Args:
        loggers: the trainer's loggers.
        prefix: the callback's key prefix.
        step: the step to log at.
        figures: the figures by key, rendered on call; ``None``: render none.
        tables: the tables by key, ``(columns, rows)``.
        figure_dir: also write each figure as a PNG there (:func:`write_figure`).
        log_images: send the figures to the loggers that take images.
        who: the callback's name, for the warnings.
        warn: called with ``(tag, message)`` for each logger that cannot take a figure or a table.
    """
    from lightning_interp.plotting import figure_to_array

    seconds = 0.0
    if figures is not None and (figure_dir or (log_images and any(takes_images(logger) for logger in loggers))):
        start = time.perf_counter()
        for key, fig in figures().items():
            image = figure_to_array(fig)
            if figure_dir:
                write_figure(str(figure_dir), f"{prefix}/{key}", image, step, who)
            if log_images:
                log_figure(loggers, f"{prefix}/{key}", image, step, who, warn)
        seconds = time.perf_counter() - start
    elif log_images:
        # figures skipped by the budget are not a logger's fault: warn only for those that cannot take images
        for logger in loggers:
            if not takes_images(logger):
                warn(*no_images_message(who, logger))
    if loggers:
        for key, (columns, rows) in tables().items():
            log_table(loggers, f"{prefix}/{key}", columns, rows, step, who, warn)
    return seconds
