"""measure_saliency: the callback logs exactly what the function returns, and the function against references."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import FinalLayerSaliencyCallback
from lightning_interp.probe import draw_probe
from lightning_interp.results import MethodResult, flat_scalars
from lightning_interp.saliency import (
    READ_OUTS,
    FinalLayerSaliency,
    SaliencyResult,
    bilinear_upsample,
    deletion_curve,
    measure_saliency,
)

from .recorder import BASE_KEYS, Recorder

ROOT = Path(__file__).resolve().parents[1]
class TinyCNN(pl.LightningModule):
    """Conv -> ReLU -> global average pool -> Linear: the closed-form head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyFlattenCNN(TinyCNN):
    """Conv -> ReLU -> flatten -> Linear: not a pooled head, so the autograd fallback (channel sets NaN)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__(classes)
        self.fc = nn.Linear(6 * 8 * 8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def _same(logged: dict[str, float], expected: dict[str, Any]) -> None:
    """Every key, the same value; NaN equals NaN."""
    assert set(logged) == set(expected), sorted(set(logged) ^ set(expected))
    for key, value in expected.items():
        want, got = float(value), float(logged[key])
        assert (math.isnan(want) and math.isnan(got)) or want == got, (key, got, want)


@pytest.mark.parametrize(
    ("model_cls", "settings"),
    [
        (TinyCNN, dict(deletion_steps=3)),
        (TinyCNN, dict(deletion_steps=4, deletion_images=5, target="label", min_size=2)),
        (TinyFlattenCNN, dict(deletion_steps=0)),
    ],
)
def test_the_callback_logs_what_measure_saliency_returns(model_cls: type[TinyCNN], settings: dict[str, Any]) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    data = TensorDataset(x, y)
    seed, size = 7, 9
    cb = FinalLayerSaliencyCallback(probe_size=size, seed=seed, log_images=False, budget=None, **settings)
    recorder = Recorder()
    model = model_cls()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[cb], logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="autograd fallback") if model_cls is TinyFlattenCNN else nullcontext():
        trainer.fit(model, DataLoader(data, batch_size=8))
    logged = [m for _, m in recorder.rows if any(k.startswith("saliency/") for k in m)][-1]
    logged = {k.removeprefix("saliency/"): v for k, v in logged.items() if k.removeprefix("saliency/") not in BASE_KEYS}
    # the probe and the baseline maps' generator, rebuilt from the seed alone: the probe draw comes first
    generator = torch.Generator().manual_seed(seed)
    probe = draw_probe(DataLoader(data, batch_size=8), size, generator)
    assert torch.equal(probe.inputs, cb.probe_inputs) and torch.equal(probe.labels, cb.probe_labels)
    result = measure_saliency(model.eval(), probe.inputs, probe.labels, generator=generator, **settings)
    assert isinstance(result, MethodResult)
    _same(logged, flat_scalars(result))
    _same({k: v for k, v in cb.history[-1].items() if k not in ("step", "epoch", *BASE_KEYS)}, flat_scalars(result))
    assert result.tables() == {} and cb.tables(cb.last) == {}
    if model_cls is TinyFlattenCNN:
        assert math.isnan(logged["disc_channels"]) and math.isnan(logged["conf_channels"])


def test_measure_saliency_against_independent_references() -> None:
    """Each read-out from the maps and deletion curves computed one by one; NaN past deletion_images."""
    torch.manual_seed(1)
    model = TinyCNN(4).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    result = measure_saliency(model, x, y, generator=torch.Generator().manual_seed(3), target="label", deletion_steps=4,
                              deletion_images=3, min_size=2)  # fmt: skip
    assert isinstance(result, SaliencyResult)
    saliency = FinalLayerSaliency(model, min_size=2)
    pg = saliency.attribute(x, target=y, method="policy_gradient")
    disc = saliency.attribute(x, target=y, method="discriminative")
    share = F.relu(-pg).flatten(1).sum(1) / pg.abs().flatten(1).sum(1)
    torch.testing.assert_close(result.per_image["neg_pg_share"], share.double())
    prob = model(x).detach().softmax(1)[torch.arange(5), y]
    torch.testing.assert_close(result.per_image["target_prob"], prob.double())
    sizes = saliency.class_chain_mask(y, "+", model.fc.weight).sum(1).double()
    torch.testing.assert_close(result.per_image["disc_channels"], sizes)
    random_maps = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(3))
    for name, maps in (("pg", bilinear_upsample(pg, (8, 8))), ("disc", bilinear_upsample(disc, (8, 8))), ("random", random_maps)):
        auc = deletion_curve(model, x[:3], maps[:3], y[:3], steps=4).mean(1).double()
        torch.testing.assert_close(result.per_image[f"deletion_auc_{name}"][:3], auc, msg=name)
        assert result.per_image[f"deletion_auc_{name}"][3:].isnan().all()
    rand = result.per_image["deletion_auc_random"]
    torch.testing.assert_close(result.per_image["faithfulness_pg"], rand - result.per_image["deletion_auc_pg"], equal_nan=True)
    # the means: over all five images, the deletion read-outs over the first three
    scalars = result.scalars()
    assert list(scalars) == ["probe_size", *READ_OUTS] and scalars["probe_size"] == (5, None)
    values = result.per_image["faithfulness_disc"][:3]
    mean, se = scalars["faithfulness_disc"]
    assert float(mean) == pytest.approx(float(values.mean()))
    assert float(se) == pytest.approx(float(values.std() / math.sqrt(3)))
    assert float(scalars["target_prob"][0]) == pytest.approx(float(prob.mean()))


def test_measure_saliency_nan_images_and_errors() -> None:
    torch.manual_seed(2)
    model = TinyCNN(3).eval()
    x = torch.randn(4, 1, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    flat = flat_scalars(measure_saliency(model, x, deletion_steps=2, generator=torch.Generator()))
    # one NaN image makes every mean NaN (a result, logged), never a number computed from argmax of NaN
    assert all(math.isnan(float(v)) for k, v in flat.items() if k != "probe_size") and flat["probe_size"] == 4
    with pytest.raises(ValueError, match="target='label' needs the labels"):
        measure_saliency(model, x, target="label")
    with pytest.raises(ValueError, match="target must be one of"):
        measure_saliency(model, x, target="true")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deletion_images must be an int >= 1 or None"):
        measure_saliency(model, x, deletion_images=0)
    with pytest.raises(TypeError, match=r"floating-point image batch \[N, C, H, W\]"):
        measure_saliency(model, torch.randn(4, 64))
    with pytest.raises(ValueError, match="another model"):
        measure_saliency(model, x, saliency=FinalLayerSaliency(TinyCNN(3)))


def test_the_saliency_modules_import_neither_captum_nor_matplotlib() -> None:
    code = (
        "import sys\n"
        "import lightning_interp.saliency, lightning_interp.saliency_maps, lightning_interp.final_layer\n"
        "import lightning_interp.faithfulness\n"
        "from lightning_interp.saliency import measure_saliency, fit_ald, deletion_curves, split_chain\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('captum', 'matplotlib', 'lightning'))\n"
        "assert not heavy, heavy\n"
        "from lightning_interp.saliency import FinalLayerSaliency\n"
        "from lightning_interp.saliency_maps import FinalLayerSaliency as Same\n"
        "from captum.attr import Attribution\n"
        "assert FinalLayerSaliency is Same and issubclass(FinalLayerSaliency, Attribution)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    assert out.stdout.strip() == "ok"
