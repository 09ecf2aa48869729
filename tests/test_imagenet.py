"""ImageNetDataModule and load_images on tiny ImageFolder trees written with PIL (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.models import ResNet18_Weights, ResNet50_Weights

from lightning_interp.datamodules import ImageNetDataModule, load_images
from lightning_interp.datamodules.imagenet import FlatImageFolder, imagenet_class_names, read_synset_mapping
from lightning_interp.models import SmallCNN

# tench, goldfish, great white shark: indices 0, 1, 2 of torchvision's ImageNet-1k categories
WNIDS = ["n01440764", "n01443537", "n01484850"]
SIZES = [(300, 260), (280, 400), (256, 256), (500, 300)]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _write_image(path: Path, size: tuple[int, int], seed: int, fmt: str = "JPEG") -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    # smooth colour ramps plus noise, so resizing and cropping change the pixels noticeably
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.linspace(0.2, 1.0, h, dtype=np.float32)[:, None, None]
    pixels = np.clip(base * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def make_tree(
    root: Path, train_wnids: list[str] = WNIDS, val_wnids: list[str] | None = None, n_train: int = 2, n_val: int = 2
) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` with varying image sizes (reverse wnid order)."""
    seed = 0
    for split, wnids, n in (("train", train_wnids, n_train), ("val", val_wnids or train_wnids, n_val)):
        for wnid in reversed(wnids):  # creation order must not matter
            for i in range(n):
                _write_image(root / split / wnid / f"{wnid}_{i}.JPEG", SIZES[seed % len(SIZES)], seed)
                seed += 1
    return root


def manual_eval(path: str | Path, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (bilinear), center-crop ``crop``, scale to [0, 1], normalise; with numpy."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize((nw, nh), Image.BILINEAR)
    top, left = round((nh - crop) / 2), round((nw - crop) / 2)
    a = np.asarray(image, dtype=np.float32)[top : top + crop, left : left + crop] / 255.0
    return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "imagenet")


def test_val_batch_is_resize_crop_normalise(tree: Path) -> None:
    dm = ImageNetDataModule(str(tree), batch_size=6, num_workers=0)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() < -1.0 and x.max() > 1.0  # normalised, not in [0, 1]
    for i, (path, label) in enumerate(dm.val_dataset.samples):
        assert y[i].item() == label
        torch.testing.assert_close(x[i], manual_eval(path), atol=1e-5, rtol=0)
    # test and predict read the val split in the same order
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        xt, yt = next(iter(loader))
        assert torch.equal(xt, x) and torch.equal(yt, y)
        assert isinstance(loader.sampler, SequentialSampler)


def test_labels_follow_sorted_wnids(tree: Path) -> None:
    dm = ImageNetDataModule(str(tree), batch_size=6, num_workers=0)
    dm.setup("fit")
    assert dm.classes == sorted(WNIDS) and dm.num_classes == 3
    for ds in (dm.train_dataset, dm.val_dataset):
        assert ds.classes == sorted(WNIDS)
        assert [Path(p).parent.name for p, _ in ds.samples] == [dm.classes[label] for _, label in ds.samples]
    _, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [0, 0, 1, 1, 2, 2]


def test_train_loader_shuffles_and_augments(tree: Path) -> None:
    dm = ImageNetDataModule(str(tree), batch_size=4, num_workers=0, pin_memory=False)
    loader = dm.train_dataloader()  # sets up on first access
    assert isinstance(loader.sampler, RandomSampler) and not loader.pin_memory
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= {0, 1, 2}
    torch.manual_seed(0)
    a = dm.train_dataset[0][0]
    torch.manual_seed(1)
    b = dm.train_dataset[0][0]
    assert a.shape == b.shape == (3, 224, 224) and not torch.equal(a, b)  # random crop / flip


def test_image_size_and_transform_overrides(tree: Path) -> None:
    dm = ImageNetDataModule(str(tree), batch_size=2, num_workers=0, image_size=96, resize_size=112)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 96, 96)
    torch.testing.assert_close(x[0], manual_eval(dm.val_dataset.samples[0][0], 112, 96), atol=1e-5, rtol=0)
    assert dm.train_dataloader().dataset[0][0].shape == (3, 96, 96)

    def to_size(image: Image.Image) -> torch.Tensor:
        return torch.tensor(image.size)

    dm = ImageNetDataModule(str(tree), batch_size=6, num_workers=0, eval_transform=to_size, train_transform=to_size)
    dm.setup("fit")
    expected = [list(Image.open(p).size) for p, _ in dm.val_dataset.samples]
    assert next(iter(dm.val_dataloader()))[0].tolist() == expected


def test_class_names_fall_back_to_wnids(tree: Path) -> None:
    dm = ImageNetDataModule(str(tree), num_workers=0)
    assert dm.class_names == sorted(WNIDS)  # 3 synsets: torchvision's 1000-name list does not apply


def test_class_names_from_loc_synset_mapping(tree: Path) -> None:
    (tree / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
        "n01484850 great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias\n"
    )
    dm = ImageNetDataModule(str(tree), num_workers=0)
    dm.setup("validate")
    assert dm.class_names == ["tench", "goldfish", "great white shark"]


def test_class_names_from_other_sources(tree: Path) -> None:
    # words.txt (tab separated) covering only part of the synsets: the rest keep their wnid
    (tree / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn00001740\tentity\n")
    assert ImageNetDataModule(str(tree)).class_names == ["n01440764", "goldfish", "n01484850"]
    # an explicit imagenet_class_index.json takes precedence over files in data_dir
    index = tree.parent / "imagenet_class_index.json"
    index.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish_json"]}))
    dm = ImageNetDataModule(str(tree), class_index_file=str(index))
    assert dm.class_names == ["tench", "goldfish_json", "n01484850"]
    # torchvision's meta.bin: (wnid -> tuple of names, val wnids)
    (tree / "words.txt").unlink()
    torch.save(({"n01484850": ("great white shark", "white shark")}, []), tree / "meta.bin")
    assert ImageNetDataModule(str(tree)).class_names == ["n01440764", "n01443537", "great white shark"]


def test_1000_synsets_use_torchvision_names() -> None:
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = imagenet_class_names(wnids)
    assert names == ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[999] == "toilet tissue"
    assert imagenet_class_names(wnids[:999]) == wnids[:999]  # only for exactly 1000
    not_wnids = [f"class_{i:04d}" for i in range(1000)]
    assert imagenet_class_names(not_wnids) == not_wnids  # some other 1000-class dataset


def test_1000_synsets_mapping_file_wins(tmp_path: Path) -> None:
    wnids = [f"n{i:08d}" for i in range(1000)]
    (tmp_path / "synset_words.txt").write_text("n00000002 my shark, other\n")
    names = imagenet_class_names(wnids, data_dir=tmp_path)
    assert names[:3] == ["tench", "goldfish", "my shark"]


def test_read_synset_mapping_formats(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"0": ["n01440764", "tench"]}))
    assert read_synset_mapping(tmp_path / "a.json") == {"n01440764": "tench"}
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"imagenet_class_index\.json format"):
        read_synset_mapping(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="<wnid> <name>"):
        read_synset_mapping(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="class-name file not found"):
        read_synset_mapping(tmp_path / "missing.json")


@pytest.mark.parametrize("weights", ["ResNet18_Weights.IMAGENET1K_V1", ResNet18_Weights.IMAGENET1K_V1])
def test_weights_transforms(tree: Path, weights: str | ResNet18_Weights) -> None:
    dm = ImageNetDataModule(str(tree), batch_size=6, num_workers=0, weights=weights)
    assert dm.weights is ResNet18_Weights.IMAGENET1K_V1
    x, _ = next(iter(dm.val_dataloader()))
    reference = ResNet18_Weights.IMAGENET1K_V1.transforms()
    for i, (path, _) in enumerate(dm.val_dataset.samples):
        torch.testing.assert_close(x[i], reference(Image.open(path).convert("RGB")), atol=0, rtol=0)
    assert dm.train_dataloader().dataset[0][0].shape == (3, 224, 224)


def test_weights_with_other_resize(tree: Path) -> None:
    dm = ImageNetDataModule(str(tree), batch_size=2, num_workers=0, weights="torchvision.models.ResNet50_Weights.IMAGENET1K_V2")
    assert dm.eval_transform.resize_size == [232] and dm.eval_transform.crop_size == [224]
    x, _ = next(iter(dm.val_dataloader()))
    path = dm.val_dataset.samples[0][0]
    torch.testing.assert_close(x[0], ResNet50_Weights.IMAGENET1K_V2.transforms()(Image.open(path).convert("RGB")))
    assert not torch.allclose(x[0], manual_eval(path), atol=1e-3)  # not the resize-256 transform


@pytest.mark.parametrize("weights", ["ResNet18_Weights.NOPE", "NoSuch_Weights.IMAGENET1K_V1", "resnet18"])
def test_unknown_weights(tmp_path: Path, weights: str) -> None:
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        ImageNetDataModule(str(tmp_path), weights=weights)


def test_missing_data_dir(tmp_path: Path) -> None:
    dm = ImageNetDataModule(str(tmp_path / "nowhere"))  # construction does not look at the disk
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert msg.startswith("ImageNet not found")
    assert str(tmp_path / "nowhere" / "train" / "<wnid>" / "*.JPEG") in msg
    assert str(tmp_path / "nowhere" / "val" / "<wnid>" / "*.JPEG") in msg
    assert "one folder per synset" in msg and "image-net.org" in msg and "valprep.sh" in msg and "data_dir=" in msg
    with pytest.raises(FileNotFoundError, match="ImageNet not found"):
        dm.val_dataloader()
    with pytest.raises(FileNotFoundError, match="ImageNet not found"):
        _ = dm.classes


def test_missing_val_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imagenet")
    for f in (root / "val").rglob("*.JPEG"):
        f.unlink()
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val").rmdir()
    with pytest.raises(FileNotFoundError, match=r"ImageNet not found: .*val does not exist; expected .*valprep\.sh"):
        ImageNetDataModule(str(root)).setup("fit")


def test_missing_train_split_only_matters_for_fit(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imagenet")
    (root / "train").rename(root / "train_elsewhere")
    dm = ImageNetDataModule(str(root), batch_size=6, num_workers=0)
    dm.setup("validate")
    assert dm.train_dataset is None and len(dm.val_dataset) == 6
    with pytest.raises(FileNotFoundError, match=r"train does not exist"):
        dm.setup("fit")
    dm = ImageNetDataModule(str(root), train_split="train_elsewhere", num_workers=0)
    dm.setup("fit")
    assert len(dm.train_dataset) == 6


def test_flat_val_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imagenet", n_val=0)
    for i in range(3):
        _write_image(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", (64, 48), i)
    with pytest.raises(FileNotFoundError) as err:
        ImageNetDataModule(str(root)).setup("fit")
    msg = str(err.value)
    assert "is flat" in msg and "3 images but no synset folders" in msg and "raw ILSVRC2012 val layout" in msg
    assert "Sort them into one folder per synset" in msg and "valprep.sh" in msg


def test_empty_split_and_empty_synset_folders(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imagenet")
    (root / "train" / "n01440764" / "n01440764_0.JPEG").unlink()
    (root / "train" / "n01440764" / "n01440764_1.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"train split in .* is incomplete: .*n01440764"):
        ImageNetDataModule(str(root)).setup("fit")
    empty = tmp_path / "empty"
    (empty / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"ImageNet not found: .*val is empty"):
        ImageNetDataModule(str(empty)).setup("validate")


def test_mismatched_class_lists(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "imagenet", train_wnids=WNIDS, val_wnids=[*WNIDS[:2], "n01491361"], n_train=1, n_val=1)
    with pytest.raises(ValueError) as err:
        ImageNetDataModule(str(root)).setup("fit")
    msg = str(err.value)
    assert "different class lists" in msg
    assert "Only in train/: ['n01484850']" in msg and "only in val/: ['n01491361']" in msg


def test_hidden_folders_and_files_are_skipped(tree: Path) -> None:
    (tree / "val" / ".ipynb_checkpoints").mkdir()
    (tree / "val" / "n01440764" / "._n01440764_0.JPEG").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    dm = ImageNetDataModule(str(tree), batch_size=8, num_workers=0)
    dm.setup("fit")
    assert dm.classes == sorted(WNIDS) and len(dm.val_dataset) == 6


def test_load_images_tree(tree: Path) -> None:
    ds = load_images(tree / "val")
    assert ds.classes == sorted(WNIDS) and len(ds) == 6
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 0
    ds = load_images(str(tree / "val"), transform=lambda im: torch.tensor(im.size))
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 2, 2]
    assert [ds[i][0].tolist() for i in range(6)] == [list(Image.open(p).size) for p, _ in ds.samples]


def test_load_images_flat(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    _write_image(folder / "b.JPEG", (40, 30), 0)
    _write_image(folder / "a.png", (30, 40), 1, fmt="PNG")
    _write_image(folder / "c.webp", (20, 20), 2, fmt="WEBP")
    _write_image(folder / "d.BMP", (10, 12), 3, fmt="BMP")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "e.jpg")  # grayscale -> RGB
    (folder / "notes.txt").write_text("not an image")
    ds = load_images(folder, transform=lambda im: torch.tensor([*im.size, len(im.getbands())]))
    assert isinstance(ds, FlatImageFolder) and len(ds) == 5
    assert [Path(p).name for p, _ in ds.samples] == ["a.png", "b.JPEG", "c.webp", "d.BMP", "e.jpg"]
    assert [ds[i][0].tolist() for i in range(5)] == [[30, 40, 3], [40, 30, 3], [20, 20, 3], [10, 12, 3], [8, 8, 3]]
    assert all(ds[i][1] == -1 for i in range(5))


def test_load_images_mixed_warns_and_uses_tree(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _write_image(folder / "cat" / "1.jpg", (16, 16), 0)
    _write_image(folder / "loose.jpg", (16, 16), 1)
    with pytest.warns(UserWarning, match="images directly in it are ignored"):
        ds = load_images(folder)
    assert ds.classes == ["cat"] and len(ds) == 1


def test_load_images_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        load_images(tmp_path / "empty")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_images(tmp_path / "file.jpg")


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ImageNetDataModule(str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        ImageNetDataModule(str(tmp_path), num_workers=-1)


def test_trainer_fit_and_predict(tree: Path) -> None:
    pl.seed_everything(0)
    dm = ImageNetDataModule(str(tree), batch_size=3, num_workers=0, image_size=64, resize_size=72)
    model = SmallCNN(in_channels=3, num_classes=dm.num_classes, channels=(4, 8))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    probs = torch.cat(trainer.predict(model, dm))
    assert probs.shape == (6, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6))
