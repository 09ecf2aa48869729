"""Small stand-ins for what the docs' snippets leave to the user (a model, loaders, a checkpoint, tensors).

The docs load them in hidden setup blocks (``<!-- invisible-code-block: python ... -->``, marked
``# stand-in: ...``) so that every snippet runs in ``tests/test_docs.py`` as printed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.models import ClassifierModule


class MyCNN(ClassifierModule):
    """A user's CNN as the README pictures it: ``body`` (``body.3`` a conv block's output) then pool and ``fc``."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__(lr=1e-2)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


def image_loaders(n: int = 64, size: int = 12, num_classes: int = 4) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of random images whose class is the bright quadrant (learnable, tiny)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(num_classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    half = size // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * half : (r + 1) * half, col * half : (col + 1) * half] += 1.0
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=32, shuffle=True), DataLoader(ds, batch_size=32)
