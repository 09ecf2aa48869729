"""A folder of images as a datamodule that survives bad files: what an audit of a trained model reads.

The folder is flat, or holds one sub-folder per class (class names from the sub-folders). Every image is
decoded once at :meth:`ImageFolderDataModule.setup`; an unreadable, truncated or non-image file is skipped
with a warning and listed in :attr:`ImageFolderDataModule.skipped` (file and reason) instead of stopping the
run with a PIL traceback.

Example:
    >>> import tempfile, os
    >>> from PIL import Image
    >>> with tempfile.TemporaryDirectory() as d:
    ...     Image.new("RGB", (40, 30)).save(os.path.join(d, "a.png"))
    ...     _ = open(os.path.join(d, "notes.txt"), "w").write("not an image")
    ...     dm = ImageFolderDataModule(d, transform=None, image_size=32)
    ...     dm.setup()
    >>> dm.inputs.shape, dm.files, [s.reason.split(" (")[0] for s in dm.skipped]
    (torch.Size([1, 3, 32, 32]), ['a.png'], ['not an image file'])
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.datamodules.imagenet import IMAGE_EXTENSIONS

__all__ = ["FOLDER_EXTENSIONS", "ImageFolderDataModule", "SkippedFile", "decode_image", "scan_folder"]


@dataclass
class SkippedFile:
    """A file the datamodule could not use, and why."""

    file: str
    reason: str


def _visible(name: str) -> bool:
    return not name.startswith(".")


#: Extensions read from a folder: the ImageNet ones and GIF (its first frame).
FOLDER_EXTENSIONS: tuple[str, ...] = (*IMAGE_EXTENSIONS, ".gif")


def _walk_once(top: str, seen: set[str], skipped: list[SkippedFile], root: str) -> list[str]:
    """Every visible file under ``top``, sorted, following symlinked folders but reading each real folder once.

    ``seen`` holds the real paths of the folders already read: a link back to one of them (``zz -> .``, a loop)
    or a second link to the same folder is listed in ``skipped`` instead of being read again.
    """
    out: list[str] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        entries = sorted((e for e in os.scandir(folder) if _visible(e.name)), key=lambda e: e.name)
        subfolders = []
        for e in entries:
            if e.is_dir():
                real = os.path.realpath(e.path)
                if real in seen:
                    skipped.append(SkippedFile(os.path.relpath(e.path, root), f"a link to a folder already read ({real})"))
                    continue
                seen.add(real)
                subfolders.append(e.path)
            elif e.is_file():
                out.append(e.path)
        stack += reversed(subfolders)  # depth first, in name order
    return out


def scan_folder(root: str | os.PathLike, skipped: list[SkippedFile] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Every visible file under ``root`` with its class index (``-1`` in a flat folder), and the class names.

    A folder with sub-folders is read as one class per sub-folder (sorted names; files directly in ``root`` get
    ``-1`` then); otherwise the files directly in ``root``. Symlinked folders are followed, each real folder
    at most once: a link to a folder already read (``root`` itself, a loop, a second link to a class) is not a
    class and adds no file twice; it is appended to ``skipped``.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no files.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    skipped = [] if skipped is None else skipped
    seen = {os.path.realpath(root)}
    classes: list[str] = []
    class_dirs: list[str] = []
    files: list[tuple[str, int]] = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not _visible(e.name):
            continue
        if e.is_dir():
            real = os.path.realpath(e.path)
            if real in seen:
                skipped.append(SkippedFile(e.name, f"a link to a folder already read ({real})"))
                continue
            seen.add(real)
            classes.append(e.name)
            class_dirs.append(e.path)
        elif e.is_file():
            files.append((e.path, -1))
    for index, folder in enumerate(class_dirs):
        files += [(path, index) for path in _walk_once(folder, seen, skipped, root)]
    if not files:
        raise FileNotFoundError(f"no files in {root} or in its sub-folders; put images there ({', '.join(FOLDER_EXTENSIONS)})")
    return files, classes


def _to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images scaled by their bit depth to 8 bits (Pillow would clip them at 255: white)."""
    import numpy as np

    if image.mode.startswith("I;16"):
        bits = 16
    elif image.mode == "I":
        # 16-bit PNGs may open as "I"; a TIFF says its depth (tag 258, BitsPerSample)
        tag = getattr(image, "tag_v2", {}).get(258) if hasattr(image, "tag_v2") else None
        bits = int(tag[0] if isinstance(tag, tuple) else tag) if tag else 16
    elif image.mode == "F":  # floating point: taken as [0, 1]
        array = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
        return Image.fromarray(np.round(array * 255).astype(np.uint8), mode="L")
    else:
        return image
    array = np.asarray(image).astype(np.float64)
    scaled = np.clip(np.round(array * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def decode_image(path: str) -> Image.Image:
    """An RGB image as a viewer shows it: EXIF orientation applied, 16-bit depth scaled, a GIF's first frame.

    Decodes fully (``load``), so a truncated file fails here rather than in the middle of a batch.
    """
    from PIL import ImageOps

    with open(path, "rb") as f:
        image: Image.Image = Image.open(f)
        image.seek(0)  # the first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image) or image  # a phone photo upright, as a viewer shows it
        return _to_8bit(image).convert("RGB")


class ImageFolderDataModule(pl.LightningDataModule):
    """The images of a folder, decoded and preprocessed once, as ``(image, label)`` batches.

    Args:
        root: the folder (flat, or one sub-folder per class).
        transform: a callable on an RGB ``PIL.Image`` returning a ``[C, H, W]`` tensor (e.g. a model's
            preprocessing); ``None``: resize to ``image_size`` and scale to ``[0, 1]``.
        image_size: the side of the square images when ``transform`` is ``None``.
        limit: read at most this many images (in file order); ``None``: all.
        batch_size: batch size of the validation and prediction loaders.
        class_names: names of the model's classes. When given, a sub-folder named like a class is labelled
            with that class's index; otherwise sub-folders are labelled by their sorted position when there are
            exactly as many as the model has classes (else the labels are ``-1``, unknown).
        num_classes: the model's number of classes (for the rule above).
        progress: show a bar over the files (``None``: when stderr is a terminal).

    Attributes:
        inputs: ``[N, C, H, W]`` after :meth:`setup`.
        labels: ``[N]`` class indices, ``-1`` where unknown.
        files: the N file names, relative to ``root``.
        folders: the sub-folder of each image (``""`` in a flat folder).
        skipped: the files that were not used, with the reason.
    """

    def __init__(
        self,
        root: str,
        transform: Callable[[Any], Tensor] | None = None,
        image_size: int = 224,
        limit: int | None = None,
        batch_size: int = 16,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be None or >= 1, got {limit}")
        self.root = os.fspath(root)
        self.transform = transform
        self.image_size = image_size
        self.limit = limit
        self.batch_size = batch_size
        self.class_names = class_names
        self.num_classes = num_classes
        self.progress = progress
        self.inputs: Tensor | None = None
        self.labels: Tensor | None = None
        self.files: list[str] = []
        self.folders: list[str] = []
        self.skipped: list[SkippedFile] = []

    def _default_transform(self) -> Callable[[Any], Tensor]:
        import torchvision.transforms as T

        return T.Compose([T.Resize((self.image_size, self.image_size)), T.ToTensor()])

    def _label_map(self, folders: list[str]) -> list[int]:
        if self.class_names is not None:
            index = {name: i for i, name in enumerate(self.class_names)}
            if any(f in index for f in folders):
                return [index.get(f, -1) for f in folders]
        if self.num_classes is not None and len(folders) == self.num_classes:
            return list(range(len(folders)))
        return [-1] * len(folders)

    def setup(self, stage: str | None = None) -> None:
        if self.inputs is not None:
            return
        from tqdm import tqdm

        self.files, self.folders, self.skipped = [], [], []
        links: list[SkippedFile] = []
        files, folders = scan_folder(self.root, links)
        for link in links:
            self._skip(link.file, link.reason)
        mapping = self._label_map(folders)
        transform = self.transform or self._default_transform()
        images: list[Tensor] = []
        labels: list[int] = []
        shown = self.progress if self.progress is not None else sys.stderr.isatty()
        for path, folder in tqdm(files, desc="reading images", unit="image", disable=not shown):
            if self.limit is not None and len(images) >= self.limit:
                break
            rel = os.path.relpath(path, self.root)
            if not path.lower().endswith(FOLDER_EXTENSIONS):
                self._skip(rel, f"not an image file (extension {os.path.splitext(path)[1] or 'none'})")
                continue
            try:
                image = transform(decode_image(path))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                self._skip(rel, f"cannot decode: {type(err).__name__}: {err}")
                continue
            if images and image.shape != images[0].shape:
                # without a resize and a crop, images of other sizes cannot share a batch with the first
                self._skip(
                    rel, f"size {list(image.shape)} after preprocessing, the first image's is {list(images[0].shape)}: "
                    "resize and crop to one size (--resize, --crop)",
                )  # fmt: skip
                continue
            images.append(image)
            labels.append(mapping[folder] if folder >= 0 else -1)
            self.files.append(rel)
            self.folders.append(folders[folder] if folder >= 0 else "")
        if not images:
            raise ValueError(
                f"no readable images in {self.root}: {len(self.skipped)} file(s) skipped, e.g. "
                f"{[(s.file, s.reason) for s in self.skipped[:3]]}"
            )
        self.inputs = torch.stack(images)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def _skip(self, file: str, reason: str) -> None:
        self.skipped.append(SkippedFile(file, reason))
        warnings.warn(f"skipped {file}: {reason}", stacklevel=3)

    @property
    def labelled(self) -> bool:
        """Whether every image has a class label."""
        return self.labels is not None and bool((self.labels >= 0).all())

    def _loader(self) -> DataLoader:
        if self.inputs is None or self.labels is None:
            raise RuntimeError("call setup() first")
        return DataLoader(TensorDataset(self.inputs, self.labels), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
