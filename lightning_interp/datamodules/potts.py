"""Categorical sequences from two planted Potts models: a task whose Bayes log-odds is a known pairwise energy.

Inputs are sequences ``sigma = (sigma_1, ..., sigma_L)`` of ``L`` sites, each in one of ``q`` states. Class ``c``
(``c = 0, 1``, equally likely) is drawn from the Potts model ``P_c(sigma) = exp(-E_c(sigma)) / Z_c`` with energy

``E_c(sigma) = -(sum_i h^c_i(sigma_i) + sum_{i<j} J^c_ij(sigma_i, sigma_j))``,

so ``log P_c(sigma) = sum_i h^c_i(sigma_i) + sum_{i<j} J^c_ij(sigma_i, sigma_j) - log Z_c``. The Bayes log-odds

``log P(y=1 | sigma) / P(y=0 | sigma) = E_0(sigma) - E_1(sigma) + log Z_0 - log Z_1``

is a pairwise energy with fields ``h^1 - h^0`` and couplings ``J^1 - J^0``: the logit expansion of a well-trained
classifier (docs/expansion.md) must recover these differences, in the zero-sum gauge, up to noise.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.expansion import one_hot_flat
from lightning_interp.tasks.potts import PottsTask

__all__ = ["PottsDataModule", "one_hot_flat"]

#: Largest number of categories ``torch.multinomial`` accepts, so the largest enumerable model.
_MAX_CATEGORIES = 2**24
#: Rows per chunk when evaluating energies over the enumeration.
_CHUNK = 2**16


class PottsDataModule(pl.LightningDataModule):
    """Two classes of categorical sequences drawn from two planted Potts models (docs/expansion.md).

    **Convention.** ``E_c(sigma) = -(sum_i h^c_i(sigma_i) + sum_{i<j} J^c_ij(sigma_i, sigma_j))`` and
    ``P_c(sigma) = exp(-E_c(sigma)) / Z_c``. ``.fields`` is float64 ``[2, L, q]`` (``fields[c, i, a] = h^c_i(a)``)
    and ``.couplings`` float64 ``[2, L, L, q, q]`` (``couplings[c, i, j, a, b] = J^c_ij(a, b)``), stored symmetric,
    ``J[c, i, j, a, b] = J[c, j, i, b, a]``, with zero blocks ``J[c, i, i]``.

    **Planted parameters** (drawn in ``__init__`` from ``torch.Generator().manual_seed(4 * seed)``, in this order):

    1. shared background: fields ``h^s_i(a) ~ shared_scale * N(0, 1)`` and, for every pair ``i < j``, couplings
       ``J^s_ij(a, b) ~ shared_scale * N(0, 1)``, all iid;
    2. class fields ``h^c = h^s + field_scale * N(0, 1)`` (iid, class 0 then class 1);
    3. ``num_pairs`` distinct site pairs ``i < j`` chosen uniformly (``.pairs``, int64 ``[num_pairs, 2]``);
    4. on each chosen pair, class couplings ``J^c_ij = J^s_ij + D^c_ij``, where ``D^c_ij`` is a ``q x q`` block of iid
       ``coupling_scale * N(0, 1)`` entries (class 0 then class 1), double-centred (every row and column sums to
       zero, i.e. the block is in the zero-sum gauge: a pure interaction that no field can absorb); elsewhere
       ``J^c_ij = J^s_ij``.

    The background cancels in the log-odds, whose couplings ``J^1 - J^0`` are therefore non-zero only on the planted
    pairs, where they are already in the zero-sum gauge (entries of standard deviation
    ``sqrt(2) * coupling_scale * (q - 1) / q``), and whose fields have standard deviation ``sqrt(2) * field_scale``.
    A classifier linear in the one-hot input cannot represent the planted pairs. With the defaults (``L = 8``,
    ``q = 4``, seed 0) the exact Bayes accuracy is about 0.82 (0.82 to 0.91 over seeds 0 to 3), while logistic
    regression reaches about 0.73.

    **Sampling.** Labels are uniform in ``{0, 1}``; each class's sequences are then drawn from ``P_c``:

    - exactly when ``q**L <= max_enumeration``: ``torch.multinomial`` over all ``q**L`` sequences with weights
      ``exp(log P_c)``;
    - otherwise by Gibbs sampling: ``gibbs_chains`` chains, started uniformly at random, run systematic-scan
      heat-bath sweeps (site ``0, ..., L - 1`` each resampled from its exact conditional), vectorised over chains.
      After ``gibbs_burn_in`` sweeps every chain contributes its state, then again after every further
      ``gibbs_sweeps`` sweeps, until enough samples are collected (the samples are then randomly permuted).

    Split ``k`` of (train, val, test) is drawn at :meth:`setup` from ``torch.Generator().manual_seed(4 * seed + 1 + k)``.
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
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if num_states < 2:
            raise ValueError(f"num_states must be >= 2, got {num_states}")
        if encoding not in self.encodings:
            raise ValueError(f"encoding must be one of {self.encodings}, got {encoding!r}")
        max_pairs = seq_len * (seq_len - 1) // 2
        if not 0 <= num_pairs <= max_pairs:
            raise ValueError(f"num_pairs must be in [0, {max_pairs}] for seq_len={seq_len}, got {num_pairs}")
        if min(field_scale, coupling_scale, shared_scale) < 0:
            raise ValueError("field_scale, coupling_scale and shared_scale must be >= 0")
        if min(n_train, n_val, n_test, num_workers) < 0 or batch_size < 1:
            raise ValueError("n_train, n_val, n_test and num_workers must be >= 0 and batch_size >= 1")
        if not 1 <= max_enumeration <= _MAX_CATEGORIES:
            raise ValueError(f"max_enumeration must be in [1, 2**24], got {max_enumeration}")
        if gibbs_sweeps < 1 or gibbs_burn_in < 0 or gibbs_chains < 1:
            raise ValueError("gibbs_sweeps and gibbs_chains must be >= 1 and gibbs_burn_in >= 0")
        self.seq_len, self.num_states, self.num_pairs = seq_len, num_states, num_pairs
        self.field_scale, self.coupling_scale, self.shared_scale = float(field_scale), float(coupling_scale), float(shared_scale)
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.batch_size, self.seed, self.encoding, self.shuffle = batch_size, seed, encoding, shuffle
        self.max_enumeration = max_enumeration
        self.gibbs_sweeps, self.gibbs_burn_in, self.gibbs_chains = gibbs_sweeps, gibbs_burn_in, gibbs_chains
        self.num_workers = num_workers
        self.fields, self.couplings, self.pairs = self._plant(torch.Generator().manual_seed(4 * seed))
        self._log_weights: Tensor | None = None  # [2, q**L] unnormalised log-probabilities, lazily
        self._splits: dict[str, TensorDataset] = {}
        self.states: dict[str, Tensor] = {}
        self.labels: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------------------------
    # planted model

    def _plant(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        length, q = self.seq_len, self.num_states
        f64 = torch.float64
        iu, ju = torch.triu_indices(length, length, offset=1)
        shared_h = self.shared_scale * torch.randn(length, q, generator=g, dtype=f64)
        shared_j = self.shared_scale * torch.randn(len(iu), q, q, generator=g, dtype=f64)
        fields = shared_h + self.field_scale * torch.randn(2, length, q, generator=g, dtype=f64)
        chosen = torch.randperm(len(iu), generator=g)[: self.num_pairs].sort().values
        upper = shared_j.expand(2, -1, -1, -1).clone()  # [2, P, q, q], pairs i < j
        blocks = self.coupling_scale * torch.randn(2, len(chosen), q, q, generator=g, dtype=f64)
        # double-centre: pure interactions, with no part that a field could absorb
        blocks = blocks - blocks.mean(-1, keepdim=True) - blocks.mean(-2, keepdim=True) + blocks.mean((-1, -2), keepdim=True)
        upper[:, chosen] += blocks
        couplings = torch.zeros(2, length, length, q, q, dtype=f64)
        couplings[:, iu, ju] = upper
        couplings[:, ju, iu] = upper.transpose(-1, -2)
        pairs = torch.stack([iu[chosen], ju[chosen]], dim=1)
        return fields, couplings, pairs

    def planted_field_difference(self) -> Tensor:
        """``h^1 - h^0``, float64 ``[L, q]``: the raw (not gauge-fixed) fields of the Bayes log-odds."""
        return self.fields[1] - self.fields[0]

    def planted_coupling_difference(self) -> Tensor:
        """``J^1 - J^0``, float64 ``[L, L, q, q]``: the raw (not gauge-fixed), symmetric couplings of the Bayes log-odds."""
        return self.couplings[1] - self.couplings[0]

    def _check_class(self, c: int) -> None:
        if c not in (0, 1):
            raise ValueError(f"class must be 0 or 1, got {c}")

    def _check_states(self, states: Tensor) -> Tensor:
        if states.dim() != 2 or states.shape[1] != self.seq_len:
            raise ValueError(f"states must have shape [N, {self.seq_len}], got {list(states.shape)}")
        return states.long()

    def _neg_energies(self, states: Tensor) -> Tensor:
        """``-E_c(states)`` for both classes: float64 ``[2, N]`` (chunked over rows)."""
        q, lq = self.num_states, self.seq_len * self.num_states
        flat_j = self.couplings.permute(0, 1, 3, 2, 4).reshape(2, lq, lq)  # [(i, a), (j, b)]
        flat_h = self.fields.reshape(2, lq)
        out = []
        for chunk in states.split(_CHUNK):
            x = one_hot_flat(chunk, q).double()  # [n, Lq]
            pair = 0.5 * torch.einsum("nk,ckl,nl->cn", x, flat_j, x)  # symmetric J, zero diagonal: sum_{i<j}
            out.append(flat_h @ x.T + pair)
        return torch.cat(out, dim=1) if out else torch.zeros(2, 0, dtype=torch.float64)

    def energy(self, states: Tensor, c: int) -> Tensor:
        """Energy ``E_c(sigma) = -(sum_i h^c_i(sigma_i) + sum_{i<j} J^c_ij(sigma_i, sigma_j))`` of each row.

        Args:
            states: int64 ``[N, L]``.
            c: class, 0 or 1.

        Returns:
            float64 ``[N]``.

        Raises:
            ValueError: a bad class or shape.
        """
        self._check_class(c)
        return -self._neg_energies(self._check_states(states))[c]

    # ------------------------------------------------------------------------------------------------------------
    # enumeration

    @property
    def task(self) -> PottsTask:
        """The planted models as a :class:`PottsTask` (exact posterior; enumerable, one-hot modules only).

        Raises:
            ValueError: the model is not enumerable or the encoding is not one-hot.
        """
        return PottsTask(self)

    @property
    def num_sequences(self) -> int:
        """``q**L``, the number of distinct sequences."""
        return self.num_states**self.seq_len

    @property
    def enumerable(self) -> bool:
        """Whether ``q**L <= max_enumeration`` (exact sampling and exact partition functions)."""
        return self.num_sequences <= self.max_enumeration

    def require_enumerable(self, what: str) -> None:
        """Raise a ``ValueError`` naming ``what`` and the fix when the model is too large to enumerate."""
        if not self.enumerable:
            raise ValueError(
                f"{what} needs the partition functions, computed by enumeration only when "
                f"num_states**seq_len ({self.num_sequences}) <= max_enumeration ({self.max_enumeration})"
            )

    def _index_to_states(self, index: Tensor) -> Tensor:
        powers = self.num_states ** torch.arange(self.seq_len - 1, -1, -1, dtype=torch.long)
        return (index.long()[:, None] // powers) % self.num_states

    def all_states(self) -> Tensor:
        """Every sequence, int64 ``[q**L, L]``, in lexicographic order (site 0 most significant).

        Raises:
            ValueError: the model is not enumerable (``q**L > max_enumeration``).
        """
        self.require_enumerable("all_states")
        return self._index_to_states(torch.arange(self.num_sequences))

    def _enumerated_log_weights(self) -> Tensor:
        if self._log_weights is None:
            self.require_enumerable("enumeration")
            chunks = [self._neg_energies(self._index_to_states(idx)) for idx in torch.arange(self.num_sequences).split(_CHUNK)]
            self._log_weights = torch.cat(chunks, dim=1)
        return self._log_weights

    def log_partition(self, c: int) -> float:
        """``log Z_c``, exact by enumeration.

        Raises:
            ValueError: a bad class or a model that is not enumerable.
        """
        self._check_class(c)
        self.require_enumerable("log_partition")
        return float(torch.logsumexp(self._enumerated_log_weights()[c], dim=0))

    def log_prob(self, states: Tensor, c: int) -> Tensor:
        """``log P_c(sigma) = -E_c(sigma) - log Z_c`` of each row, float64 ``[N]``.

        Raises:
            ValueError: a bad class or shape, or a model that is not enumerable.
        """
        self.require_enumerable("log_prob")
        return -self.energy(states, c) - self.log_partition(c)

    def bayes_log_odds(self, states: Tensor) -> Tensor:
        """Exact Bayes log-odds ``log P(y=1 | sigma) - log P(y=0 | sigma)``, float64 ``[N]``.

        Equal to ``log P_1(sigma) - log P_0(sigma) + log(pi_1 / pi_0) = E_0(sigma) - E_1(sigma) + log Z_0 - log Z_1``
        (the priors are equal, so ``log(pi_1 / pi_0) = 0``). When the model is not enumerable,
        ``energy(states, 0) - energy(states, 1)`` is the log-odds up to the unknown constant.

        Raises:
            ValueError: a bad shape, or a model that is not enumerable.
        """
        self.require_enumerable("bayes_log_odds")
        neg = self._neg_energies(self._check_states(states))
        return neg[1] - neg[0] - self.log_partition(1) + self.log_partition(0)

    def bayes_accuracy(self) -> float:
        """Exact accuracy of the Bayes classifier, ``sum_sigma max(pi_0 P_0(sigma), pi_1 P_1(sigma))``, by enumeration.

        Raises:
            ValueError: the model is not enumerable.
        """
        self.require_enumerable("bayes_accuracy")
        w = self._enumerated_log_weights()
        log_p = w - torch.logsumexp(w, dim=1, keepdim=True)
        return float(0.5 * log_p.max(dim=0).values.exp().sum())

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def sample_states(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences from ``P_c``, int64 ``[n, L]``: exact when enumerable, else Gibbs (see the class docstring).

        Args:
            c: class, 0 or 1.
            n: number of sequences.
            generator: random generator (the global one when ``None``).

        Raises:
            ValueError: a bad class or a negative ``n``.
        """
        self._check_class(c)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        g = generator if generator is not None else torch.default_generator
        if n == 0:
            return torch.zeros(0, self.seq_len, dtype=torch.long)
        if self.enumerable:
            w = self._enumerated_log_weights()[c]
            index = torch.multinomial((w - w.max()).exp(), n, replacement=True, generator=g)
            return self._index_to_states(index)
        return self._gibbs(c, n, g)

    def _gibbs(self, c: int, n: int, g: torch.Generator) -> Tensor:
        length, q = self.seq_len, self.num_states
        chains = min(self.gibbs_chains, n)
        h = self.fields[c]  # [L, q]
        j = self.couplings[c].permute(0, 2, 1, 3).reshape(length, q, length * q)  # [i, a, (j, b)]
        x = torch.zeros(chains, length, q, dtype=torch.float64)
        x.scatter_(2, torch.randint(0, q, (chains, length, 1), generator=g), 1.0)

        def sweep() -> None:
            for i in range(length):
                local = h[i] + x.reshape(chains, -1) @ j[i].T  # [chains, q]; J_ii = 0 drops the site itself
                cdf = torch.softmax(local, dim=1).cumsum(dim=1)
                u = torch.rand(chains, 1, generator=g, dtype=torch.float64)
                new = (u > cdf).sum(dim=1).clamp_max(q - 1)
                x[:, i].zero_()
                x[:, i].scatter_(1, new[:, None], 1.0)

        for _ in range(self.gibbs_burn_in):
            sweep()
        samples = [x.argmax(dim=2)]
        collected = chains
        while collected < n:
            for _ in range(self.gibbs_sweeps):
                sweep()
            samples.append(x.argmax(dim=2))
            collected += chains
        out = torch.cat(samples)[:n]
        return out[torch.randperm(n, generator=g)]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` labelled sequences ``(states int64 [n, L], y int64 [n])``, labels uniform in ``{0, 1}``.

        Args:
            n: number of samples.
            generator: random generator (the global one when ``None``).
        """
        g = generator if generator is not None else torch.default_generator
        y = torch.randint(0, 2, (n,), generator=g)
        states = torch.empty(n, self.seq_len, dtype=torch.long)
        for c in (0, 1):
            mask = y == c
            states[mask] = self.sample_states(c, int(mask.sum()), g)
        return states, y

    def encode(self, states: Tensor) -> Tensor:
        """``states`` in this module's ``encoding``: :func:`one_hot_flat` (float32 ``[N, L * q]``) or as is (int64)."""
        states = self._check_states(states)
        return one_hot_flat(states, self.num_states) if self.encoding == "one_hot" else states

    # ------------------------------------------------------------------------------------------------------------
    # Lightning

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for offset, (name, n) in enumerate((("train", self.n_train), ("val", self.n_val), ("test", self.n_test))):
            states, y = self.sample(n, torch.Generator().manual_seed(4 * self.seed + 1 + offset))
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
