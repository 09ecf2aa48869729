"""Moved to :mod:`lightning_interp.probe` (Lightning-free); this name stays until every import is updated."""

from lightning_interp.probe import INPUT_KEYS, LABEL_KEYS, Probe, ProbeSource, Unpack, draw_probe, unpack_batch  # noqa: F401
