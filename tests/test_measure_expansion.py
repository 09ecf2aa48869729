"""measure_expansion: the function every logged expansion read-out comes from."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_interp.callbacks import LogitExpansionCallback
from lightning_interp.datamodules import PottsDataModule
from lightning_interp.expansion import ExpansionResult, Square, expand, measure_expansion, resolve_target, unit_pairs
from lightning_interp.results import MethodResult, flat_scalars

TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
L, Q = 4, 3


class Tiny(pl.LightningModule):
    """A classifier of one-hot sequences with a squared hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(L * Q, 6), Square(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _same(logged: dict[str, float], measured: dict[str, object]) -> None:
    """Every key logged equals the function's value exactly (NaN equals NaN), and no key is missing."""
    logged = {k: v for k, v in logged.items() if k not in ("step", "epoch")}
    assert set(logged) == set(measured)
    for key, value in measured.items():
        got = float(value.item()) if isinstance(value, torch.Tensor) else float(value)  # type: ignore[arg-type]
        assert got == logged[key] or (math.isnan(got) and math.isnan(logged[key])), (key, got, logged[key])


@pytest.mark.parametrize("entry", ["fit", "validate"])
def test_the_callback_logs_what_measure_expansion_returns(entry: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    dm = PottsDataModule(seq_len=L, num_states=Q, num_pairs=1, n_train=128, n_val=64, batch_size=32)
    seed, units = 3, [("net.0", 4), ("net.1", 0), ("net.0", 1)]
    cb = LogitExpansionCallback(L, Q, num_samples=40, seed=seed, units=units, top_pairs=3, log_images=False, budget=None)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], **TRAINER)  # type: ignore[arg-type]
    if entry == "fit":
        trainer.fit(model, dm)
    else:
        trainer.validate(model, dm, verbose=False)
    logged = cb.history[-1]
    # the documented seeding of the background sequences: seed and step
    generator = torch.Generator().manual_seed(seed * 1_000_003 + int(logged["step"]))
    planted = (dm.planted_field_difference(), dm.planted_coupling_difference())
    result = measure_expansion(
        model, generator=generator, seq_len=L, num_states=Q, num_samples=40, units=units, planted=planted, top_pairs=3
    )
    _same(logged, flat_scalars(result))
    assert {"field_corr", "coupling_corr", "net.1/unit0/var_order2_se"} <= set(logged)
    assert cb.last is not None and cb.tables(cb.last) == result.tables()
    assert set(result.tables()) == {"strongest_pairs", *(f"{a}/unit{u}/strongest_pairs" for a, u in units)}


def test_exact_result_of_a_quadratic_network_and_its_identities() -> None:
    torch.manual_seed(1)
    model = Tiny().net
    result = measure_expansion(model, seq_len=L, num_states=Q, method="exact", units=[("0", 2)])
    assert isinstance(result, MethodResult) and isinstance(result, ExpansionResult)
    scalars = result.scalars()
    # Linear -> Square -> Linear is exactly a pairwise energy: no residual; the fractions add to 1
    assert float(scalars["var_residual"][0]) < 1e-12
    assert float(scalars["var_order1"][0]) + float(scalars["var_order2"][0]) == pytest.approx(1, abs=1e-12)
    assert all(se is None for _, se in scalars.values())  # the exact method has no sampling error
    # a first-layer unit is a sum of site terms: order 1 only
    assert float(scalars["0/unit2/var_order1"][0]) == pytest.approx(1, abs=1e-6)
    # the default target of a two-output model is z_1 - z_0
    direct = expand(model, L, Q, method="exact", target=(1, 0))
    torch.testing.assert_close(result.expansion.fields, direct.fields, rtol=0, atol=0)
    torch.testing.assert_close(scalars["max_coupling"][0], direct.coupling_strength(apc=True).max())
    # planted terms equal to the recovered ones correlate perfectly
    with_planted = measure_expansion(
        model, seq_len=L, num_states=Q, method="exact", planted=(direct.fields, direct.couplings), top_pairs=2
    )
    assert float(with_planted.field_corr) == pytest.approx(1, abs=1e-12)  # type: ignore[arg-type]
    assert float(with_planted.coupling_corr) == pytest.approx(1, abs=1e-12)  # type: ignore[arg-type]
    columns, rows = with_planted.tables()["strongest_pairs"]
    assert columns == ["site_i", "site_j", "strength_apc"] and len(rows) == 2
    assert rows == [[i, j, s] for i, j, s in direct.strongest_pairs(2, apc=True)]


def test_background_inputs_generator_and_errors() -> None:
    torch.manual_seed(2)
    model = Tiny().net
    background = torch.randint(0, Q, (30, L))
    result = measure_expansion(model, background, torch.zeros(30), num_states=Q, target=1)  # seq_len from the inputs
    direct = expand(model, L, Q, method="sampled", background=background, target=1)
    torch.testing.assert_close(result.expansion.couplings, direct.couplings, rtol=0, atol=0)
    # every expansion of a measurement starts from the generator's state: the logit's and the units' alike
    g = torch.Generator().manual_seed(7)
    both = measure_expansion(model, seq_len=L, num_states=Q, num_samples=20, units=[("2", 1)], generator=g)
    logit = expand(model, L, Q, num_samples=20, method="sampled", target=(1, 0), generator=torch.Generator().manual_seed(7))
    unit = expand(model, L, Q, num_samples=20, method="sampled", layer="2", unit=1, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(both.units["2/unit1"][0].fields, unit.fields, rtol=0, atol=0)
    torch.testing.assert_close(both.expansion.fields, logit.fields, rtol=0, atol=0)  # the default target: z_1 - z_0
    with pytest.raises(ValueError, match="needs seq_len"):
        measure_expansion(model, num_states=Q)
    with pytest.raises(ValueError, match=r"target=5 names output 5, but Sequential has 2 output\(s\)"):
        resolve_target(model, L, Q, 5)
    with pytest.raises(ValueError, match="pair \\(a, b\\) of distinct"):
        measure_expansion(model, seq_len=L, num_states=Q, target=(1, 1))
    with pytest.raises(ValueError, match=r"units names \('0', 1\) twice"):
        unit_pairs([("0", 1), ("2", 0), ("0", 1)])
    assert unit_pairs([("0", 3), ("2", 0), ("0", 1)]) == {"0": [3, 1], "2": [0]}


def test_the_callback_declares_its_own_arguments_and_passes_the_shared_ones_on() -> None:
    import inspect

    cb = LogitExpansionCallback(L, Q, every_n_steps=5, seed=9, key_prefix="potts", probe=None, budget=None)
    assert (cb.every_n_steps, cb.seed, cb.prefix, cb.budget) == (5, 9, "potts", None)
    own = [p.name for p in inspect.signature(LogitExpansionCallback).parameters.values() if p.kind is not p.VAR_KEYWORD]
    assert own == ["seq_len", "num_states", "method", "order", "num_samples", "target", "max_evaluations", "top_pairs", "units"]
    with pytest.raises(TypeError, match="takes no probe: it averages over uniformly random sequences"):
        LogitExpansionCallback(L, Q, probe=torch.zeros(4, L * Q))
    with pytest.raises(ValueError, match=r"every_n_steps must be None or an int >= 0, got -1"):
        LogitExpansionCallback(L, Q, every_n_steps=-1)
