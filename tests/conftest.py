"""Shared test settings: wandb disabled unless a test opts in, quiet Lightning, doctest namespace."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
# The suite's fits last a few steps, where a 5% overhead budget would skip nearly every measurement; the
# budget has its own tests, with explicit budgets (tests/test_budget.py).
os.environ.setdefault("LIGHTNING_INTERP_BUDGET", "off")
# The suite runs many small tensor ops on 2 shared cores, where torch's intra-op threads wait on each other:
# MCMC and image tests ran 10-30x slower with 2 threads than with 1 on a loaded machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace: dict) -> None:
    doctest_namespace["torch"] = torch
