"""The `lightning-interp audit` command on generated images and saved random weights."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lightning_interp.audit import build_model, load_weights, run_audit
from lightning_interp.cli import main
from lightning_interp.saliency import fit_ald
from tests.wandb_reader import read_history

WNIDS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(WNIDS):
        (root / wnid).mkdir()
        for i in range(2):
            h, w = (240 + 20 * i, 300 - 10 * k)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / wnid / f"img{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (230, 250, 3), dtype=np.uint8)).save(root / f"photo{i}.png")
    return root


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_audit_resnet_writes_report_tables_and_figures(image_tree: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    weights = _save(model, tmp_path / "r18.pth")
    out = tmp_path / "out"
    main(["audit", "--arch", "resnet18", "--weights", str(weights), "--images", str(image_tree), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 6 and report["num_classes"] == 3
    assert (report["feature_layer"], report["classifier"], report["closed_form"]) == ("layer4", "fc", True)
    fit = fit_ald(model.fc.weight.detach())
    assert report["ald"]["joint_positive"]["r2"] == pytest.approx(float(fit.joint_positive.r2), rel=1e-9)
    with open(out / "ald_per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [float(r["pos_slope"]) for r in per_class] == pytest.approx(fit.positive.slope.tolist(), rel=1e-9)
    with open(out / "maps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["folder"] for r in rows] == [w for w in WNIDS for _ in range(2)]
    # three folders for a three-class model: labels are class indices, so accuracy is reported
    assert [int(r["label"]) for r in rows] == [0, 0, 1, 1, 2, 2]
    model.eval()
    with torch.no_grad():
        from lightning_interp.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD

        img = Image.open(image_tree / WNIDS[0] / "img0.JPEG").convert("RGB")
        t = torchvision.transforms.Compose(
            [
                torchvision.transforms.Resize(256),
                torchvision.transforms.CenterCrop(224),
                torchvision.transforms.ToTensor(),
                torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        p = model(t(img)[None]).softmax(1)[0]
    assert int(rows[0]["predicted"]) == int(p.argmax())
    assert float(rows[0]["probability"]) == pytest.approx(float(p.max()), rel=1e-5)
    assert report["accuracy"] == pytest.approx(np.mean([int(r["label"]) == int(r["predicted"]) for r in rows]))
    assert (out / "ald_histogram.png").stat().st_size > 1000 and (out / "maps_000.png").exists()


def test_audit_lightning_checkpoint_flat_folder_limit_and_wandb(
    flat_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    model = torchvision.models.resnet18(num_classes=1000)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3, "global_step": 10}
    torch.save(ckpt, tmp_path / "last.ckpt")
    report = run_audit("resnet18", str(tmp_path / "last.ckpt"), str(flat_images), str(tmp_path / "out"), limit=2, use_wandb=True)
    assert report["num_images"] == 2 and report["accuracy"] is None
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert all(r["class_name"] == names[r["predicted"]] for r in report["images_table"])
    (run,) = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*"))
    keys = set().union(*read_history(run))
    assert {"audit/maps/_type", "audit/ald_per_class/_type", "audit/mean_neg_pg_share"} <= keys


@pytest.mark.parametrize(
    ("arch", "closed"),
    [("densenet121", True), ("efficientnet_b0", True), ("mobilenet_v3_small", False), ("vit_b_16", False)],
)
def test_audit_torchvision_families(arch: str, closed: bool, flat_images: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = _save(torchvision.models.get_model(arch, num_classes=10), tmp_path / f"{arch}.pth")
    report = run_audit(arch, str(weights), str(flat_images), str(tmp_path / "out"), limit=1, progress=False)
    assert report["closed_form"] is closed and report["num_classes"] == 10
    assert report["num_images"] == 1


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_bad_weights_and_arguments(tmp_path: Path, image_tree: Path) -> None:
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=2).state_dict(), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True"):
        load_weights(str(tmp_path / "evil.pth"))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(str(tmp_path / "missing.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_weights(str(tmp_path / "list.pth"))
    _save(torchvision.models.resnet18(num_classes=2), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="unknown architecture 'resnet5000'"):
        build_model("resnet5000", str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="do not fit densenet121"):
        build_model("densenet121", str(tmp_path / "r18.pth"))
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "audit",
                "--arch",
                "resnet18",
                "--weights",
                str(tmp_path / "r18.pth"),
                "--images",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exc.value.code == 2
