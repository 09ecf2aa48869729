"""scripts/bench_stability.py at reduced size: ablation read-outs at the callback's defaults are stable
between seeds and agree with a long run within their error bars; correlation gaps agree within their SEs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_stability.py"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_stability", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_stability"] = module
    spec.loader.exec_module(module)
    return module


def test_defaults_are_stable_and_agree_with_a_long_run(bench) -> None:  # type: ignore[no-untyped-def]
    out = bench.run(epochs=3, layers=["head.2"], ref_chains=16, ref_steps=1000, ref_burn_in=100)
    assert out["accuracy"] > 0.8
    res = out["ablation"]["head.2"]
    assert res["units"] == 64
    assert res["r_seeds"] >= 0.9, res["r_seeds"]
    assert res["r_reference"] >= 0.9, res["r_reference"]
    for key, vals in res["readouts"].items():
        for value, se in vals.values():
            assert math.isfinite(value), key
            if key in bench.READOUTS:
                assert math.isfinite(se) and se >= 0, key
    failed = [line for line, ok in bench.checks(out) if not ok]
    assert not failed, failed
    assert set(out["correlation"]) >= {"input", "head.2"}
