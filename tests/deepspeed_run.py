"""The three image callbacks on a model sharded by DeepSpeed ZeRO-3 (its own engine), for tests/test_sharding.py.

Run as ``python tests/deepspeed_run.py CASE OUT_DIR``. ``single``: one process measures the plain model.
``zero3``: this process is one rank of a gloo group (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
set by the test), wraps the same model in ``deepspeed.initialize`` with ZeRO stage 3 and parameter persistence
threshold 0 (every parameter partitioned, empty outside a gather) and measures the engine's module inside
:func:`~lightning_interp.callbacks.sharding.gathered`. Every process writes ``rank<r>.json``: each callback's
scalars, whether the weights were partitioned before and after the measurements, and the error, if any.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["LIGHTNING_INTERP_BUDGET"] = "off"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from torch import nn

from lightning_interp.callbacks import (
    AblationProbeCallback,
    CorrelationOrderCallback,
    FinalLayerSaliencyCallback,
)
from lightning_interp.callbacks.sharding import gathered, sharding_kind
from lightning_interp.hooks import isolate


class CNN(nn.Module):
    """conv-ReLU-conv-ReLU, global average pooling, Linear: 1x8x8 images, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class Trainer:
    """What the callbacks read of a trainer outside a fit: one process's view (the probe is given, not drawn)."""

    world_size = 1
    is_global_zero = True
    strategy = None

    def __init__(self) -> None:
        self.loggers: list[Any] = []


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(48, 1, 8, 8, generator=g), torch.arange(48) % 4


def callbacks() -> list[Any]:
    kw: dict[str, Any] = dict(log_images=False, probe=probe())
    return [
        FinalLayerSaliencyCallback(probe_size=6, min_size=4, deletion_steps=4, **kw),
        AblationProbeCallback(layers=["features.2"], probe_size=16, num_steps=60, burn_in=10, **kw),
        CorrelationOrderCallback(layers=["features.2"], probe_size=48, min_per_class=4, **kw),
    ]


def main(case: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = CNN()
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, Any] = {"error": None, "scalars": [], "partitioned": None, "kind": None, "partitioned_after": None}
    try:
        if case == "zero3":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
            config = {
                "train_micro_batch_size_per_gpu": 4,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "zero_allow_untested_optimizer": True,
            }
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            model = engine.module
            # ZeRO-3 at threshold 0 leaves every parameter of a rank empty outside a gather
            record["partitioned"] = all(p.numel() == 0 for p in model.parameters())
        trainer = Trainer()
        record["kind"] = sharding_kind(trainer, model)
        for cb in callbacks():
            cb.prepare(trainer, model)
            with gathered(trainer, model), isolate(model):
                measurement = cb.measure(model)
            record["scalars"].append({k: float(v) for k, v in measurement.scalars.items()})
        if case == "zero3":
            # released again after the measurements, and ZeRO-3's hooks back: a forward pass of the engine still runs
            record["partitioned_after"] = all(p.numel() == 0 for p in model.parameters())
            record["engine_forward"] = list(engine(probe()[0][:4]).shape)
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
