"""Every script in scripts/ in its ``--quick`` smoke mode: it runs in-process and writes its results files.

Each script's ``main(["--quick", "--out", tmp])`` goes through the real code path at tiny sizes; the test
checks that ``results.md`` holds the script's table (its header row) and ``results.json`` its configuration
and the machine metadata of ``scripts/harness.py``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

#: script -> the start of its table's header row in results.md
HEADERS = {
    "bench_ablation": "| method | repeats | median s | x plain forward |",
    "bench_ablation_default": "| quantity | value |",
    "bench_audit": "| method | seconds | per image |",
    "bench_correlation": "| act | read-out | reference | analytic [ms] |",
    "bench_overhead": "| setup | bare s | with callbacks s |",
    "bench_saliency": "| maps | method | calls |",
    "bench_stability": "| read-out | seed 0 | seed 1 |",
    "reproduce_fischer": "| task | act | layer | real | order2 |",
    "reproduce_nam": "| layer (d) | epoch | acc | distr |",
    "reproduce_siddhartha": "| model | arch | classes | features | joint R^2 (+) |",
    "reproduce_xie": "| preset | step | kl | tv |",
    "reproduce_zamuner": "| model | n_train | method | test acc |",
}
#: scripts that write their results through scripts/harness.py (bench_saliency has its own format)
HARNESS = set(HEADERS) - {"bench_saliency"}


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def process_state() -> Iterator[None]:
    """The scripts set torch's threads, the global seeds and Lightning's log levels: put them back."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    loggers = {name: logging.getLogger(name).level for name in ("lightning", "lightning.pytorch", "lightning.fabric")}
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)


def test_every_script_is_covered() -> None:
    assert {p.stem for p in SCRIPTS.glob("*.py")} - {"harness"} == set(HEADERS)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(HEADERS))
def test_quick_run_writes_results(name: str, tmp_path: Path, process_state: None) -> None:
    load_script(name).main(["--quick", "--out", str(tmp_path)])
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert any(line.startswith(HEADERS[name]) for line in lines), lines[:20]
    header = next(i for i, line in enumerate(lines) if line.startswith(HEADERS[name]))
    assert lines[header + 1].startswith("|--"), lines[header + 1]  # the separator row
    assert lines[header + 2].startswith("| "), "the table has no rows"
    data = json.loads((tmp_path / "results.json").read_text())
    if name in HARNESS:
        assert data["config"]["quick"] is True and data["config"]["out"] == str(tmp_path)
        assert data["machine"]["wall_s"] > 0 and len(data["machine"]["loadavg_end"]) == 3


def write_idx(raw: Path, n_train: int, n_test: int) -> None:
    """Tiny MNIST IDX files in ``raw``: random 28 x 28 images, labels cycling over the ten digits."""
    rng = np.random.default_rng(0)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())


@pytest.mark.filterwarnings("ignore")
def test_reproduce_fischer_on_mnist_files(tmp_path: Path, process_state: None) -> None:
    """``--data mnist``: the datamodule's message for absent or damaged files before any training; tiny files run."""
    script = load_script("reproduce_fischer")
    small = ["--seeds", "1", "--activations", "relu", "--hidden", "8", "8", "--epochs", "1", "--probe-size", "256"]
    small += ["--measurements", "1", "--theory-samples", "1000", "--theory-mc-draws", "200"]
    with pytest.raises(SystemExit, match="MNIST not found under") as info:
        script.main(["--data", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a"), *small])
    assert "train-images-idx3-ubyte   <- missing" in str(info.value)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, n_train=400, n_test=100)
    data = script.main(["--data", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b"), *small])
    (summary,) = data["summary"]
    assert (summary["task"], summary["probe_size"], summary["test_size"], summary["num_classes"]) == ("mnist", 256, 100, 10)
    # the check's moments come from the training split: the 144 images the seeded permutation leaves after the probe
    train = torch.randperm(400, generator=torch.Generator().manual_seed(0))[256:]
    assert data["results"][0]["input_train_moments"]["min_per_class"] == int(torch.bincount(train % 10).min())
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">ii", 2049, 99) + bytes(99))  # fewer labels than images
    with pytest.raises(SystemExit, match="t10k-labels-idx1-ubyte"):
        script.main(["--data", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c"), *small])
    assert not (tmp_path / "c").exists()


def test_reproduce_fischer_summary_over_seeds() -> None:
    """The table's means and standard errors over seeds against numpy, from made-up per-seed results."""
    script = load_script("reproduce_fischer")
    rng = np.random.default_rng(1)
    gaps, ses = rng.normal(0.05, 0.02, size=4), rng.uniform(0.005, 0.02, size=4)
    layer = {col: 0.5 for col in script.COLUMNS}
    results = [
        {
            "task": "digits", "activation": "relu", "seed": s, "hidden": [8], "epochs": 1, "steps": 10, "probe_size": 100,
            "test_size": 50, "layers": ["input"], "layer_roles": {"input": "input"}, "test_acc": 0.9 + 0.01 * s,
            "per_layer": {"input": {**layer, "gap": float(gaps[s]), "gap_se": float(ses[s])}}, "theory_exact_input": None,
            "input_train_moments": {"order2": 0.5, "gap": float(gaps[s]), "gap_se": float(ses[s]), "min_per_class": 9},
            "seconds": 1.0,
        }
        for s in range(4)
    ]  # fmt: skip
    (summary,) = script.summarize(results)
    row = summary["per_layer"]["input"]
    assert row["gap"] == pytest.approx(gaps.mean()) and row["gaps"] == pytest.approx(gaps.tolist())
    assert row["gap_se_seeds"] == pytest.approx(gaps.std(ddof=1) / 2)
    assert row["gap_se_probe"] == pytest.approx(math.sqrt((ses**2).sum()) / 4)
    assert summary["test_acc_se_seeds"] == pytest.approx(np.std([0.9, 0.91, 0.92, 0.93], ddof=1) / 2)
    assert script.gap_se(row) == pytest.approx(max(gaps.std(ddof=1) / 2, math.sqrt((ses**2).sum()) / 4))
