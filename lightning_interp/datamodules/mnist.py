"""MNIST from torchvision's files, with a train / val split of the 60,000 training images.

:class:`torchvision.datasets.MNIST` reads the four uncompressed IDX files in ``<data_dir>/MNIST/raw/``. Nothing
is downloaded unless ``download=True``; when the files are absent the datamodule says which ones and how to get
them, and before torchvision reads them it checks their IDX headers and sizes (:func:`check_idx_file`), so a
damaged file is named with what is wrong instead of failing inside torchvision.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import MNIST

__all__ = [
    "MNIST_FILES",
    "MNIST_IMAGE_SIZE",
    "MNIST_MEAN",
    "MNIST_STD",
    "MNISTDataModule",
    "MNISTFileError",
    "check_idx_file",
    "check_split_files",
    "missing_files",
]

MNIST_MEAN = 0.1307
"""Mean pixel intensity of the MNIST training images (after ``ToTensor``, i.e. in ``[0, 1]``)."""
MNIST_STD = 0.3081
"""Standard deviation of the pixel intensities of the MNIST training images (in ``[0, 1]``)."""
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
"""The files that ``torchvision.datasets.MNIST`` needs in ``<root>/MNIST/raw/`` (uncompressed IDX)."""
MNIST_IMAGE_SIZE = 28
"""Height and width of an MNIST image."""

# IDX: a big-endian magic number 0x0000 0800 + number of dimensions (0x08: unsigned bytes), then one big-endian
# 32-bit size per dimension, then the data
_IDX_FORMATS = {"images": (2051, 3), "labels": (2049, 1)}
_GZIP_MAGIC = b"\x1f\x8b"


class MNISTFileError(ValueError):
    """A raw MNIST file that torchvision cannot read correctly; the message names the file, the problem and the fix.

    Args:
        path: the file.
        problem: what is wrong (what was expected and what was found).
        fix: how to get a good file.

    Attributes:
        path: the file.
        problem: what is wrong.
    """

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"MNIST file {path}: {problem}. {fix}")
        self.path = path
        self.problem = problem


def _redownload_hint(path: str) -> str:
    name = os.path.basename(path)
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    folder = os.path.dirname(path)
    return (
        f"Re-download {name}.gz from {MNIST.mirrors[0]}{name}.gz (or another MNIST mirror), extract it (gunzip -k) and "
        f"put {name} in {folder}; or delete {os.path.join(folder, name)} and run with download=True, which fetches and "
        "extracts the missing file."
    )


def _gzip_error(path: str) -> str | None:
    """Why the gzip file ``path`` cannot be decompressed, or ``None`` when the whole stream decompresses."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


def check_idx_file(path: str, kind: str) -> tuple[int, ...]:
    """Check the IDX header of an uncompressed MNIST file against its size; return its dimensions.

    ``kind="images"``: magic number 2051 and three sizes ``(n, 28, 28)``, then ``n * 28 * 28`` bytes;
    ``kind="labels"``: magic number 2049 and one size ``(n,)``, then ``n`` bytes, each a digit 0..9.

    Args:
        path: the file.
        kind: ``"images"`` or ``"labels"``.

    Returns:
        The sizes in the header: ``(n, 28, 28)`` or ``(n,)``.

    Raises:
        MNISTFileError: a gzip archive (extracted or not decompressible), a wrong magic number, images that are not
            28 x 28, fewer bytes than the header announces (truncated) or more, or a label outside 0..9.
        ValueError: an unknown ``kind``.
    """
    if kind not in _IDX_FORMATS:
        raise ValueError(f"kind must be one of {sorted(_IDX_FORMATS)}, got {kind!r}")
    magic, ndim = _IDX_FORMATS[kind]
    header = 4 + 4 * ndim
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(header)
    fix = _redownload_hint(path)
    if head[:2] == _GZIP_MAGIC:
        error = _gzip_error(path)
        if error is not None:
            raise MNISTFileError(
                path, f"expected an uncompressed IDX file, found a gzip archive that cannot be decompressed ({error})", fix
            )
        raise MNISTFileError(
            path,
            "expected the uncompressed IDX file, found gzip-compressed data",
            f"Extract it: mv {path} {path}.gz && gunzip -k {path}.gz",
        )
    if len(head) < 4:
        raise MNISTFileError(path, f"truncated: {size} bytes, fewer than the 4 of the magic number", fix)
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        problem = (
            f"wrong magic number: expected {magic} (the {kind} of MNIST, bytes {magic.to_bytes(4, 'big').hex(' ')}), "
            f"found {found} (bytes {head[:4].hex(' ')})"
        )
        other = {2051: "images", 2049: "labels"}.get(found)
        if other is not None:
            problem += f"; this is an MNIST {other} file: were the files renamed or swapped?"
        raise MNISTFileError(path, problem, fix)
    if size < header:
        raise MNISTFileError(path, f"truncated: {size} bytes, fewer than the {header}-byte header of an IDX {kind} file", fix)
    dims = tuple(int.from_bytes(head[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if kind == "images" and dims[1:] != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise MNISTFileError(
            path, f"expected images of {MNIST_IMAGE_SIZE} x {MNIST_IMAGE_SIZE} pixels, the header says {dims[1]} x {dims[2]}", fix
        )
    expected = header + math.prod(dims)  # Python ints: a garbage header must not overflow
    what = f"{dims[0]} images of {MNIST_IMAGE_SIZE} x {MNIST_IMAGE_SIZE} bytes" if kind == "images" else f"{dims[0]} labels"
    if size < expected:
        raise MNISTFileError(
            path,
            f"truncated: the header announces {what}, {expected} bytes with the header, but the file has {size} "
            f"({expected - size} missing)",
            fix,
        )
    if size > expected:
        raise MNISTFileError(
            path,
            f"the header announces {what}, {expected} bytes with the header, but the file has {size} "
            f"({size - expected} too many)",
            fix,
        )
    if kind == "labels" and dims[0]:
        labels = np.fromfile(path, dtype=np.uint8, offset=header)
        bad = np.flatnonzero(labels > 9)
        if bad.size:
            raise MNISTFileError(
                path, f"expected labels 0..9, found {int(labels[bad[0]])} at index {int(bad[0])} ({bad.size} such labels)", fix
            )
    return dims


def check_split_files(raw_folder: str, prefix: str) -> int:
    """Check the images and labels files of one split (``prefix`` ``"train"`` or ``"t10k"``); return its size.

    Args:
        raw_folder: the folder with the uncompressed IDX files.
        prefix: ``"train"`` or ``"t10k"``.

    Returns:
        The number of images (and labels).

    Raises:
        MNISTFileError: a damaged file (:func:`check_idx_file`) or fewer (or more) labels than images.
    """
    images = os.path.join(raw_folder, f"{prefix}-images-idx3-ubyte")
    labels = os.path.join(raw_folder, f"{prefix}-labels-idx1-ubyte")
    n_images = check_idx_file(images, "images")[0]
    n_labels = check_idx_file(labels, "labels")[0]
    if n_labels != n_images:
        fewer = "fewer" if n_labels < n_images else "more"
        raise MNISTFileError(
            labels,
            f"{n_labels} labels, {fewer} than the {n_images} images of {images}: the two files of the '{prefix}' split "
            "must have one label per image (they come from different downloads, or one is a subset)",
            _redownload_hint(labels) + f" Do the same for {os.path.basename(images)}.",
        )
    return n_images


def _raw_folder(data_dir: str) -> str:
    return os.path.join(data_dir, "MNIST", "raw")


def _legacy_present(data_dir: str) -> bool:
    """torchvision also accepts its old processed cache, ``MNIST/processed/{training,test}.pt``."""
    processed = os.path.join(data_dir, "MNIST", "processed")
    return all(os.path.isfile(os.path.join(processed, f)) for f in (MNIST.training_file, MNIST.test_file))


def missing_files(data_dir: str) -> list[str]:
    """The files of :data:`MNIST_FILES` missing from ``<data_dir>/MNIST/raw`` (empty when torchvision can load)."""
    if _legacy_present(data_dir):
        return []
    raw = _raw_folder(data_dir)
    return [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]


def _not_found_message(data_dir: str, missing: list[str]) -> str:
    raw = _raw_folder(data_dir)
    lines = [
        f"MNIST not found under data_dir={data_dir!r}: torchvision.datasets.MNIST needs these four uncompressed IDX files",
        *(f"  {os.path.join(raw, f)}{'   <- missing' if f in missing else ''}" for f in MNIST_FILES),
    ]
    gz = [f for f in missing if os.path.isfile(os.path.join(raw, f + ".gz"))]
    damaged = {f: _gzip_error(os.path.join(raw, f + ".gz")) for f in gz}
    good = [f for f in gz if damaged[f] is None]
    if good:
        lines.append(
            f"Only the archives {', '.join(f + '.gz' for f in good)} are there: extract them in place (gunzip -k), or "
            "pass download=True, which extracts the original archives without downloading them again."
        )
    for f in gz:
        if damaged[f] is not None:
            lines.append(
                f"The archive {os.path.join(raw, f + '.gz')} cannot be decompressed ({damaged[f]}): it is damaged or not "
                f"a gzip file, so gunzip cannot extract it. Delete it and re-download {f}.gz from {MNIST.mirrors[0]}{f}.gz "
                "(or pass download=True, which fetches it again)."
            )
    for elsewhere in (data_dir, os.path.join(data_dir, "raw")):
        if any(os.path.isfile(os.path.join(elsewhere, f)) for f in MNIST_FILES):
            lines.append(
                f"Some of the files are in {elsewhere}: data_dir must be the folder that holds MNIST/raw/, not the raw folder."
            )
            break
    lines.append(
        "To get them: run once with download=True on a machine with internet access (MNISTDataModule(data_dir, "
        "download=True).prepare_data(), or torchvision.datasets.MNIST(data_dir, download=True)), or copy the four "
        f"files (from the train-*/t10k-* .gz archives of an MNIST mirror, uncompressed) into {raw}."
    )
    return "\n".join(lines)


class MNISTDataModule(pl.LightningDataModule):
    """MNIST digits read with :class:`torchvision.datasets.MNIST`; a seeded train / val split of the training set.

    ``data_dir`` is torchvision's ``root``: it holds ``MNIST/raw/`` with the four uncompressed IDX files of
    :data:`MNIST_FILES`. The 60,000 training images are split by a permutation drawn from ``seed`` into
    ``val_size`` validation images and the rest for training; the 10,000 ``t10k`` images are the test (and
    predict) set. Transform: ``ToTensor`` (pixels in ``[0, 1]``), then, with ``normalize``,
    ``Normalize((0.1307,), (0.3081,))``, then, with ``flatten``, a flatten to ``[784]``. Batches are ``(x, y)``
    with ``x`` float32 ``[B, 1, 28, 28]`` (``[B, 784]`` with ``flatten``; ``.input_shape``) and ``y`` int64 ``[B]``;
    class ``k`` is the digit ``classes[k] == str(k)``.

    The files are looked for at :meth:`prepare_data` / :meth:`setup`, not at construction; :meth:`setup` checks the
    IDX headers and sizes of the split it loads (:func:`check_split_files`) before torchvision reads them. With ``download=True``
    :meth:`prepare_data` (or :meth:`setup` when the files are still absent) downloads them with torchvision.

    Args:
        data_dir: folder holding ``MNIST/raw/`` (torchvision's ``root``).
        download: download the files when absent (needs internet access).
        batch_size: batch size of every loader.
        num_workers: ``DataLoader`` workers.
        val_size: number of training images held out for validation (``0 <= val_size < 60000``).
        seed: seed of the train / val permutation.
        normalize: normalise with the MNIST mean and standard deviation (:data:`MNIST_MEAN`, :data:`MNIST_STD`).
        flatten: flatten each image to a ``[784]`` vector (for MLPs).
        shuffle: shuffle the training set each epoch.

    Raises:
        ValueError: a non-positive batch size, negative ``num_workers`` or ``val_size``.
        FileNotFoundError: (at :meth:`prepare_data` / :meth:`setup`, with ``download=False``) a file of
            :data:`MNIST_FILES` is missing; the message names each expected path and how to get the files.
        MNISTFileError: (a ``ValueError``, at :meth:`setup`) a damaged file: a gzip archive in place of the IDX file,
            a wrong magic number, a truncated file, fewer labels than images, labels outside 0..9; the message names
            the file, what was expected and found, and how to get a good copy.
        ValueError: (at :meth:`setup`) ``val_size`` is not smaller than the training set.

    Example:
        >>> dm = MNISTDataModule("data", batch_size=128, flatten=True)
        >>> dm.num_classes, dm.val_size
        (10, 5000)
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> len(dm.train_dataset), len(dm.val_dataset)  # doctest: +SKIP
        (55000, 5000)
        >>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> x.shape, y.dtype  # doctest: +SKIP
        (torch.Size([128, 784]), torch.int64)
    """

    num_classes = 10
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        normalize: bool = True,
        flatten: bool = False,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or val_size < 0:
            raise ValueError("batch_size must be >= 1, num_workers and val_size >= 0")
        self.data_dir = os.path.expanduser(os.fspath(data_dir))
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.normalize = normalize
        self.flatten = flatten
        self.shuffle = shuffle
        steps: list = [T.ToTensor()]
        if normalize:
            steps.append(T.Normalize((MNIST_MEAN,), (MNIST_STD,)))
        if flatten:
            steps.append(T.Lambda(torch.flatten))
        self.transform = T.Compose(steps)
        self.input_shape: tuple[int, ...] = (MNIST_IMAGE_SIZE**2,) if flatten else (1, MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def raw_folder(self) -> str:
        """``<data_dir>/MNIST/raw``, where the IDX files are read from."""
        return _raw_folder(self.data_dir)

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming the expected files when torchvision cannot load MNIST from ``data_dir``."""
        missing = missing_files(self.data_dir)
        if missing:
            raise FileNotFoundError(_not_found_message(self.data_dir, missing))

    def check_split(self, prefix: str) -> None:
        """Check the raw IDX files of split ``prefix`` (``"train"`` or ``"t10k"``) before torchvision reads them.

        Skipped when torchvision reads its old processed cache (``MNIST/processed/*.pt``) instead.

        Raises:
            MNISTFileError: a damaged file (see :func:`check_split_files`).
        """
        if not _legacy_present(self.data_dir):
            check_split_files(self.raw_folder, prefix)

    def prepare_data(self) -> None:
        """Download the files when ``download`` (torchvision skips files already present); else check for them."""
        if self.download and missing_files(self.data_dir):
            MNIST(self.data_dir, train=True, download=True)
            MNIST(self.data_dir, train=False, download=True)
        self.check_files()

    def setup(self, stage: str | None = None) -> None:
        if missing_files(self.data_dir):
            if self.download:
                self.prepare_data()
            self.check_files()
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self.check_split("train")
            full = MNIST(self.data_dir, train=True, transform=self.transform)
            if self.val_size >= len(full):
                raise ValueError(f"val_size ({self.val_size}) must be smaller than the training set ({len(full)} images)")
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
            self.val_dataset = Subset(full, perm[: self.val_size])
            self.train_dataset = Subset(full, perm[self.val_size :])
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.check_split("t10k")
            self.test_dataset = MNIST(self.data_dir, train=False, transform=self.transform)

    def _loader(self, name: str, stage: str, shuffle: bool) -> DataLoader:
        if getattr(self, name) is None:
            self.setup(stage)
        return DataLoader(
            getattr(self, name),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train_dataset", "fit", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val_dataset", "fit", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test_dataset", "test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test_dataset", "predict", False)
