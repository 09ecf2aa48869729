"""Datamodules: synthetic tasks with known structure, and ImageNet."""

from lightning_interp.datamodules.imagenet import ImageNetDataModule, load_images
from lightning_interp.datamodules.synthetic import PatchImageDataModule, SyntheticDataModule

__all__ = ["ImageNetDataModule", "PatchImageDataModule", "SyntheticDataModule", "load_images"]
