"""Two planted Potts models over categorical sequences: a task whose Bayes log-odds is a known pairwise energy.

Inputs are sequences ``sigma = (sigma_1, ..., sigma_L)`` of ``L`` sites, each in one of ``q`` states. Class ``c``
(``c = 0, 1``, equally likely) is drawn from the Potts model ``P_c(sigma) = exp(-E_c(sigma)) / Z_c`` with energy

``E_c(sigma) = -(sum_i h^c_i(sigma_i) + sum_{i<j} J^c_ij(sigma_i, sigma_j))``,

so ``log P_c(sigma) = sum_i h^c_i(sigma_i) + sum_{i<j} J^c_ij(sigma_i, sigma_j) - log Z_c``. The Bayes log-odds

``log P(y=1 | sigma) / P(y=0 | sigma) = E_0(sigma) - E_1(sigma) + log Z_0 - log Z_1``

is a pairwise energy with fields ``h^1 - h^0`` and couplings ``J^1 - J^0``: the logit expansion of a well-trained
classifier (docs/expansion.md) must recover these differences, in the zero-sum gauge, up to noise.
:class:`~lightning_interp.datamodules.PottsDataModule` wraps a :class:`PottsTask` and draws its splits through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_interp.encoding import one_hot_flat, zero_sum_gauge
from lightning_interp.tasks.base import Estimate, GenerativeTask

__all__ = ["MAX_ENUMERATION", "PottsTask"]

MAX_ENUMERATION = 2**24
"""Largest number of categories ``torch.multinomial`` accepts, so the largest enumerable model."""
#: Rows per chunk when evaluating energies over the enumeration.
_CHUNK = 2**16


class PottsTask(GenerativeTask):
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
       ``coupling_scale * N(0, 1)`` entries (class 0 then class 1) brought to the zero-sum gauge with
       :func:`~lightning_interp.encoding.zero_sum_gauge` (every row and column sums to zero: a pure interaction
       that no field can absorb); elsewhere ``J^c_ij = J^s_ij``.

    The background cancels in the log-odds, whose couplings ``J^1 - J^0`` are therefore non-zero only on the planted
    pairs, where they are already in the zero-sum gauge (entries of standard deviation
    ``sqrt(2) * coupling_scale * (q - 1) / q``), and whose fields have standard deviation ``sqrt(2) * field_scale``.
    A classifier linear in the one-hot input cannot represent the planted pairs. With the defaults (``L = 8``,
    ``q = 4``, seed 0) the exact Bayes accuracy is about 0.82 (0.82 to 0.91 over seeds 0 to 3), while logistic
    regression reaches about 0.73.

    **Sampling** (:meth:`sample_states`, the one sampler of the task): class ``c``'s sequences are drawn from ``P_c``

    - exactly when ``q**L <= max_enumeration``: ``torch.multinomial`` over all ``q**L`` sequences with weights
      ``exp(log P_c)``;
    - otherwise by Gibbs sampling: ``gibbs_chains`` chains, started uniformly at random, run systematic-scan
      heat-bath sweeps (site ``0, ..., L - 1`` each resampled from its exact conditional), vectorised over chains.
      After ``gibbs_burn_in`` sweeps every chain contributes its state, then again after every further
      ``gibbs_sweeps`` sweeps, until enough samples are collected (the samples are then randomly permuted).

    :meth:`draw` gives labelled integer sequences (what the datamodule's splits are); as a
    :class:`GenerativeTask` the inputs are the one-hot sequences ``[n, L * q]`` (:func:`one_hot_flat`, index
    ``i * q + a``), and ``log p(x|c) = log P_c(sigma)`` uses the enumerated partition functions, so
    :class:`~lightning_interp.callbacks.PosteriorGapCallback` can compare a classifier of Potts sequences with the
    exact Bayes posterior (enumerable models only).

    Args:
        seq_len: number of sites ``L`` (at least 2).
        num_states: states per site ``q`` (at least 2).
        num_pairs: number of strongly coupled, class-specific site pairs (at most ``L (L - 1) / 2``).
        field_scale: standard deviation of the class-specific fields.
        coupling_scale: standard deviation of the class-specific couplings on the planted pairs.
        shared_scale: standard deviation of the shared background fields and couplings.
        seed: seed of the planted parameters.
        max_enumeration: largest ``q**L`` for which the model is enumerated (exact sampling, partition functions,
            :meth:`log_prob`, :meth:`bayes_log_odds`, the posterior); at most ``2**24``.
        gibbs_sweeps: thinning sweeps between two samples of a Gibbs chain.
        gibbs_burn_in: burn-in sweeps of every Gibbs chain.
        gibbs_chains: number of parallel Gibbs chains.

    Raises:
        ValueError: ``seq_len < 2``, ``num_states < 2``, ``num_pairs`` out of range, negative scales or bad
            enumeration / Gibbs settings.

    Example:
        >>> task = PottsTask(seq_len=4, num_states=3, num_pairs=2)
        >>> task.fields.shape, task.couplings.shape, task.dim
        (torch.Size([2, 4, 3]), torch.Size([2, 4, 4, 3, 3]), 12)
        >>> states, y = task.draw(5, torch.Generator().manual_seed(0))
        >>> states.shape, y.shape
        (torch.Size([5, 4]), torch.Size([5]))
        >>> task.log_posterior(one_hot_flat(states, 3)).shape
        torch.Size([5, 2])
        >>> 0.5 < task.exact_bayes_accuracy() < 1.0
        True
    """

    def __init__(
        self,
        seq_len: int = 8,
        num_states: int = 4,
        num_pairs: int = 4,
        field_scale: float = 0.3,
        coupling_scale: float = 1.0,
        shared_scale: float = 0.3,
        seed: int = 0,
        max_enumeration: int = 2**20,
        gibbs_sweeps: int = 10,
        gibbs_burn_in: int = 200,
        gibbs_chains: int = 1_000,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if num_states < 2:
            raise ValueError(f"num_states must be >= 2, got {num_states}")
        max_pairs = seq_len * (seq_len - 1) // 2
        if not 0 <= num_pairs <= max_pairs:
            raise ValueError(f"num_pairs must be in [0, {max_pairs}] for seq_len={seq_len}, got {num_pairs}")
        if min(field_scale, coupling_scale, shared_scale) < 0:
            raise ValueError("field_scale, coupling_scale and shared_scale must be >= 0")
        if not 1 <= max_enumeration <= MAX_ENUMERATION:
            raise ValueError(f"max_enumeration must be in [1, 2**24], got {max_enumeration}")
        if gibbs_sweeps < 1 or gibbs_burn_in < 0 or gibbs_chains < 1:
            raise ValueError("gibbs_sweeps and gibbs_chains must be >= 1 and gibbs_burn_in >= 0")
        self.seq_len, self.num_states, self.num_pairs = seq_len, num_states, num_pairs
        self.field_scale, self.coupling_scale, self.shared_scale = float(field_scale), float(coupling_scale), float(shared_scale)
        self.seed, self.max_enumeration = seed, max_enumeration
        self.gibbs_sweeps, self.gibbs_burn_in, self.gibbs_chains = gibbs_sweeps, gibbs_burn_in, gibbs_chains
        self.num_classes, self.dim = 2, seq_len * num_states
        self.priors = torch.full((2,), 0.5, dtype=torch.float64)
        self.fields, self.couplings, self.pairs = self._plant(torch.Generator().manual_seed(4 * seed))
        self._log_weights: Tensor | None = None  # [2, q**L] unnormalised log-probabilities, lazily

    def __repr__(self) -> str:
        return f"PottsTask(seq_len={self.seq_len}, num_states={self.num_states}, num_pairs={self.num_pairs}, seed={self.seed})"

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
        upper[:, chosen] += self._zero_sum_blocks(blocks, iu[chosen], ju[chosen])
        couplings = torch.zeros(2, length, length, q, q, dtype=f64)
        couplings[:, iu, ju] = upper
        couplings[:, ju, iu] = upper.transpose(-1, -2)
        pairs = torch.stack([iu[chosen], ju[chosen]], dim=1)
        return fields, couplings, pairs

    def _zero_sum_blocks(self, blocks: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """The ``[2, P, q, q]`` blocks on pairs ``(rows, cols)`` (``rows < cols``) in the zero-sum gauge.

        Pure interactions, with no part that a field could absorb: the blocks are laid out as symmetric couplings
        and gauge-fixed by :func:`~lightning_interp.encoding.zero_sum_gauge` (fields of zero), which double-centres
        every block.
        """
        length, q = self.seq_len, self.num_states
        full = torch.zeros(2, length, length, q, q, dtype=blocks.dtype)
        full[:, rows, cols] = blocks
        full[:, cols, rows] = blocks.transpose(-1, -2)
        _, _, centred = zero_sum_gauge(torch.zeros(2, length, q, dtype=blocks.dtype), full)
        return centred[:, rows, cols]

    def planted_field_difference(self) -> Tensor:
        """``h^1 - h^0``, float64 ``[L, q]``: the raw (not gauge-fixed) fields of the Bayes log-odds."""
        return self.fields[1] - self.fields[0]

    def planted_coupling_difference(self) -> Tensor:
        """``J^1 - J^0``, float64 ``[L, L, q, q]``: the raw (not gauge-fixed), symmetric couplings of the Bayes log-odds."""
        return self.couplings[1] - self.couplings[0]

    def check_class(self, c: int) -> None:
        """Raise a ``ValueError`` unless ``c`` is a class (0 or 1)."""
        if c not in (0, 1):
            raise ValueError(f"class must be 0 or 1, got {c}")

    def check_states(self, states: Tensor) -> Tensor:
        """``states`` as int64 after checking the shape ``[N, L]``.

        Raises:
            ValueError: a bad shape.
        """
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
        self.check_class(c)
        return -self._neg_energies(self.check_states(states))[c]

    # ------------------------------------------------------------------------------------------------------------
    # enumeration

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
        self.check_class(c)
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
        neg = self._neg_energies(self.check_states(states))
        return neg[1] - neg[0] - self.log_partition(1) + self.log_partition(0)

    def exact_bayes_accuracy(self) -> float:
        """Accuracy of the Bayes classifier, ``sum_sigma max(pi_0 P_0(sigma), pi_1 P_1(sigma))``, by enumeration.

        Raises:
            ValueError: the model is not enumerable.
        """
        self.require_enumerable("bayes_accuracy")
        w = self._enumerated_log_weights()
        log_p = w - torch.logsumexp(w, dim=1, keepdim=True)
        return float(0.5 * log_p.max(dim=0).values.exp().sum())

    def bayes_accuracy(self, n: int = 200_000, generator: torch.Generator | None = None) -> Estimate:
        """The Bayes accuracy, exact by enumeration (:meth:`exact_bayes_accuracy`) with a standard error of 0.

        Args:
            n: unused (the value is exact, not a Monte-Carlo estimate).
            generator: unused.

        Raises:
            ValueError: the model is not enumerable.
        """
        return Estimate(self.exact_bayes_accuracy(), 0.0)

    # ------------------------------------------------------------------------------------------------------------
    # the generative task (one-hot inputs)

    def class_log_likelihood(self, x: Tensor) -> Tensor:
        """``log P_c(sigma)`` of one-hot sequences ``x`` ``[n, L * q]`` for both classes, float64 ``[n, 2]``.

        Raises:
            ValueError: the model is not enumerable.
        """
        states = x.reshape(len(x), self.seq_len, self.num_states).argmax(dim=2)
        return torch.stack([self.log_prob(states, c) for c in (0, 1)], dim=1)

    def sample_class(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` one-hot sequences of class ``c``, float64 ``[n, L * q]`` (:meth:`sample_states`, encoded)."""
        return one_hot_flat(self.sample_states(c, n, generator), self.num_states).to(torch.float64)

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def sample_states(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences from ``P_c``, int64 ``[n, L]``: exact when enumerable, else Gibbs (see the class docstring).

        Args:
            c: class, 0 or 1.
            n: number of sequences.
            generator: random generator (the global one when ``None``).

        Returns:
            int64 ``[n, L]``.

        Raises:
            ValueError: a bad class or a negative ``n``.
        """
        self.check_class(c)
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

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` labelled sequences ``(states int64 [n, L], y int64 [n])``.

        Labels are uniform in ``{0, 1}`` (``torch.randint``), then class 0's sequences, then class 1's, by
        :meth:`sample_states`.

        Args:
            n: number of samples.
            generator: random generator (the global one when ``None``).

        Returns:
            ``(states, y)``.
        """
        g = generator if generator is not None else torch.default_generator
        y = torch.randint(0, 2, (n,), generator=g)
        states = torch.empty(n, self.seq_len, dtype=torch.long)
        for c in (0, 1):
            mask = y == c
            states[mask] = self.sample_states(c, int(mask.sum()), g)
        return states, y
