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
predictions (the report says so). Everything is written into a staging folder next to ``OUT`` and moved into
place at the end, so a failed run leaves no half report and an old ``report.json`` never survives next to new
maps. ``report.json`` holds a top-level key per method; ``report.html`` the same with figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.loading import LoadedClassifier, build_model, load_classifier, load_weights
from lightning_interp.report import INTROS, Section, callback_section, write_html

__all__ = [
    "CALLBACK_KEYS",
    "METHODS",
    "AuditModule",
    "build_model",
    "load_weights",
    "run_audit",
    "run_config_audit",
    "stage_inputs",
]

#: The name under which :class:`AuditModule` registers the wrapped classifier itself.
NET_NAME = "audited_classifier"

#: The methods of an image-folder audit, in report order.
METHODS: tuple[str, ...] = ("saliency", "weights", "ablation", "correlation")


class AuditModule(pl.LightningModule):
    """A classifier as a ``LightningModule`` for ``Trainer.validate``, with the classifier's own layer names.

    The classifier's children (and its own parameters and buffers) are registered directly on this module, so
    ``named_modules()`` paths are the ones the user wrote (``layer4``, ``fc``), not ``model.layer4``.

    Args:
        net: a module whose forward returns logits ``[N, K]``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        for name, param in net.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in net.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        # registered last, so named_modules() (which skips repeats) lists the children under their own names; as a
        # submodule, torch.fx can trace through it and split the network at a layer (the ablation's fast path)
        self.add_module(NET_NAME, net)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, NET_NAME)(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        known = y >= 0
        if bool(known.any()):
            acc = (self(x[known]).argmax(1) == y[known]).float().mean()
            self.log("audit/accuracy", acc, batch_size=int(known.sum()))


def stage_inputs(model: nn.Module, feature_layer: str) -> list[str]:
    """Layers whose outputs are the inputs of the model's stages, then ``feature_layer`` (before the head).

    A stage is a top-level child that is an ``nn.Sequential`` with parameters (ResNet's ``layer1..4``); the
    input of a stage is the output of the child before it. Models without such stages get ``[feature_layer]``.
    """
    children = list(model.named_children())
    layers = []
    for i, (_name, child) in enumerate(children):
        if i > 0 and isinstance(child, nn.Sequential) and any(True for _ in child.parameters()):
            layers.append(children[i - 1][0])
    if feature_layer in layers:
        layers.remove(feature_layer)
    return [*layers, feature_layer]


def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


def _balanced_subset(labels: Tensor, keep: Tensor, cap: int | None) -> Tensor:
    """``keep`` thinned to at most ``cap`` images, the same number (the first ones) from each kept class.

    Each class keeps ``cap // classes`` images (at least its own minimum: the classes' smallest count
    when that is more); when that is over the cap, the most frequent classes come first.
    """
    if cap is None or int(keep.sum()) <= cap:
        return keep
    classes, counts = labels[keep].unique(return_counts=True)
    order = counts.argsort(descending=True, stable=True)
    classes, counts = classes[order], counts[order]
    per = max(int(counts.min()), cap // len(classes))
    classes = classes[: max(1, cap // per)]  # the most frequent classes that fit
    out = torch.zeros_like(keep)
    for c in classes.tolist():
        idx = torch.nonzero(keep & (labels == c)).flatten()[:per]
        out[idx] = True
    return out


def _publish(staging: str, out: str) -> None:
    """Replace ``out`` by ``staging`` (an old report never survives next to new files)."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".audit-old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _make_logger(use_wandb: bool, staging: str, name: str) -> Any:
    if not use_wandb:
        return False
    from lightning_interp.demo import make_logger

    return make_logger("wandb", staging, name)


class _Tick(pl.Callback):
    """Advance the methods' progress bar, and clock the method before it in the callback list."""

    def __init__(self, bar: Any, name: str, clock: dict[str, float]) -> None:
        self.bar, self.name, self.clock = bar, name, clock

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(self.name)
            self.bar.update(1)
        self.clock[self.name] = now - self.clock.pop("_last", now)
        self.clock["_last"] = now


class _FolderAudit:
    """The image-folder audit: builds the callbacks, runs ``Trainer.validate``, turns the results into sections."""

    def __init__(self, loaded: LoadedClassifier, dm: Any, staging: str, methods: Sequence[str], options: dict[str, Any]) -> None:
        self.loaded, self.dm, self.staging, self.methods, self.options = loaded, dm, staging, list(methods), options
        self.notes: dict[str, list[str]] = {m: [] for m in METHODS}
        self.module = AuditModule(loaded.model)
        k = loaded.num_classes
        folder_names = sorted(set(dm.folders) - {""})
        self.names = loaded.class_names or (folder_names if len(folder_names) == k else [f"class {i}" for i in range(k)])

    def figure_dir(self, method: str) -> str:
        return os.path.join(self.staging, "figures", method)

    def run(self, logger: Any, device: str | None) -> list[Section]:
        import lightning.pytorch as pl

        from lightning_interp.saliency import FinalLayerSaliency

        x = self.dm.inputs
        accelerator = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
        self.module.to(accelerator)
        logits = _logits(self.module, x, self.options["batch_size"])  # the one forward pass the rows share
        self.probs = logits.softmax(1).cpu()
        self.preds = self.probs.argmax(1)
        labels = self.dm.labels if self.dm.labelled else self.preds
        if not self.dm.labelled:
            for m in ("ablation", "correlation"):
                self.notes[m].append(
                    "The images have no class labels (no class sub-folders matching the model's classes): the model's "
                    "predictions stand in for labels, so accuracies measure agreement with the unablated model."
                )
        saliency = FinalLayerSaliency(self.module, min_size=self.options["min_size"])
        saliency.resolve(x[:2].to(accelerator))
        self.saliency = saliency
        callbacks = self.callbacks(x, labels, saliency.feature_layer)
        from tqdm import tqdm

        bar = tqdm(total=len(callbacks), desc="audit methods", unit="method", disable=not self.options["progress"])
        self.seconds: dict[str, float] = {}
        ticking: list[pl.Callback] = [_Tick(None, "_start", self.seconds)]
        for name, cb in callbacks.items():  # Lightning calls callbacks in list order: a tick after each method
            ticking += [cb, _Tick(bar, name, self.seconds)]
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            logger=logger,
            callbacks=ticking,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.options["progress"],
            default_root_dir=self.staging,
        )
        try:
            trainer.validate(self.module, dataloaders=self.dm.val_dataloader(), verbose=False)
        finally:
            bar.close()
        self.seconds = {k: round(v, 3) for k, v in self.seconds.items() if not k.startswith("_")}
        return self.sections(callbacks, logger)

    def callbacks(self, x: Tensor, labels: Tensor, feature_layer: str | None) -> dict[str, Any]:
        from lightning_interp import callbacks as cbs

        n, seed = len(x), self.options["seed"]
        once = dict(every_n_epochs=None, measure_at_end=False, budget=None, seed=seed)
        out: dict[str, Any] = {}
        if "saliency" in self.methods:
            out["saliency"] = cbs.FinalLayerSaliencyCallback(
                probe=(x, labels),
                probe_size=n,
                min_size=self.options["min_size"],
                deletion_images=self.options["deletion_images"],
                class_names=self.names,
                figure_dir=self.figure_dir("saliency"),
                **once,
            )
        present = labels.bincount(minlength=self.loaded.num_classes)
        if "ablation" in self.methods and feature_layer is not None:
            tasks = present.argsort(descending=True)[: self.options["max_tasks"]]
            tasks = sorted(int(t) for t in tasks if present[t] > 0)
            self.tasks = [self.names[t] for t in tasks]
            if int((present > 0).sum()) > len(tasks):
                self.notes["ablation"].append(
                    f"Class tasks: the {len(tasks)} most frequent classes of the images (max_tasks={self.options['max_tasks']})."
                )
            out["ablation"] = cbs.AblationProbeCallback(
                num_steps=self.options["ablation_steps"],
                burn_in=self.options["ablation_steps"] // 10,
                layers=[feature_layer],
                probe=(x, labels),
                probe_size=n,
                tasks=tasks,
                class_names=self.names,
                figure_dir=self.figure_dir("ablation"),
                **once,
            )
        if "correlation" in self.methods and feature_layer is not None:
            need = self.options["min_per_class"]
            keep = present[labels] >= need
            if int((present >= need).sum()) < 2:
                self.notes["correlation"].append(
                    f"Skipped: correlation orders need at least two classes with {need} images each (min_per_class); "
                    f"the largest classes here have {sorted(present.tolist(), reverse=True)[:3]} images."
                )
            else:
                keep = _balanced_subset(labels, keep, self.options["correlation_images"])
                if not bool(keep.all()):
                    self.notes["correlation"].append(
                        f"Measured on {int(keep.sum())} images of {len(labels[keep].unique())} classes: classes with at "
                        f"least {need} images (min_per_class), at most {self.options['correlation_images']} images in "
                        "all (correlation_images), the same number from each class."
                    )
                out["correlation"] = cbs.CorrelationOrderCallback(
                    layers=stage_inputs(self.module, feature_layer),
                    probe=(x[keep], labels[keep]),
                    probe_size=int(keep.sum()),
                    min_per_class=need,
                    figure_dir=self.figure_dir("correlation"),
                    **once,
                )
        return out

    def sections(self, callbacks: dict[str, Any], logger: Any) -> list[Section]:
        sections = []
        for method in self.methods:
            if method == "weights":
                sections.append(self.weights_section(logger))
                continue
            cb = callbacks.get(method)
            if cb is None:
                title = {"ablation": "Bayesian ablation", "correlation": "Correlation orders"}.get(method, method)
                intro_key = {"ablation": "AblationProbeCallback", "correlation": "CorrelationOrderCallback"}.get(method, "")
                sections.append(Section(method, title, " ".join(INTROS.get(intro_key, ("", ""))), notes=self.notes[method]))
                continue
            section = callback_section(cb, self.staging, key=method)
            section.notes += self.notes[method]
            if method == "saliency":
                self.saliency_details(cb, section)
            sections.append(section)
        return sections

    def image_rows(self, cb: Any | None) -> list[dict[str, Any]]:
        """One row per image: file, folder, label, prediction, probability and the per-image saliency numbers."""
        per_image: dict[int, dict[str, float]] = {}
        if cb is not None and cb.last is not None and cb.probe_indices is not None:
            values = cb.last.data["per_image"]
            for j, i in enumerate(cb.probe_indices.tolist()):
                per_image[i] = {name: float(v[j]) for name, v in values.items()}
        rows = []
        for i, file in enumerate(self.dm.files):
            label = int(self.dm.labels[i])
            pred = int(self.preds[i])
            rows.append(
                {
                    "file": file,
                    "folder": self.dm.folders[i],
                    "label": self.names[label] if label >= 0 else "",
                    "predicted": self.names[pred],
                    "predicted_index": pred,
                    "probability": float(self.probs[i, pred]),
                    **per_image.get(i, {}),
                }
            )
        return rows

    def saliency_details(self, cb: Any, section: Section) -> None:
        from lightning_interp.plotting import figure_to_png, saliency_grid

        rows = self.image_rows(cb)
        self.rows = rows
        columns = ["file", "label", "predicted", "probability", "neg_pg_share", "faithfulness_pg"]
        section.tables.append(("Per image", columns, [[r.get(c, float("nan")) for c in columns] for r in rows]))
        # the callback's figure shows the first rows; the report shows every image, 8 per grid, named by file
        section.figures = [f for f in section.figures if not f[0].endswith(".png") or "maps" not in f[0]]
        if cb.last is None or cb.probe_indices is None:
            return
        order = cb.probe_indices.tolist()
        labels = [f"{rows[i]['file']}: {rows[i]['predicted']} {rows[i]['probability']:.2f}" for i in order]
        maps, inputs = cb.last.data["maps"], cb.last.data["inputs"]
        for start in range(0, len(order), 8):
            path = os.path.join(self.figure_dir("saliency"), f"maps_{start // 8:03d}.png")
            with open(path, "wb") as f:
                f.write(figure_to_png(saliency_grid(maps, inputs, rows=8, labels=labels, start=start)))
            section.figures.append(
                (os.path.relpath(path, self.staging), f"saliency maps, images {start + 1}-{min(len(order), start + 8)}")
            )
        section.notes.append(
            "Maps explain the predicted class. Discriminative and confusing maps are in [0, 1]; the policy-gradient map "
            "is divided by its largest magnitude per image."
        )

    def weights_section(self, logger: Any) -> Section:
        from lightning_interp.plotting import ald_figure, figure_to_png
        from lightning_interp.saliency import fit_ald

        head = self.saliency.classifier if hasattr(self, "saliency") else None
        section = Section("weights", "Final-layer weights", " ".join(INTROS["weights"]))
        if head is None:
            section.notes.append("No final nn.Linear found: nothing to fit.")
            return section
        weight = dict(self.module.named_modules())[head].weight.detach().cpu()
        fit = fit_ald(weight)
        rows = fit.rows()
        for r in rows:
            r["class_name"] = self.names[int(r["class"])]
        _write_csv(os.path.join(self.staging, "ald_per_class.csv"), rows)
        os.makedirs(self.figure_dir("weights"), exist_ok=True)
        path = os.path.join(self.figure_dir("weights"), "ald_histogram.png")
        with open(path, "wb") as f:
            f.write(figure_to_png(ald_figure(weight, fit)))
        pos, neg = fit.positive.r2[~fit.positive.r2.isnan()], fit.negative.r2[~fit.negative.r2.isnan()]
        section.scalars = [
            ("joint_r2_positive", float(fit.joint_positive.r2), None),
            ("joint_r2_negative", float(fit.joint_negative.r2), None),
            ("median_r2_positive", float(pos.median()) if pos.numel() else float("nan"), None),
            ("median_r2_negative", float(neg.median()) if neg.numel() else float("nan"), None),
        ]
        section.figures.append((os.path.relpath(path, self.staging), "weight histogram and joint log-rank fits"))
        shown = ["class_name", "pos_r2", "neg_r2", "pos_kappa", "neg_kappa"]
        section.tables.append(
            ("Per class (first 20; all in ald_per_class.csv)", shown, [[r[c] for c in shown] for r in rows[:20]])
        )
        section.notes.append(f"Classifier {head!r}: {weight.shape[0]} classes x {weight.shape[1]} features.")
        if logger:
            from lightning_interp.plotting import png_to_array

            with open(path, "rb") as f:
                logger.log_image(key="audit/ald_histogram", images=[png_to_array(f.read())])
        return section


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become ``None`` (``report.json`` is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run_audit(
    arch: str | None = None,
    weights: str | None = None,
    images: str | None = None,
    out: str = "audit_out",
    model: str | None = None,
    ckpt: str | None = None,
    methods: Sequence[str] = METHODS,
    limit: int | None = None,
    batch_size: int = 16,
    min_size: int = 20,
    max_tasks: int = 20,
    ablation_steps: int = 1000,
    min_per_class: int = 5,
    deletion_images: int | None = 50,
    correlation_images: int | None = 500,
    image_size: int | None = None,
    channels: int | None = None,
    use_wandb: bool = False,
    device: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Audit a classifier on a folder of images; write ``report.json``, ``report.html`` and figures into ``out``.

    Args:
        arch: a torchvision model name or ``"timm:<name>"`` (with ``weights``).
        weights: local weights of ``arch`` (``.pth``/``.ckpt``/``.safetensors``).
        images: a folder of images (flat, or one sub-folder per class).
        out: the output folder (replaced as a whole at the end).
        model: ``package.module.ClassName`` of a ``LightningModule`` (with ``ckpt``).
        ckpt: its Lightning checkpoint.
        methods: a subset of :data:`METHODS`.
        limit: audit at most this many images.
        batch_size: images per forward pass.
        min_size: ``min_size`` of the saliency channel split.
        max_tasks: most ablation class tasks (the most frequent classes among the images).
        ablation_steps: MCMC steps per chain of the ablation (8 chains; a tenth is burn-in).
        min_per_class: fewest images a class needs for the correlation orders.
        deletion_images: the saliency faithfulness (deletion curves, 33 forward passes per image) on the first
            this many images (``None``: all); the maps themselves cover every image.
        correlation_images: the correlation orders on at most this many images, the same number per class
            (``None``: all); each costs about ten forward passes (three surrogate orders at every stage input).
        image_size: override the input size of the preprocessing.
        channels: 1 for grey-scale models (with ``image_size``).
        use_wandb: also log into an offline wandb run (under ``out/wandb``).
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        progress: show progress bars.
        seed: seed of the callbacks' generators.

    Returns:
        The report (also ``out/report.json``): ``meta``, ``skipped``, ``images`` and one key per method.

    Raises:
        ValueError: an unknown method, bad weights (empty, truncated, non-finite), no readable image.
        FileNotFoundError: a missing weights file or image folder.
    """
    from lightning_interp.datamodules.images import ImageFolderDataModule

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown audit methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if images is None:
        raise ValueError("give the images to audit: --images DIR (or use --config for a datamodule)")
    start = time.perf_counter()
    loaded = load_classifier(arch=arch, weights=weights, model=model, ckpt=ckpt, image_size=image_size, channels=channels)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".audit-", dir=parent)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm = ImageFolderDataModule(
                images,
                transform=loaded.preprocessing.transform,
                limit=limit,
                batch_size=batch_size,
                class_names=loaded.class_names,
                num_classes=loaded.num_classes,
            )
            dm.setup()
        for w in caught:  # show the skipped files once, then list them in the report
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        options = dict(
            batch_size=batch_size,
            min_size=min_size,
            max_tasks=max_tasks,
            min_per_class=min_per_class,
            ablation_steps=ablation_steps,
            deletion_images=deletion_images,
            correlation_images=correlation_images,
            progress=progress,
            seed=seed,
        )
        audit = _FolderAudit(loaded, dm, staging, [m for m in METHODS if m in methods], options)
        logger = _make_logger(use_wandb, staging, f"audit-{loaded.source.split()[-1]}")
        sections = audit.run(logger, device)
        rows = getattr(audit, "rows", None) or audit.image_rows(None)
        labelled = [r for r in rows if r["label"]]
        meta = {
            "model": loaded.source,
            "files": [os.path.abspath(f) for f in loaded.files],
            "images": os.path.abspath(images),
            "num_images": len(rows),
            "num_skipped": len(dm.skipped),
            "num_classes": loaded.num_classes,
            "preprocessing": loaded.preprocessing.description,
            "feature_layer": audit.saliency.feature_layer,
            "classifier": audit.saliency.classifier,
            "closed_form": bool(audit.saliency.uses_closed_form),
            "accuracy": sum(r["label"] == r["predicted"] for r in labelled) / len(labelled) if labelled else None,
            "ablation_tasks": getattr(audit, "tasks", []),
            "method_seconds": audit.seconds,
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        report = _write_outputs(staging, meta, sections, rows, [asdict(s) for s in dm.skipped])
        if logger:
            _log_tables(logger, rows, meta)
            from lightning_interp.demo import finish_logger

            finish_logger(logger)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_outputs(
    staging: str, meta: dict[str, Any], sections: list[Section], rows: list[dict[str, Any]], skipped: list[dict[str, str]]
) -> dict[str, Any]:
    _write_csv(os.path.join(staging, "images.csv"), rows)
    report: dict[str, Any] = {"meta": meta, "skipped": skipped, "images": rows}
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
    write_html(staging, f"lightning-interp audit: {meta['model']}", [*sections, skipped_section], meta=shown)
    return report


def _log_tables(logger: Any, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if rows:
        columns = list(rows[0])
        logger.log_table(key="audit/images", columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    if meta["accuracy"] is not None:
        logger.log_metrics({"audit/accuracy_all": meta["accuracy"]})


#: Report keys of the callbacks a config may name.
CALLBACK_KEYS: dict[str, str] = {
    "FinalLayerSaliencyCallback": "saliency",
    "AblationProbeCallback": "ablation",
    "CorrelationOrderCallback": "correlation",
    "PosteriorGapCallback": "posterior",
    "LogitExpansionCallback": "expansion",
}


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
    from lightning_interp.demo import finish_logger

    if ckpt is not None:
        load_weights(ckpt)  # empty, truncated and non-finite files fail here, naming the file
    start = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".audit-", dir=parent)
    try:
        cli = LightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", config, f"--trainer.default_root_dir={staging}"],
            save_config_callback=None,
        )
        callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, InterpretabilityCallback)]
        if not callbacks:
            raise ValueError(
                f"{config} names no lightning-interp callback under trainer.callbacks: add e.g. "
                "lightning_interp.callbacks.FinalLayerSaliencyCallback there"
            )
        keys: dict[str, int] = {}
        for cb in callbacks:
            key = CALLBACK_KEYS.get(type(cb).__name__, cb.prefix)
            keys[key] = keys.get(key, 0) + 1
            if cb.figure_dir is None:
                cb.figure_dir = os.path.join(staging, "figures", key if keys[key] == 1 else f"{key}{keys[key]}")
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)
        sections, seen = [], set()
        for cb in callbacks:
            key = CALLBACK_KEYS.get(type(cb).__name__, cb.prefix)
            key = key if key not in seen else cb.prefix.replace("/", "_")
            seen.add(key)
            sections.append(callback_section(cb, staging, key=key))
        meta = {
            "model": type(cli.model).__name__,
            "config": os.path.abspath(config),
            "checkpoint": os.path.abspath(ckpt) if ckpt else None,
            "data": type(cli.datamodule).__name__ if cli.datamodule is not None else None,
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        report = _clean({"meta": meta, **{s.key: s.to_json() for s in sections}})
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(report, f, indent=2, allow_nan=False, default=str)
        write_html(staging, f"lightning-interp audit: {meta['model']}", sections, meta=meta)
        for logger in cli.trainer.loggers:
            finish_logger(logger)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
