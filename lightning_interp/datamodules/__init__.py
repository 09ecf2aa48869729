"""Datamodules: synthetic tasks with known structure."""

from lightning_interp.datamodules.imagenet import ImageNetDataModule, load_images
from lightning_interp.datamodules.synthetic import SyntheticDataModule

__all__ = ["ImageNetDataModule", "SyntheticDataModule", "load_images"]
