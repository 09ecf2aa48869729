"""The image-folder audit: the classifier as a ``LightningModule``, the callbacks measuring once, the sections.

:class:`FolderAudit` builds the callbacks that :data:`~lightning_interp.audit_options.AUDIT_METHODS` names, runs
``Trainer.validate`` once and turns each callback's measurement into a report section
(:func:`~lightning_interp.report.callback_section`); :func:`lightning_interp.audit.run_audit` drives it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp import methods as registry
from lightning_interp.audit_options import AUDIT_METHODS, AuditOptions
from lightning_interp.audit_progress import Progress, Tick
from lightning_interp.loading import LoadedClassifier
from lightning_interp.loggers import log_figure, warn_now
from lightning_interp.report import Section, callback_section

__all__ = ["NET_NAME", "WEIGHTS_INTRO", "AuditModule", "FolderAudit", "balanced_subset", "stage_inputs", "write_csv"]

#: The name under which :class:`AuditModule` registers the wrapped classifier itself.
NET_NAME = "audited_classifier"

#: The introduction of the ``weights`` section (the saliency paper's fit of the final layer's weights).
WEIGHTS_INTRO = (
    "The final layer's weights of every class are fitted with an asymmetric Laplace distribution (Siddhartha, 2022): "
    "the log-rank plot of each side is a straight line when the fit holds. R² near 1 means a good fit; the histogram "
    "shows the pooled weights and the fitted densities."
)


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


def balanced_subset(labels: Tensor, keep: Tensor, cap: int | None) -> Tensor:
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


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


class FolderAudit:
    """The image-folder audit: builds the callbacks, runs ``Trainer.validate``, turns the results into sections.

    Args:
        loaded: the classifier.
        dm: the set-up image datamodule.
        staging: the folder the outputs go into.
        options: the audit's options (its ``methods`` are run in :data:`AUDIT_METHODS` order).
        progress: what to show while it runs.
    """

    def __init__(self, loaded: LoadedClassifier, dm: Any, staging: str, options: AuditOptions, progress: Progress) -> None:
        self.loaded, self.dm, self.staging, self.options, self.progress = loaded, dm, staging, options, progress
        self.methods = [m for m in AUDIT_METHODS if m in options.methods]
        self.notes: dict[str, list[str]] = {m: [] for m in AUDIT_METHODS}
        self.module = AuditModule(loaded.model)
        k = loaded.num_classes
        folder_names = sorted(set(dm.folders) - {""})
        self.names = loaded.class_names or (folder_names if len(folder_names) == k else [f"class {i}" for i in range(k)])

    def figure_dir(self, method: str) -> str:
        return os.path.join(self.staging, "figures", method)

    def run(self, logger: Any, device: str | None) -> list[Section]:
        from lightning_interp.saliency import FinalLayerSaliency

        x = self.dm.inputs
        accelerator = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
        self.module.to(accelerator)
        logits = _logits(self.module, x, self.options.batch_size)  # the one forward pass the rows share
        self.probs = logits.softmax(1).cpu()
        self.preds = self.probs.argmax(1)
        labels = self.dm.labels if self.dm.labelled else self.preds
        if not self.dm.labelled:
            for m in ("ablation", "correlation"):
                self.notes[m].append(
                    "The images have no class labels (no class sub-folders matching the model's classes): the model's "
                    "predictions stand in for labels, so accuracies measure agreement with the unablated model."
                )
        saliency = FinalLayerSaliency(self.module, min_size=self.options.min_size)
        saliency.resolve(x[:2].to(accelerator))
        self.saliency = saliency
        callbacks = self.callbacks(x, labels, saliency.feature_layer)
        progress: Progress = self.progress
        names = list(callbacks)
        progress.methods = names + (["weights"] if "weights" in self.methods else [])
        if "ablation" in callbacks:  # its bar moves while the chains run too, not only while images pass
            callbacks["ablation"].on_step = progress.mcmc_step
        ticking: list[pl.Callback] = [Tick(progress, None, names[0] if names else None)]
        for i, (name, cb) in enumerate(callbacks.items()):  # Lightning calls callbacks in list order: a tick after each
            ticking += [cb, Tick(progress, name, names[i + 1] if i + 1 < len(names) else None)]
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            logger=logger,
            callbacks=ticking,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,  # one validation batch loop; the methods' own bars say more
            default_root_dir=self.staging,
        )
        progress.attach(self.module)
        try:
            trainer.validate(self.module, dataloaders=self.dm.val_dataloader(), verbose=False)
        finally:
            progress.close()
        sections = self.sections(callbacks, logger)
        self.seconds = dict(progress.seconds)
        return sections

    def callbacks(self, x: Tensor, labels: Tensor, feature_layer: str | None) -> dict[str, Any]:
        from lightning_interp import callbacks as cbs

        n, seed = len(x), self.options.seed
        once: dict[str, Any] = dict(every_n_epochs=None, measure_at_end=False, budget=None, seed=seed)
        out: dict[str, Any] = {}
        if "saliency" in self.methods:
            out["saliency"] = cbs.FinalLayerSaliencyCallback(
                probe=(x, labels),
                probe_size=n,
                min_size=self.options.min_size,
                deletion_images=self.options.deletion_images,
                class_names=self.names,
                figure_dir=self.figure_dir("saliency"),
                **once,
            )
        present = labels.bincount(minlength=self.loaded.num_classes)
        if "ablation" in self.methods and feature_layer is not None:
            top = present.argsort(descending=True)[: self.options.max_tasks]
            tasks = sorted(int(t) for t in top if present[t] > 0)
            self.tasks = [self.names[t] for t in tasks]
            if int((present > 0).sum()) > len(tasks):
                self.notes["ablation"].append(
                    f"Class tasks: the {len(tasks)} most frequent classes of the images (max_tasks={self.options.max_tasks})."
                )
            out["ablation"] = cbs.AblationProbeCallback(
                num_steps=self.options.ablation_steps,
                burn_in=self.options.ablation_steps // 10,
                layers=[feature_layer],
                probe=(x, labels),
                probe_size=n,
                tasks=tasks,
                class_names=self.names,
                figure_dir=self.figure_dir("ablation"),
                **once,
            )
        if "correlation" in self.methods and feature_layer is not None:
            need = self.options.min_per_class
            keep = present[labels] >= need
            if int((present >= need).sum()) < 2:
                self.notes["correlation"].append(
                    f"Skipped: correlation orders need at least two classes with {need} images each (min_per_class); "
                    f"the largest classes here have {sorted(present.tolist(), reverse=True)[:3]} images."
                )
            else:
                keep = balanced_subset(labels, keep, self.options.correlation_images)
                if not bool(keep.all()):
                    self.notes["correlation"].append(
                        f"Measured on {int(keep.sum())} images of {len(labels[keep].unique())} classes: classes with at "
                        f"least {need} images (min_per_class), at most {self.options.correlation_images} images in "
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
                self.progress.start("weights", counted=False)  # a fit of the head: no images
                sections.append(self.weights_section(logger))
                self.progress.end()
                continue
            cb = callbacks.get(method)
            if cb is None:  # skipped (the notes say why): the method's title and introduction, no numbers
                record = registry.find(method)
                sections.append(Section(method, record.title, record.intro, notes=self.notes[method]))
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
        section = Section("weights", "Final-layer weights", WEIGHTS_INTRO)
        if head is None:
            section.notes.append("No final nn.Linear found: nothing to fit.")
            return section
        weight = dict(self.module.named_modules())[head].weight.detach().cpu()
        fit = fit_ald(weight)
        rows = [{**r, "class_name": self.names[int(r["class"])]} for r in fit.rows()]
        write_csv(os.path.join(self.staging, "ald_per_class.csv"), rows)
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
                log_figure([logger], "audit/ald_histogram", png_to_array(f.read()), None, "audit", warn_now)
        return section
