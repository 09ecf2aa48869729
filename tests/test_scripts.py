"""Every script in scripts/ in its ``--quick`` smoke mode: it runs in-process and writes its results files.

Each script's ``main(["--quick", "--out", tmp])`` goes through the real code path at tiny sizes; the test
checks that ``results.md`` holds the script's table (its header row) and ``results.json`` its configuration
and the machine metadata of ``scripts/harness.py``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

#: script -> the start of its table's header row in results.md
HEADERS = {
    "bench_ablation": "| method | repeats | median s | x plain forward |",
    "bench_correlation": "| act | read-out | reference | analytic [ms] |",
    "bench_overhead": "| setup | bare s | with callbacks s |",
    "bench_saliency": "| maps | method | calls |",
    "bench_stability": "| read-out | seed 0 | seed 1 |",
    "reproduce_fischer": "| task | act | layer | real | order2 |",
    "reproduce_nam": "| layer (d) | epoch | acc | distr |",
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
