"""The image callbacks under Lightning's sharded and distributed strategies, on 2 CPU processes (gloo).

Each case runs ``tests/sharded_run.py`` (Lightning's subprocess launcher starts the second rank by running the
script again) and compares every callback's history on every rank with one process on the same weights and
data, to 1e-4 relative.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_interp.callbacks.base import figure_filesystem

SCRIPT = Path(__file__).with_name("sharded_run.py")


def launch(case: str, out: Path) -> list[dict[str, Any]]:
    """Run ``sharded_run.py CASE`` and return each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), case, str(out)], env=env, capture_output=True, text=True, timeout=300)
    records = sorted(out.glob("rank*.json"))
    assert records, f"{case}: no rank wrote its record (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return [json.loads(r.read_text()) for r in records]


def assert_same(reference: dict[str, Any], record: dict[str, Any]) -> None:
    assert record["error"] is None, record["error"]
    assert len(record["histories"]) == len(reference["histories"]) == 3
    for ref, got in zip(reference["histories"], record["histories"], strict=True):
        assert len(ref) == len(got) == 3  # measure_at_start, step 2, step 4
        for a, b in zip(ref, got, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6, nan_ok=True), key


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch("single", tmp_path_factory.mktemp("single"))[0]


@pytest.mark.parametrize("case", ["fsdp2", "fsdp"])
def test_sharded_histories_equal_one_process(case: str, single: dict[str, Any], tmp_path: Path) -> None:
    # fsdp2: ModelParallelStrategy + fully_shard(features) + fully_shard(model), a unit whose children the torch.fx
    # split calls directly; fsdp: FSDP1 with a Conv2d/Linear wrap policy through a CPU subclass of FSDPStrategy
    records = launch(case, tmp_path)
    assert len(records) == 2
    for record in records:
        assert record["steps"] == 4, "training ran all its steps"
        assert_same(single, record)


def test_tensor_parallel_refused_before_step_one(tmp_path: Path) -> None:
    records = launch("tp", tmp_path)
    assert len(records) == 2
    for record in records:
        assert record["steps"] == 0
        assert "['fc']" in record["error"] and "tensor-parallel" in record["error"]


def test_ddp_keeps_the_sampler_split_and_measures_rank_zero_probe(tmp_path: Path) -> None:
    # Lightning wraps the validation SubsetRandomSampler in a DistributedSamplerWrapper, and each rank's
    # validation data differs: every rank measures rank 0's probe, drawn from the split only
    from tests.sharded_run import VAL_SPLIT

    reference = launch("single_split", tmp_path / "single")[0]
    records = launch("ddp_split", tmp_path / "ddp")
    assert len(records) == 2
    for record in records:
        for indices in record["probe_indices"]:
            assert indices and set(indices) <= set(VAL_SPLIT)
        assert record["probe_indices"] == reference["probe_indices"]
        assert_same(reference, record)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3() -> None:  # pragma: no cover - only where deepspeed is installed
    pytest.skip("DeepSpeed ZeRO-3 on CPU through its own engine: not written yet (see docs/callbacks.md)")


def test_figure_dir_through_fsspec() -> None:
    import fsspec

    fs, root = figure_filesystem("memory://run/figures")
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/a.png", "wb") as f:
        f.write(b"png")
    assert fsspec.filesystem("memory").cat("memory://run/figures/a.png") == b"png"
    local_fs, local = figure_filesystem("figures/here")
    assert local_fs.protocol in ("file", ("file", "local")) and local.endswith("figures/here")
    with pytest.raises(ValueError, match="figure_dir='nosuchproto://x'"):
        figure_filesystem("nosuchproto://x")
