"""Datamodules: synthetic tasks with known structure, MNIST and ImageNet."""

from lightning_interp.datamodules.imagenet import ImageNetDataModule, load_images
from lightning_interp.datamodules.mnist import MNISTDataModule
from lightning_interp.datamodules.potts import PottsDataModule, one_hot_flat
from lightning_interp.datamodules.synthetic import (
    HigherOrderDataModule,
    PatchImageDataModule,
    SyntheticDataModule,
    XORDataModule,
)

__all__ = [
    "HigherOrderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "PatchImageDataModule",
    "PottsDataModule",
    "SyntheticDataModule",
    "XORDataModule",
    "load_images",
    "one_hot_flat",
]
