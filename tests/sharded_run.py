"""One fit of a small CNN with the three image callbacks under a strategy, for tests/test_sharding.py.

Run as ``python tests/sharded_run.py CASE OUT_DIR``; CASE is ``single``, ``fsdp2``, ``fsdp`` (FSDP1 on CPU
through a test-only strategy subclass), ``tp`` (tensor parallel) or ``ddp_split``. Lightning's subprocess
launcher starts the second rank by running this script again. Every rank writes ``rank<r>.json``: the
callbacks' histories, their probe indices, the training steps taken and the error, if any.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["LIGHTNING_INTERP_BUDGET"] = "off"

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from lightning_interp.callbacks import (
    AblationProbeCallback,
    CorrelationOrderCallback,
    FinalLayerSaliencyCallback,
)
from lightning_interp.models import SmallCNN

#: The validation split of the ddp_split case: positions in the one dataset that holds train and validation items.
VAL_SPLIT = list(range(48, 64))


class ShardedCNN(SmallCNN):
    """The contract suite's small CNN, sharded in ``configure_model`` as the case asks."""

    def __init__(self, case: str, lr: float = 1e-2) -> None:
        super().__init__(in_channels=1, num_classes=4, channels=(8, 16), lr=lr)
        self.case = case

    def configure_model(self) -> None:
        if self.case == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            # a unit whose children a torch.fx split calls directly, past the unit's own hooks
            fully_shard(self.features, mesh=mesh)
            fully_shard(self, mesh=mesh)
        elif self.case == "tp":
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            parallelize_module(self, self.device_mesh["tensor_parallel"], {"fc": ColwiseParallel(output_layouts=Replicate())})


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP1 on CPU (Lightning's FSDPStrategy passes a CUDA device index): test-only."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **self.kwargs)


class Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.steps += 1


def data(rank_shift: int = 0) -> TensorDataset:
    """64 random 1x8x8 images, 4 classes; ``rank_shift`` makes another dataset (rank-different validation data)."""
    g = torch.Generator().manual_seed(11 + rank_shift)
    return TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.arange(64) % 4)


def callbacks(case: str) -> list[Any]:
    kw: dict[str, Any] = dict(every_n_steps=2, every_n_epochs=None, measure_at_start=True, log_images=False)
    return [
        FinalLayerSaliencyCallback(probe_size=6, min_size=4, deletion_steps=4, **kw),
        AblationProbeCallback(layers=["features.2"], probe_size=16, num_steps=100, burn_in=10, **kw),
        CorrelationOrderCallback(layers=["features.2"], probe_size=48, min_per_class=4, **kw),
    ]


def main(case: str, out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(3, verbose=False)
    split = case.endswith("_split")
    # the split cases test the probe data, not training (Lightning's distributed sampler shuffles the training data
    # of each rank): a learning rate of 0 keeps the weights equal to the single process's
    model = ShardedCNN(case, lr=0.0 if split else 1e-2)
    cbs = callbacks(case)
    steps = Steps()
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # every rank reads all data: the averaged gradient is one process's
    )
    if case.startswith("single"):
        kw["devices"] = 1
        if split:
            kw["limit_val_batches"] = None
    elif case == "fsdp2":
        kw.update(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    elif case == "tp":
        kw.update(devices=2, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    elif case == "fsdp":
        wrap = {torch.nn.Conv2d, torch.nn.Linear}
        kw.update(devices=2, strategy=CPUFSDPStrategy(process_group_backend="gloo", auto_wrap_policy=wrap))
    elif case.startswith("ddp_split"):
        kw.update(devices=2, strategy="ddp", use_distributed_sampler=True, limit_val_batches=None)
    trainer = pl.Trainer(callbacks=[*cbs, steps], **kw)
    # one process's batch of 32 is two ranks' 16 each: the same steps per epoch
    train = DataLoader(data(), batch_size=32 if case == "single_split" else 16, shuffle=False)
    if case.startswith("ddp_split") or case == "single_split":
        # the validation split of the same dataset, differing by rank (each rank reads its own copy)
        shift = int(os.environ.get("LOCAL_RANK", "0")) if case.startswith("ddp_split") else 0
        val = DataLoader(data(shift), batch_size=8, sampler=SubsetRandomSampler(VAL_SPLIT))
    else:
        val = None
    error = None
    try:
        trainer.fit(model, train, val)
    except Exception as err:  # the refusal under test: recorded, not raised
        error = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    rank = trainer.global_rank
    record = {
        "error": error,
        "steps": steps.steps,
        "histories": [cb.history for cb in cbs],
        "probe_indices": [None if cb.probe_indices is None else cb.probe_indices.tolist() for cb in cbs],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
