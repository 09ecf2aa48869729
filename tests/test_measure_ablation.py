"""measure_ablation is what AblationProbeCallback logs: the callback's scalars equal the function's on its probe.

Like torchmetrics' MetricTester: a real (tiny) fit with the callback, then the function called directly on the probe
the callback drew, with the generator it seeded (``seed * 1_000_003 + step``); every logged key must come back equal
(NaN equal to NaN). Also: the result's protocol (scalars with SEs, tables), and the exact-vs-MCMC choice made in one
function, :func:`~lightning_interp.ablation.choose_method`.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.ablation import (
    AUTO_EXACT_MASKS,
    MAX_EXACT_UNITS,
    AblationResult,
    BayesianAblation,
    choose_method,
    measure_ablation,
)
from lightning_interp.callbacks import AblationProbeCallback
from lightning_interp.callbacks.measurement import SIZE_KEYS
from lightning_interp.results import MethodResult, flat_scalars

ROOT = Path(__file__).resolve().parents[1]


class TinyConvNet(pl.LightningModule):
    """Two conv layers (8 and 20 channels: one enumerated exactly, one sampled), global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 20, 3, padding=1)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    x = torch.randn(96, 1, 8, 8, generator=g) + y[:, None, None, None].float()  # a learnable class signal
    return DataLoader(TensorDataset(x, y), batch_size=32)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12 * max(1.0, abs(a))


SETTINGS: dict[str, Any] = dict(probe_size=60, num_chains=3, num_steps=60, burn_in=10, informative_bits=0.05)


@pytest.mark.parametrize(
    ("layers", "methods"),
    [(["conv1"], ["exact"]), (["conv2"], ["mcmc"]), (["conv1", "conv2"], ["exact", "mcmc"])],
    ids=["exact", "mcmc", "both"],
)
def test_callback_logs_what_measure_ablation_returns(layers: list[str], methods: list[str]) -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyConvNet()
    cb = AblationProbeCallback(layers=layers, seed=5, budget=None, min_ess=0.0, **SETTINGS)
    kw: dict = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(max_epochs=1, callbacks=[cb], **kw).fit(model, _data())
    logged = {k: v for k, v in cb.history[-1].items() if k not in ("step", "epoch")}
    assert cb.probe_inputs is not None and cb.probe_labels is not None
    model.eval()
    with torch.no_grad():
        result = measure_ablation(
            model,
            cb.probe_inputs,
            cb.probe_labels,
            generator=torch.Generator().manual_seed(cb.seed * 1_000_003 + cb.step),
            layers=layers,
            **{k: v for k, v in SETTINGS.items() if k != "probe_size"},
        )
    assert [result.results[layer].method for layer in layers] == methods
    direct = {k: float(v) for k, v in flat_scalars(result).items()}
    assert set(direct) == set(logged) - (set(SIZE_KEYS) - {"num_steps", "probe_size"})
    different = {k: (logged[k], direct[k]) for k in direct if not _same(logged[k], direct[k])}
    assert not different, different
    assert direct["probe_size"] == 60 and direct["num_steps"] == 60
    if "mcmc" in methods:  # the MCMC read-outs and diagnostics are among them
        assert {"conv2/ess", "conv2/acceptance_rate", "conv2/manifold_complexity_left_out"} <= set(direct)
    # the table the callback logs is the result's
    assert cb.last is not None and cb.tables(cb.last) == result.tables()


def test_measurement_follows_the_result_protocol_and_both_inference_kinds() -> None:
    """scalars() pairs every read-out with its SE (None for sizes and diagnostics); exact and MCMC agree in kind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(90, 4)
    y = model(x).argmax(1)
    exact = measure_ablation(model, x, y, layers="1", method="exact", top_units=5, class_names=["a", "b", "c"])
    mcmc = measure_ablation(model, x, y, layers="1", method="mcmc", num_chains=3, num_steps=80, burn_in=10)
    for m in (exact, mcmc):
        assert isinstance(m, MethodResult) and isinstance(m, AblationResult)
        scalars = m.scalars()
        assert scalars["num_steps"][1] is None and scalars["probe_size"] == (90.0, None)
        assert scalars["1/full_accuracy"][1] is None and scalars["1/distributedness"][1] is not None
        # the function's numbers are those of the engine fitted with the same generator
        r = m.results["1"]
        assert float(scalars["1/max_importance"][0]) == float(r.importance.max())
    assert exact.results["1"].method == "exact" and mcmc.results["1"].method == "mcmc"
    assert "1/ess" not in exact.scalars() and mcmc.scalars()["1/ess"][1] is None
    columns, rows = exact.tables()["top_units"]
    assert columns == ["layer", "unit", "task", "importance", "information_bits"] and len(rows) == 5
    assert {row[2] for row in rows} <= {"a", "b", "c"}
    info = [row[4] for row in rows]
    assert info == sorted(info, reverse=True)
    # the same generator state gives the same run; every layer starts from it
    again = measure_ablation(model, x, y, layers=["1", "1"], method="mcmc", num_chains=3, num_steps=80, burn_in=10)
    assert torch.equal(again.results["1"].importance, mcmc.results["1"].importance)


def test_exact_or_mcmc_is_decided_by_one_function() -> None:
    """choose_method decides for the engine, the function and the callback's budget; the rule's constants live there."""
    torch.manual_seed(0)
    for d in (4, 12, 13, 14, 16, 17):
        model = nn.Sequential(nn.Linear(3, d), nn.ReLU(), nn.Linear(d, 2)).eval()
        x = torch.randn(40, 3)
        y = torch.arange(40) % 2
        for chains, steps in ((2, 30), (16, 1100)):
            expected = choose_method(d, "auto", chains, steps)
            assert expected == (
                "exact" if d <= MAX_EXACT_UNITS and 2**d <= max(AUTO_EXACT_MASKS, chains * (steps + 1)) else "mcmc"
            )
            if expected == "exact" and d > 12:
                continue  # (a 2^13+ enumeration on 40 examples is slow and adds nothing here)
            engine = BayesianAblation(model, "1", num_chains=chains, num_steps=steps, burn_in=1)
            assert engine._method(d) == expected
            if steps == 30:
                fit = measure_ablation(model, x, y, layers="1", num_chains=chains, num_steps=steps, burn_in=5)
                assert fit.results["1"].method == expected, d
            cb = AblationProbeCallback(layers="1", num_chains=chains, num_steps=steps, burn_in=1, probe_size=200)
            cb._probe, cb._units = (torch.randn(200, 3), torch.arange(200) % 2), {"1": d}
            # the budget's floor: the probe floor's share (64 of 200) for an exact layer, steps times rows otherwise
            assert (cb.work_floor() == pytest.approx(64 / 200)) == (expected == "exact"), d
    with pytest.raises(ValueError, match=r"method='exact' enumerates 2\^d masks and needs d <= 16, but layer 'x' has 17"):
        choose_method(17, "exact", 8, 1000, "x")
    # the rule's constants are compared nowhere else in the package or the callback
    sources = [
        *sorted((ROOT / "lightning_interp" / "ablation").glob("*.py")),
        ROOT / "lightning_interp" / "callbacks" / "ablation.py",
    ]
    for path in sources:
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or fn.name == "choose_method":
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Compare, ast.BinOp)):
                    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                    assert not names & {"MAX_EXACT_UNITS", "AUTO_EXACT_MASKS"}, f"{path.name}:{fn.name} decides exact vs MCMC"
