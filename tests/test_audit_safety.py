"""`lightning-interp audit` as a new user meets it (issue 22): a LightningModule trained on real digits in [0, 1],
audited with its own preprocessing; warnings when the numbers mean nothing; an `--out` that never destroys files;
images decoded as a viewer shows them; one-line errors; progress in logs.

The user-style model is trained once per module (about a second): scikit-learn's 8x8 digits upsampled to 28x28,
pixels in [0, 1], no normalisation. Its accuracy on the saved PNGs is computed here directly, independently of the
audit's loading and preprocessing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightning_interp.audit import MARKER, OutputFolderError, check_out, number_warnings, run_audit
from lightning_interp.cli import main
from lightning_interp.datamodules.images import ImageFolderDataModule, decode_image

PER_CLASS = 20  # 10 classes x 20 = 200 test digits, as in the issue


class LitDigits(pl.LightningModule):
    """A user's MNIST-style module: 28x28 grey digits in [0, 1], no normalisation (``tests.test_audit_safety.LitDigits``)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(width, 16, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16 * 7 * 7, 10)
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(self.features(x), 2).flatten(1))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target)


def _tree(paths: list[Path]) -> dict[str, str]:
    """Every file under ``paths`` with a hash of its content: the user's files, to compare before and after."""
    out = {}
    for root in paths:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return np.round(x[0].numpy() * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The issue's user: a trained module, its checkpoint, 200 test digits as PNGs in class folders, its accuracy."""
    root = tmp_path_factory.mktemp("user")
    x, y = _digits()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    test_idx = torch.cat([order[y[order] == c][:PER_CLASS] for c in range(10)])
    train_mask = torch.ones(len(x), dtype=torch.bool)
    train_mask[test_idx] = False
    torch.manual_seed(0)
    model = LitDigits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = x[train_mask], y[train_mask]
    for _ in range(2):  # brief training: about 0.85 accuracy, well above chance and below 1
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            F.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    model.eval()
    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(root / "best.ckpt")
    imgs = root / "imgs"
    for j, i in enumerate(test_idx.tolist()):
        folder = imgs / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_uint8(x[i])).save(folder / f"d{j:03d}.png")
    # the reference: the model on the PNGs as a user reads them (8-bit grey / 255), without the audit's code
    files = sorted(imgs.rglob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0)[None] for f in files])
    with torch.no_grad():
        preds = model(pixels).argmax(1)
    labels = torch.tensor([int(f.parent.name) for f in files])
    accuracy = float((preds == labels).float().mean())
    assert 0.6 < accuracy < 0.99, accuracy  # a model worth auditing, and a number that can be missed
    return {"root": root, "ckpt": root / "best.ckpt", "imgs": imgs, "accuracy": accuracy, "model": model}


def _audit_args(user: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return [
        "audit", "--model", "tests.test_audit_safety.LitDigits", "--ckpt", str(user["ckpt"]), "--images", str(user["imgs"]),
        "--grayscale", "--out", str(out), "--methods", "weights", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- preprocessing, warnings


def test_user_preprocessing_gives_the_models_own_accuracy_and_defaults_warn(
    user: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "audit"
    main(_audit_args(user, out, "--mean", "0", "--std", "1"))
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["accuracy"] == pytest.approx(user["accuracy"], abs=0.02)
    assert report["meta"]["num_images"] == 10 * PER_CLASS
    pre = report["meta"]["preprocessing"]
    assert pre.startswith("images of 28x28 as they are") and "no normalisation" in pre, pre
    assert report["warnings"] == []
    printed = capsys.readouterr()
    assert "preprocessing: images of 28x28 as they are" in printed.err  # stated at the start
    assert "preprocessing: images of 28x28 as they are" in printed.out  # and in the summary

    # the same images without the flags: ImageNet's mean and std on [0, 1] digits, a guess, and the audit says so
    main(_audit_args(user, out))  # re-running into the audit's own --out works
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["accuracy"] < user["accuracy"] - 0.05
    assert report["warnings"][0].startswith("the normalisation is a guess: a checkpoint of LitDigits")
    assert all("--mean 0 --std 1" in w and "--resize N|none" in w for w in report["warnings"])
    printed = capsys.readouterr()
    assert "warning: the normalisation is a guess" in printed.err and "WARNING" in printed.out
    html = (out / "report.html").read_text()
    top = html.index('<div id="warnings" data-warnings="')
    assert top < html.index("<section") and 'class="warning"' in html[top : html.index("<section")]
    assert "Preprocessing:" in html[top : html.index("<section")]

    # a zoom as in the issue (resize, then centre-crop the model's size), here 10x: the model sees a blur of the
    # digit's centre; the numbers mean nothing, and the warnings say why, with the preprocessing and what to change
    main(_audit_args(user, out, "--resize", "280", "--crop", "28", "--mean", "0", "--std", "1"))
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["accuracy"] < 0.3
    assert report["warnings"] and all("resize the short side to 280, centre-crop 28x28" in w for w in report["warnings"])
    assert any("within chance" in w or "of the 200 predictions" in w for w in report["warnings"]), report["warnings"]


def test_resize_and_crop_flags_and_the_model_input_size(user: dict[str, Any], tmp_path: Path) -> None:
    # --resize 32 --crop 28 zooms, as the audit did before: the inputs differ from the model's own
    report = run_audit(
        model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(user["imgs"]), out=str(tmp_path / "o"),
        methods=("weights",), progress=False, mean=[0.0], std=[1.0], resize=32, crop=28,
    )  # fmt: skip
    assert "resize the short side to 32, centre-crop 28x28" in report["meta"]["preprocessing"]
    zoomed = report["meta"]["accuracy"]
    # images of another size than example_input_array are resized and cropped by default (here 40x40 -> 28x28)
    big = tmp_path / "big"
    for f in sorted(user["imgs"].rglob("*.png"))[::20]:
        (big / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).resize((40, 40), Image.BILINEAR).save(big / f.parent.name / f.name)
    dm = ImageFolderDataModule(str(big), transform=None, image_size=28)
    report = run_audit(
        model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(big), out=str(tmp_path / "o2"),
        methods=("weights",), progress=False, mean=[0.0], std=[1.0],
    )  # fmt: skip
    assert report["meta"]["num_images"] == 10 and dm.root == str(big)
    assert (
        "images of 28x28 as they are, others: resize the short side to 32, centre-crop 28x28" in report["meta"]["preprocessing"]
    )
    with pytest.raises(ValueError, match=r"--mean takes one value or one per channel \(1\), got 3"):
        run_audit(
            model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(big), out=str(tmp_path / "o3"),
            mean=[0.1, 0.2, 0.3], progress=False,
        )  # fmt: skip
    assert zoomed < user["accuracy"]  # the zoom the issue found costs accuracy
    with pytest.raises(SystemExit) as exc:  # argparse refuses a size that is not a number or 'none'
        main(_audit_args(user, tmp_path / "o4", "--resize", "big"))
    assert exc.value.code == 2
    with pytest.raises(ValueError, match=r"--std must be > 0, got \[0.0\]"):
        run_audit(
            model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(big), out=str(tmp_path / "o5"),
            std=[0.0], progress=False,
        )  # fmt: skip
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


def test_number_warnings_each_sign_and_none_on_a_good_model() -> None:
    labels = torch.arange(10).repeat(20)
    good = labels.clone()
    good[::7] = (good[::7] + 1) % 10  # 86% accuracy
    conf = torch.full((200,), 0.9)
    assert number_warnings(good, labels, conf, 10, "P") == []
    chance = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(0))
    (w,) = number_warnings(chance, labels, conf, 10, "resize 32")
    assert "within chance (1/10 + 3 SE = 0.164)" in w and "resize 32" in w and "--std" in w and "--crop N|none" in w
    one = torch.zeros(200, dtype=torch.long)
    found = number_warnings(one, labels, torch.full((200,), 0.999), 10, "P")
    assert len(found) == 3 and "takes 100% of the 200 predictions" in found[1] and "confidently wrong" in found[2]
    # one class's images predicted as that class: concentrated predictions are right, no warning
    assert number_warnings(one, torch.zeros(200, dtype=torch.long), conf, 10, "P") == []
    unlabelled = torch.full((200,), -1)
    assert len(number_warnings(one, unlabelled, conf, 10, "P")) == 1


# ----------------------------------------------------------------------------------------------------- --out rules


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0], err
    return lines[0]


def test_out_that_would_destroy_user_files_is_refused(
    user: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = tmp_path / "proj"
    (proj / "imgs").mkdir(parents=True)
    for f in sorted(user["imgs"].rglob("*.png"))[:: 2 * PER_CLASS]:
        (proj / "imgs" / f.parent.name).mkdir(exist_ok=True)
        (proj / "imgs" / f.parent.name / f.name).write_bytes(f.read_bytes())
    (proj / "train.py").write_text("print('my training script')\n")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "link").symlink_to(tmp_path / "results")
    before = _tree([tmp_path])
    imgs = proj / "imgs"

    def args(out: Path) -> list[str]:
        return [*_audit_args(user, out)[:6], str(imgs), *_audit_args(user, out)[7:]]

    assert "is the image folder" in _refused(args(imgs), capsys)
    assert "is inside the image folder" in _refused(args(imgs / "audit"), capsys)
    assert "contains the image folder" in _refused(args(proj), capsys)
    assert "is a file" in _refused(args(tmp_path / "notes.txt"), capsys)
    assert "no audit wrote" in _refused(args(tmp_path / "results"), capsys)
    assert "symbolic link" in _refused(args(tmp_path / "link"), capsys)
    assert _tree([tmp_path]) == before  # nothing touched, nothing hidden left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes.txt", "proj", "results"]

    # an empty folder is accepted; a file added to an audit's folder is then protected
    (tmp_path / "empty").mkdir()
    main(args(tmp_path / "empty"))
    assert (tmp_path / "empty" / MARKER).is_file() and (tmp_path / "empty" / "report.json").is_file()
    (tmp_path / "empty" / "my_notes.md").write_text("mine")
    assert "my_notes.md" in _refused(args(tmp_path / "empty"), capsys)
    assert (tmp_path / "empty" / "my_notes.md").read_text() == "mine"


def test_out_follows_the_umask_and_a_held_lock_refuses_a_second_audit(
    user: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "audit"
    previous = os.umask(0o022)
    try:
        main(_audit_args(user, out, "--limit", "12"))
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777, (out / "report.json").stat().st_mode & 0o777) == (0o755, 0o644)
    assert (out / "figures").stat().st_mode & 0o777 == 0o755
    before = _tree([out])
    # another audit holds the lock on this --out (the file next to it): this one fails at once, nothing lost
    fd = os.open(tmp_path / ".audit.audit-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _refused(_audit_args(user, out, "--limit", "12"), capsys)
        assert "another audit is writing into it" in line
        assert _tree([out]) == before
    finally:
        os.close(fd)
    os.unlink(tmp_path / ".audit.audit-lock")
    main(_audit_args(user, out, "--limit", "12"))  # free again: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]  # no lock, staging or old folder left


def test_two_audits_into_one_out_one_wins_whole(user: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "audit"
    common: dict[str, Any] = dict(
        model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), out=str(out), methods=("weights",), progress=False
    )
    run_audit(images=str(user["imgs"]), limit=3, **common)  # an earlier report, replaced by the winner
    inside, tried = threading.Event(), threading.Event()
    setup = ImageFolderDataModule.setup

    def slow(self: ImageFolderDataModule, stage: str | None = None) -> None:
        setup(self, stage)
        inside.set()  # the first audit holds --out ...
        assert tried.wait(60)  # ... until the second has tried

    monkeypatch.setattr(ImageFolderDataModule, "setup", slow)
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.update(first=run_audit(images=str(user["imgs"]), limit=20, **common)))
    first.start()
    try:
        assert inside.wait(60)
        monkeypatch.setattr(ImageFolderDataModule, "setup", setup)
        with pytest.raises(OutputFolderError, match="another audit is writing into it"):
            run_audit(images=str(user["imgs"]), limit=7, **common)
    finally:
        tried.set()
        first.join(120)
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(results["first"])) and report["meta"]["num_images"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]


def test_sigterm_removes_the_staging_folder_and_the_next_run_removes_stale_ones(
    user: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "audit"
    setup = ImageFolderDataModule.setup

    def terminated(self: ImageFolderDataModule, stage: str | None = None) -> None:
        setup(self, stage)
        signal.raise_signal(signal.SIGTERM)  # as `kill PID` would, in the middle of the audit

    monkeypatch.setattr(ImageFolderDataModule, "setup", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        run_audit(
            model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(user["imgs"]), out=str(out),
            methods=("weights",), progress=False, limit=5,
        )  # fmt: skip
    assert exc.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is handler
    monkeypatch.undo()
    # a killed run (SIGKILL: no handler runs) leaves its staging and old folders: the next run into --out removes them
    stale = [tmp_path / ".audit.audit-staging-99-abcd", tmp_path / ".audit.audit-old-99-abcd"]
    for s in stale:
        (s / "figures").mkdir(parents=True)
    (tmp_path / ".other.audit-staging-99-abcd").mkdir()  # another --out's: not ours to remove
    run_audit(
        model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(user["imgs"]), out=str(out),
        methods=("weights",), progress=False, limit=5,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.audit-staging-99-abcd", "audit"]


def test_check_out_accepts_new_empty_and_audit_folders(tmp_path: Path) -> None:
    check_out(tmp_path / "new", tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")
    (tmp_path / "a" / "figures").mkdir(parents=True)
    (tmp_path / "a" / MARKER).write_text(json.dumps({"entries": ["figures", "report.json"]}))
    (tmp_path / "a" / "report.json").write_text("{}")
    check_out(tmp_path / "a")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="which is a file"):
        check_out(tmp_path / "notes.txt" / "sub" / "audit")
    (tmp_path / "a" / MARKER).write_text("not json")
    with pytest.raises(OutputFolderError, match="no audit wrote"):
        check_out(tmp_path / "a")


# -------------------------------------------------------------------------------------------------- decoding images


def _predict(model: nn.Module, root: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    from lightning_interp.loading import custom_preprocessing

    pre = custom_preprocessing(28, 1, None, None, mean=[0.0], std=[1.0])
    dm = ImageFolderDataModule(str(root), transform=pre.transform)
    dm.setup()
    with torch.no_grad():
        return dm.files, dm.inputs, model(dm.inputs).argmax(1)


def test_16bit_png_and_exif_rotated_jpeg_predict_as_the_upright_8bit_image(user: dict[str, Any], tmp_path: Path) -> None:
    files = sorted(user["imgs"].rglob("*.png"))[::5]  # 40 digits
    for kind in ("png8", "png16", "jpg", "jpg_exif"):
        (tmp_path / kind / "d").mkdir(parents=True)
    for f in files:
        a = np.asarray(Image.open(f))
        Image.fromarray(a).save(tmp_path / "png8" / "d" / f.name)
        Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "png16" / "d" / f.name)  # the same picture, 16 bits
        Image.fromarray(a).save(tmp_path / "jpg" / "d" / f"{f.stem}.jpg", quality=100, subsampling=0)
        # a phone photo: pixels stored turned 90 degrees anticlockwise; EXIF orientation 6 says to show them turned
        # 90 degrees clockwise, upright
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.rot90(a, k=1).copy()).save(
            tmp_path / "jpg_exif" / "d" / f"{f.stem}.jpg", quality=100, subsampling=0, exif=exif
        )
    assert Image.open(tmp_path / "png16" / "d" / files[0].name).mode.startswith("I;16")
    model = user["model"]
    _, x8, p8 = _predict(model, tmp_path / "png8")
    _, x16, p16 = _predict(model, tmp_path / "png16")
    assert torch.equal(x16, x8) and torch.equal(p16, p8)
    _, _, pj = _predict(model, tmp_path / "jpg")
    _, xe, pe = _predict(model, tmp_path / "jpg_exif")
    assert float((xe - x8).abs().mean()) < 0.01 and torch.equal(pe, pj)
    assert float((pe == p8).float().mean()) >= 0.95
    # the control: the rotated file read without its orientation is another picture, and the model says so
    raw = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255)[None]
            for p in sorted((tmp_path / "jpg_exif" / "d").iterdir())
        ]
    )
    with torch.no_grad():
        assert float((model(raw).argmax(1) == p8).float().mean()) < 0.7


def test_gif_first_frame_and_symlinked_folders_read_once(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((10, 10), 40 if c == "a" else 80, np.uint8)).save(root / c / "x.png")
    frames = [Image.fromarray(np.full((10, 10), v, np.uint8)) for v in (200, 10)]
    frames[0].save(root / "a" / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(str(root / "a" / "anim.gif")))[0, 0, 0] == 200  # the first frame
    (root / "zz").symlink_to(root)  # zz -> . : a loop
    (root / "c").symlink_to(root / "a")  # a second way to the same class folder
    (root / "b" / "up").symlink_to(root / "b")  # a loop inside a class
    ext = tmp_path / "elsewhere"
    ext.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ext / "y.png")
    (root / "b" / "more").symlink_to(ext)  # a linked folder read once
    dm = ImageFolderDataModule(str(root), image_size=8, num_classes=2)
    with pytest.warns(UserWarning, match="a link to a folder already read"):
        dm.setup()
    assert dm.files == ["a/anim.gif", "a/x.png", "b/x.png", "b/more/y.png"]  # a folder's files, then its sub-folders
    assert dm.labels.tolist() == [0, 0, 1, 1] and dm.folders == ["a", "a", "b", "b"]
    assert sorted(s.file for s in dm.skipped) == ["b/up", "c", "zz"]


# ------------------------------------------------------------------------------------------------ errors, progress


def test_weights_of_another_architecture_and_an_unimportable_model_are_one_line(
    tmp_path: Path, user: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision

    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), tmp_path / "r50.pth")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "audit",
                "--arch",
                "resnet18",
                "--weights",
                str(tmp_path / "r50.pth"),
                "--images",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert (
        "Check --arch" in err
        and "first mismatching layer 'layer1.0.conv1.weight' (weights [64, 64, 1, 1], model [64, 64, 3, 3])" in err
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "audit",
                "--model",
                "userpkg_missing.lit.LitMNIST",
                "--ckpt",
                str(user["ckpt"]),
                "--images",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "PYTHONPATH" in err and "userpkg_missing" in err, err


def test_model_in_the_working_folder_is_imported(tmp_path: Path, user: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # the console script does not put the working folder on sys.path; the user's userpkg/lit.py is found anyway
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "lit.py").write_text("from tests.test_audit_safety import LitDigits as LitMNIST\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        report = run_audit(
            model="userpkg.lit.LitMNIST", ckpt=str(user["ckpt"]), images=str(user["imgs"]), out="audit",
            methods=("weights",), progress=False, limit=10, mean=[0.0], std=[1.0],
        )  # fmt: skip
    finally:
        for name in ("userpkg", "userpkg.lit"):
            sys.modules.pop(name, None)
    assert report["meta"]["model"] == "userpkg.lit.LitMNIST" and report["meta"]["num_images"] == 10


def test_progress_in_a_log_and_in_a_terminal(user: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common: dict[str, Any] = dict(
        model="tests.test_audit_safety.LitDigits", ckpt=str(user["ckpt"]), images=str(user["imgs"]), limit=30,
        mean=[0.0], std=[1.0], methods=("saliency", "weights"), deletion_images=2,
    )  # fmt: skip
    run_audit(out=str(tmp_path / "log"), progress=None, **common)  # stderr is not a terminal here: lines
    err = capsys.readouterr().err
    assert "preprocessing: images of 28x28 as they are" in err and "read 30 images (0 skipped)" in err
    assert re.search(r"saliency done in [\d.]+ s \(1/2 methods\)", err) and re.search(r"weights done in [\d.]+ s \(2/2", err)
    assert "\r" not in err  # no bar redrawn into the log
    run_audit(out=str(tmp_path / "bar"), progress=True, **common)
    err = capsys.readouterr().err
    # the saliency bar counts the images through the network while the method runs: at least every image once
    counts = [int(n) for n in re.findall(r"saliency \(1/2\): (\d+)image", err)]
    assert counts and max(counts) >= 30, err[-500:]
    # the ablation's bar counts its MCMC steps once the chains run (they pass no images through the network)
    run_audit(
        out=str(tmp_path / "mcmc"), progress=True, ablation_steps=40, **{**common, "methods": ("ablation",)}
    )
    err = capsys.readouterr().err
    steps = [int(n) for n in re.findall(r"ablation \(1/1\): (\d+)step", err)]
    assert steps and max(steps) >= 40, err[-500:]
