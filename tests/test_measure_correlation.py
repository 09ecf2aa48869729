"""measure_correlation: the function every logged correlation read-out comes from."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import CorrelationOrderCallback
from lightning_interp.correlation import CorrelationResult, LayerReplacement, Quadratic, measure_correlation
from lightning_interp.results import MethodResult, flat_scalars

TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Tiny(pl.LightningModule):
    """Three classes of 4-d inputs through a ReLU and a quadratic hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 8), Quadratic(0.3), nn.Linear(8, 3))

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


def _data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + torch.nn.functional.one_hot(y, 4).float() * 1.5
    return x, y


def _same(logged: dict[str, float], measured: dict[str, object]) -> None:
    """Every key logged equals the function's value exactly (NaN equals NaN), and no key is missing."""
    logged = {k: v for k, v in logged.items() if k not in ("step", "epoch")}
    assert set(logged) == set(measured)
    for key, value in measured.items():
        got = float(value.item()) if isinstance(value, torch.Tensor) else float(value)  # type: ignore[arg-type]
        assert got == logged[key] or (math.isnan(got) and math.isnan(logged[key])), (key, got, logged[key])


@pytest.mark.parametrize("entry", ["fit", "validate"])
def test_the_callback_logs_what_measure_correlation_returns_on_its_probe(entry: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    seed = 4
    cb = CorrelationOrderCallback(probe_size=150, min_per_class=5, seed=seed, log_images=False, budget=None)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], **TRAINER)  # type: ignore[arg-type]
    if entry == "fit":
        trainer.fit(model, loader, loader)
    else:
        trainer.validate(model, loader, verbose=False)
    logged = cb.history[-1]
    assert cb.probe_inputs is not None and cb.probe_labels is not None and len(cb.probe_labels) == 150
    assert cb.layers == ["input", "net.1", "net.3"]  # "auto": the input and the two activations
    # the documented seeding of the draws: seed and step, one generator per measurement
    generator = torch.Generator().manual_seed(seed * 1_000_003 + int(logged["step"]))
    result = measure_correlation(model.eval(), cb.probe_inputs, cb.probe_labels, generator=generator, layers="auto")
    _same(logged, flat_scalars(result))
    assert logged["probe_size"] == 150


def test_result_shape_identities_and_errors() -> None:
    torch.manual_seed(1)
    model = Tiny().eval()
    x, y = _data(90, seed=1)
    result = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0), layers=["input", "net.3"])
    assert isinstance(result, MethodResult) and isinstance(result, CorrelationResult)
    scalars = result.scalars()
    assert scalars["probe_size"] == (90, None) and result.tables() == {}
    names = ("acc_real", "acc_order2", "acc_order1", "acc_order0", "higher_order_gap", "non_gaussianity")
    assert [k for k in scalars if k != "probe_size"] == [f"{layer}/{n}" for layer in ("input", "net.3") for n in names]
    assert all(se is not None for k, (_, se) in scalars.items() if k != "probe_size")
    with torch.no_grad():
        real = (model(x).argmax(1) == y).double().mean()
    for layer in ("input", "net.3"):
        values = result.layers[layer]
        torch.testing.assert_close(values["acc_real"][0], real, rtol=0, atol=1e-15)
        # the gap is the mean of the paired differences: the difference of the two means
        gap = values["acc_real"][0] - values["acc_order2"][0]
        torch.testing.assert_close(values["higher_order_gap"][0], gap, rtol=0, atol=1e-12)
    # one draw per example: another generator gives other surrogate accuracies, the same real accuracy
    other = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(1), layers=["input", "net.3"])
    assert other.layers["input"]["acc_real"] == result.layers["input"]["acc_real"]
    assert any(other.layers[k]["acc_order2"][0] != result.layers[k]["acc_order2"][0] for k in ("input", "net.3"))
    with pytest.raises(ValueError, match=r"needs the class labels \[N\]"):
        measure_correlation(model, x)
    with pytest.raises(ValueError, match=r"net\.9"):
        measure_correlation(model, x, y, layers=["net.9"])
    with pytest.raises(ValueError, match=r"fewer than 2 examples"):
        measure_correlation(model, x[:4], torch.tensor([0, 1, 1, 2]), layers=["input"])


def test_the_replacement_cache_is_filled_reused_and_renewed_for_another_model() -> None:
    torch.manual_seed(2)
    model, x, y = Tiny().eval(), *_data(60, seed=2)
    cache: dict[str, LayerReplacement] = {}
    first = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0), replacements=cache)
    assert set(cache) == {"input", "net.1", "net.3"} and all(r.model is model for r in cache.values())
    kept = dict(cache)
    again = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0), replacements=cache)
    assert all(cache[k] is kept[k] for k in kept)  # reused: torch.fx splits the model once
    assert flat_scalars(again) == flat_scalars(first)
    uncached = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0))
    assert flat_scalars(uncached) == flat_scalars(first)
    other = Tiny().eval()
    measure_correlation(other, x, y, generator=torch.Generator().manual_seed(0), replacements=cache)
    assert all(r.model is other for r in cache.values())


def test_non_finite_logits_make_the_accuracies_nan() -> None:
    torch.manual_seed(3)
    model, x, y = Tiny().eval(), *_data(60, seed=3)
    with torch.no_grad():
        model.net[4].weight[0, 0] = math.nan
    result = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0), layers=["input"])
    flat = flat_scalars(result)
    assert all(math.isnan(float(flat[f"input/{n}"])) for n in ("acc_real", "acc_order2", "acc_order1", "acc_order0"))
    assert not math.isnan(float(flat["input/non_gaussianity"]))


def test_the_figure_draws_the_result_and_the_history() -> None:
    from lightning_interp.plotting import correlation_orders_figure

    torch.manual_seed(4)
    model, x, y = Tiny().eval(), *_data(60, seed=4)
    result = measure_correlation(model, x, y, generator=torch.Generator().manual_seed(0), layers=["input", "net.1"])
    history = [{"step": float(s), **{k: float(v) for k, v in flat_scalars(result).items()}} for s in (0, 10)]
    fig = correlation_orders_figure(result, history)
    left, right = fig.axes[:2]
    assert len(left.patches) == 4 * 2  # four bars per layer
    assert [t.get_text() for t in left.get_xticklabels()] == ["input", "net.1"]
    assert len(right.containers) == 2  # one error-bar line per layer


def test_the_callback_declares_its_own_arguments_and_passes_the_shared_ones_on() -> None:
    import inspect

    cb = CorrelationOrderCallback(every_n_steps=5, seed=9, key_prefix="orders", probe=_data(30), budget=None)
    assert (cb.every_n_steps, cb.seed, cb.prefix, cb.budget) == (5, 9, "orders", None) and cb.probe is not None
    own = [p.name for p in inspect.signature(CorrelationOrderCallback).parameters.values() if p.kind is not p.VAR_KEYWORD]
    assert own == ["layers", "probe_size", "min_per_class"]
    with pytest.raises(TypeError, match="bogus"):
        CorrelationOrderCallback(bogus=1)
