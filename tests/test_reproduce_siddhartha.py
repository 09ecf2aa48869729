"""``scripts/reproduce_siddhartha.py`` on small random-weight models saved to a temporary folder.

The script's numbers are checked against :func:`lightning_interp.saliency.fit_ald` applied here to the head
tensor read straight from the saved file (so the script must find the right layer and the right rows), and
against a planted class row whose sides are exact ``exp(a i / L + b)`` sequences (``R^2 = 1``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from lightning_interp.saliency import ALDSide, fit_ald
from tests.test_scripts import load_script

#: the planted row: ImageNet's "tricycle"; its positive and negative sides are exp(a i / L + b) exactly
PLANTED_CLASS = 870
POS_SLOPE, POS_INTERCEPT, NEG_SLOPE, NEG_INTERCEPT = 2.0, -4.0, 3.0, -5.0


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    yield load_script("reproduce_siddhartha")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random weights of timm ``test_vit`` (1000 classes), the same with a planted row, torchvision MobileNetV3 (10)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).state_dict()
    torch.save(vit, folder / "vit.pth")
    planted = {k: v.clone() for k, v in vit.items()}
    half = planted["head.weight"].shape[1] // 2
    ranks = torch.arange(half, dtype=torch.float64) / half
    row = torch.cat([torch.exp(POS_SLOPE * ranks + POS_INTERCEPT), -torch.exp(NEG_SLOPE * ranks + NEG_INTERCEPT)])
    planted["head.weight"][PLANTED_CLASS] = row[torch.randperm(2 * half)].float()
    torch.save(planted, folder / "vit_planted.pth")
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).state_dict()
    torch.save(mobilenet, folder / "mobilenet.pth")
    return {"vit": folder / "vit.pth", "planted": folder / "vit_planted.pth", "mobilenet": folder / "mobilenet.pth"}


def same_side(reported: dict[str, float], reference: ALDSide, index: int | None = None) -> None:
    for key in ("slope", "intercept", "r2", "kappa", "count"):
        value = getattr(reference, key) if index is None else getattr(reference, key)[index]
        assert reported[key] == pytest.approx(float(value), rel=1e-9, nan_ok=True), key


def test_fits_match_fit_ald_of_the_saved_head(script: ModuleType, files: dict[str, Path], tmp_path: Path) -> None:
    data = script.main(
        [
            "--weights",
            str(files["vit"]),
            str(files["mobilenet"]),
            "--arch",
            "timm:test_vit",
            "mobilenet_v3_small",
            "--out",
            str(tmp_path),
        ]
    )
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    expected = [
        (files["vit"], "head.weight", [(categories.index(n), n) for n in ("tricycle", "web site", "whiptail")]),
        (files["mobilenet"], "classifier.3.weight", [(i, str(i)) for i in range(3)]),
    ]
    assert len(data["models"]) == 2
    for model, (path, key, classes) in zip(data["models"], expected, strict=True):
        weight = torch.load(path, weights_only=True)[key]
        fit = fit_ald(weight)
        assert (model["num_classes"], model["features"]) == tuple(weight.shape)
        same_side(model["joint_positive"], fit.joint_positive)
        same_side(model["joint_negative"], fit.joint_negative)
        assert model["median_r2_positive"] == pytest.approx(float(fit.positive.r2.median()), rel=1e-12)
        assert [(c["index"], c["name"]) for c in model["classes"]] == classes
        for c in model["classes"]:
            same_side(c["positive"], fit.positive, c["index"])
            same_side(c["negative"], fit.negative, c["index"])
    md = (tmp_path / "results.md").read_text()
    assert "0.75-0.89 (75 timm models)" in md and md.count("~0.88-0.90 (ResNet-18)") == 3
    assert f"| vit.pth | timm:test_vit | 1000 | 64 | {data['models'][0]['joint_positive']['r2']:.3f} |" in md
    assert json.loads((tmp_path / "results.json").read_text())["reference"]["joint_r2_range_75_timm_models"] == [0.75, 0.89]


def test_planted_row_is_an_exact_fit_and_classes_resolve_by_name_or_index(
    script: ModuleType, files: dict[str, Path], tmp_path: Path
) -> None:
    # one --arch for both files; the same class by index and by name
    files_and_arch = ["--weights", str(files["planted"]), str(files["vit"]), "--arch", "timm:test_vit"]
    data = script.main([*files_and_arch, "--classes", "870", "tricycle", "3", "--out", str(tmp_path)])
    planted, plain = data["models"]
    by_index, by_name, other = planted["classes"]
    assert (by_index["index"], by_name["index"], other["index"]) == (PLANTED_CLASS, PLANTED_CLASS, 3)
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert by_index == by_name and by_index["name"] == "tricycle" and other["name"] == categories[3]
    pos, neg = by_index["positive"], by_index["negative"]
    assert pos["r2"] == pytest.approx(1.0, abs=1e-12) and neg["r2"] == pytest.approx(1.0, abs=1e-12)
    assert (pos["slope"], pos["intercept"]) == pytest.approx((POS_SLOPE, POS_INTERCEPT), abs=1e-5)  # float32 weights
    assert (neg["slope"], neg["intercept"]) == pytest.approx((NEG_SLOPE, NEG_INTERCEPT), abs=1e-5)
    assert plain["classes"][0]["positive"]["r2"] < 0.999  # the random row of the unplanted file
    assert plain["classes"][2] == planted["classes"][2]  # the other rows are the same tensors
    assert not math.isclose(plain["joint_positive"]["r2"], planted["joint_positive"]["r2"], rel_tol=1e-9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "timm:test_vit", "mobilenet_v3_small", "resnet18"], None),  # neither one nor one per file
        (["--arch", "mobilenet_v3_small", "--classes", "cat"], "has no class names"),
        (["--arch", "mobilenet_v3_small", "--classes", "10"], "has 10 classes"),
        (["--arch", "resnet18"], "do not fit resnet18"),
    ],
)
def test_clear_errors(script: ModuleType, files: dict[str, Path], tmp_path: Path, extra: list[str], message: str | None) -> None:
    with pytest.raises(SystemExit) as info:
        script.main(["--weights", str(files["mobilenet"]), "--out", str(tmp_path), *extra])
    if message is None:
        assert info.value.code == 2  # argparse's usage error
    else:
        assert str(files["mobilenet"]) in str(info.value) and message in str(info.value)
    assert not (tmp_path / "results.md").exists()


def test_truncated_file_is_named(script: ModuleType, files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(files["mobilenet"].read_bytes()[:1000])
    with pytest.raises(SystemExit, match="truncated"):
        script.main(["--weights", str(bad), "--arch", "mobilenet_v3_small", "--out", str(tmp_path / "out")])
