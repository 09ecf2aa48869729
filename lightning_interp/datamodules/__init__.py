"""Datamodules: synthetic tasks with known structure."""

from lightning_interp.datamodules.synthetic import SyntheticDataModule

__all__ = ["SyntheticDataModule"]
