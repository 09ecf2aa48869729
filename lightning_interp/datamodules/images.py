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

__all__ = ["ImageFolderDataModule", "SkippedFile", "scan_folder"]


@dataclass
class SkippedFile:
    """A file the datamodule could not use, and why."""

    file: str
    reason: str


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """Every visible file under ``root`` with its class index (``-1`` in a flat folder), and the class names.

    A folder with sub-folders is read as one class per sub-folder (sorted names; files directly in ``root`` get
    ``-1`` then); otherwise the files directly in ``root``.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no files.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    files: list[tuple[str, int]] = [
        (e.path, -1) for e in sorted(os.scandir(root), key=lambda e: e.name) if e.is_file() and _visible(e.name)
    ]
    for index, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            files += [(os.path.join(dirpath, f), index) for f in sorted(filenames) if _visible(f)]
    if not files:
        raise FileNotFoundError(f"no files in {root} or in its sub-folders; put images there ({', '.join(IMAGE_EXTENSIONS)})")
    return files, classes


def _decode(path: str) -> Image.Image:
    """Decode fully (``load``), so a truncated file fails here rather than in the middle of a batch."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return image.convert("RGB")


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

        files, folders = scan_folder(self.root)
        mapping = self._label_map(folders)
        transform = self.transform or self._default_transform()
        images, labels = [], []
        self.files, self.folders, self.skipped = [], [], []
        for path, folder in tqdm(files, desc="reading images", unit="image", disable=len(files) < 50):
            if self.limit is not None and len(images) >= self.limit:
                break
            rel = os.path.relpath(path, self.root)
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                self._skip(rel, f"not an image file (extension {os.path.splitext(path)[1] or 'none'})")
                continue
            try:
                image = transform(_decode(path))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                self._skip(rel, f"cannot decode: {type(err).__name__}: {err}")
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
