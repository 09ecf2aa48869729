"""Logit (energy) expansion callback: fields, couplings and variance by order for categorical-input models.

Reference: Zamuner & De Los Rios, arXiv:2102.03202 (2021). See :mod:`lightning_interp.expansion`
(definitions follow docs/expansion.md; the paper's exact formulas are not reproduced here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_interp.callbacks.base import InterpretabilityCallback, Measurement, RunOn, check_choice, check_int
from lightning_interp.expansion import Evaluator, PottsExpansion, Target, expand, one_hot_flat, zero_sum_gauge
from lightning_interp.plotting import subplots

__all__ = ["LogitExpansionCallback"]


def _corr(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten().double(), b.flatten().double().to(a.device)
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300)


def _unit_targets(units: Any) -> list[tuple[str, int]]:
    """``units`` as a list of ``(layer, unit)`` pairs; ``ValueError`` unless each is a layer name and an index ``>= 0``."""
    form = (
        "units must be a list of (layer, unit) pairs: a named_modules() path (a non-empty string) and a flattened "
        "unit index >= 0, e.g. [('net.0', 3)]"
    )
    if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
        raise ValueError(f"{form}; got {units!r}")
    pairs: list[tuple[str, int]] = []
    for item in units:
        ok = isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and item[0] != ""
        ok = ok and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0
        if not ok:
            raise ValueError(f"{form}; got {item!r} in units")
        pair = (item[0], int(item[1]))
        if pair in pairs:
            raise ValueError(f"units names {pair!r} twice; list each (layer, unit) once")
        pairs.append(pair)
    return pairs


def _by_layer(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    """The unit indices of each layer, in the order given (one expansion per layer serves all its units)."""
    groups: dict[str, list[int]] = {}
    for layer, unit in pairs:
        groups.setdefault(layer, []).append(unit)
    return groups


def _unit_key(layer: str, unit: int) -> str:
    return f"{layer}/unit{unit}"


def _strength_figure(strength: Tensor, title: str) -> Any:
    s = strength.double().cpu()
    fig, ax = subplots(figsize=(4.5, 4))
    im = ax.imshow(s, cmap="viridis")
    ax.set_xlabel("site j")
    ax.set_ylabel("site i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return fig


def _target_form(target: Any) -> bool:
    """Whether ``target`` is ``None``, an index ``>= 0`` or a pair of distinct indices ``>= 0``."""

    def index(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if target is None or index(target):
        return True
    return isinstance(target, (tuple, list)) and len(target) == 2 and all(index(v) for v in target) and target[0] != target[1]


class LogitExpansionCallback(InterpretabilityCallback):
    """Log the Potts expansion of a categorical-input classifier's logit during training.

    The model must take one-hot inputs of ``seq_len`` sites with ``num_states`` states (site-major
    ``[N, L * q]`` by default; pass ``encode`` otherwise). Logged: ``expansion/var_order1``,
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
        every_n_epochs: see :class:`~lightning_interp.callbacks.base.InterpretabilityCallback`.
        every_n_steps: see the base class.
        run_on: see the base class.
        measure_at_start: see the base class.
        measure_at_end: see the base class.
        seed: seed of the background sequences (with the step).
        log_images: see the base class.
        figure_dir: see the base class.
        key_prefix: see the base class.
        prog_bar: scalars to show in the progress bar; see the base class.
        budget: the share of training time its scheduled measurements may use; see the base class.

    Raises:
        ValueError: in ``__init__``, for ``seq_len < 2``, ``num_states < 2``, an unknown ``method``,
            ``order`` not 1 or 2, ``num_samples < 2``, a malformed ``target`` or ``units``, ``method="quadratic"``
            with ``units``, or exact enumeration over the limit; before the first training step, for a model
            that rejects the encoded input, a ``target`` outside the model's outputs, a layer of ``units``
            the model does not have (the message lists close names), or a unit outside its layer's width.

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
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        run_on: RunOn = "train_epoch_end",
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        seed: int = 0,
        log_images: bool = True,
        figure_dir: str | None = None,
        key_prefix: str | None = None,
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
            prog_bar=prog_bar,
            budget=budget,
        )
        check_int("seq_len", seq_len, 2)
        check_int("num_states", num_states, 2)
        check_choice("method", method, ("sampled", "exact", "quadratic"))
        check_choice("order", order, (1, 2))
        check_int("num_samples", num_samples, 2)
        check_int("max_evaluations", max_evaluations, 1)
        check_int("top_pairs", top_pairs, 0)
        if not _target_form(target):
            raise ValueError(
                "target must be None, an output index >= 0, or a pair (a, b) of distinct output indices "
                f"for z_a - z_b; got {target!r}"
            )
        pairs = _unit_targets(units)
        if pairs and method == "quadratic":
            raise ValueError("method='quadratic' is the closed form of the logits; with units= use method='exact' or 'sampled'")
        if method == "exact" and num_states**seq_len > max_evaluations:
            raise ValueError(
                f"method='exact' needs q^L = {num_states**seq_len} evaluations, over max_evaluations="
                f"{max_evaluations}; use method='sampled'"
            )
        self.seq_len, self.num_states, self.method, self.order = seq_len, num_states, method, order
        self.num_samples, self.target, self.max_evaluations, self.top_pairs = num_samples, target, max_evaluations, top_pairs
        self.units = pairs
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
        out = Evaluator(pl_module, self.num_states, one_hot_flat, None, 2)(torch.zeros(2, self.seq_len, dtype=torch.long))
        if self.target is None:
            self._target = (1, 0) if out.shape[1] == 2 else 0
        else:
            indices = self.target if isinstance(self.target, (tuple, list)) else (self.target,)
            if max(indices) >= out.shape[1]:
                raise ValueError(
                    f"target={self.target!r} names output {max(indices)}, but {type(pl_module).__name__} has "
                    f"{out.shape[1]} output(s) (0..{out.shape[1] - 1}); choose indices below {out.shape[1]}"
                )
            self._target = tuple(self.target) if isinstance(self.target, list) else self.target
        for layer, units in _by_layer(self.units).items():
            # unknown layers (with close names), layers that do not run and units beyond the width fail here
            Evaluator(pl_module, self.num_states, one_hot_flat, None, 2, layer=layer, unit=units)(
                torch.zeros(2, self.seq_len, dtype=torch.long)
            )
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "planted_coupling_difference") and hasattr(dm, "planted_field_difference"):
            h = torch.as_tensor(dm.planted_field_difference(), dtype=torch.float64)
            j = torch.as_tensor(dm.planted_coupling_difference(), dtype=torch.float64)
            _, h0, j0 = zero_sum_gauge(h, j)
            self._planted = (h0, j0)

    def _expand(self, pl_module: nn.Module, **which: Any) -> PottsExpansion:
        # every expansion of a measurement draws the same background sequences
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        return expand(
            pl_module,
            self.seq_len,
            self.num_states,
            order=self.order,
            method=self.method,
            num_samples=self.num_samples,
            generator=gen,
            max_evaluations=self.max_evaluations,
            **which,
        )

    @staticmethod
    def _order_scalars(e: PottsExpansion, strength: Tensor, prefix: str = "") -> dict[str, Tensor | float]:
        scalars: dict[str, Tensor | float] = {
            f"{prefix}var_order1": e.variance_explained[1],
            f"{prefix}var_order2": e.variance_explained[2],
            f"{prefix}var_residual": e.variance_explained["residual"],
            f"{prefix}max_coupling": strength.max(),
        }
        if e.variance_explained_se is not None:
            for key, name in ((1, "var_order1"), (2, "var_order2"), ("residual", "var_residual")):
                scalars[f"{prefix}{name}_se"] = e.variance_explained_se[key]
        return scalars

    def measure(self, pl_module: nn.Module) -> Measurement:
        e = self._expand(pl_module, target=self._target)
        strength = e.coupling_strength(apc=True)
        scalars = self._order_scalars(e, strength)
        if self._planted is not None:
            h0, j0 = self._planted
            scalars["field_corr"] = _corr(e.fields, h0)
            scalars["coupling_corr"] = _corr(e.couplings, j0)
        hidden: dict[str, tuple[PottsExpansion, Tensor]] = {}
        for layer, units in _by_layer(self.units).items():
            layer_expansion = self._expand(pl_module, layer=layer, unit=units)
            for k, unit in enumerate(units):
                eu = layer_expansion.select(k)
                su = eu.coupling_strength(apc=True)
                key = _unit_key(layer, unit)
                hidden[key] = (eu, su)
                scalars.update(self._order_scalars(eu, su, f"{key}/"))
        return Measurement(scalars=scalars, data={"expansion": e, "strength": strength, "units": hidden})

    def figures(self, measurement: Measurement) -> dict[str, Any]:
        figs = {"coupling_strength": _strength_figure(measurement.data["strength"], "coupling strength (Frobenius, APC)")}
        for key, (_, strength) in measurement.data.get("units", {}).items():
            figs[f"{key}/coupling_strength"] = _strength_figure(strength, f"{key}: coupling strength (Frobenius, APC)")
        return figs

    def tables(self, measurement: Measurement) -> dict[str, tuple[list[str], list[list[Any]]]]:
        columns = ["site_i", "site_j", "strength_apc"]
        e: PottsExpansion = measurement.data["expansion"]
        pairs = e.strongest_pairs(self.top_pairs, apc=True)
        out = {"strongest_pairs": (columns, [[i, j, s] for i, j, s in pairs])}
        for key, (eu, _) in measurement.data.get("units", {}).items():
            out[f"{key}/strongest_pairs"] = (columns, [[i, j, s] for i, j, s in eu.strongest_pairs(self.top_pairs, apc=True)])
        return out
