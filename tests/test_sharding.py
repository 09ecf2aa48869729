"""The image callbacks under Lightning's sharded and distributed strategies, on 2 CPU processes (gloo).

Each case runs ``tests/sharded_run.py`` (Lightning's subprocess launcher starts the second rank by running the
script again) and compares every callback's history on every rank with one process on the same weights and
data, to 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_interp.loggers import figure_filesystem

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


def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or an install that fails at import
        return f"deepspeed is not importable: {type(err).__name__}: {err}"
    return None


@pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
def test_deepspeed_zero3_equals_one_process(tmp_path: Path) -> None:
    # DeepSpeed's own engine (deepspeed.initialize, ZeRO stage 3, persistence threshold 0: every parameter of a rank
    # is an empty partition outside a gather) on 2 gloo processes on CPU; the three image callbacks measure the
    # engine's module inside gathered() on every rank and equal one process on the same weights and probe.
    # The first run here builds DeepSpeed's CPU shared-memory op (about a minute); later runs load it.
    script = SCRIPT.with_name("deepspeed_run.py")
    reference = tmp_path / "single"
    reference.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, str(script), "single", str(reference)], env=env, timeout=300, check=True)
    single = json.loads((reference / "rank0.json").read_text())
    assert single["error"] is None, single["error"]
    out = tmp_path / "zero3"
    out.mkdir()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), "zero3", str(out)],
            env={**env, **dist, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in ranks]
    records = sorted(out.glob("rank*.json"))
    assert len(records) == 2, f"not every rank wrote its record:\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
    for path in records:
        record = json.loads(path.read_text())
        assert record["error"] is None, record["error"]
        assert record["kind"] == "deepspeed" and record["partitioned"] is True
        assert record["partitioned_after"] is True and record["engine_forward"] == [4, 4]
        assert len(record["scalars"]) == len(single["scalars"]) == 3
        for ref, got in zip(single["scalars"], record["scalars"], strict=True):
            assert ref.keys() == got.keys()
            for key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6, nan_ok=True), key


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
