"""`lightning-interp audit`: every method on a trained classifier, from torchvision, timm, a Lightning checkpoint or
a LightningCLI config, on generated image folders with bad files; the report rendered in headless Chromium."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from lightning_interp.audit import AuditModule, run_audit, stage_inputs
from lightning_interp.cli import main
from lightning_interp.datamodules.images import ImageFolderDataModule
from lightning_interp.loading import imagenet_preprocessing, load_classifier, load_weights
from lightning_interp.saliency import fit_ald
from tests.wandb_reader import read_history

CLASSES = ("n01440764", "n01443537", "n01484850")
SIZE = 64  # small inputs keep the ResNet-18 audit to seconds


def _write_images(folder: Path, n: int, seed: int, ext: str = "png") -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 70 + 3 * i, 80 - 2 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.{ext}")


@pytest.fixture(scope="module")
def labelled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for k, name in enumerate(CLASSES):
        _write_images(root / name, 5, seed=k)
    return root


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def resnet_audit(labelled_tree: Path, resnet_weights: tuple[nn.Module, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "out"
    args = ["--arch", "resnet18", "--weights", str(resnet_weights[1]), "--images", str(labelled_tree), "--out", str(out)]
    main(["audit", *args, "--image-size", str(SIZE), "--max-tasks", "3", "--ablation-steps", "200"])
    return out


def test_torchvision_audit_runs_every_method_with_error_bars(
    resnet_audit: Path, resnet_weights: tuple[nn.Module, Path], labelled_tree: Path
) -> None:
    report = json.loads((resnet_audit / "report.json").read_text())
    assert {"meta", "skipped", "images", "saliency", "weights", "ablation", "correlation"} <= set(report)
    meta = report["meta"]
    assert (meta["num_images"], meta["num_classes"], meta["num_skipped"]) == (15, 3, 0)
    assert (meta["feature_layer"], meta["classifier"], meta["closed_form"]) == ("layer4", "fc", True)
    assert "ImageNet defaults" in meta["preprocessing"]
    # every estimate carries its standard error
    for method, name in (("saliency", "neg_pg_share"), ("ablation", "layer4/distributedness")):
        scalars = report[method]["scalars"]
        assert name in scalars and f"{name}_se" in scalars, sorted(scalars)
    # a callback's warnings reach the report: 200 MCMC steps on 512 channels cannot mix
    assert any(
        n.startswith("Warning: AblationProbeCallback") and "effective sample size" in n for n in report["ablation"]["notes"]
    )
    top_units = next(rows for caption, rows in report["ablation"]["tables"].items() if "top" in caption.lower())
    assert top_units and {r["task"] for r in top_units} <= set(CLASSES)  # tasks named by class, not "class 1"
    corr = report["correlation"]["scalars"]
    assert "layer4/acc_order2" in corr and "layer4/acc_order2_se" in corr
    assert any(k.startswith("layer3/") for k in corr)  # the input of the last stage, too
    # the weight fits are the library's fit of the saved head
    model = resnet_weights[0]
    fit = fit_ald(model.fc.weight.detach())
    assert report["weights"]["scalars"]["joint_r2_positive"] == pytest.approx(float(fit.joint_positive.r2), rel=1e-9)
    with open(resnet_audit / "ald_per_class.csv") as f:
        assert [float(r["pos_slope"]) for r in csv.DictReader(f)] == pytest.approx(fit.positive.slope.tolist(), rel=1e-9)
    # per-image rows: the file, its folder label, and the model's own prediction under the stated preprocessing
    rows = report["images"]
    assert [r["folder"] for r in rows] == [c for c in CLASSES for _ in range(5)]
    assert [r["label"] for r in rows] == [c for c in CLASSES for _ in range(5)]
    x = imagenet_preprocessing(SIZE).transform(Image.open(labelled_tree / CLASSES[1] / "img2.png").convert("RGB"))
    with torch.no_grad():
        p = model(x[None]).softmax(1)[0]
    row = next(r for r in rows if r["file"] == os.path.join(CLASSES[1], "img2.png"))
    assert row["predicted"] == CLASSES[int(p.argmax())] and row["probability"] == pytest.approx(float(p.max()), rel=1e-4)
    assert all("neg_pg_share" in r and 0 <= r["neg_pg_share"] <= 1 for r in rows)
    assert meta["accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in rows]))
    # the per-image saliency values are the callback's mean
    mean = np.mean([r["neg_pg_share"] for r in rows])
    assert report["saliency"]["scalars"]["neg_pg_share"] == pytest.approx(mean, rel=1e-6)


def test_report_renders_in_headless_chromium(resnet_audit: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    text = (resnet_audit / "report.html").read_text()
    expected = len(re.findall(r"<img ", text))
    assert expected >= 5  # two saliency grids, ablation, correlation, weights
    for name in ("saliency", "weights", "ablation", "correlation"):
        items = re.search(rf'<section id="{name}" data-items="(\d+)"', text)
        assert items and int(items.group(1)) > 0, name
    assert CLASSES[0] in text and "img0.png" in text  # class names and file names, not indices
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--virtual-time-budget=10000"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", (resnet_audit / "report.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    total, loaded = re.search(r'data-images-total="(\d+)"', dom), re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, dom[:300]
    assert int(total.group(1)) == expected == int(loaded.group(1))


class TinyNet(pl.LightningModule):
    """A user's own module, restored from its checkpoint by class path (``tests.test_audit.TinyNet``)."""

    def __init__(self, width: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)
        self.example_input_array = torch.zeros(1, 3, 24, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def _tiny_checkpoint(path: Path, width: int = 6) -> TinyNet:
    torch.manual_seed(1)
    model = TinyNet(width=width)
    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return model


def test_lightning_checkpoint_by_class_path_with_wandb(
    labelled_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    model = _tiny_checkpoint(tmp_path / "tiny.ckpt", width=5)
    out = tmp_path / "out"
    report = run_audit(
        model="tests.test_audit.TinyNet", ckpt=str(tmp_path / "tiny.ckpt"), images=str(labelled_tree), out=str(out),
        use_wandb=True, progress=False, methods=("saliency", "weights", "ablation"), ablation_steps=100,
    )  # fmt: skip
    assert report["meta"]["model"] == "tests.test_audit.TinyNet"
    assert "24x24" in report["meta"]["preprocessing"]  # from example_input_array
    assert report["meta"]["feature_layer"] == "body" and report["meta"]["classifier"] == "head"
    assert "correlation" not in report
    assert "body/distributedness_se" in report["ablation"]["scalars"]
    x = imagenet_preprocessing(24).transform(Image.open(labelled_tree / CLASSES[0] / "img0.png").convert("RGB"))
    with torch.no_grad():
        p = model.eval()(x[None]).softmax(1)[0]  # hyper-parameters (width=5) came back from the checkpoint
    assert report["images"][0]["probability"] == pytest.approx(float(p.max()), rel=1e-4)
    (run,) = glob.glob(str(out / "wandb" / "offline-run-*"))
    keys = set().union(*read_history(run))
    assert {"saliency/neg_pg_share", "audit/images/_type", "ablation/body/full_accuracy"} <= keys, sorted(keys)[:40]


def test_timm_model_from_safetensors(labelled_tree: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install lightning-interp[timm]); CI installs it")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = load_classifier(arch="timm:resnet18", weights=str(tmp_path / "m.safetensors"))
    assert "timm data config" in loaded.preprocessing.description and loaded.num_classes == 3
    report = run_audit(
        arch="timm:resnet18", weights=str(tmp_path / "m.safetensors"), images=str(labelled_tree), out=str(tmp_path / "o"),
        image_size=SIZE, methods=("saliency", "weights"), progress=False,
    )  # fmt: skip
    assert report["meta"]["classifier"] == "fc" and report["meta"]["feature_layer"] == "layer4"
    fit = fit_ald(model.fc.weight.detach())
    assert report["weights"]["scalars"]["joint_r2_negative"] == pytest.approx(float(fit.joint_negative.r2), rel=1e-9)


def test_lightning_cli_config_audit_with_posterior_gap(tmp_path: Path) -> None:
    config = tmp_path / "audit.yaml"
    config.write_text(
        """
model:
  class_path: lightning_interp.models.SmallCNN
  init_args: {in_channels: 1, num_classes: 4, channels: [4, 6]}
data:
  class_path: lightning_interp.datamodules.PatchImageDataModule
  init_args: {n_train: 64, n_val: 64, batch_size: 32}
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_interp.callbacks.PosteriorGapCallback
      init_args: {probe_size: 64}
    - class_path: lightning_interp.callbacks.FinalLayerSaliencyCallback
      init_args: {probe_size: 4, deletion_steps: 2}
"""
    )
    out = tmp_path / "out"
    main(["audit", "--config", str(config), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert {"posterior", "saliency"} <= set(report)
    gap = report["posterior"]["scalars"]
    assert gap["kl"] >= 0 and "kl_se" in gap
    assert (out / "report.html").exists() and report["saliency"]["figures"]


def _corrupt_folder(root: Path) -> Path:
    _write_images(root, 3, seed=5, ext="jpg")
    data = (root / "img0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "text_as.jpg").write_text("this is not a JPEG")
    (root / "notes.txt").write_text("a note next to the images")
    return root


def test_bad_image_files_are_skipped_and_listed(tmp_path: Path, resnet_weights: tuple[nn.Module, Path]) -> None:
    images = _corrupt_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="skipped"):
        report = run_audit(
            arch="resnet18", weights=str(resnet_weights[1]), images=str(images), out=str(tmp_path / "out"),
            image_size=SIZE, methods=("saliency",), progress=False,
        )  # fmt: skip
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"truncated.jpg", "empty.png", "text_as.jpg", "notes.txt"}
    assert "not an image" in skipped["notes.txt"] and "cannot decode" in skipped["truncated.jpg"]
    assert [r["file"] for r in report["images"]] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert report["images"][0]["label"] == ""  # a flat folder has no labels
    html = (tmp_path / "out" / "report.html").read_text()
    assert "truncated.jpg" in html and re.search(r'<section id="skipped" data-items="4"', html)


def test_bad_weight_files_name_the_file(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(num_classes=2).state_dict()
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth is empty \(0 bytes\)"):
        load_weights(tmp_path / "empty.pth")
    torch.save(state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth .*truncated"):
        load_weights(tmp_path / "cut.pth")
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan\.pth holds non-finite weights .*fc\.weight"):
        load_weights(tmp_path / "nan.pth")
    with pytest.raises(SystemExit) as exc:  # the command exits with a message, not a traceback
        main(
            ["audit", "--arch", "resnet18", "--weights", str(tmp_path / "nan.pth"), "--images", ".", "--out", str(tmp_path / "o")]
        )
    assert exc.value.code == 2 and not (tmp_path / "o").exists()


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_weights_loading_refuses_code_and_wrong_architectures(tmp_path: Path) -> None:
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=2).state_dict(), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True"):
        load_weights(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_weights(tmp_path / "list.pth")
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="unknown architecture 'resnet5000'"):
        load_classifier(arch="resnet5000", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="do not fit densenet121"):
        load_classifier(arch="densenet121", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="either --arch"):
        load_classifier()
    with pytest.raises(ValueError, match="not a LightningModule"):
        load_classifier(model="torch.nn.Linear", ckpt=str(tmp_path / "r18.pth"))


def test_rerun_replaces_the_output_and_a_failed_run_leaves_it(
    tmp_path: Path, labelled_tree: Path, resnet_weights: tuple[nn.Module, Path]
) -> None:
    out = tmp_path / "out"
    args: dict[str, Any] = dict(arch="resnet18", weights=str(resnet_weights[1]), out=str(out), image_size=SIZE, progress=False)
    run_audit(images=str(labelled_tree / CLASSES[0]), methods=("weights",), **args)
    (out / "report.json").write_text('{"stale": true}')  # an earlier audit's files (its marker lists them)
    (out / "figures" / "maps_007.png").write_bytes(b"old")
    run_audit(images=str(labelled_tree / CLASSES[0]), methods=("weights",), **args)
    assert not (out / "figures" / "maps_007.png").exists() and "stale" not in (out / "report.json").read_text()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileNotFoundError):
        run_audit(images=str(tmp_path / "no_such_folder"), **args)
    assert sorted(p.name for p in out.iterdir()) == before  # the old report is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".audit-")]  # no staging folder left


def test_audit_module_keeps_the_layer_names_and_the_stage_inputs() -> None:
    net = torchvision.models.resnet18(num_classes=4)
    module = AuditModule(net)
    assert {n for n, _ in module.named_modules()} == {n for n, _ in net.named_modules()} | {"audited_classifier"}
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in net.parameters())
    assert stage_inputs(module, "layer4") == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(module.eval()(x), net.eval()(x))
    module.train()
    assert net.training and module.eval() is module and not net.training
    tiny_vit = torchvision.models.VisionTransformer(32, 16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8, num_classes=2)
    vit = AuditModule(tiny_vit)
    assert "class_token" in dict(vit.named_parameters())  # the classifier's own parameters are registered


def test_image_folder_labels_follow_the_model_classes(tmp_path: Path) -> None:
    for name in ("b", "a"):
        _write_images(tmp_path / name, 2, seed=3)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, class_names=["x", "a", "b"])
    dm.setup()
    assert dm.labels.tolist() == [1, 1, 2, 2] and dm.folders == ["a", "a", "b", "b"]
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, num_classes=5, limit=3)
    dm.setup()
    assert dm.labels.tolist() == [-1, -1, -1] and not dm.labelled


@pytest.mark.parametrize(("arch", "closed"), [("densenet121", True), ("efficientnet_b0", True), ("mobilenet_v3_small", False)])
def test_torchvision_families(arch: str, closed: bool, labelled_tree: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(arch, num_classes=3).state_dict(), tmp_path / "w.pth")
    report = run_audit(
        arch=arch, weights=str(tmp_path / "w.pth"), images=str(labelled_tree / CLASSES[0]), out=str(tmp_path / "out"),
        image_size=SIZE, limit=2, methods=("saliency", "weights"), progress=False,
    )  # fmt: skip
    assert report["meta"]["closed_form"] is closed and report["meta"]["num_images"] == 2
    assert report["saliency"]["scalars"]["neg_pg_share_se"] is not None


def test_correlation_subset_keeps_whole_balanced_classes() -> None:
    from lightning_interp.audit_folder import balanced_subset

    labels = torch.tensor([0] * 8 + [1] * 6 + [2] * 6 + [3] * 2)
    keep = labels != 3  # class 3 has too few images
    assert torch.equal(balanced_subset(labels, keep, None), keep) and torch.equal(balanced_subset(labels, keep, 50), keep)
    sub = balanced_subset(labels, keep, 12)  # 3 classes: 4 each would be under the smallest class (6): 2 classes x 6
    assert int(sub.sum()) == 12 and labels[sub].bincount(minlength=4).tolist() == [6, 6, 0, 0]
    assert torch.equal(torch.nonzero(sub & (labels == 0)).flatten(), torch.arange(6))  # the first images of a class
    sub = balanced_subset(labels, keep, 18)  # 6 per class fits all three
    assert labels[sub].bincount(minlength=4).tolist() == [6, 6, 6, 0]
