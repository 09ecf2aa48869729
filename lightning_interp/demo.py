"""The main job, ``lightning-interp demo``: every callback on the task it suits, in one logged run.

* posterior gap: the post's MLP (1-64-64-2) on presets 1 and 3 of Xie (2025);
* final-layer saliency: the small CNN on :class:`~lightning_interp.datamodules.PatchImageDataModule` in
  content mode (the class is the pattern of a square at a random position);
* Bayesian ablation and correlation orders: an MLP on XOR;
* the energy expansion: an MLP on sequences from two planted Potts models.

All parts log into one logger (one offline wandb run by default), write their figures under
``OUT/figures/<part>/``, and the demo writes ``OUT/summary.json`` and ``OUT/report.html``.

Every model, datamodule and probe is built after seeding with ``seed``, so one seed gives one
``summary.json`` (its ``wall_time_s`` fields aside). When stderr is not a terminal (a log file, CI), the
progress bar is off and the demo prints one line per part and per measurement, with the time, instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from lightning_interp import methods
from lightning_interp.loggers import finish_logger, make_logger

__all__ = ["PARTS", "run_demo"]

#: The demo's parts: the ``part`` of every record of :data:`lightning_interp.methods.METHODS`, in its order.
PARTS: tuple[str, ...] = tuple(m.part for m in methods.METHODS)


def _trainer(logger: Any, out: str, callbacks: list, **kw: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        callbacks=callbacks,
        logger=logger,
        accelerator="auto",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        default_root_dir=out,
        **kw,
    )


class _Progress:
    """Prints a line to stderr per part and per measurement, for logs where no progress bar shows.

    A Lightning callback placed after the interpretability callbacks: after every training batch and epoch it
    looks whether their ``history`` grew and prints the new measurement with the times since the demo's start
    and since the previous line (the measurement's own cost is in between).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = self.last = time.perf_counter()

    def line(self, text: str) -> None:
        """Print ``[demo  12.3 s] text (+1.2 s)`` when enabled."""
        if not self.enabled:
            return
        now = time.perf_counter()
        print(f"[demo {now - self.start:7.1f} s] {text} (+{now - self.last:.1f} s)", file=sys.stderr, flush=True)
        self.last = now

    def callback(self, watched: list) -> Any:
        """A Lightning callback reporting the new ``history`` entries of the callbacks in ``watched``."""
        import lightning.pytorch as pl

        progress = self
        seen = {id(cb): len(cb.history) for cb in watched}

        class _Report(pl.Callback):
            def _check(self) -> None:
                for cb in watched:
                    for entry in cb.history[seen[id(cb)] :]:
                        shown = ", ".join(
                            f"{k}={v:.4g}"
                            for k, v in list(entry.items())[:8]
                            if k not in ("step", "epoch") and isinstance(v, float) and not k.endswith("_se")
                        )
                        where = f"step {int(entry.get('step', 0))}, epoch {int(entry.get('epoch', 0))}"
                        progress.line(f"  {cb.prefix}: measured at {where}: {shown[:160]}")
                    seen[id(cb)] = len(cb.history)

            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                self._check()

            def on_validation_end(self, *args: Any, **kwargs: Any) -> None:
                self._check()

            def on_train_epoch_end(self, *args: Any, **kwargs: Any) -> None:
                self._check()

            def on_fit_end(self, *args: Any, **kwargs: Any) -> None:
                self._check()

        return _Report()


class _Demo:
    """The state the demo's parts share: output folder, logger, seed, settings and the summary they fill in.

    Every part of :data:`PARTS` is a method of this class of the same name (``run_demo`` calls them in order).
    """

    def __init__(
        self,
        out: str,
        logger: Any,
        seed: int,
        epochs: int,
        summary: dict[str, Any],
        progress: _Progress | None = None,
        parts: Sequence[str] = PARTS,
        presets: Sequence[int] = (1, 3),
        max_steps: int = 3000,
        n_train: int = 100_000,
        probe_size: int = 4096,
    ) -> None:
        self.out, self.logger, self.seed, self.epochs, self.summary = out, logger, seed, epochs, summary
        self.progress = progress or _Progress(False)
        self.parts, self.presets, self.max_steps, self.n_train, self.probe_size = parts, presets, max_steps, n_train, probe_size
        self.xor_done = False

    def figures(self, part: str) -> str:
        return os.path.join(self.out, "figures", part)

    def seed_everything(self) -> None:
        """Seed before a part builds its model, data and callbacks: their initial state is then the seed's."""
        import lightning.pytorch as pl

        pl.seed_everything(self.seed, verbose=False)

    def fit(self, callbacks: list, model: Any, dm: Any, **trainer_kw: Any) -> None:
        # Seeded again here so that the training's shuffling and dropout do not depend on how much
        # randomness the construction above used.
        self.seed_everything()
        watched = list(callbacks)
        _trainer(self.logger, self.out, [*watched, self.progress.callback(watched)], **trainer_kw).fit(model, dm)

    def record(self, part: str, callback: Any, t0: float, **extra: Any) -> None:
        self.summary["parts"][part] = {
            "callback": type(callback).__name__,
            "prefix": callback.prefix,
            "final": callback.history[-1],
            "history": callback.history,
            "wall_time_s": round(time.perf_counter() - t0, 2),
            **extra,
        }

    def posterior(self) -> None:
        """The post's MLP on each preset; the gap against the step, all presets in one figure."""
        from lightning_interp import callbacks as cbs
        from lightning_interp.datamodules import SyntheticDataModule
        from lightning_interp.models import MLPClassifier
        from lightning_interp.plotting import figure_to_png, subplots
        from lightning_interp.tasks import xie_task

        max_steps, n_train, probe_size = self.max_steps, self.n_train, self.probe_size
        fig, ax = subplots(figsize=(6, 4))
        for preset in self.presets:
            self.progress.line(f"part posterior_preset{preset}: {max_steps} steps")
            t0 = time.perf_counter()
            self.seed_everything()  # before the model: its initial weights come from the seed
            cb = cbs.PosteriorGapCallback(
                probe_size=probe_size,
                every_n_epochs=None,
                every_n_steps=max(1, max_steps // 20),
                measure_at_start=True,
                seed=self.seed,
                figure_dir=self.figures(f"posterior_preset{preset}"),
                key_prefix=f"posterior_gap/preset{preset}",
                budget=None,  # the demo shows every measurement of its short runs
            )
            dm = SyntheticDataModule(xie_task(preset), n_train, 0, 0, batch_size=64, seed=self.seed)
            self.fit([cb], MLPClassifier(1, 2, hidden=(64, 64)), dm, max_steps=max_steps, limit_val_batches=0)
            self.record(f"posterior_preset{preset}", cb, t0, preset=preset)
            self.progress.line(f"part posterior_preset{preset} done")
            ax.plot([max(h["step"], 1) for h in cb.history], [h["kl"] for h in cb.history], marker="o", label=f"preset {preset}")
        ax.set(xscale="log", yscale="log", xlabel="training step", ylabel="mean KL(p || q) on the probe set")
        ax.set_title("Posterior gap during training")
        ax.legend()
        with open(os.path.join(self.out, "gap_vs_step.png"), "wb") as f:
            f.write(figure_to_png(fig))

    def saliency(self) -> None:
        """The small CNN on content-mode patch images (the class is a pattern at a random position)."""
        from lightning_interp import callbacks as cbs
        from lightning_interp.datamodules import PatchImageDataModule
        from lightning_interp.models import SmallCNN

        self.progress.line(f"part saliency: {self.epochs} epochs")
        t0 = time.perf_counter()
        self.seed_everything()
        cb = cbs.FinalLayerSaliencyCallback(
            probe_size=8, min_size=4, every_n_epochs=1, seed=self.seed, figure_dir=self.figures("saliency"), budget=None
        )
        dm = PatchImageDataModule(n_train=2048, n_val=256, seed=self.seed, evidence="content")
        self.fit([cb], SmallCNN(in_channels=1, num_classes=4, channels=(8, 16), lr=1e-2), dm, max_epochs=self.epochs)
        self.record("saliency", cb, t0)
        self.progress.line("part saliency done")

    def ablation(self) -> None:
        """Bayesian ablation of an MLP on XOR (one fit with the correlation orders when both run)."""
        self.xor()

    def correlation(self) -> None:
        """Correlation orders of an MLP on XOR (one fit with the ablation when both run)."""
        self.xor()

    def xor(self) -> None:
        """Ablation and correlation orders of an MLP on XOR, in one fit (once, whichever part asks first)."""
        if self.xor_done:
            return
        self.xor_done = True
        parts = self.parts
        from lightning_interp import callbacks as cbs
        from lightning_interp.datamodules import XORDataModule
        from lightning_interp.models import MLPClassifier

        self.progress.line(f"part {' and '.join(p for p in ('ablation', 'correlation') if p in parts)}: {self.epochs} epochs")
        t0 = time.perf_counter()
        self.seed_everything()
        found: list[tuple[str, Any]] = []
        if "ablation" in parts:
            found.append(
                (
                    "ablation",
                    cbs.AblationProbeCallback(
                        layers=["net.1", "net.3"],
                        probe_size=256,
                        every_n_epochs=1,
                        seed=self.seed,
                        figure_dir=self.figures("ablation"),
                        budget=None,
                    ),
                )
            )
        if "correlation" in parts:
            found.append(
                (
                    "correlation",
                    cbs.CorrelationOrderCallback(
                        probe_size=1024, every_n_epochs=1, seed=self.seed, figure_dir=self.figures("correlation"), budget=None
                    ),
                )
            )
        dm = XORDataModule(noise=0.3, n_train=4096, n_val=1024, seed=self.seed)
        self.fit([cb for _, cb in found], MLPClassifier(2, 2, hidden=(12, 12), lr=1e-2), dm, max_epochs=self.epochs)
        for part, cb in found:
            self.record(part, cb, t0, task="xor")
            self.progress.line(f"part {part} done")

    def expansion(self) -> None:
        """An MLP on sequences of two planted Potts models; the sampled expansion of its logit."""
        from lightning_interp import callbacks as cbs
        from lightning_interp.datamodules import PottsDataModule
        from lightning_interp.models import MLPClassifier

        self.progress.line(f"part expansion: {self.epochs} epochs")
        t0 = time.perf_counter()
        self.seed_everything()
        cb = cbs.LogitExpansionCallback(
            8,
            4,
            method="sampled",
            num_samples=256,
            every_n_epochs=1,
            seed=self.seed,
            figure_dir=self.figures("expansion"),
            budget=None,
        )
        dm = PottsDataModule(seq_len=8, num_states=4, n_train=20000, seed=self.seed)
        self.fit([cb], MLPClassifier(32, 2, hidden=(64,), lr=3e-3), dm, max_epochs=self.epochs)
        self.record("expansion", cb, t0)
        self.progress.line("part expansion done")


def run_demo(
    out: str = "demo_out",
    max_steps: int = 3000,
    logger: str = "wandb",
    presets: Sequence[int] = (1, 3),
    seed: int = 0,
    parts: Sequence[str] = PARTS,
    epochs: int = 4,
    n_train: int = 100_000,
    probe_size: int = 4096,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the summary also written to ``out/summary.json``.

    Args:
        out: output folder.
        max_steps: training steps per posterior preset.
        logger: ``"wandb"`` (offline), ``"tensorboard"`` or ``"csv"``.
        presets: posterior presets to run.
        seed: seed of everything.
        parts: which of :data:`PARTS` to run.
        epochs: epochs of the saliency, ablation / correlation and expansion parts.
        n_train: training-set size of the posterior presets.
        probe_size: posterior-gap probe size.
        progress: print a line per part and per measurement to stderr; default: when stderr is not a
            terminal (where the progress bar is off).
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown demo parts {sorted(unknown)}; choose from {PARTS}")
    missing = [p for p in parts if not callable(getattr(_Demo, p, None))]
    if missing:  # a record of lightning_interp.methods.METHODS without its part here
        raise ValueError(f"the demo has no part {missing}: add a method of that name to lightning_interp.demo._Demo")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    run_logger = make_logger(logger, out, "demo")
    summary: dict[str, Any] = {"max_steps": max_steps, "epochs": epochs, "logger": logger, "seed": seed, "parts": {}}
    show = not sys.stderr.isatty() if progress is None else progress
    demo = _Demo(out, run_logger, seed, epochs, summary, _Progress(show), parts, presets, max_steps, n_train, probe_size)
    for part in PARTS:  # the registry's order, whatever the order of ``parts``
        if part in parts:
            getattr(demo, part)()
    finish_logger(run_logger)
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    write_report(out, summary)
    return summary


def write_report(out: str, summary: dict[str, Any]) -> str:
    """Write ``out/report.html`` (:mod:`lightning_interp.report`): per part its final scalars and latest figures.

    The page reports, in ``data-images-loaded`` / ``data-images-total`` attributes of ``<body>``, how
    many of its images the browser could load (checked in a test with headless Chromium).
    """
    from lightning_interp.report import Section, intro, latest_figures, scalars_with_se, write_html

    sections = []
    if os.path.exists(os.path.join(out, "gap_vs_step.png")):
        sections.append(
            Section(
                "posterior_gap_vs_step",
                "Posterior gap during training",
                methods.find("posterior_gap").intro,
                figures=[("gap_vs_step.png", "mean KL to the Bayes posterior against the training step, per preset")],
            )
        )
    for part, res in summary["parts"].items():
        figures = [
            (os.path.relpath(p, out), os.path.basename(p).rsplit("_step", 1)[0].replace("_", " "))
            for p in latest_figures(os.path.join(out, "figures", part))
        ]
        sections.append(
            Section(
                part,
                f"{part} ({res['callback']}, {res['prefix']}/..., {res['wall_time_s']} s)",
                intro(res["callback"]),
                scalars=scalars_with_se(res["final"]),
                figures=figures,
            )
        )
    meta = {"wall time (s)": summary["wall_time_s"], "logger": summary["logger"], "seed": summary["seed"]}
    return write_html(out, "lightning-interp demo", sections, meta=meta)
