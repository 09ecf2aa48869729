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
CONFIGS = sorted((ROOT / "lightning_interp" / "configs").glob("*.yaml"))  # installed with the package
MEASURES = ("kl", "reverse_kl", "js", "tv", "l2", "max_abs", "excess_ce", "accuracy", "accuracy_gap", "kl_low_density")


PREFIXES = {
    "posterior_preset1": "posterior_gap/preset1",
    "posterior_preset3": "posterior_gap/preset3",
    "saliency": "saliency",
    "ablation": "ablation",
    "correlation": "correlation",
    "expansion": "expansion",
}
FIGURES = {
    "posterior_gap/preset1/posterior",
    "posterior_gap/preset3/gap_by_density",
    "saliency/maps",
    "ablation/net.1/importance",
    "correlation/orders",
    "expansion/coupling_strength",
}
TABLES = {"posterior_gap/preset3/by_density", "ablation/top_units", "expansion/strongest_pairs"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        main(["demo", "--out", str(out), "--max-steps", "60", "--epochs", "1"])
    return out


def test_demo_writes_summary_and_figures_for_every_callback(demo_out: Path) -> None:
    summary = json.loads((demo_out / "summary.json").read_text())
    assert set(summary["parts"]) == set(PREFIXES)
    for part, prefix in PREFIXES.items():
        res = summary["parts"][part]
        assert res["prefix"] == prefix and len(res["history"]) >= 1
        assert os.listdir(demo_out / "figures" / part), part
    for preset in ("preset1", "preset3"):
        final = summary["parts"][f"posterior_{preset}"]["final"]
        assert final["step"] == 60.0
        assert all(final[m] >= 0 for m in ("kl", "reverse_kl", "js", "tv", "l2", "max_abs"))
    assert (demo_out / "gap_vs_step.png").stat().st_size > 1000
    assert (demo_out / "report.html").exists()


def test_demo_wandb_run_holds_scalars_images_and_tables_of_every_callback(demo_out: Path) -> None:
    runs = sorted(glob.glob(str(demo_out / "wandb" / "offline-run-*")))
    assert len(runs) == 1, "the whole demo logs into one wandb run"
    rows = read_history(runs[0])
    keys = set().union(*rows)
    summary = json.loads((demo_out / "summary.json").read_text())
    for part, prefix in PREFIXES.items():
        final = summary["parts"][part]["final"]
        for name, value in final.items():
            if name in ("step", "epoch") or value != value:  # NaN values are not logged
                continue
            logged = [r[f"{prefix}/{name}"] for r in rows if f"{prefix}/{name}" in r]
            assert logged and logged[-1] == pytest.approx(value, rel=1e-9), f"{prefix}/{name}"
    for fig in FIGURES:
        assert any(r.get(f"{fig}/_type") == "images/separated" for r in rows), fig
    for table in TABLES:
        assert any(r.get(f"{table}/_type") == "table-file" for r in rows), table
    for m in MEASURES:
        assert f"posterior_gap/preset1/{m}" in keys
    assert glob.glob(os.path.join(runs[0], "files", "media", "images", "saliency", "maps_*.png"))
    assert glob.glob(os.path.join(runs[0], "files", "media", "table", "ablation", "top_units_*.json"))


def test_demo_report_renders_every_figure_in_headless_chromium(demo_out: Path, tmp_path: Path) -> None:
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    html_text = (demo_out / "report.html").read_text()
    expected = len(re.findall(r"<img ", html_text))
    assert expected >= len(PREFIXES)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    dom = subprocess.run(
        [chromium, *flags, (demo_out / "report.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, dom[:500]
    assert int(total.group(1)) == expected and int(loaded.group(1)) == expected


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
            "12",
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
    main(["demo", "--out", str(tmp_path), "--max-steps", "20", "--logger", logger, "--presets", "2", "--parts", "posterior"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["logger"] == logger and summary["parts"]["posterior_preset2"]["final"]["step"] == 20.0
    pattern = "metrics.csv" if logger == "csv" else "events.out.tfevents.*"
    assert glob.glob(str(tmp_path / "demo" / "**" / pattern), recursive=True)
