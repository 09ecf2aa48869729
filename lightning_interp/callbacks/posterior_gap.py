"""Posterior-gap callback: track the distance between the network's softmax and the exact posterior.

Reference: Yudi Xie, "How do we interpret the outputs of a neural network trained on
classification?", ICLR 2025 Blogposts Track. The read-outs are
:func:`lightning_interp.posterior.measure_posterior_gap`'s.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import InterpretabilityCallback
from lightning_interp.callbacks.measurement import Measurement
from lightning_interp.checks import check_int, model_device_dtype
from lightning_interp.plotting import posterior_gap_figures
from lightning_interp.posterior import ExactPosterior, batched_logits, exact_posterior, measure_posterior_gap
from lightning_interp.probe import draw_probe
from lightning_interp.results import flat_scalars
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
    posterior). At each measurement it logs what :func:`~lightning_interp.posterior.measure_posterior_gap`
    returns:
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
        **kwargs: the arguments every callback shares (``every_n_epochs``, ``seed``, ``probe``, ``budget``, ...):
            see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`. ``seed`` seeds the probe set;
            ``probe``: inputs to measure on instead of samples of the task (they should follow the task's input
            distribution), read with ``unpack``.

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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
        #: The task's exact posterior on the probe set (``None`` until the probe is drawn).
        self.exact: ExactPosterior | None = None

    def _state_key_fields(self) -> dict[str, Any]:
        return {"probe_size": self.probe_size}

    # ------------------------------------------------------------------ setup
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = self.task
        if task is None:
            dm = getattr(trainer, "datamodule", None)  # set by fit/validate with a datamodule
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
        if self.exact is None:
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
        y: Tensor | None
        if self.probe is None:
            x, y = task.sample(self.probe_size, self.generator)
        else:
            drawn = draw_probe(self.probe, self.probe_size, self.generator, self.unpack)
            x, y = drawn.inputs, drawn.labels
        # labels missing from the probe are drawn from the posterior with the callback's generator, once
        self.exact = exact_posterior(
            task, x, y, generator=self.generator, num_density_bins=self.num_density_bins, grid_size=self.grid_size
        )
        self.probe_inputs, self.probe_labels = self.exact.inputs, self.exact.labels

    # ------------------------------------------------------------------ measurement
    def estimate_cost(self, pl_module: nn.Module) -> float | None:
        """The time of the probe's logits: the posterior is computed once, when the probe is drawn."""
        if self.exact is None or self._resolved is None:
            return None
        start = time.perf_counter()
        with torch.no_grad():
            batched_logits(pl_module, self.exact.inputs, self._resolved.input_shape, self.batch_size)
        return time.perf_counter() - start

    def measure(self, pl_module: nn.Module) -> Measurement:
        if self.exact is None or self._resolved is None:
            raise RuntimeError("PosteriorGapCallback.measure() called before setup()")
        exact = self.exact
        result = measure_posterior_gap(
            pl_module, exact.inputs, exact.labels, task=self._resolved, batch_size=self.batch_size, exact=exact
        )
        data: dict[str, Any] = {"result": result, "logits": result.logits, "gap": result.gap}
        if result.grid_logits is not None:
            data["grid_logits"] = result.grid_logits
        return Measurement(scalars=dict(flat_scalars(result)), data=data)

    # ------------------------------------------------------------------ figures and tables
    def figures(self, measurement: Measurement) -> dict[str, Any]:
        return posterior_gap_figures(measurement.data["result"])

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        return measurement.data["result"].tables()
