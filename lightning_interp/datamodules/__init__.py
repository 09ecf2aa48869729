"""Datamodules: synthetic tasks with known structure, Potts sequences, scikit-learn's digits, MNIST, ImageNet, image folders."""

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
