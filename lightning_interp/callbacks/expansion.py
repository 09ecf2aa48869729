"""Logit (energy) expansion callback: fields, couplings and variance by order for categorical-input models.

Reference: Zamuner & De Los Rios, arXiv:2102.03202 (2021). See :mod:`lightning_interp.expansion`
(definitions follow docs/expansion.md; the paper's exact formulas are not reproduced here). Every logged
number comes from :func:`~lightning_interp.expansion.measure_expansion`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import InterpretabilityCallback
from lightning_interp.callbacks.measurement import Measurement
from lightning_interp.checks import check_choice, check_int
from lightning_interp.encoding import one_hot_flat
from lightning_interp.expansion import Target, check_target, measure_expansion, resolve_target, unit_pairs
from lightning_interp.plotting import expansion_figures
from lightning_interp.results import flat_scalars
from lightning_interp.sequences import Evaluator

__all__ = ["LogitExpansionCallback"]


class LogitExpansionCallback(InterpretabilityCallback):
    """Log the Potts expansion of a categorical-input classifier's logit during training.

    The model must take one-hot inputs of ``seq_len`` sites with ``num_states`` states (site-major
    ``[N, L * q]``). Each measurement is :func:`~lightning_interp.expansion.measure_expansion` on background
    sequences drawn with :meth:`draw_generator` (the seed and the step). Logged: ``expansion/var_order1``,
    ``expansion/var_order2``, ``expansion/var_residual`` (fractions of the logit's variance under the
    uniform measure; with ``_se``, a grouped jackknife over the background sequences, for the sampled
    method), ``expansion/max_coupling`` (largest APC-corrected coupling strength); when the
    datamodule exposes planted parameters (``planted_field_difference()`` /
    ``planted_coupling_difference()``, as :class:`~lightning_interp.datamodules.PottsDataModule`),
    also ``expansion/field_corr`` and ``expansion/coupling_corr``: correlations of the recovered
    zero-sum-gauge terms with the planted differences. Images: the coupling-strength map; table: the
    strongest pairs.

    With ``units``, hidden units are expanded as well (the paper expands "each layer of the network, and
    the logits layer in particular"): for each ``(layer, unit)``, the output (pre-activation) of module
    ``layer``, flattened unit ``unit``, as a Potts energy of the input, logged under
    ``expansion/<layer>/unit<unit>/`` with the same names (``var_order1``, ``var_order2``,
    ``var_residual`` [``_se``], ``max_coupling``), with its own coupling-strength map and strongest pairs.
    The units of one layer share the forward passes of one expansion; each layer costs about as much as
    the logit's.

    Args:
        seq_len: sites ``L``.
        num_states: states per site ``q``.
        method: ``"sampled"`` (default), ``"exact"`` or ``"quadratic"`` (see :func:`~lightning_interp.expansion.expand`).
        order: 1 or 2.
        num_samples: background sequences of the sampled method.
        target: output index, ``(a, b)`` for ``z_a - z_b``, or ``None``: the difference ``(1, 0)`` for a
            two-class model, output 0 otherwise.
        max_evaluations: the exact method's limit.
        top_pairs: rows of the strongest-pairs table.
        units: hidden units to expand besides the logit: ``(layer, unit)`` pairs, a ``named_modules()``
            path and a flattened unit index of the layer's per-example output (see
            :func:`~lightning_interp.expansion.expand`).
        **kwargs: the arguments every callback shares (``every_n_epochs``, ``every_n_steps``, ``run_on``,
            ``measure_at_start``, ``measure_at_end``, ``seed`` (of the background sequences, with the step),
            ``log_images``, ``figure_dir``, ``key_prefix``, ``prog_bar``, ``budget``): see
            :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`. The expansion reads no data, so
            ``probe`` and ``unpack`` other than ``None`` are refused.

    Raises:
        ValueError: in ``__init__``, for ``seq_len < 2``, ``num_states < 2``, an unknown ``method``,
            ``order`` not 1 or 2, ``num_samples < 2``, a malformed ``target`` or ``units``, ``method="quadratic"``
            with ``units``, or exact enumeration over the limit; before the first training step, for a model
            that rejects the encoded input, a ``target`` outside the model's outputs, a layer of ``units``
            the model does not have (the message lists close names), or a unit outside its layer's width.
        TypeError: in ``__init__``, for a ``probe`` or an ``unpack``.

    Example:
        >>> cb = LogitExpansionCallback(seq_len=8, num_states=4, every_n_epochs=1)
    """

    prefix = "expansion"

    def __init__(
        self,
        seq_len: int,
        num_states: int,
        method: Literal["sampled", "exact", "quadratic"] = "sampled",
        order: int = 2,
        num_samples: int = 256,
        target: Target = None,
        max_evaluations: int = 2**20,
        top_pairs: int = 10,
        units: Sequence[tuple[str, int]] = (),
        **kwargs: Any,
    ) -> None:
        data = [name for name in ("probe", "unpack") if kwargs.get(name) is not None]
        if data:
            raise TypeError(
                f"LogitExpansionCallback takes no {' or '.join(data)}: it averages over uniformly random sequences, "
                "not over data; leave them out"
            )
        super().__init__(**kwargs)
        check_int("seq_len", seq_len, 2)
        check_int("num_states", num_states, 2)
        check_choice("method", method, ("sampled", "exact", "quadratic"))
        check_choice("order", order, (1, 2))
        check_int("num_samples", num_samples, 2)
        check_int("max_evaluations", max_evaluations, 1)
        check_int("top_pairs", top_pairs, 0)
        check_target(target)
        groups = unit_pairs(units)
        if groups and method == "quadratic":
            raise ValueError("method='quadratic' is the closed form of the logits; with units= use method='exact' or 'sampled'")
        if method == "exact" and num_states**seq_len > max_evaluations:
            raise ValueError(
                f"method='exact' needs q^L = {num_states**seq_len} evaluations, over max_evaluations="
                f"{max_evaluations}; use method='sampled'"
            )
        self.seq_len, self.num_states, self.method, self.order = seq_len, num_states, method, order
        self.num_samples, self.target, self.max_evaluations, self.top_pairs = num_samples, target, max_evaluations, top_pairs
        self.units = [(str(item[0]), int(item[1])) for item in units]  # as given (the order is in the state key)
        self._target: Target = target
        self._planted: tuple[Tensor, Tensor] | None = None

    def _state_key_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"seq_len": self.seq_len, "num_states": self.num_states, "method": self.method}
        if self.units:  # only then: the default keeps the key of checkpoints written before units existed
            fields["units"] = [list(pair) for pair in self.units]
        return fields

    #: The expansion averages over uniformly random sequences, not over the trainer's data.
    needs_data = False

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._target = resolve_target(pl_module, self.seq_len, self.num_states, self.target)
        for layer, units in unit_pairs(self.units).items():
            # unknown layers (with close names), layers that do not run and units beyond the width fail here
            Evaluator(pl_module, self.num_states, one_hot_flat, None, 2, layer=layer, unit=units)(
                torch.zeros(2, self.seq_len, dtype=torch.long)
            )
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "planted_coupling_difference") and hasattr(dm, "planted_field_difference"):
            self._planted = (
                torch.as_tensor(dm.planted_field_difference(), dtype=torch.float64),
                torch.as_tensor(dm.planted_coupling_difference(), dtype=torch.float64),
            )

    def draw_generator(self) -> torch.Generator:
        """The generator of the background sequences of the measurement at :attr:`step`: seeded by ``seed`` and the step."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~lightning_interp.expansion.measure_expansion` a measurement uses."""
        return {
            "seq_len": self.seq_len,
            "num_states": self.num_states,
            "method": self.method,
            "order": self.order,
            "num_samples": self.num_samples,
            "target": self._target,
            "max_evaluations": self.max_evaluations,
            "units": self.units,
            "planted": self._planted,
            "top_pairs": self.top_pairs,
        }

    def measure(self, pl_module: nn.Module) -> Measurement:
        result = measure_expansion(pl_module, generator=self.draw_generator(), **self.settings())
        return Measurement(scalars=flat_scalars(result), data={"result": result})

    def figures(self, measurement: Measurement) -> dict[str, Any]:
        return expansion_figures(measurement.data["result"])

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        return measurement.data["result"].tables() if "result" in measurement.data else {}
