"""Categorical sequences from two planted Potts models (:class:`~lightning_interp.tasks.PottsTask`), as a datamodule.

The planted model, its exact enumeration and its sampler live in the task; the datamodule draws fixed train / val /
test splits through it and batches them.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.encoding import one_hot_flat
from lightning_interp.tasks.potts import PottsTask

__all__ = ["PottsDataModule", "one_hot_flat"]


class PottsDataModule(pl.LightningDataModule):
    """Two classes of categorical sequences drawn from two planted Potts models (docs/expansion.md).

    The model is a :class:`~lightning_interp.tasks.PottsTask` built from the same arguments (its docstring gives
    the convention, how the parameters are planted and how sequences are sampled); the datamodule draws its
    splits through the task's sampler and exposes the task's planted parameters (``.fields``, ``.couplings``,
    ``.pairs``), the planted differences and the exact quantities (:meth:`log_prob`, :meth:`bayes_log_odds`,
    :meth:`bayes_accuracy`). ``.task`` is the task itself, for the posterior gap (one-hot, enumerable modules only).

    Split ``k`` of (train, val, test) is drawn at :meth:`setup` by :meth:`PottsTask.draw` from
    ``torch.Generator().manual_seed(4 * seed + 1 + k)`` (labels uniform in ``{0, 1}``).
    Batches are ``(x, y)``, ``y`` int64 ``[B]``; with ``encoding="one_hot"`` ``x`` is float32 ``[B, L * q]`` (see
    :func:`one_hot_flat`, index ``i * q + a``), with ``encoding="states"`` int64 ``[B, L]``. The integer sequences
    and labels of every split are kept in ``.states[split]`` and ``.labels[split]``.

    Args:
        seq_len: number of sites ``L`` (at least 2).
        num_states: states per site ``q`` (at least 2).
        num_pairs: number of strongly coupled, class-specific site pairs (at most ``L (L - 1) / 2``).
        field_scale: standard deviation of the class-specific fields.
        coupling_scale: standard deviation of the class-specific couplings on the planted pairs.
        shared_scale: standard deviation of the shared background fields and couplings.
        n_train: training-set size.
        n_val: validation-set size.
        n_test: test-set size.
        batch_size: batch size of every loader.
        seed: seed of the planted parameters and of the data draw.
        encoding: ``"one_hot"`` or ``"states"``, the form of ``x`` in batches.
        shuffle: shuffle the training set each epoch.
        max_enumeration: largest ``q**L`` for which the model is enumerated (exact sampling, partition functions,
            :meth:`log_prob`, :meth:`bayes_log_odds`, :meth:`bayes_accuracy`); at most ``2**24``.
        gibbs_sweeps: thinning sweeps between two samples of a Gibbs chain.
        gibbs_burn_in: burn-in sweeps of every Gibbs chain.
        gibbs_chains: number of parallel Gibbs chains.
        num_workers: ``DataLoader`` workers.

    Raises:
        ValueError: ``seq_len < 2``, ``num_states < 2``, an unknown ``encoding``, ``num_pairs`` out of range,
            negative scales, negative sizes, a non-positive batch size or bad enumeration / Gibbs settings.

    Example:
        >>> dm = PottsDataModule(seq_len=4, num_states=3, n_train=64, n_val=16, n_test=16, batch_size=16)
        >>> dm.fields.shape, dm.couplings.shape, dm.num_classes
        (torch.Size([2, 4, 3]), torch.Size([2, 4, 4, 3, 3]), 2)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([16, 12]), torch.float32, torch.int64)
        >>> dm.states["train"].shape
        torch.Size([64, 4])
        >>> 0.5 < dm.bayes_accuracy() < 1.0
        True
    """

    num_classes = 2
    encodings: tuple[str, ...] = ("one_hot", "states")

    def __init__(
        self,
        seq_len: int = 8,
        num_states: int = 4,
        num_pairs: int = 4,
        field_scale: float = 0.3,
        coupling_scale: float = 1.0,
        shared_scale: float = 0.3,
        n_train: int = 20_000,
        n_val: int = 2_000,
        n_test: int = 2_000,
        batch_size: int = 128,
        seed: int = 0,
        encoding: str = "one_hot",
        shuffle: bool = True,
        max_enumeration: int = 2**20,
        gibbs_sweeps: int = 10,
        gibbs_burn_in: int = 200,
        gibbs_chains: int = 1_000,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if encoding not in self.encodings:
            raise ValueError(f"encoding must be one of {self.encodings}, got {encoding!r}")
        if min(n_train, n_val, n_test, num_workers) < 0 or batch_size < 1:
            raise ValueError("n_train, n_val, n_test and num_workers must be >= 0 and batch_size >= 1")
        # the task checks the model's arguments
        self._task = PottsTask(
            seq_len=seq_len,
            num_states=num_states,
            num_pairs=num_pairs,
            field_scale=field_scale,
            coupling_scale=coupling_scale,
            shared_scale=shared_scale,
            seed=seed,
            max_enumeration=max_enumeration,
            gibbs_sweeps=gibbs_sweeps,
            gibbs_burn_in=gibbs_burn_in,
            gibbs_chains=gibbs_chains,
        )
        self.seq_len, self.num_states, self.num_pairs = seq_len, num_states, num_pairs
        self.field_scale, self.coupling_scale, self.shared_scale = float(field_scale), float(coupling_scale), float(shared_scale)
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.batch_size, self.seed, self.encoding, self.shuffle = batch_size, seed, encoding, shuffle
        self.max_enumeration = max_enumeration
        self.gibbs_sweeps, self.gibbs_burn_in, self.gibbs_chains = gibbs_sweeps, gibbs_burn_in, gibbs_chains
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}
        self.states: dict[str, Tensor] = {}
        self.labels: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------------------------
    # the task and its planted model

    @property
    def task(self) -> PottsTask:
        """The planted models as a :class:`PottsTask` whose posterior is exact (enumerable, one-hot modules only).

        Raises:
            ValueError: the model is not enumerable or the encoding is not one-hot.
        """
        if self.encoding != "one_hot":
            raise ValueError(
                f"the Potts task's inputs are one-hot sequences; this datamodule uses encoding={self.encoding!r}: "
                "use PottsDataModule(encoding='one_hot')"
            )
        self._task.require_enumerable("the exact posterior (PottsDataModule.task)")
        return self._task

    @property
    def fields(self) -> Tensor:
        """The planted fields, float64 ``[2, L, q]`` (``fields[c, i, a] = h^c_i(a)``); see :class:`PottsTask`."""
        return self._task.fields

    @property
    def couplings(self) -> Tensor:
        """The planted couplings, float64 ``[2, L, L, q, q]`` (``couplings[c, i, j, a, b] = J^c_ij(a, b)``, symmetric)."""
        return self._task.couplings

    @property
    def pairs(self) -> Tensor:
        """The planted, class-specific site pairs ``i < j``, int64 ``[num_pairs, 2]``."""
        return self._task.pairs

    def planted_field_difference(self) -> Tensor:
        """``h^1 - h^0``, float64 ``[L, q]``: the raw (not gauge-fixed) fields of the Bayes log-odds."""
        return self._task.planted_field_difference()

    def planted_coupling_difference(self) -> Tensor:
        """``J^1 - J^0``, float64 ``[L, L, q, q]``: the raw (not gauge-fixed), symmetric couplings of the Bayes log-odds."""
        return self._task.planted_coupling_difference()

    def energy(self, states: Tensor, c: int) -> Tensor:
        """Energy ``E_c(sigma)`` of each row of int64 ``states`` ``[N, L]``, float64 ``[N]`` (:meth:`PottsTask.energy`).

        Raises:
            ValueError: a bad class or shape.
        """
        return self._task.energy(states, c)

    @property
    def num_sequences(self) -> int:
        """``q**L``, the number of distinct sequences."""
        return self._task.num_sequences

    @property
    def enumerable(self) -> bool:
        """Whether ``q**L <= max_enumeration`` (exact sampling and exact partition functions)."""
        return self._task.enumerable

    def require_enumerable(self, what: str) -> None:
        """Raise a ``ValueError`` naming ``what`` and the fix when the model is too large to enumerate."""
        self._task.require_enumerable(what)

    def all_states(self) -> Tensor:
        """Every sequence, int64 ``[q**L, L]``, in lexicographic order (site 0 most significant).

        Raises:
            ValueError: the model is not enumerable (``q**L > max_enumeration``).
        """
        return self._task.all_states()

    def log_partition(self, c: int) -> float:
        """``log Z_c``, exact by enumeration.

        Raises:
            ValueError: a bad class or a model that is not enumerable.
        """
        return self._task.log_partition(c)

    def log_prob(self, states: Tensor, c: int) -> Tensor:
        """``log P_c(sigma) = -E_c(sigma) - log Z_c`` of each row, float64 ``[N]``.

        Raises:
            ValueError: a bad class or shape, or a model that is not enumerable.
        """
        return self._task.log_prob(states, c)

    def bayes_log_odds(self, states: Tensor) -> Tensor:
        """Exact Bayes log-odds ``log P(y=1 | sigma) - log P(y=0 | sigma)``, float64 ``[N]`` (:meth:`PottsTask.bayes_log_odds`).

        Raises:
            ValueError: a bad shape, or a model that is not enumerable.
        """
        return self._task.bayes_log_odds(states)

    def bayes_accuracy(self) -> float:
        """Exact accuracy of the Bayes classifier, by enumeration (:meth:`PottsTask.exact_bayes_accuracy`).

        Raises:
            ValueError: the model is not enumerable.
        """
        return self._task.exact_bayes_accuracy()

    # ------------------------------------------------------------------------------------------------------------
    # sampling, through the task

    def sample_states(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences from ``P_c``, int64 ``[n, L]`` (:meth:`PottsTask.sample_states`).

        Raises:
            ValueError: a bad class or a negative ``n``.
        """
        return self._task.sample_states(c, n, generator)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` labelled sequences ``(states int64 [n, L], y int64 [n])``, labels uniform (:meth:`PottsTask.draw`).

        Args:
            n: number of samples.
            generator: random generator (the global one when ``None``).

        Returns:
            ``(states, y)``.
        """
        return self._task.draw(n, generator)

    def encode(self, states: Tensor) -> Tensor:
        """``states`` in this module's ``encoding``: :func:`one_hot_flat` (float32 ``[N, L * q]``) or as is (int64)."""
        states = self._task.check_states(states)
        return one_hot_flat(states, self.num_states) if self.encoding == "one_hot" else states

    # ------------------------------------------------------------------------------------------------------------
    # Lightning

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for offset, (name, n) in enumerate((("train", self.n_train), ("val", self.n_val), ("test", self.n_test))):
            states, y = self._task.draw(n, torch.Generator().manual_seed(4 * self.seed + 1 + offset))
            self.states[name], self.labels[name] = states, y
            self._splits[name] = TensorDataset(self.encode(states), y)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            self.setup()
        return DataLoader(self._splits[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
