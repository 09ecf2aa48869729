"""Posterior-gap callback: track the distance between the network's softmax and the exact posterior.

Reference: Yudi Xie, "How do we interpret the outputs of a neural network trained on
classification?", ICLR 2025 Blogposts Track. See :mod:`lightning_interp.posterior`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import InterpretabilityCallback, Measurement, RunOn, check_int, model_device_dtype
from lightning_interp.callbacks.probe import ProbeSource, Unpack, draw_probe
from lightning_interp.plotting import subplots
from lightning_interp.posterior import GAP_MEASURES, PosteriorGap
from lightning_interp.tasks import GenerativeTask

__all__ = ["PosteriorGapCallback"]


class PosteriorGapCallback(InterpretabilityCallback):
    """Log how far the model's softmax ``q(c|x)`` is from the true posterior ``p(c|x)`` of a known task.

    At setup the callback takes the task from ``task=`` or from the datamodule's ``task`` attribute
    (for example :class:`~lightning_interp.datamodules.SyntheticDataModule`, or
    :class:`~lightning_interp.datamodules.PatchImageDataModule` for a CNN on images), checks that the
    module maps inputs of shape ``[N, *task.input_shape]`` to ``[N, K]`` logits with
    ``K = task.num_classes``, and draws its own fixed
    probe set of ``probe_size`` labelled samples with its own generator (or takes the inputs of
    ``probe``, whose exact posterior the task gives; labels missing from ``probe`` are drawn from that
    posterior). At each measurement it logs
    ``posterior_gap/<measure>`` for the means over the probe set of ``kl``, ``reverse_kl``, ``js``,
    ``tv``, ``l2``, ``mean_max_abs`` (the per-example ``max_c |p - q|``), ``excess_ce``, ``accuracy``,
    ``bayes_accuracy`` and ``accuracy_gap``, each with ``<measure>_se``, its standard error over the
    probe examples; ``max_abs``, the worst ``|p(c|x) - q(c|x)|`` over the probe set (no error bar: a
    maximum, not a mean); plus ``kl_low_density`` / ``tv_low_density`` (with ``_se``): the gap in the
    lowest of ``num_density_bins`` bins of input density (equal-count bins of the probe set), which is
    where a network misses the posterior when data is scarce (preset 3 of the post). Figures: for 1-D
    tasks the model's softmax against
    the true posterior over ``x`` with the data density (the post's figures), for ``D > 1`` a
    reliability-style scatter of ``q`` against ``p``; and the gap per density bin. A table lists the
    per-bin gaps.

    Args:
        task: the generative task; taken from ``trainer.datamodule.task`` when ``None``.
        probe_size: number of probe samples (a bounded, fixed set).
        num_density_bins: number of equal-count input-density bins (0 disables the per-bin gap).
        batch_size: forward-pass batch size over the probe set.
        grid_size: points of the ``x`` grid of the 1-D figure.
        every_n_epochs: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`.
        every_n_steps: see the base class.
        run_on: see the base class.
        measure_at_start: see the base class.
        measure_at_end: see the base class.
        seed: seed of the probe set.
        log_images: see the base class.
        figure_dir: see the base class.
        key_prefix: see the base class.
        probe: inputs to measure on instead of samples of the task (they should follow the task's input
            distribution); see the base class.
        unpack: how to read a batch of ``probe``; see the base class.
        prog_bar: scalars to show in the progress bar; see the base class.
        budget: the share of training time its scheduled measurements may use; see the base class.

    Raises:
        ValueError: in ``__init__``, for ``probe_size < 2``, ``batch_size < 1``, ``num_density_bins < 0``
            or ``grid_size < 2``; before the first training step, when no task is available, the
            module's output is not ``[N, K]`` logits, or ``K`` differs from ``task.num_classes``.
        TypeError: at setup, when ``task`` is not a ``GenerativeTask`` or the module rejects the task's
            inputs.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_interp.datamodules import SyntheticDataModule
        >>> from lightning_interp.models import MLPClassifier
        >>> from lightning_interp.tasks import xie_task
        >>> cb = PosteriorGapCallback(probe_size=256, log_images=False)
        >>> trainer = pl.Trainer(max_steps=5, callbacks=[cb], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(MLPClassifier(1, 2), SyntheticDataModule(xie_task(1), 320, 64, 64, batch_size=64))
        >>> sorted(cb.history[-1])[:4]
        ['accuracy', 'accuracy_gap', 'accuracy_gap_se', 'accuracy_se']
    """

    prefix = "posterior_gap"

    def __init__(
        self,
        task: GenerativeTask | None = None,
        probe_size: int = 2048,
        num_density_bins: int = 10,
        batch_size: int = 8192,
        grid_size: int = 400,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        run_on: RunOn = "train_epoch_end",
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        seed: int = 0,
        log_images: bool = True,
        figure_dir: str | None = None,
        key_prefix: str | None = None,
        probe: ProbeSource | None = None,
        unpack: Unpack = None,
        prog_bar: Sequence[str] = (),
        budget: float | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            run_on=run_on,
            measure_at_start=measure_at_start,
            measure_at_end=measure_at_end,
            seed=seed,
            log_images=log_images,
            figure_dir=figure_dir,
            key_prefix=key_prefix,
            probe=probe,
            unpack=unpack,
            prog_bar=prog_bar,
            budget=budget,
        )
        if task is not None and not isinstance(task, GenerativeTask):
            raise TypeError(f"task must be a lightning_interp.tasks.GenerativeTask, got {type(task).__name__}")
        check_int("probe_size", probe_size, 2)
        check_int("batch_size", batch_size, 1)
        check_int("num_density_bins", num_density_bins, 0)
        check_int("grid_size", grid_size, 2)
        self.task = task
        self.probe_size = probe_size
        self.num_density_bins = num_density_bins
        self.batch_size = batch_size
        self.grid_size = grid_size
        self._resolved: GenerativeTask | None = None
        self._probe: dict[str, Tensor] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        return {"probe_size": self.probe_size}

    # ------------------------------------------------------------------ setup
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = self.task
        if task is None:
            dm = trainer.datamodule
            task = getattr(dm, "task", None)
            if task is None:
                where = "no datamodule" if dm is None else f"the datamodule {type(dm).__name__} has no `task` attribute"
                raise ValueError(
                    f"PosteriorGapCallback needs the generative task whose posterior is known, but {where}. "
                    "Pass PosteriorGapCallback(task=...) or use a datamodule with a `task` attribute "
                    "(for example lightning_interp.datamodules.SyntheticDataModule)."
                )
        if not isinstance(task, GenerativeTask):
            raise TypeError(f"the task must be a lightning_interp.tasks.GenerativeTask, got {type(task).__name__}")
        self._resolved = task
        self._check_module(pl_module, task)
        if not self._probe:
            self._draw_probe(task)

    def _check_module(self, module: nn.Module, task: GenerativeTask) -> None:
        device, dtype = model_device_dtype(module)
        x, _ = task.sample(2, torch.Generator().manual_seed(self.seed))
        shape = ", ".join(str(s) for s in task.input_shape)
        try:
            out = module(x.reshape(len(x), *task.input_shape).to(device=device, dtype=dtype))
        except Exception as err:
            raise TypeError(
                f"{type(module).__name__} failed on the task's inputs (float tensors of shape [N, {shape}]): "
                f"{type(err).__name__}: {err}. PosteriorGapCallback feeds x from task.sample(); use a model whose "
                f"forward takes [N, {shape}] inputs and returns [N, K] logits."
            ) from err
        if not isinstance(out, Tensor) or out.ndim != 2:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{type(module).__name__}.forward must return logits of shape [N, K], got {got}. "
                "Wrap the model so that forward returns a [N, K] tensor of logits."
            )
        if out.shape[1] != task.num_classes:
            raise ValueError(
                f"the model outputs {out.shape[1]} logits but the task has {task.num_classes} classes; "
                "set the model's number of classes to task.num_classes."
            )

    #: The probe comes from the task (or from ``probe=``), never from the trainer's data.
    needs_data = False

    def _draw_probe(self, task: GenerativeTask) -> None:
        if self.probe is None:
            x, y = task.sample(self.probe_size, self.generator)
        else:
            drawn = draw_probe(self.probe, self.probe_size, self.generator, self.unpack)
            like = task.sample(1, torch.Generator().manual_seed(0))[0]
            x, y = drawn.inputs.to(like.dtype).reshape(-1, *like.shape[1:]), drawn.labels
        log_joint = task.log_joint(x)  # once: the density and the posterior both follow from it
        log_density = torch.logsumexp(log_joint, dim=1)
        if y is None:  # y ~ p(y|x): with x from the task's input distribution, (x, y) follows the task
            y = torch.multinomial((log_joint - log_density[:, None]).exp(), 1, generator=self.generator)[:, 0]
        probe = {"x": x, "y": y, "log_posterior": log_joint - log_density[:, None], "log_density": log_density}
        if self.num_density_bins > 1:
            qs = torch.linspace(0, 1, self.num_density_bins + 1, dtype=torch.float64)[1:-1]
            probe["density_edges"] = torch.unique(torch.quantile(log_density, qs))
        if task.dim == 1:
            lo, hi = x.min().item(), x.max().item()
            pad = 0.05 * (hi - lo)
            grid = torch.linspace(lo - pad, hi + pad, self.grid_size)[:, None]
            probe.update(grid=grid, grid_log_posterior=task.log_posterior(grid), grid_log_density=task.log_density(grid))
        self._probe = probe

    # ------------------------------------------------------------------ measurement
    def _logits(self, module: nn.Module, x: Tensor) -> Tensor:
        device, dtype = model_device_dtype(module)
        shape = self._resolved.input_shape if self._resolved is not None else x.shape[1:]
        chunks = [
            module(x[i : i + self.batch_size].reshape(-1, *shape).to(device=device, dtype=dtype))
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(chunks)

    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """The time of the probe's logits: the posterior is computed once, when the probe is drawn."""
        if not self._probe:
            return None
        start = time.perf_counter()
        with torch.no_grad():
            self._logits(pl_module, self._probe["x"])
        return time.perf_counter() - start

    def measure(self, pl_module: nn.Module) -> Measurement:
        if not self._probe:
            raise RuntimeError("PosteriorGapCallback.measure() called before setup()")
        p = self._probe
        logits = self._logits(pl_module, p["x"])
        device = logits.device
        # every rank holds the whole probe set: no sync across processes (it would count each example twice)
        metric = PosteriorGap(log_target=True, density_edges=p.get("density_edges"), sync_on_compute=False).to(device)
        metric.update(logits, p["log_posterior"].to(device), target=p["y"].to(device), log_density=p["log_density"].to(device))
        out = metric.compute()
        scalars: dict[str, Tensor | float] = {}
        for k in (*GAP_MEASURES, "excess_ce", "accuracy", "bayes_accuracy", "accuracy_gap"):
            # the mean of the per-example max_c |p - q| is mean_max_abs; max_abs is the worst example
            name = "mean_max_abs" if k == "max_abs" else k
            scalars[name], scalars[f"{name}_se"] = out[k], out[f"{k}_se"]
        scalars["max_abs"] = out["max_abs_worst"]
        data: dict[str, Any] = {"logits": logits, "gap": out}
        if "density_edges" in p:
            for k in ("kl", "tv"):
                scalars[f"{k}_low_density"] = out[f"{k}_by_density"][0]
                scalars[f"{k}_low_density_se"] = out[f"{k}_se_by_density"][0]
        if "grid" in p:
            data["grid_logits"] = self._logits(pl_module, p["grid"])
        return Measurement(scalars=scalars, data=data)

    # ------------------------------------------------------------------ figures and tables
    def figures(self, measurement: Measurement) -> dict[str, Any]:
        p = self._probe
        figs: dict[str, Any] = {}
        if "grid" in p:
            figs["posterior"] = _posterior_figure(
                p["grid"][:, 0],
                p["grid_log_posterior"].exp(),
                measurement.data["grid_logits"].softmax(dim=1).double().cpu(),
                p["grid_log_density"].exp(),
            )
        else:
            figs["reliability"] = _reliability_figure(
                p["log_posterior"].exp(), measurement.data["logits"].softmax(dim=1).double().cpu()
            )
        gap = measurement.data["gap"]
        if "kl_by_density" in gap:
            fig, ax = subplots(figsize=(6, 3.2))
            bins = torch.arange(len(gap["kl_by_density"]))
            for shift, k, label in ((-0.2, "kl", "KL(p||q)"), (0.2, "tv", "TV")):
                ax.bar(
                    bins + shift,
                    gap[f"{k}_by_density"].cpu(),
                    width=0.4,
                    label=label,
                    yerr=gap[f"{k}_se_by_density"].cpu(),
                    capsize=2,
                )
            ax.set_xlabel("input-density bin (0 = lowest density)")
            ax.set_ylabel("mean gap (± 1 SE)")
            ax.set_title("Posterior gap by input density")
            ax.legend()
            figs["gap_by_density"] = fig
        return figs

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        gap = measurement.data["gap"]
        if "kl_by_density" not in gap:
            return {}
        edges = self._probe["density_edges"].tolist()
        lows = [float("-inf"), *edges]
        highs = [*edges, float("inf")]
        rows = [
            [
                i,
                lows[i],
                highs[i],
                int(gap["count_by_density"][i]),
                *(float(gap[f"{k}_by_density"][i]) for k in GAP_MEASURES),
                *(float(gap[f"{k}_se_by_density"][i]) for k in ("kl", "tv")),
            ]
            for i in range(len(lows))
        ]
        means = ["mean_max_abs" if k == "max_abs" else k for k in GAP_MEASURES]
        return {"by_density": (["bin", "log_density_low", "log_density_high", "count", *means, "kl_se", "tv_se"], rows)}


def _posterior_figure(x: Tensor, p: Tensor, q: Tensor, density: Tensor) -> Any:
    import matplotlib

    fig, (ax, ax2) = subplots(2, 1, figsize=(6, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for c in range(p.shape[1]):
        color = colors[c % len(colors)]
        ax.plot(x, p[:, c], color=color, lw=2, label=f"true p(c={c}|x)")
        ax.plot(x, q[:, c], color=color, lw=2, ls="--", label=f"model q(c={c}|x)")
    ax.set_ylabel("probability")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Model softmax vs. Bayesian posterior")
    ax2.fill_between(x, density, alpha=0.4, color="gray")
    ax2.set_ylabel("p(x)")
    ax2.set_xlabel("x")
    return fig


def _reliability_figure(p: Tensor, q: Tensor, max_points: int = 3000) -> Any:
    fig, ax = subplots(figsize=(4.5, 4.5))
    n = min(len(p), max_points)
    for c in range(p.shape[1]):
        ax.scatter(p[:n, c], q[:n, c], s=4, alpha=0.4, label=f"class {c}")
    ax.plot([0, 1], [0, 1], color="black", lw=1)
    ax.set_xlabel("true posterior p(c|x)")
    ax.set_ylabel("model softmax q(c|x)")
    ax.set_title("q vs. p on the probe set")
    ax.legend(fontsize=8, markerscale=3)
    return fig
