"""Audit a trained classifier with every method that applies: one command, one report.

``lightning-interp audit --arch resnet50 --weights r50.pth --images DIR --out OUT`` (or ``--arch timm:NAME``,
``--model pkg.Class --ckpt last.ckpt``, ``--config audit.yaml``). The audit is ``Trainer.validate`` with the
library's callbacks measuring once, so every number comes from the same code as during training:

* **saliency** (:class:`~lightning_interp.callbacks.FinalLayerSaliencyCallback`): maps of every image for the
  predicted class, with file name, label, prediction and probability per image;
* **weights**: asymmetric-Laplace fits of the final layer (:func:`~lightning_interp.saliency.fit_ald`);
* **ablation** (:class:`~lightning_interp.callbacks.AblationProbeCallback`): which channels of the last stage
  each class task needs (the classes present in the images, at most ``max_tasks``), with standard errors;
* **correlation** (:class:`~lightning_interp.callbacks.CorrelationOrderCallback`): correlation orders at the
  input of each stage and before the head (classes with enough images);
* **posterior** and **expansion**: with ``--config``, when the datamodule has a generative task or
  categorical inputs (the config names those callbacks).

Without class sub-folders the images have no labels; the methods that need labels then use the model's
predictions (the report says so). The preprocessing is the model form's own unless ``--mean``, ``--std``,
``--resize`` or ``--crop`` say otherwise; it is printed at the start and stated at the top of the report, and
warnings (:func:`number_warnings`) say when the accuracy or the predictions show that the model did not
recognise its inputs.

``OUT`` must be new, empty, or an earlier audit's folder (:func:`check_out`, recognised by :data:`MARKER`), and
neither the image folder nor inside or around it. Under a lock on ``OUT`` everything is written into a staging
folder next to it and moved into place at the end, so a failed, terminated or concurrent run leaves no half
report and an old ``report.json`` never survives next to new maps. ``report.json`` holds a top-level key per
method (and ``meta``, ``warnings``, ``images``, ``skipped``); ``report.html`` the same with figures.

The parts: the options (:class:`~lightning_interp.audit_options.AuditOptions`, declared once for the command and
:func:`run_audit`), the image-folder audit (:mod:`lightning_interp.audit_folder`), the output folder
(:mod:`lightning_interp.audit_files`) and the progress display (:mod:`lightning_interp.audit_progress`). The
methods and their report keys come from :data:`lightning_interp.methods.METHODS`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import warnings
from dataclasses import asdict, fields, replace
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_interp import methods as registry
from lightning_interp.audit_files import MARKER, OutputFolderError, check_out, staged
from lightning_interp.audit_folder import AuditModule, FolderAudit, stage_inputs, write_csv
from lightning_interp.audit_options import AUDIT_METHODS, AuditOptions
from lightning_interp.audit_progress import Progress, progress_mode, say
from lightning_interp.loading import build_model, load_classifier, load_weights
from lightning_interp.loggers import log_table, warn_now
from lightning_interp.report import Section, callback_section, write_html

__all__ = [
    "AUDIT_METHODS",
    "CALLBACK_KEYS",
    "MARKER",
    "METHODS",
    "AuditModule",
    "AuditOptions",
    "OutputFolderError",
    "build_model",
    "check_out",
    "load_weights",
    "number_warnings",
    "run_audit",
    "run_config_audit",
    "stage_inputs",
]

#: The sections of an image-folder audit, in report order (:data:`AUDIT_METHODS`; the name ``METHODS`` is older).
METHODS = AUDIT_METHODS


def _make_logger(use_wandb: bool, staging: str, name: str) -> Any:
    if not use_wandb:
        return False
    from lightning_interp.loggers import make_logger

    return make_logger("wandb", staging, name)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become ``None`` (``report.json`` is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


_HOW_TO_CHANGE = (
    "If the model was trained on other inputs, give its preprocessing: --mean and --std (one value, or one per channel; "
    "--mean 0 --std 1 for pixels in [0, 1]), --resize N|none, --crop N|none."
)


def number_warnings(preds: Tensor, labels: Tensor, top_prob: Tensor, num_classes: int, preprocessing: str) -> list[str]:
    """Warnings that the audit's numbers may mean nothing: the model did not recognise the images.

    Three signs, each a warning naming the preprocessing and the flags that change it: the labelled accuracy is
    within chance (``<= 1/K + 3 SE`` of chance, ``K`` the classes among the labels); one class takes more than
    90% of the predictions (when the labels are not that concentrated themselves); the mean top probability is
    above 0.99 while the accuracy is below 0.5 (confidently wrong).

    Args:
        preds: ``[N]`` predicted classes.
        labels: ``[N]`` labels, ``-1`` where unknown.
        top_prob: ``[N]`` probability of the predicted class.
        num_classes: the model's number of classes.
        preprocessing: the preprocessing used, in words.

    Returns:
        The warnings (empty when none applies).
    """
    found: list[str] = []
    known = labels >= 0
    n_known, n = int(known.sum()), len(preds)
    accuracy = float((preds[known] == labels[known]).float().mean()) if n_known else None
    if accuracy is not None:
        k = len(labels[known].unique())
        if k >= 2:
            chance = 1.0 / k
            bound = chance + 3.0 * math.sqrt(chance * (1 - chance) / n_known)
            if accuracy <= bound:
                found.append(
                    f"accuracy {accuracy:.3f} on {n_known} labelled images is within chance (1/{k} + 3 SE = {bound:.3f})"
                )
    if n >= 10 and num_classes >= 2:
        counts = preds.bincount(minlength=num_classes)
        top = int(counts.argmax())
        share = float(counts[top]) / n
        label_share = float(labels[known].bincount().max()) / n_known if n_known else 0.0
        if share > 0.9 and label_share <= 0.9:
            found.append(f"one class (index {top}) takes {share:.0%} of the {n} predictions")
    if accuracy is not None and accuracy < 0.5 and n_known and float(top_prob[known].mean()) > 0.99:
        found.append(
            f"the mean top probability is {float(top_prob[known].mean()):.3f} while the accuracy is {accuracy:.3f} "
            "(confidently wrong)"
        )
    return [
        f"{reason}: the numbers in this report may describe inputs the model never saw. Preprocessing used: "
        f"{preprocessing}. {_HOW_TO_CHANGE}"
        for reason in found
    ]


def run_audit(options: AuditOptions | None = None, /, **settings: Any) -> dict[str, Any]:
    """Audit a classifier on a folder of images; write ``report.json``, ``report.html`` and figures into ``out``.

    The keywords are the fields of :class:`~lightning_interp.audit_options.AuditOptions` (``arch``, ``weights``,
    ``images``, ``out``, ``methods``, ``limit``, ...: the flags of ``lightning-interp audit``, plus ``channels``,
    ``use_wandb``, ``min_per_class`` and ``progress``); an :class:`AuditOptions` may be given first, the keywords
    then replace its fields. With ``config``, this is :func:`run_config_audit` (``config``, ``out``, ``ckpt``).

    Returns:
        The report (also ``out/report.json``): ``meta``, ``warnings``, ``skipped``, ``images`` and one key per method.

    Raises:
        OutputFolderError: ``out`` is refused (see :func:`check_out`), or another audit is writing into it.
        ValueError: an unknown method, bad weights (empty, truncated, non-finite, another architecture), a bad
            preprocessing argument, no readable image.
        FileNotFoundError: a missing weights file or image folder.
        TypeError: a keyword that is no option (the message lists them).
    """
    from lightning_interp.datamodules.images import ImageFolderDataModule

    if options is None:
        options = AuditOptions.from_keywords(**settings)
    elif settings:
        AuditOptions.from_keywords(**settings)  # names the unknown keywords
        options = replace(options, **settings)
    if options.config is not None:
        return run_config_audit(options.config, options.out, ckpt=options.ckpt)
    o = options
    unknown = set(o.methods) - set(AUDIT_METHODS)
    if unknown:
        raise ValueError(f"unknown audit methods {sorted(unknown)}; choose from {', '.join(AUDIT_METHODS)}")
    if o.images is None:
        raise ValueError("give the images to audit: --images DIR (or use --config for a datamodule)")
    if not os.path.isdir(o.images):
        raise FileNotFoundError(f"image folder not found: {o.images}")
    check_out(o.out, o.images)  # before anything is written
    start = time.perf_counter()
    loaded = load_classifier(
        arch=o.arch, weights=o.weights, model=o.model, ckpt=o.ckpt, image_size=o.image_size, channels=o.channels,
        resize=o.resize, crop=o.crop, mean=o.mean, std=o.std,
    )  # fmt: skip
    mode = progress_mode(o.progress)
    description = loaded.preprocessing.description
    with staged(o.out, loaded.source) as staging:
        if mode != "off":  # once --out is ours: a refused run prints its one error line only
            say(f"{loaded.source}, {loaded.num_classes} classes; preprocessing: {description}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm = ImageFolderDataModule(
                o.images,
                transform=loaded.preprocessing.transform,
                limit=o.limit,
                batch_size=o.batch_size,
                class_names=loaded.class_names,
                num_classes=loaded.num_classes,
                progress=mode == "bar",
            )
            dm.setup()
        for w in caught:  # show the skipped files once, then list them in the report
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if mode == "log":
            say(f"read {len(dm.files)} images ({len(dm.skipped)} skipped) from {o.images}")
        audit = FolderAudit(loaded, dm, staging, o, Progress(mode, [m for m in AUDIT_METHODS if m in o.methods]))
        logger = _make_logger(o.use_wandb, staging, f"audit-{loaded.source.split()[-1]}")
        sections = audit.run(logger, o.device)
        rows = getattr(audit, "rows", None) or audit.image_rows(None)
        labelled = [r for r in rows if r["label"]]
        assert dm.labels is not None  # set by setup()
        found = number_warnings(audit.preds, dm.labels, audit.probs.max(1).values, loaded.num_classes, description)
        if loaded.guessed:
            found.insert(0, f"{loaded.guessed}. {_HOW_TO_CHANGE}")
        for message in found:
            say(f"warning: {message}")
        meta = {
            "model": loaded.source,
            "files": [os.path.abspath(f) for f in loaded.files],
            "images": os.path.abspath(o.images),
            "num_images": len(rows),
            "num_skipped": len(dm.skipped),
            "num_classes": loaded.num_classes,
            "preprocessing": description,
            "feature_layer": audit.saliency.feature_layer,
            "classifier": audit.saliency.classifier,
            "closed_form": bool(audit.saliency.uses_closed_form),
            "accuracy": sum(r["label"] == r["predicted"] for r in labelled) / len(labelled) if labelled else None,
            "ablation_tasks": getattr(audit, "tasks", []),
            "method_seconds": audit.seconds,
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        report = _write_outputs(staging, meta, sections, rows, [asdict(s) for s in dm.skipped], found)
        if logger:
            _log_tables(logger, rows, meta)
            from lightning_interp.loggers import finish_logger

            finish_logger(logger)
    return report


# The keywords run_audit takes, for help() and IDEs: the fields of AuditOptions, each with its default.
run_audit.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("options", inspect.Parameter.POSITIONAL_ONLY, default=None, annotation="AuditOptions | None")]
    + [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(AuditOptions)
    ],
    return_annotation="dict[str, Any]",
)


def _write_outputs(
    staging: str,
    meta: dict[str, Any],
    sections: list[Section],
    rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    found: list[str],
) -> dict[str, Any]:
    write_csv(os.path.join(staging, "images.csv"), rows)
    report: dict[str, Any] = {"meta": meta, "warnings": found, "skipped": skipped, "images": rows}
    report.update({s.key: s.to_json() for s in sections})
    report = _clean(report)
    with open(os.path.join(staging, "report.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=False, default=str)
    skipped_section = Section(
        "skipped",
        "Skipped files",
        "Files in the image folder that could not be read are listed here with the reason; the audit used the others.",
        tables=[("Skipped files", ["file", "reason"], [[s["file"], s["reason"]] for s in skipped])] if skipped else [],
        notes=[] if skipped else ["No file was skipped."],
    )
    shown = {k: v for k, v in meta.items() if k != "files"}
    write_html(
        staging, f"lightning-interp audit: {meta['model']}", [*sections, skipped_section], meta=shown, warnings=found,
        preprocessing=meta["preprocessing"],
    )  # fmt: skip
    return report


def _log_tables(logger: Any, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if rows:
        columns = list(rows[0])
        log_table([logger], "audit/images", columns, [[r.get(c) for c in columns] for r in rows], None, "audit", warn_now)
    if meta["accuracy"] is not None:
        logger.log_metrics({"audit/accuracy_all": meta["accuracy"]})


#: Report keys of the callbacks a config may name, by class name: each method's ``part`` (from
#: :data:`lightning_interp.methods.METHODS`; ``posterior`` for ``PosteriorGapCallback``).
CALLBACK_KEYS: dict[str, str] = {m.callback_name: m.part for m in registry.METHODS}


def _report_key(callback: Any) -> str:
    """The report key of a config's callback: its method's ``part``, else its prefix (a callback no record names)."""
    record = registry.for_callback(callback)
    return record.part if record is not None else str(callback.prefix)


def run_config_audit(config: str, out: str = "audit_out", ckpt: str | None = None) -> dict[str, Any]:
    """Audit what a LightningCLI config names: its model, its datamodule and its lightning-interp callbacks.

    The config is the one ``lightning-interp fit --config`` takes (``model``, ``data``, ``trainer.callbacks``);
    the audit runs ``trainer.validate`` once (with ``ckpt`` when given) and every lightning-interp callback
    measures once. Figures go into ``out/figures/<method>`` unless a callback sets ``figure_dir``.

    Raises:
        ValueError: the config names no lightning-interp callback, or the checkpoint is bad.
    """
    from lightning.pytorch.cli import LightningCLI

    from lightning_interp.callbacks.base import InterpretabilityCallback
    from lightning_interp.loggers import finish_logger

    if ckpt is not None:
        load_weights(ckpt)  # empty, truncated and non-finite files fail here, naming the file
    check_out(out)  # before anything is written
    start = time.perf_counter()
    with staged(out, config) as staging:
        cli = LightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", config, f"--trainer.default_root_dir={staging}"],
            save_config_callback=None,
        )
        data = type(cli.datamodule).__name__ if cli.datamodule is not None else None
        preprocessing = f"the validation transforms of the config's datamodule ({data})"
        say(f"{type(cli.model).__name__}; preprocessing: {preprocessing}")
        trainer_callbacks: list[Any] = cli.trainer.callbacks  # type: ignore[attr-defined]
        callbacks = [cb for cb in trainer_callbacks if isinstance(cb, InterpretabilityCallback)]
        if not callbacks:
            raise ValueError(
                f"{config} names no lightning-interp callback under trainer.callbacks: add e.g. "
                "lightning_interp.callbacks.FinalLayerSaliencyCallback there"
            )
        keys: dict[str, int] = {}
        for cb in callbacks:
            key = _report_key(cb)
            keys[key] = keys.get(key, 0) + 1
            if cb.figure_dir is None:
                cb.figure_dir = os.path.join(staging, "figures", key if keys[key] == 1 else f"{key}{keys[key]}")
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)
        sections, seen = [], set()
        for cb in callbacks:
            key = _report_key(cb)
            key = key if key not in seen else cb.prefix.replace("/", "_")
            seen.add(key)
            sections.append(callback_section(cb, staging, key=key))
        meta = {
            "model": type(cli.model).__name__,
            "config": os.path.abspath(config),
            "checkpoint": os.path.abspath(ckpt) if ckpt else None,
            "data": data,
            "preprocessing": preprocessing,
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        report = _clean({"meta": meta, "warnings": [], **{s.key: s.to_json() for s in sections}})
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(report, f, indent=2, allow_nan=False, default=str)
        write_html(staging, f"lightning-interp audit: {meta['model']}", sections, meta=meta, preprocessing=preprocessing)
        for logger in cli.trainer.loggers:
            finish_logger(logger)
    return report
