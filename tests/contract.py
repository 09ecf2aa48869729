"""Registry of callbacks for the shared contract suite (tests/test_contract.py).

A callback joins the suite by appending a :class:`ContractCase` to :data:`CASES`: how to build it,
a small model and datamodule it suits, the path of a module that runs during its measurement (an
exception is injected there), and its misconfigurations with the error each must raise at setup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import (
    AblationProbeCallback,
    CorrelationOrderCallback,
    FinalLayerSaliencyCallback,
    InterpretabilityCallback,
    LogitExpansionCallback,
    PosteriorGapCallback,
)
from lightning_interp.datamodules import PatchImageDataModule, PottsDataModule, SyntheticDataModule
from lightning_interp.models import MLPClassifier, SmallCNN
from lightning_interp.tasks import GaussianTask, xie_task


@dataclass
class BadConfig:
    """A misconfiguration: ``build()`` returns ``(callback, model, datamodule)``; setup must raise."""

    id: str
    build: Callable[[], tuple[InterpretabilityCallback, pl.LightningModule, pl.LightningDataModule]]
    error: type[Exception]
    match: str


@dataclass
class ContractCase:
    """How to exercise one callback in the contract suite.

    ``make_callback(**overrides)`` must accept the base-class arguments (cadence, seed, run_on, ...).
    ``make_datamodule(batch_size, shuffle)`` must return a datamodule whose train set has
    ``num_train`` samples (a multiple of 64, for the DDP equivalence test).
    """

    id: str
    make_callback: Callable[..., InterpretabilityCallback]
    make_model: Callable[[], pl.LightningModule]
    make_datamodule: Callable[..., pl.LightningDataModule]
    raise_in: str
    num_train: int = 256
    bad_configs: list[BadConfig] = field(default_factory=list)
    #: Extra callback arguments when the data comes as plain dataloaders (no datamodule to read from).
    loader_kwargs: Callable[[pl.LightningDataModule], dict[str, Any]] = lambda dm: {}


# ------------------------------------------------------------------------------------------------
# PosteriorGapCallback
# ------------------------------------------------------------------------------------------------


class _VectorOutput(MLPClassifier):
    """Returns one number per sample instead of [N, K] logits."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, 0]


class _NoTaskDataModule(pl.LightningDataModule):
    """A datamodule with data but no ``task`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        x, y = xie_task(1).sample(128, torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)


def _gap_callback(**kw: Any) -> PosteriorGapCallback:
    kw.setdefault("probe_size", 512)
    kw.setdefault("num_density_bins", 4)
    kw.setdefault("grid_size", 50)
    return PosteriorGapCallback(**kw)


def _gap_datamodule(batch_size: int = 32, shuffle: bool = True, task: Any = None) -> SyntheticDataModule:
    return SyntheticDataModule(
        task or xie_task(3), n_train=256, n_val=64, n_test=64, batch_size=batch_size, seed=1, shuffle=shuffle
    )


CASES: list[ContractCase] = [
    ContractCase(
        id="posterior_gap",
        make_callback=_gap_callback,
        make_model=lambda: MLPClassifier(1, 2, hidden=(16, 16), dropout=0.1, lr=1e-2),
        make_datamodule=_gap_datamodule,
        raise_in="net.3",
        loader_kwargs=lambda dm: {"task": dm.task},
        bad_configs=[
            BadConfig(
                "output_not_logits",
                lambda: (_gap_callback(), _VectorOutput(1, 2, hidden=(8,)), _gap_datamodule()),
                ValueError,
                r"must return logits of shape \[N, K\], got \[2\]",
            ),
            BadConfig(
                "num_classes_mismatch",
                lambda: (_gap_callback(), MLPClassifier(1, 3, hidden=(8,)), _gap_datamodule()),
                ValueError,
                r"outputs 3 logits but the task has 2 classes",
            ),
            BadConfig(
                "no_task",
                lambda: (_gap_callback(), MLPClassifier(1, 2, hidden=(8,)), _NoTaskDataModule()),
                ValueError,
                r"has no `task` attribute.*PosteriorGapCallback\(task=\.\.\.\)",
            ),
            BadConfig(
                "wrong_input_type",
                lambda: (_gap_callback(), SmallCNN(in_channels=1, num_classes=2), _gap_datamodule()),
                TypeError,
                r"failed on the task's inputs \(float tensors of shape \[N, 1\]\)",
            ),
            BadConfig(
                "task_from_argument_mismatch",
                lambda: (
                    _gap_callback(
                        task=GaussianTask(torch.zeros(3, 2) + torch.arange(3.0)[:, None], torch.eye(2).expand(3, 2, 2))
                    ),
                    MLPClassifier(1, 2, hidden=(8,)),
                    _gap_datamodule(),
                ),
                TypeError,
                r"failed on the task's inputs \(float tensors of shape \[N, 2\]\)",
            ),
            BadConfig(
                "noise_free_images",
                lambda: (
                    _gap_callback(),
                    SmallCNN(in_channels=1, num_classes=4),
                    PatchImageDataModule(noise=0.0, n_train=64, n_val=16, batch_size=16),
                ),
                ValueError,
                r"noise must be > 0 for a density \(and a posterior\), got 0.0",
            ),
            BadConfig(
                "potts_index_encoding",
                lambda: (
                    _gap_callback(),
                    MLPClassifier(4, 2, hidden=(8,)),
                    PottsDataModule(seq_len=4, num_states=3, encoding="states", n_train=64, n_val=16, n_test=0),
                ),
                ValueError,
                r"inputs are one-hot sequences.*encoding='states'.*PottsDataModule\(encoding='one_hot'\)",
            ),
        ],
    ),
]


# ------------------------------------------------------------------------------------------------
# FinalLayerSaliencyCallback
# ------------------------------------------------------------------------------------------------


def ImageDataModule(batch_size: int = 32, shuffle: bool = True, n: int = 256, seed: int = 0) -> PatchImageDataModule:
    """Tiny 1x12x12 images: noise plus a bright 3x3 patch in the quadrant given by the class (4 classes)."""
    return PatchImageDataModule(n_train=n * 3 // 4 // 32 * 32, n_val=n // 4, batch_size=batch_size, seed=seed, shuffle=shuffle)


class _ConvHead(SmallCNN):
    """Logits from a 1x1 convolution and a mean: no final nn.Linear."""

    def __init__(self) -> None:
        super().__init__(in_channels=1, num_classes=4, channels=(8, 16))
        self.head = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).mean(dim=(2, 3))


def _saliency_callback(**kw: Any) -> FinalLayerSaliencyCallback:
    kw.setdefault("probe_size", 6)
    kw.setdefault("min_size", 4)
    kw.setdefault("deletion_steps", 4)
    return FinalLayerSaliencyCallback(**kw)


def _cnn() -> SmallCNN:
    return SmallCNN(in_channels=1, num_classes=4, channels=(8, 16), lr=1e-2)


CASES.append(
    ContractCase(
        id="saliency",
        make_callback=_saliency_callback,
        make_model=_cnn,
        make_datamodule=lambda batch_size=32, shuffle=True: ImageDataModule(batch_size=batch_size, shuffle=shuffle),
        raise_in="features.2",
        num_train=192,
        bad_configs=[
            BadConfig(
                "unknown_layer",
                lambda: (_saliency_callback(feature_layer="features.99"), _cnn(), ImageDataModule()),
                ValueError,
                r"unknown layer 'features\.99'",
            ),
            BadConfig(
                "no_final_linear",
                lambda: (_saliency_callback(), _ConvHead(), ImageDataModule()),
                ValueError,
                r"no nn\.Linear whose output is the model's output",
            ),
            BadConfig(
                "min_size_zero",
                lambda: (_saliency_callback(min_size=0), _cnn(), ImageDataModule()),
                ValueError,
                r"min_size must be an int >= 1, got 0",
            ),
            BadConfig(
                "single_logit",
                lambda: (_saliency_callback(), SmallCNN(in_channels=1, num_classes=1, channels=(8, 16)), ImageDataModule()),
                ValueError,
                r"single logit per example \(\[N, 1\]\)",
            ),
            BadConfig(
                "non_image_inputs",
                lambda: (_saliency_callback(), MLPClassifier(1, 2, hidden=(8,)), _gap_datamodule()),
                TypeError,
                r"needs image inputs \[N, C, H, W\]",
            ),
        ],
    )
)


# ------------------------------------------------------------------------------------------------
# AblationProbeCallback
# ------------------------------------------------------------------------------------------------

_THREE_CLASS = GaussianTask(means=[[0.0, 0.0], [2.5, 0.0], [0.0, 2.5]], covariances=torch.eye(2).expand(3, 2, 2))


def _ablation_callback(**kw: Any) -> AblationProbeCallback:
    kw.setdefault("layers", ["net.1"])
    kw.setdefault("probe_size", 96)
    return AblationProbeCallback(**kw)


def gaussian3_datamodule(batch_size: int = 32, shuffle: bool = True) -> SyntheticDataModule:
    return SyntheticDataModule(_THREE_CLASS, n_train=256, n_val=96, n_test=0, batch_size=batch_size, seed=2, shuffle=shuffle)


CASES.append(
    ContractCase(
        id="ablation",
        make_callback=_ablation_callback,
        make_model=lambda: MLPClassifier(2, 3, hidden=(6, 5), dropout=0.1, lr=1e-2),
        make_datamodule=gaussian3_datamodule,
        raise_in="net.4",
        bad_configs=[
            BadConfig(
                "unknown_layer",
                lambda: (_ablation_callback(layers=["net.42"]), MLPClassifier(2, 3, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"unknown layer 'net\.42'",
            ),
            BadConfig(
                "exact_too_many_units",
                lambda: (_ablation_callback(method="exact"), MLPClassifier(2, 3, hidden=(20,)), gaussian3_datamodule()),
                ValueError,
                r"needs d <= 16, but layer 'net\.1' has 20 units",
            ),
            BadConfig(
                "task_outside_classes",
                lambda: (_ablation_callback(tasks=[7]), MLPClassifier(2, 3, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"tasks \[7\] are not classes of the model, which has 3",
            ),
            BadConfig(
                "tasks_typo",
                lambda: (_ablation_callback(tasks="clases"), MLPClassifier(2, 3, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"tasks must be one of 'classes', 'all', got 'clases'",
            ),
            BadConfig(
                "burn_in_not_below_steps",
                lambda: (_ablation_callback(num_steps=50, burn_in=50), MLPClassifier(2, 3, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"burn_in \(50\) must be smaller than num_steps \(50\)",
            ),
            BadConfig(
                "single_logit",
                lambda: (_ablation_callback(), MLPClassifier(2, 1, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"single logit per example",
            ),
            BadConfig(
                "labels_outside_classes",
                lambda: (_ablation_callback(), MLPClassifier(2, 2, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"outside the model's 2 classes",
            ),
            BadConfig(
                "wrong_input",
                lambda: (_ablation_callback(), MLPClassifier(5, 3, hidden=(6,)), gaussian3_datamodule()),
                TypeError,
                r"failed on the probe inputs of shape \[2\]",
            ),
        ],
    )
)


# ------------------------------------------------------------------------------------------------
# CorrelationOrderCallback
# ------------------------------------------------------------------------------------------------


def _correlation_callback(**kw: Any) -> CorrelationOrderCallback:
    kw.setdefault("probe_size", 96)
    return CorrelationOrderCallback(**kw)


class _IntOutput(MLPClassifier):
    """Its hidden activation returns integers (not a float tensor)."""

    def __init__(self) -> None:
        super().__init__(2, 3, hidden=(6,))
        self.net[1] = _ToInt()


class _ToInt(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x > 0).long()


class _IntFirstModel(_IntOutput):
    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[1](self.net[0](x)).float())


CASES.append(
    ContractCase(
        id="correlation",
        make_callback=_correlation_callback,
        make_model=lambda: MLPClassifier(2, 3, hidden=(6, 5), dropout=0.1, lr=1e-2),
        make_datamodule=gaussian3_datamodule,
        raise_in="net.4",
        bad_configs=[
            BadConfig(
                "unknown_layer",
                lambda: (
                    _correlation_callback(layers=["input", "net.9"]),
                    MLPClassifier(2, 3, hidden=(6,)),
                    gaussian3_datamodule(),
                ),
                ValueError,
                r"unknown layer 'net\.9'",
            ),
            BadConfig(
                "non_float_layer",
                lambda: (_correlation_callback(layers=["net.1"]), _IntFirstModel(), gaussian3_datamodule()),
                TypeError,
                r"layer 'net\.1' outputs torch\.int64, not a float tensor",
            ),
            BadConfig(
                "single_logit",
                lambda: (_correlation_callback(layers=["net.1"]), MLPClassifier(2, 1, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"single logit per example",
            ),
            BadConfig(
                "too_few_per_class",
                lambda: (_correlation_callback(probe_size=12), MLPClassifier(2, 3, hidden=(6,)), gaussian3_datamodule()),
                ValueError,
                r"fewer than min_per_class=10 probe examples",
            ),
        ],
    )
)


# ------------------------------------------------------------------------------------------------
# LogitExpansionCallback
# ------------------------------------------------------------------------------------------------


class CategoricalDataModule(pl.LightningDataModule):
    """One-hot sequences of 4 sites with 3 states; class 1 when sites 0 and 2 agree (a pairwise rule)."""

    def __init__(self, batch_size: int = 32, shuffle: bool = True, n: int = 256) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        states = torch.randint(0, 3, (n + 64, 4), generator=g)
        y = (states[:, 0] == states[:, 2]).long()
        x = torch.nn.functional.one_hot(states, 3).reshape(len(states), -1).float()
        self.train_set, self.val_set = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
        self.batch_size, self.shuffle = batch_size, shuffle

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def _expansion_callback(**kw: Any) -> LogitExpansionCallback:
    kw.setdefault("seq_len", 4)
    kw.setdefault("num_states", 3)
    kw.setdefault("num_samples", 32)
    return LogitExpansionCallback(**kw)


CASES.append(
    ContractCase(
        id="expansion",
        make_callback=_expansion_callback,
        make_model=lambda: MLPClassifier(12, 2, hidden=(8,), dropout=0.1, lr=1e-2),
        make_datamodule=lambda batch_size=32, shuffle=True: CategoricalDataModule(batch_size=batch_size, shuffle=shuffle),
        raise_in="net.3",
        bad_configs=[
            BadConfig(
                "model_rejects_encoding",
                lambda: (_expansion_callback(seq_len=5), MLPClassifier(12, 2, hidden=(8,)), CategoricalDataModule()),
                ValueError,
                r"rejected the encoded input of shape \[2, 15\]",
            ),
            BadConfig(
                "order_3",
                lambda: (_expansion_callback(order=3), MLPClassifier(12, 2, hidden=(8,)), CategoricalDataModule()),
                ValueError,
                r"order must be one of 1, 2, got 3",
            ),
            BadConfig(
                "target_pair_outside_outputs",
                lambda: (_expansion_callback(target=(5, 0)), MLPClassifier(12, 2, hidden=(8,)), CategoricalDataModule()),
                ValueError,
                r"target=\(5, 0\) names output 5, but MLPClassifier has 2 output\(s\)",
            ),
            BadConfig(
                "target_outside_outputs",
                lambda: (_expansion_callback(target=9), MLPClassifier(12, 2, hidden=(8,)), CategoricalDataModule()),
                ValueError,
                r"target=9 names output 9, but MLPClassifier has 2 output\(s\)",
            ),
            BadConfig(
                "num_samples_zero",
                lambda: (_expansion_callback(num_samples=0), MLPClassifier(12, 2, hidden=(8,)), CategoricalDataModule()),
                ValueError,
                r"num_samples must be an int >= 2, got 0",
            ),
            BadConfig(
                "too_few_states",
                lambda: (_expansion_callback(num_states=1), MLPClassifier(4, 2, hidden=(8,)), CategoricalDataModule()),
                ValueError,
                r"num_states must be an int >= 2, got 1",
            ),
            BadConfig(
                "exact_over_limit",
                lambda: (
                    _expansion_callback(method="exact", max_evaluations=10),
                    MLPClassifier(12, 2, hidden=(8,)),
                    CategoricalDataModule(),
                ),
                ValueError,
                r"q\^L = 81 evaluations, over max_evaluations=10",
            ),
        ],
    )
)
