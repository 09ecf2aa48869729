"""The main job (`lightning-interp demo`), its offline wandb run read back from disk, and the YAML configs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_interp.cli import main
from tests.wandb_reader import read_history

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MEASURES = ("kl", "reverse_kl", "js", "tv", "l2", "max_abs", "excess_ce", "accuracy", "accuracy_gap", "kl_low_density")


def test_demo_writes_summary_figures_and_an_offline_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--max-steps", "60"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["presets"]) == {"1", "3"}
    for preset in ("1", "3"):
        final = summary["presets"][preset]["final"]
        assert final["step"] == 60.0
        assert all(final[m] >= 0 for m in ("kl", "reverse_kl", "js", "tv", "l2", "max_abs"))
        figs = os.listdir(out / "figures" / f"preset{preset}")
        assert any(f.startswith("posterior_gap_posterior_step") for f in figs)
        assert any(f.startswith("posterior_gap_gap_by_density_step") for f in figs)
    assert (out / "gap_vs_step.png").stat().st_size > 1000

    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2, "one offline wandb run per preset"
    for preset, run in zip(("1", "3"), runs, strict=True):
        rows = read_history(run)
        keys = set().union(*rows)
        for m in MEASURES:
            assert f"posterior_gap/{m}" in keys
        assert any(r.get("posterior_gap/posterior/_type") == "images/separated" for r in rows)
        assert any(r.get("posterior_gap/by_density/_type") == "table-file" for r in rows)
        logged_kl = [r["posterior_gap/kl"] for r in rows if "posterior_gap/kl" in r]
        history = summary["presets"][preset]["history"]
        assert logged_kl == pytest.approx([h["kl"] for h in history], rel=1e-12)
        assert glob.glob(os.path.join(run, "files", "media", "images", "posterior_gap", "posterior_*.png"))
        assert glob.glob(os.path.join(run, "files", "media", "table", "posterior_gap", "by_density_*.json"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_configs_run_with_lightning_cli(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import yaml

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load(config.read_text())
    prefixes = []
    for cb in spec["trainer"]["callbacks"]:
        module, name = cb["class_path"].rsplit(".", 1)
        prefixes.append(getattr(importlib.import_module(module), name).prefix)
    # An absolute save_dir: wandb's service process keeps the working directory it started in.
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "30",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "outputs"),
        ]
    )
    runs = glob.glob(str(tmp_path / "outputs" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    keys = set().union(*read_history(runs[0]))
    for prefix in prefixes:
        scalars = {k for k in keys if k.startswith(f"{prefix}/") and "/_" not in k}
        assert len(scalars) >= 5, f"{config.name}: too few {prefix}/ keys: {sorted(scalars)} in {sorted(keys)[:20]}"
    if "posterior_gap" in prefixes:
        assert {f"posterior_gap/{m}" for m in MEASURES} <= keys


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("lightning-interp")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "fit" in out
    out = subprocess.run([str(exe), "demo", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--max-steps" in out and "--logger" in out


def test_demo_rejects_unknown_logger() -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--logger", "mlflow"])


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_demo_with_other_loggers(logger: str, tmp_path: Path) -> None:
    main(["demo", "--out", str(tmp_path), "--max-steps", "20", "--logger", logger, "--presets", "2"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["logger"] == logger and summary["presets"]["2"]["final"]["step"] == 20.0
    pattern = "metrics.csv" if logger == "csv" else "events.out.tfevents.*"
    assert glob.glob(str(tmp_path / "preset2" / "**" / pattern), recursive=True)
