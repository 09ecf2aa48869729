"""ImageNet (ILSVRC2012) from the standard extracted folder layout, and a loader for any folder of images.

The datamodule reads ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG`` with
:class:`torchvision.datasets.ImageFolder` (the layout :class:`torchvision.datasets.ImageNet` extracts to), so
labels are the indices of the sorted synset folder names. Nothing is ever downloaded: human-readable class
names come from a mapping file in ``data_dir`` or torchvision's ``meta.bin`` when present, otherwise from the
1000 ImageNet-1k category names that torchvision ships (when the split has exactly 1000 synsets).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.models import ResNet18_Weights, WeightsEnum, get_weight

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "FlatImageFolder",
    "ImageNetDataModule",
    "imagenet_class_names",
    "load_images",
    "read_synset_mapping",
    "resolve_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
"""Image file extensions that are read (compared case-insensitively, so ``.JPEG`` is included)."""

_MAPPING_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
_WNID = re.compile(r"^n\d{8}$")


def _is_image(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _rgb_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _find_classes(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the non-hidden sub-folders (what ``ImageFolder`` numbers as classes)."""
    return sorted(e.name for e in os.scandir(os.fspath(directory)) if e.is_dir() and not e.name.startswith("."))


class _ImageFolder(ImageFolder):
    """``ImageFolder`` that skips hidden folders (``.ipynb_checkpoints``, ``.DS_Store`` ...) and hidden files."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        super().__init__(str(root), transform=transform, loader=_rgb_loader, is_valid_file=_is_image)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = _find_classes(directory)
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}


class FlatImageFolder(Dataset):
    """The images directly inside one folder (sorted by file name), each with label ``-1``.

    Args:
        root: the folder.
        transform: applied to each RGB ``PIL.Image``.

    Raises:
        FileNotFoundError: the folder is missing or holds no image files.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        self.root = str(root)
        self.transform = transform
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        files = sorted(e.path for e in os.scandir(self.root) if e.is_file() and _is_image(e.name))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}")
        self.samples: list[tuple[str, int]] = [(f, -1) for f in files]
        self.targets: list[int] = [-1] * len(files)
        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = _rgb_loader(path)
        return (self.transform(image) if self.transform is not None else image), target


def _has_images(directory: str | os.PathLike[str]) -> bool:
    for _, _, files in os.walk(os.fspath(directory)):
        if any(_is_image(f) for f in files):
            return True
    return False


def _top_level_images(directory: str | os.PathLike[str]) -> list[str]:
    return sorted(e.name for e in os.scandir(os.fspath(directory)) if e.is_file() and _is_image(e.name))


def load_images(path: str | os.PathLike, transform: Callable | None = None) -> ImageFolder | FlatImageFolder:
    """A dataset of ``(image, label)`` over a folder tree (``path/<class>/<image>``) or a flat folder of images.

    A folder with class sub-folders that contain images is read as an
    :class:`~torchvision.datasets.ImageFolder` (labels are the indices of the sorted sub-folder names; images
    directly in ``path`` are then ignored, with a warning). Otherwise the images directly in ``path`` are read as
    a :class:`FlatImageFolder` with label ``-1``. Images are converted to RGB; extensions are
    :data:`IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders are skipped.

    Args:
        path: the folder.
        transform: applied to each RGB ``PIL.Image`` (``None`` returns the image itself).

    Raises:
        FileNotFoundError: ``path`` is missing, is not a folder, or holds no images.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.new("RGB", (32, 24)).save(f"{d}/a.png")
        ...     ds = load_images(d, transform=lambda im: im.size)
        ...     len(ds), ds[0]
        (1, ((32, 24), -1))
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    if any(_has_images(os.path.join(path, d)) for d in _find_classes(path)):
        top = _top_level_images(path)
        if top:
            warnings.warn(f"{path} has class sub-folders; the {len(top)} images directly in it are ignored", stacklevel=2)
        return _ImageFolder(path, transform=transform)
    if _top_level_images(path):
        return FlatImageFolder(path, transform=transform)
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path} or in its sub-folders")


def read_synset_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``wnid -> name`` mapping file.

    Formats: ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``, also accepted as
    ``{"n01440764": "tench"}``), or text with one ``<wnid> <names>`` per line as in ``LOC_synset_mapping.txt`` /
    ``synset_words.txt`` (``n01440764 tench, Tinca tinca``) and ``words.txt`` (tab-separated). Of a
    comma-separated list of synonyms the first is kept.

    Args:
        path: the file.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be parsed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = Path(d, "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\\n")
        ...     read_synset_mapping(Path(d, "LOC_synset_mapping.txt"))
        {'n01440764': 'tench'}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("top level is not an object")
            mapping = {}
            for key, value in data.items():
                if isinstance(value, (list, tuple)) and len(value) == 2:
                    mapping[str(value[0])] = str(value[1])
                elif isinstance(value, str):
                    mapping[str(key)] = value
                else:
                    raise TypeError(f"entry {key!r} is neither [wnid, name] nor a name")
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(
                f'{path}: expected the imagenet_class_index.json format {{"0": ["n01440764", "tench"], ...}}: {e}'
            ) from e
        return mapping
    mapping = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            mapping[parts[0]] = parts[1].split(",")[0].strip()
    if not mapping:
        raise ValueError(f"{path}: expected lines '<wnid> <name>, <synonyms>' such as 'n01440764 tench, Tinca tinca'")
    return mapping


def resolve_weights(weights: str | WeightsEnum) -> WeightsEnum:
    """A torchvision weights enum from its name (``"ResNet50_Weights.IMAGENET1K_V2"``) or the enum itself.

    Nothing is downloaded: only the enum (its ``transforms()`` and ``meta``) is looked up.

    Args:
        weights: ``"<Enum>.<VALUE>"`` (optionally prefixed with ``torchvision.models.``) or a ``WeightsEnum``.

    Raises:
        ValueError: unknown weights.

    Example:
        >>> resolve_weights("ResNet18_Weights.IMAGENET1K_V1").transforms().crop_size
        [224]
    """
    if isinstance(weights, WeightsEnum):
        return weights
    if not isinstance(weights, str):
        raise ValueError(f"weights must be a torchvision WeightsEnum or its name, got {type(weights).__name__}")
    name = ".".join(weights.strip().split(".")[-2:])
    try:
        return get_weight(name)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"unknown torchvision weights {weights!r}: expected '<Enum>.<VALUE>', e.g. 'ResNet50_Weights.IMAGENET1K_V2'"
        ) from e


def imagenet_class_names(
    wnids: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    class_index_file: str | os.PathLike | None = None,
    categories: Sequence[str] | None = None,
) -> list[str]:
    """Human-readable names for synset folders, without any download.

    Each wnid takes the first name found in, in order: ``class_index_file``; ``LOC_synset_mapping.txt``,
    ``synset_words.txt`` or ``words.txt`` in ``data_dir``; torchvision's ``meta.bin`` in ``data_dir`` (written by
    :class:`torchvision.datasets.ImageNet`). When there are exactly 1000 wnids (of the form ``n`` + 8 digits) the
    rest are named by position from ``categories`` (default: the ImageNet-1k names torchvision ships, which are
    in sorted-wnid order). Whatever is left keeps its wnid.

    Args:
        wnids: the synset folder names, sorted as ``ImageFolder`` sorts them.
        data_dir: folder searched for mapping files.
        class_index_file: a mapping file (see :func:`read_synset_mapping`).
        categories: names by sorted-wnid position, e.g. a weights' ``meta["categories"]``; used only when
            their count equals the number of wnids.

    Raises:
        FileNotFoundError: ``class_index_file`` is given but missing.
        ValueError: a mapping file cannot be parsed.

    Example:
        >>> imagenet_class_names([f"n{i:08d}" for i in range(1000)])[:3]
        ['tench', 'goldfish', 'great white shark']
        >>> imagenet_class_names(["n01440764", "n01443537"])
        ['n01440764', 'n01443537']
    """
    mappings: list[dict[str, str]] = []
    if class_index_file is not None:
        mappings.append(read_synset_mapping(class_index_file))
    if data_dir is not None:
        for name in _MAPPING_FILES:
            if os.path.isfile(os.path.join(data_dir, name)):
                mappings.append(read_synset_mapping(os.path.join(data_dir, name)))
                break
        if os.path.isfile(os.path.join(data_dir, "meta.bin")):
            try:
                meta = torch.load(os.path.join(data_dir, "meta.bin"), weights_only=True)[0]
                mappings.append({str(k): str(v[0] if isinstance(v, (tuple, list)) else v) for k, v in meta.items()})
            except Exception as e:  # a corrupt meta.bin only costs the names
                warnings.warn(f"could not read {os.path.join(data_dir, 'meta.bin')}: {e}", stacklevel=2)
    if categories is None:
        categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # torchvision's ImageNet-1k names
    by_position = len(wnids) == len(categories) == 1000 and all(_WNID.match(w) for w in wnids)
    names = []
    for i, wnid in enumerate(wnids):
        found = next((m[wnid] for m in mappings if wnid in m), None)
        name = found if found is not None else (categories[i] if by_position else wnid)
        names.append(name)
    return names


def _layout_hint(data_dir: str, train_split: str, val_split: str) -> str:
    hint = (
        f"expected {os.path.join(data_dir, train_split, '<wnid>', '*.JPEG')} and "
        f"{os.path.join(data_dir, val_split, '<wnid>', '*.JPEG')} (one folder per synset, e.g. n01440764/, "
        "as torchvision's ImageFolder reads them). Download ILSVRC2012 from image-net.org, extract it, and move the "
        "val images into synset folders (for example with the valprep.sh script), then pass data_dir=<that folder>."
    )
    kaggle = os.path.join(data_dir, "ILSVRC", "Data", "CLS-LOC")
    if os.path.isdir(kaggle):
        hint += f" (This looks like the Kaggle download: try data_dir={kaggle!r} after sorting its val images.)"
    return hint


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet (ILSVRC2012) from the extracted folder layout, read with ``torchvision``'s ``ImageFolder``.

    ``data_dir`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (one folder per synset, the layout
    :class:`torchvision.datasets.ImageNet` extracts to). Labels are indices into the sorted wnids
    (:attr:`classes`); :attr:`class_names` are human readable (see :func:`imagenet_class_names`). The val split
    serves validation, test and predict. Batches are ``(x, y)`` with ``x`` float32 ``[B, 3, H, W]`` and ``y``
    int64 ``[B]``.

    Transforms: eval is resize ``resize_size`` + center-crop ``image_size`` + ImageNet normalisation; train is
    ``RandomResizedCrop(image_size)`` + horizontal flip + normalisation. With ``weights`` the eval transform is
    ``weights.transforms()`` (e.g. resize 232 for ``ResNet50_Weights.IMAGENET1K_V2``) and the train transform uses
    its crop size, interpolation, mean and std (``image_size`` and ``resize_size`` are then ignored). Explicit
    ``train_transform`` / ``eval_transform`` (callables on RGB ``PIL.Image``) override both.

    The folders are checked at :meth:`setup` (not at construction, so a config can name a path that is filled
    later), which raises a ``FileNotFoundError`` that says what to put where.

    Args:
        data_dir: folder holding the ``train`` and ``val`` split folders.
        batch_size: batch size of every loader.
        num_workers: ``DataLoader`` workers (kept alive between epochs when > 0).
        image_size: crop size of both transforms.
        resize_size: shorter-side resize of the eval transform.
        weights: torchvision weights (``"ResNet50_Weights.IMAGENET1K_V2"`` or the enum) whose transforms to use.
        train_transform: replaces the train transform.
        eval_transform: replaces the val / test / predict transform.
        pin_memory: pin loader memory; ``None`` pins when CUDA is available.
        train_split: name of the train split folder.
        val_split: name of the val split folder (used for validation, test and predict).
        class_index_file: ``wnid -> name`` file (``imagenet_class_index.json``, ``LOC_synset_mapping.txt`` format).
        shuffle: shuffle the training set each epoch.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: non-positive sizes or unknown ``weights``.
        FileNotFoundError: (at :meth:`setup`) ``data_dir`` or a split folder is missing, empty, or flat (the raw
            ILSVRC2012 val layout).
        ValueError: (at :meth:`setup`) the train and val splits have different synset folders.

    Example:
        >>> dm = ImageNetDataModule("/data/imagenet", batch_size=256, weights="ResNet50_Weights.IMAGENET1K_V2")
        >>> dm.eval_transform.resize_size
        [232]
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> dm.num_classes, dm.class_names[:2]  # doctest: +SKIP
        (1000, ['tench', 'goldfish'])
        >>> x, y = next(iter(dm.val_dataloader()))  # doctest: +SKIP
        >>> x.shape, y.dtype  # doctest: +SKIP
        (torch.Size([256, 3, 224, 224]), torch.int64)
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        num_workers: int = 4,
        image_size: int = 224,
        resize_size: int = 256,
        weights: str | WeightsEnum | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        pin_memory: bool | None = None,
        train_split: str = "train",
        val_split: str = "val",
        class_index_file: str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or image_size < 1 or resize_size < 1:
            raise ValueError("batch_size, image_size and resize_size must be >= 1 and num_workers >= 0")
        self.data_dir = os.path.expanduser(os.fspath(data_dir))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.resize_size = resize_size
        self.weights = resolve_weights(weights) if weights is not None else None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_split = train_split
        self.val_split = val_split
        self.class_index_file = class_index_file
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.train_transform = train_transform if train_transform is not None else self._default_train_transform()
        self.eval_transform = eval_transform if eval_transform is not None else self._default_eval_transform()
        self.train_dataset: ImageFolder | None = None
        self.val_dataset: ImageFolder | None = None
        self._classes: list[str] | None = None
        self._class_names: list[str] | None = None

    # transforms ---------------------------------------------------------------------------------------------------

    def _default_eval_transform(self) -> Callable:
        if self.weights is not None:
            return self.weights.transforms()
        return T.Compose(
            [
                T.Resize(self.resize_size),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _default_train_transform(self) -> Callable:
        size, mean, std = self.image_size, IMAGENET_MEAN, IMAGENET_STD
        interpolation = T.InterpolationMode.BILINEAR
        if self.weights is not None:
            preset = self.weights.transforms()
            crop = getattr(preset, "crop_size", [size])
            size = crop[0] if isinstance(crop, (list, tuple)) else crop
            mean = tuple(getattr(preset, "mean", mean))
            std = tuple(getattr(preset, "std", std))
            interpolation = getattr(preset, "interpolation", interpolation)
        return T.Compose(
            [
                T.RandomResizedCrop(size, interpolation=interpolation),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    # folders ------------------------------------------------------------------------------------------------------

    def _check_split(self, split: str) -> str:
        """The split folder, after checking that it is in the ``<split>/<wnid>/<images>`` layout."""
        hint = _layout_hint(self.data_dir, self.train_split, self.val_split)
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"ImageNet not found: {self.data_dir} does not exist; {hint}")
        root = os.path.join(self.data_dir, split)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageNet not found: {root} does not exist; {hint}")
        if not _find_classes(root):
            flat = _top_level_images(root)
            if flat:
                raise FileNotFoundError(
                    f"ImageNet {split} split is flat: {root} holds {len(flat)} images but no synset folders (the raw "
                    f"ILSVRC2012 val layout). Sort them into one folder per synset, {os.path.join(root, '<wnid>', '*.JPEG')} "
                    "(for example with the valprep.sh script, or from ILSVRC2012_validation_ground_truth.txt / "
                    f"LOC_val_solution.csv); {hint}"
                )
            raise FileNotFoundError(f"ImageNet not found: {root} is empty; {hint}")
        return root

    def _load_split(self, split: str) -> ImageFolder:
        root = self._check_split(split)
        try:
            return _ImageFolder(root, transform=self.train_transform if split == self.train_split else self.eval_transform)
        except FileNotFoundError as e:
            hint = _layout_hint(self.data_dir, self.train_split, self.val_split)
            raise FileNotFoundError(f"ImageNet {split} split in {root} is incomplete: {e}; {hint}") from e

    def _check_same_classes(self, train: ImageFolder, val: ImageFolder) -> None:
        if train.classes == val.classes:
            return
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"ImageNet train and val splits have different class lists: {self.train_split}/ has {len(train.classes)} "
            f"synset folders and {self.val_split}/ has {len(val.classes)}; they must match, since labels are indices "
            f"into the sorted folder names. Only in {self.train_split}/: {only_train[:10]}"
            f"{' ...' if len(only_train) > 10 else ''}; only in {self.val_split}/: {only_val[:10]}"
            f"{' ...' if len(only_val) > 10 else ''}."
        )

    def setup(self, stage: str | None = None) -> None:
        """Index the split folders ``stage`` needs: train and val for ``"fit"`` / ``None``, val otherwise.

        Raises:
            FileNotFoundError: ``data_dir`` or a needed split is missing, empty or flat.
            ValueError: the train and val splits have different synset folders.
        """
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._load_split(self.train_split)
        if self.val_dataset is None:
            self.val_dataset = self._load_split(self.val_split)
        if self.train_dataset is not None:
            self._check_same_classes(self.train_dataset, self.val_dataset)
        self._classes = list(self.val_dataset.classes)

    # classes ------------------------------------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        """The synset folder names (wnids), sorted as ``ImageFolder`` sorts them; label ``i`` is ``classes[i]``.

        Available before :meth:`setup` (it then only lists the val split's folders).
        """
        if self._classes is None:
            root = self._check_split(self.val_split)
            self._classes = _find_classes(root)
        return self._classes

    @property
    def class_names(self) -> list[str]:
        """Human-readable names of :attr:`classes` (see :func:`imagenet_class_names`); the wnid where none is known."""
        if self._class_names is None:
            categories = self.weights.meta.get("categories") if self.weights is not None else None
            self._class_names = imagenet_class_names(self.classes, self.data_dir, self.class_index_file, categories=categories)
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of synset folders."""
        return len(self.classes)

    # loaders ------------------------------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and self.shuffle,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None  # setup("fit") loads it or raises
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None  # setup("validate") loads it or raises
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
