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
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.loading import LoadedClassifier, build_model, load_classifier, load_weights
from lightning_interp.report import INTROS, Section, callback_section, write_html

__all__ = [
    "CALLBACK_KEYS",
    "MARKER",
    "METHODS",
    "AuditModule",
    "OutputFolderError",
    "build_model",
    "check_out",
    "load_weights",
    "number_warnings",
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


#: The file an audit writes into its ``--out``: a folder holding it (and nothing else the audit did not write) may
#: be replaced by the next audit; any other non-empty folder is refused.
MARKER = ".lightning-interp-audit"


class OutputFolderError(ValueError):
    """``--out`` cannot be written without destroying files that are not an earlier audit's (nothing was touched)."""


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder and path != folder


def check_out(out: str | os.PathLike, images: str | os.PathLike | None = None) -> None:
    """Refuse an ``--out`` whose replacement would destroy anything an audit did not write.

    Accepted: a path that does not exist, an empty folder, or a folder an earlier audit wrote (it holds
    :data:`MARKER`, and no entry the marker does not list). Refused: a file, a symbolic link, any other folder,
    and an ``--out`` equal to, inside or containing ``images``.

    Raises:
        OutputFolderError: one line naming ``--out`` and what to do; nothing was touched.
    """
    out = os.fspath(out)
    real = os.path.realpath(out)
    if images is not None:
        real_images = os.path.realpath(os.fspath(images))
        relation = (
            "is" if real == real_images
            else "is inside" if _inside(real, real_images)
            else "contains" if _inside(real_images, real)
            else None
        )  # fmt: skip
        if relation is not None:
            why = (
                "the next audit would read this one's figures as images" if relation == "is inside"
                else "the audit replaces --out as a whole and would delete the images"
            )  # fmt: skip
            raise OutputFolderError(
                f"--out {out} {relation} the image folder --images {os.fspath(images)}: {why}; choose an output folder "
                "outside the images (nothing was written)"
            )
    if not os.path.lexists(out):
        ancestor = os.path.dirname(os.path.abspath(out))
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise OutputFolderError(f"--out {out} lies under {ancestor}, which is a file, not a folder (nothing was written)")
        return
    if os.path.islink(out):
        raise OutputFolderError(f"--out {out} is a symbolic link: give the folder itself, or a new path (nothing was written)")
    if not os.path.isdir(out):
        raise OutputFolderError(f"--out {out} is a file, not a folder: give a new folder name (nothing was written)")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    marker = os.path.join(out, MARKER)
    written: set[str] | None = None
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                written = set(json.load(f).get("entries", [])) | {MARKER}
        except (OSError, ValueError, AttributeError):
            written = None
    if written is None:
        raise OutputFolderError(
            f"--out {out} is a folder with {len(entries)} entries (e.g. {entries[:3]}) that no audit wrote, and the "
            "audit replaces --out as a whole: give a new or empty folder, or the --out of an earlier audit (nothing was "
            "written)"
        )
    others = [e for e in entries if e not in written]
    if others:
        raise OutputFolderError(
            f"--out {out} is an earlier audit's folder, but {others[:3]} were added since and would be deleted: move "
            "them out, or give another --out (nothing was written)"
        )


def _hidden_name(out: str, kind: str) -> str:
    """A hidden sibling of ``out`` named after it: ``.NAME.audit-<kind>-<pid>-<random>``."""
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}.audit-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def _out_lock(out: str) -> Iterator[None]:
    """Hold ``.NAME.audit-lock`` next to ``out``: a second audit into the same ``--out`` fails at once.

    ``flock`` is released by the kernel when the process dies (SIGKILL included), so a stale lock file never
    blocks a later run; the file is removed on release, and a run that locked a file removed meanwhile retries.
    """
    try:
        import fcntl
    except ModuleNotFoundError:  # not POSIX: no lock (concurrent audits into one --out are then the user's to avoid)
        yield
        return
    parent, base = os.path.split(os.path.abspath(out))
    path = os.path.join(parent, f".{base}.audit-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputFolderError(
                f"--out {out}: another audit is writing into it now (lock {path}); wait for it to finish, or give "
                "another --out (nothing was written)"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _remove_stale(out: str) -> None:
    """Remove the staging and old folders of ``out`` that a killed run left (under the lock: none is in use)."""
    parent, base = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith((f".{base}.audit-staging-", f".{base}.audit-old-")):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` during the audit, so that its staging folder is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _new_staging(out: str) -> str:
    """A fresh staging folder next to ``out``, with the umask's permissions (``mkdtemp`` would make it 0700)."""
    path = _hidden_name(out, "staging")
    os.mkdir(path)
    return path


def _write_marker(staging: str, source: str) -> None:
    entries = sorted(os.listdir(staging))
    with open(os.path.join(staging, MARKER), "w") as f:
        json.dump({"written_by": "lightning-interp audit", "model": source, "entries": entries}, f, indent=1)


def _publish(staging: str, out: str) -> None:
    """Replace ``out`` by ``staging`` (an old report never survives next to new files); call under the lock."""
    old = None
    if os.path.lexists(out):
        old = _hidden_name(out, "old")
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the earlier report back: nothing lost
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _staged(out: str, source: str) -> Iterator[str]:
    """Lock ``out``, clear what killed runs left, stage into a fresh folder and publish it when the body succeeds."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with _out_lock(out), _terminate_as_exit():
        check_out(out)  # again under the lock: another audit may have written it since the first check
        _remove_stale(out)
        staging = _new_staging(out)
        try:
            yield staging
            _write_marker(staging, source)
            _publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _make_logger(use_wandb: bool, staging: str, name: str) -> Any:
    if not use_wandb:
        return False
    from lightning_interp.loggers import make_logger

    return make_logger("wandb", staging, name)


def _say(message: str) -> None:
    """One line on stderr (where the bars go), so a log of the audit shows what it is doing."""
    print(f"lightning-interp audit: {message}", file=sys.stderr, flush=True)


class _Progress:
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
            _say(f"{name} done in {seconds:.1f} s ({position}/{len(self.methods)} methods)")
        self.current = None

    def close(self) -> None:
        """Remove the hook and close a bar left open (an error mid-method)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Tick(pl.Callback):
    """Between two methods in the callback list: end the one before, start the next (Lightning keeps list order)."""

    def __init__(self, progress: _Progress, after: str | None, before: str | None) -> None:
        self.progress, self.after, self.before = progress, after, before

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.after is not None:
            self.progress.end()
        if self.before is not None:
            self.progress.start(self.before)


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
        progress: _Progress = self.options["progress"]
        names = list(callbacks)
        progress.methods = names + (["weights"] if "weights" in self.methods else [])
        if "ablation" in callbacks:  # its bar moves while the chains run too, not only while images pass
            callbacks["ablation"].on_step = progress.mcmc_step  # type: ignore[attr-defined]
        ticking: list[pl.Callback] = [_Tick(progress, None, names[0] if names else None)]
        for i, (name, cb) in enumerate(callbacks.items()):  # Lightning calls callbacks in list order: a tick after each
            ticking += [cb, _Tick(progress, name, names[i + 1] if i + 1 < len(names) else None)]
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
                self.options["progress"].start("weights", counted=False)  # a fit of the head: no images
                sections.append(self.weights_section(logger))
                self.options["progress"].end()
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


def _progress_mode(progress: bool | None) -> str:
    if progress is None:
        return "bar" if sys.stderr.isatty() else "log"
    return "bar" if progress else "off"


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
    progress: bool | None = None,
    seed: int = 0,
    resize: int | str | None = None,
    crop: int | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Audit a classifier on a folder of images; write ``report.json``, ``report.html`` and figures into ``out``.

    Args:
        arch: a torchvision model name or ``"timm:<name>"`` (with ``weights``).
        weights: local weights of ``arch`` (``.pth``/``.ckpt``/``.safetensors``).
        images: a folder of images (flat, or one sub-folder per class).
        out: the output folder: a new path, an empty folder or an earlier audit's ``out`` (see :func:`check_out`);
            replaced as a whole at the end.
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
        progress: ``None``: bars when stderr is a terminal, else one line per method; ``True``: bars; ``False``:
            neither (warnings are printed all the same).
        seed: seed of the callbacks' generators.
        resize: the short side images are resized to; ``"none"``: no resize (default: the model form's).
        crop: the side of the centre crop; ``"none"``: no crop (default: the model form's).
        mean: per-channel mean subtracted (one value or one per channel; default: the model form's).
        std: per-channel standard deviation divided by (default: the model form's).

    Returns:
        The report (also ``out/report.json``): ``meta``, ``warnings``, ``skipped``, ``images`` and one key per method.

    Raises:
        OutputFolderError: ``out`` is refused (see :func:`check_out`), or another audit is writing into it.
        ValueError: an unknown method, bad weights (empty, truncated, non-finite, another architecture), a bad
            preprocessing argument, no readable image.
        FileNotFoundError: a missing weights file or image folder.
    """
    from lightning_interp.datamodules.images import ImageFolderDataModule

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown audit methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if images is None:
        raise ValueError("give the images to audit: --images DIR (or use --config for a datamodule)")
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    check_out(out, images)  # before anything is written
    start = time.perf_counter()
    loaded = load_classifier(
        arch=arch, weights=weights, model=model, ckpt=ckpt, image_size=image_size, channels=channels,
        resize=resize, crop=crop, mean=mean, std=std,
    )  # fmt: skip
    mode = _progress_mode(progress)
    description = loaded.preprocessing.description
    with _staged(out, loaded.source) as staging:
        if mode != "off":  # once --out is ours: a refused run prints its one error line only
            _say(f"{loaded.source}, {loaded.num_classes} classes; preprocessing: {description}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm = ImageFolderDataModule(
                images,
                transform=loaded.preprocessing.transform,
                limit=limit,
                batch_size=batch_size,
                class_names=loaded.class_names,
                num_classes=loaded.num_classes,
                progress=mode == "bar",
            )
            dm.setup()
        for w in caught:  # show the skipped files once, then list them in the report
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if mode == "log":
            _say(f"read {len(dm.files)} images ({len(dm.skipped)} skipped) from {images}")
        chosen = [m for m in METHODS if m in methods]
        options = dict(
            batch_size=batch_size,
            min_size=min_size,
            max_tasks=max_tasks,
            min_per_class=min_per_class,
            ablation_steps=ablation_steps,
            deletion_images=deletion_images,
            correlation_images=correlation_images,
            progress=_Progress(mode, chosen),
            seed=seed,
        )
        audit = _FolderAudit(loaded, dm, staging, chosen, options)
        logger = _make_logger(use_wandb, staging, f"audit-{loaded.source.split()[-1]}")
        sections = audit.run(logger, device)
        rows = getattr(audit, "rows", None) or audit.image_rows(None)
        labelled = [r for r in rows if r["label"]]
        found = number_warnings(audit.preds, dm.labels, audit.probs.max(1).values, loaded.num_classes, description)
        if loaded.guessed:
            found.insert(0, f"{loaded.guessed}. {_HOW_TO_CHANGE}")
        for w in found:
            _say(f"warning: {w}")
        meta = {
            "model": loaded.source,
            "files": [os.path.abspath(f) for f in loaded.files],
            "images": os.path.abspath(images),
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


def _write_outputs(
    staging: str,
    meta: dict[str, Any],
    sections: list[Section],
    rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    found: list[str],
) -> dict[str, Any]:
    _write_csv(os.path.join(staging, "images.csv"), rows)
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
    from lightning_interp.loggers import finish_logger

    if ckpt is not None:
        load_weights(ckpt)  # empty, truncated and non-finite files fail here, naming the file
    check_out(out)  # before anything is written
    start = time.perf_counter()
    with _staged(out, config) as staging:
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
        _say(f"{type(cli.model).__name__}; preprocessing: the validation transforms of the config's datamodule ({data})")
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
            "data": data,
            "preprocessing": f"the validation transforms of the config's datamodule ({data})",
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        report = _clean({"meta": meta, "warnings": [], **{s.key: s.to_json() for s in sections}})
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(report, f, indent=2, allow_nan=False, default=str)
        write_html(staging, f"lightning-interp audit: {meta['model']}", sections, meta=meta, preprocessing=meta["preprocessing"])
        for logger in cli.trainer.loggers:
            finish_logger(logger)
    return report
