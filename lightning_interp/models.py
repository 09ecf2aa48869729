"""Small example classifiers used by the demo, the configs and the tests.

Both are ordinary :class:`~lightning.pytorch.LightningModule` s whose ``forward`` returns logits
``[N, K]``, trained with cross-entropy and Adam. The CNN ends in the timm-style split
``forward_features`` (a spatial feature map) and ``forward_head`` (global average pool + ``fc``).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassifierModule", "MLPClassifier", "SmallCNN"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training, accuracy logging and Adam for a module that maps inputs to logits.

    Args:
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
        self.log(f"{stage}/acc", (logits.argmax(dim=1) == y).float().mean())
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class MLPClassifier(ClassifierModule):
    """A multilayer perceptron ``in_features -> hidden... -> num_classes``.

    The post's network is ``MLPClassifier(1, 2, hidden=(64, 64))``. Layers are ``net.0``, ``net.1``,
    ... in ``named_modules()`` (Linear, activation[, Dropout], ...), ending in the final ``nn.Linear``.

    Args:
        in_features: input dimension.
        num_classes: number of classes (logits).
        hidden: widths of the hidden layers.
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"identity"``.
        dropout: dropout probability after each hidden activation (0 disables; the layers are then absent).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> model = MLPClassifier(1, 2, hidden=(64, 64))
        >>> model(torch.zeros(3, 1)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int = 1,
        num_classes: int = 2,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class SmallCNN(ClassifierModule):
    """A small convolutional classifier with a global-average-pool + ``fc`` head.

    ``features`` (two conv blocks) -> ``pool`` (``AdaptiveAvgPool2d(1)``) -> ``flatten`` -> ``fc``.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        channels: widths of the conv blocks.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> model = SmallCNN(in_channels=1, num_classes=10)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        blocks: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            blocks += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            width = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The spatial feature map ``[N, C, h, w]`` before pooling."""
        return self.features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the feature map."""
        return self.fc(self.flatten(self.pool(features)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
