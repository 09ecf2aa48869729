"""The callbacks observe: under the default overhead budget every attached callback measures a real fit.

A user's own CNN on scikit-learn's real digits, plain dataloaders, the README's three image callbacks at
their defaults, and the default ("auto") budget, not ``LIGHTNING_INTERP_BUDGET=off``: each callback must
measure at the final step, log its main read-outs with standard errors and the sizes it used; monitors
never find their metric missing; NaN read-outs are logged as NaN, so ``EarlyStopping(check_finite=True)``
stops a diverged fit.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import AblationProbeCallback, CorrelationOrderCallback, FinalLayerSaliencyCallback
from lightning_interp.callbacks.budget import BUDGET_ENV

pytest.importorskip("sklearn")


class DigitNet(pl.LightningModule):
    """A user's CNN for 8 x 8 digits: conv-BN-ReLU-pool, conv-BN-ReLU, global average pooling, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch: Any, _: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, _: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), 3e-3)


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(data.target)
    return TensorDataset(x[400:1400], y[400:1400]), TensorDataset(x[:400], y[:400])


@pytest.fixture
def auto_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default budget, as a user gets it (the suite's conftest turns it off elsewhere)."""
    monkeypatch.delenv(BUDGET_ENV, raising=False)


def _trainer(callbacks: list[Callback], max_epochs: int = 2, **kw: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **{**settings, **kw})


def _quick_start() -> list[Any]:
    # the README's quick start, at the defaults, on the user's last conv
    return [
        FinalLayerSaliencyCallback(),
        AblationProbeCallback(layers=["conv2"]),
        CorrelationOrderCallback(layers=["conv2"]),
    ]


#: Main read-outs each callback must log with a ``_se`` companion.
MAIN = {
    "saliency": ["deletion_auc_pg"],
    "ablation": ["conv2/distributedness", "conv2/max_importance"],
    "correlation": ["conv2/higher_order_gap"],
}


def test_every_callback_measures_the_end_of_a_fit_under_the_default_budget(auto_budget: None, digits: Any) -> None:
    train, val = digits
    cbs = _quick_start()
    trainer = _trainer(cbs)
    trainer.fit(DigitNet(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=100))
    final = trainer.global_step
    for cb in cbs:
        assert cb.ledger.share == pytest.approx(0.05 / 3), "the auto budget, shared three ways"
        assert cb.measured >= 1 and cb.history[-1]["step"] == final, f"{cb.prefix}: the final step is measured"
        last = cb.history[-1]
        assert 1 <= last["probe_size"] <= cb.probe_size and 0 < last["work"] <= 1, cb.prefix
        for name in MAIN[cb.prefix]:
            assert math.isfinite(last[name]) and math.isfinite(last[f"{name}_se"]), f"{cb.prefix}/{name}"
            assert float(trainer.callback_metrics[f"{cb.prefix}/{name}"]) == pytest.approx(last[name])
    assert cbs[1].history[-1]["num_steps"] >= 100


def test_monitors_on_the_callbacks_metrics_never_find_them_missing(auto_budget: None, digits: Any, tmp_path: Any) -> None:
    train, val = digits
    cbs = _quick_start()
    stop = EarlyStopping(monitor="saliency/deletion_auc_pg", mode="min", patience=5)
    best = ModelCheckpoint(dirpath=str(tmp_path), monitor="correlation/conv2/higher_order_gap", mode="max")
    # the monitors come first in the list: they run after the callbacks measured in validation
    trainer = _trainer([stop, best, *cbs], max_epochs=3, enable_checkpointing=True)
    trainer.fit(DigitNet(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=100))
    assert trainer.current_epoch == 3 and best.best_model_score is not None
    for cb in (cbs[0], cbs[2]):
        assert [h["epoch"] for h in cb.history] == [0.0, 1.0, 2.0], f"{cb.prefix}: every epoch the monitor checks"


class Diverges(DigitNet):
    """Weights that turn NaN in the second epoch (a learning rate too high, in effect)."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            with torch.no_grad():
                self.conv2.weight[0, 0, 0, 0] = math.nan


def test_a_nan_fit_logs_nan_and_stops_through_check_finite(auto_budget: None, digits: Any) -> None:
    train, val = digits
    cbs = _quick_start()
    stop = EarlyStopping(monitor="correlation/conv2/higher_order_gap", mode="max", check_finite=True, patience=50)
    trainer = _trainer([*cbs, stop], max_epochs=5)
    with pytest.warns(UserWarning, match=r"weights are non-finite at step \d+ \(conv1.weight, .*every read-out is logged as NaN"):
        trainer.fit(Diverges(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=100))
    assert trainer.current_epoch < 4 and stop.stopped_epoch == 1, "check_finite stopped the fit at the NaN epoch"
    for cb in cbs:
        last = cb.history[-1]
        assert last["step"] == trainer.global_step, cb.prefix
        for name in MAIN[cb.prefix]:
            assert math.isnan(last[name]) and math.isnan(float(trainer.callback_metrics[f"{cb.prefix}/{name}"]))
        assert math.isfinite(last["probe_size"]), "sizes stay what they were"


def test_non_finite_probe_examples_are_left_out_with_a_warning(digits: Any) -> None:
    _, val = digits
    x, y = val.tensors[0][:120].clone(), val.tensors[1][:120]
    x[[3, 70], 0, 2, 2] = math.nan
    dirty = CorrelationOrderCallback(layers=["conv2"], probe_size=120, min_per_class=4)
    with pytest.warns(UserWarning, match=r"2 of 120 probe examples from the validation dataloader have non-finite"):
        _trainer([dirty], max_epochs=1, limit_train_batches=2).fit(
            DigitNet(), DataLoader(TensorDataset(x[:64], y[:64])), DataLoader(TensorDataset(x, y), batch_size=60)
        )
    assert dirty.probe_inputs is not None and len(dirty.probe_inputs) == 118 and torch.isfinite(dirty.probe_inputs).all()
    keep = torch.ones(120, dtype=torch.bool)
    keep[[3, 70]] = False
    assert sorted(dirty.probe_indices.tolist()) == torch.nonzero(keep).flatten().tolist()
    assert math.isfinite(dirty.history[-1]["conv2/higher_order_gap"])
    everything = x.clone()
    everything[:, 0, 0, 0] = math.nan
    broken = CorrelationOrderCallback(layers=["conv2"], probe_size=120, min_per_class=4)
    with pytest.raises(ValueError, match=r"every one of the 120 probe examples .* non-finite"):
        _trainer([broken], max_epochs=1).fit(
            DigitNet(), DataLoader(TensorDataset(x[:64], y[:64])), DataLoader(TensorDataset(everything, y), batch_size=60)
        )


class Unused(DigitNet):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Conv2d(16, 16, 1)  # built, never called in forward


@pytest.mark.parametrize(
    "make",
    [
        lambda: AblationProbeCallback(layers=["spare"]),
        lambda: CorrelationOrderCallback(layers=["spare"]),
        lambda: FinalLayerSaliencyCallback(feature_layer="spare"),
    ],
    ids=["ablation", "correlation", "saliency"],
)
def test_a_layer_that_never_runs_is_refused_before_the_first_step(make: Any, digits: Any) -> None:
    train, val = digits
    steps: list[int] = []

    class Count(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    with pytest.raises(ValueError, match=r"'spare'.* do not run in its forward\(\)"):
        _trainer([make(), Count()], max_epochs=1).fit(Unused(), DataLoader(train, batch_size=64), DataLoader(val, batch_size=100))
    assert steps == []
