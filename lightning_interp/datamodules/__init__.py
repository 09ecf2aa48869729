"""Datamodules: synthetic tasks with known structure, Potts sequences, scikit-learn's digits, MNIST, ImageNet, image folders.

Each name is imported on first use (PEP 562 module ``__getattr__``): the MNIST and ImageNet datamodules pull
torchvision, which a script using only the synthetic ones should not pay for at import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public names and the module that defines each.
_NAMES: dict[str, str] = {
    "DigitsDataModule": "digits",
    "HigherOrderDataModule": "synthetic",
    "ImageFolderDataModule": "images",
    "ImageNetDataModule": "imagenet",
    "MNISTDataModule": "mnist",
    "MNISTFileError": "mnist",
    "PatchImageDataModule": "synthetic",
    "PottsDataModule": "potts",
    "SyntheticDataModule": "synthetic",
    "XORDataModule": "synthetic",
    "load_images": "imagenet",
    "one_hot_flat": "potts",
}

if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
    from lightning_interp.datamodules.digits import DigitsDataModule
    from lightning_interp.datamodules.imagenet import ImageNetDataModule, load_images
    from lightning_interp.datamodules.images import ImageFolderDataModule
    from lightning_interp.datamodules.mnist import MNISTDataModule, MNISTFileError
    from lightning_interp.datamodules.potts import PottsDataModule, one_hot_flat
    from lightning_interp.datamodules.synthetic import (
        HigherOrderDataModule,
        PatchImageDataModule,
        SyntheticDataModule,
        XORDataModule,
    )

__all__ = [
    "DigitsDataModule",
    "HigherOrderDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "MNISTFileError",
    "PatchImageDataModule",
    "PottsDataModule",
    "SyntheticDataModule",
    "XORDataModule",
    "load_images",
    "one_hot_flat",
]


def __getattr__(name: str) -> Any:
    """Import a datamodule (or a submodule) on first access (PEP 562) and cache it in the package."""
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif name in set(_NAMES.values()):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, for ``dir()`` and tab completion."""
    return sorted({*__all__})
