"""MCMC of a Bayesian ablation: the chains' scorer, the Metropolis sampler, its sums, read-outs and ESS.

Part of :mod:`lightning_interp.ablation`: parallel Metropolis chains of single-unit flips, each scoring its task's
examples and (balanced likelihood) its own fixed sample of other examples; Rao-Blackwellised importances and
pairwise joints, the jackknife over chains, the resolved-pairs manifold complexity. Pure torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.ablation.likelihood import TaskSet, correct_probability, rest_per_task
from lightning_interp.ablation.masked import MAX_ELEMENTS, MaskedForward
from lightning_interp.ablation.readouts import LOG2, Estimate, binary_entropy_bits

__all__ = [
    "MAX_JOINT_ELEMENTS",
    "REFRESH_STEPS",
    "ChainScorer",
    "ChainSums",
    "MetropolisChains",
    "chain_ess",
    "chain_joints",
    "chain_sums",
    "leave_one_out_marginals",
]

#: bound on the elements of the MCMC pairwise matrices [d, d] (above it, no manifold complexity)
MAX_JOINT_ELEMENTS = 16_000_000
#: MCMC with an affine head in float32: the rows' logits are recomputed exactly (in float64) every this many steps,
#: which bounds the rounding the incremental updates accumulate to that of as many float32 additions
REFRESH_STEPS = 128


class ChainScorer:
    """``log O_t(m)`` ``[T, C]`` of the current mask of every MCMC chain, from the probe rows each chain scores.

    A chain of task ``t`` scores its mask on task ``t``'s examples and, with the two-sided likelihood, on its
    own sample of at most ``rest_per_chain`` other examples (drawn once, without replacement, from
    ``generator``; all of them when there are no more): every step evaluates the same rows, so each chain
    targets a fixed posterior, and the cost per step is bounded by ``chains * (N + T * rest_per_chain)``
    rows. All chains' rows run as one batch of (example, mask) pairs.

    Where the logits are affine in the mask (:meth:`MaskedForward.linear_head`), the scorer keeps every
    row's logits (float64) for the chains' current masks, and a proposal that flips unit ``j`` adds
    ``+-(h_j - c_j) W[j]`` to them (``c_j``: the unit's masked value, :attr:`MaskedForward.masked_value`):
    ``K`` additions per row rather than a pass through the head. The rows are laid out as a grid ``[K, chain,
    slot]`` (each chain's own rows first, its other examples last, short chains padded), so that a chain's
    column ``W[j]`` broadcasts over its rows, the class maxima reduce over the outer dim (an ``argmax`` over a
    last dim of ``K`` logits was 80% of a step), and a step's counts are one weighted sum per chain.
    """

    def __init__(
        self,
        forward: MaskedForward,
        prepared: list[Tensor],
        tasks: TaskSet,
        num_chains: int,
        rest_per_chain: int,
        two_sided: bool,
        generator: torch.Generator,
        head: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        device = tasks.labels.device
        num_tasks = len(tasks.names)
        self.forward, self.prepared, self.two_sided = forward, prepared, two_sided
        self.shape = (num_tasks, num_chains)
        self.num_task = tasks.member.sum(dim=0).to(torch.float64)[:, None]  # [T, 1]
        self.num_rest = torch.zeros(num_tasks, 1, dtype=torch.float64, device=device)
        rows, chains, rest_flags, targets = [], [], [], []
        rest_counts = rest_per_task(tasks, rest_per_chain, two_sided)
        for t in range(num_tasks):
            own = torch.nonzero(tasks.member[:, t]).flatten()
            others = torch.nonzero(~tasks.member[:, t]).flatten() if two_sided else own[:0]
            k = int(rest_counts[t])
            self.num_rest[t] = k
            for c in range(num_chains):
                if k < others.numel():
                    rest = others[torch.randperm(others.numel(), generator=generator)[:k].to(device)]
                else:
                    rest = others
                rows += [own, rest]
                chains.append(torch.full((own.numel() + k,), t * num_chains + c, dtype=torch.long, device=device))
                rest_flags += [torch.zeros_like(own, dtype=torch.bool), torch.ones_like(rest, dtype=torch.bool)]
                target = tasks.classes[t] if tasks.classes else 0
                targets += [tasks.labels[own], torch.full_like(rest, target)]
        self.rows, self.chain = torch.cat(rows), torch.cat(chains)
        self.rest, self.target = torch.cat(rest_flags), torch.cat(targets)
        self.slot = self.chain * 2 + self.rest.long()  # [task-major chain, own / rest]
        self.head = head  # (W, b) of an affine head (MaskedForward.linear_head), read once per fit
        self.logits: Tensor | None = None  # affine head: the grid's logits under the current masks [K, chains, slots]
        if head is not None:
            self._grid(forward, prepared, tasks, rest_counts, head)

    def _grid(
        self, forward: MaskedForward, prepared: list[Tensor], tasks: TaskSet, rest_counts: Tensor, head: tuple[Tensor, Tensor]
    ) -> None:
        """The affine head's layout: chain ``i``'s rows at ``[i, :n_t]`` (own) and ``[i, A + B - k_t:]`` (others)."""
        features = forward.features(prepared)
        if features is None:
            raise ValueError("an affine head needs [N, d] features (MaskedForward.features)")
        device, (num_tasks, num_chains) = features.device, self.shape
        weight, bias = head
        # the grid's precision: float64 for a float64 model, else float32 (half the memory traffic of a step; its
        # drift is bounded by an exact recomputation every REFRESH_STEPS steps, see refresh())
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        features = features.to(torch.float64)
        d, k = features.shape[1], bias.numel()
        fill = forward.masked_value
        self.fill = torch.zeros(d, dtype=torch.float64, device=device) if fill is None else fill.reshape(d).to(torch.float64)
        self.features = features
        # h_j - c_j of every (example, unit), flat: what flipping unit j on adds to a row's z (times W[j])
        self.delta = (features - self.fill).reshape(-1).to(dtype)
        own_n = tasks.member.sum(dim=0).long()  # [T]
        rest_n = rest_counts.long()
        a, b = int(own_n.max()) if own_n.numel() else 0, int(rest_n.max()) if rest_n.numel() else 0
        width, chains = a + b, num_tasks * num_chains
        # each flat row's place in the grid: its chain's own rows from 0, its other examples ending at the last slot
        lengths = torch.stack([own_n, rest_n], dim=1).repeat_interleave(num_chains, dim=0).reshape(-1)  # [2 * chains]
        start_in_row = torch.stack([torch.zeros_like(own_n), width - rest_n], dim=1).repeat_interleave(num_chains, dim=0)
        first = torch.cumsum(lengths, 0) - lengths  # each (chain, own / rest) segment's first flat row
        offset = torch.arange(self.rows.numel(), device=device) - first.to(device)[self.slot]
        place = self.chain * width + start_in_row.reshape(-1).to(device)[self.slot] + offset
        rows = torch.zeros(chains * width, dtype=torch.long, device=device).index_copy_(0, place, self.rows)
        target = torch.zeros(chains * width, dtype=torch.long, device=device).index_copy_(0, place, self.target)
        # the weight of a row's "predicted as its target" in the chain's count index (own * (B + 1) + rest), 0: padding
        weight_row = torch.where(self.rest, 1, b + 1)
        self.weight_row = torch.zeros(chains * width, dtype=torch.long, device=device).index_copy_(0, place, weight_row)
        self.weight_row = self.weight_row.reshape(chains, width)
        self.grid_rows = rows.reshape(chains, width)
        self.grid_offset = self.grid_rows * d  # + j: the row's (example, unit j) in delta
        self.grid_target = target.reshape(1, chains, width)
        # 0 for the classes before a row's target, -inf after: the maximum over the earlier classes (argmax ties)
        earlier = torch.arange(k, device=device)[:, None, None] < self.grid_target  # [K, chains, slots]
        self.earlier = torch.zeros(earlier.shape, dtype=dtype, device=device).masked_fill_(~earlier, -math.inf)
        self.weight = weight  # [d, K] float64, for the exact logits
        self.weight_t = weight.T.to(dtype).contiguous()  # [K, d]
        self.bias = bias
        # log O_t for every (task, own count, others predicted as the task) (a table while it stays small)
        counts = num_tasks * (a + 1) * (b + 1)
        self.stride = b + 1
        self.rest_total = self.num_rest.repeat_interleave(num_chains, dim=0)[:, 0]  # [chains]
        self.task_total = self.num_task.repeat_interleave(num_chains, dim=0)[:, 0]
        self.table: Tensor | None = None
        if counts <= MAX_ELEMENTS:
            own = torch.arange(a + 1, dtype=torch.float64, device=device)[None, :, None]
            rest_pred = torch.arange(b + 1, dtype=torch.float64, device=device)[None, None, :]
            self.table = self._odds(own, self.num_task[:, :, None], rest_pred, self.num_rest[:, :, None])
            self.table = self.table.reshape(num_tasks, -1)  # [T, (A + 1) (B + 1)]
        self.proposed = torch.empty(k, chains, width, dtype=dtype, device=device)
        self.buffer = torch.empty_like(self.proposed)
        self.coef = self.column = torch.empty(0, dtype=dtype, device=device)

    def _odds(self, own: Tensor, num_task: Tensor, rest_pred: Tensor, num_rest: Tensor) -> Tensor:
        """``log O_t`` from the own rows answered correctly and the other rows predicted as the task's class."""
        rest = (num_rest - rest_pred) if self.two_sided else None
        p = correct_probability(own, num_task, rest, num_rest if self.two_sided else None)
        return torch.log(p) - torch.log1p(-p)

    @property
    def rows_per_step(self) -> int:
        """(example, mask) rows one step evaluates, all chains together."""
        return int(self.rows.numel())

    def start(self, states: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` of the chains' first masks ``states`` ``[T, C, d]``."""
        if self.head is None:
            return self(states)
        self.refresh(states)
        assert self.logits is not None
        return self._grid_odds(self.logits)

    def refresh(self, states: Tensor) -> None:
        """Recompute the grid's logits for the masks ``states`` ``[T, C, d]`` exactly (float64, then the grid's dtype)."""
        if self.head is None:
            return
        chains, width = self.grid_offset.shape
        d = self.weight.shape[0]
        masks = states.reshape(chains, 1, d)
        h = self.features
        per = max(1, MAX_ELEMENTS // max(1, d * width))  # chains per chunk
        parts = []
        for i in range(0, chains, per):
            rows = h.index_select(0, self.grid_rows[i : i + per].reshape(-1)).reshape(-1, width, d)
            parts.append(torch.where(masks[i : i + per], rows, self.fill) @ self.weight + self.bias)  # [chunk, slots, K]
        logits = torch.cat(parts).permute(2, 0, 1) if parts else self.proposed.double()
        self.logits = logits.to(self.proposed.dtype).contiguous()

    def _grid_odds(self, logits: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` from the grid's logits ``[K, chains, slots]``."""
        # argmax returns the first of tied maxima: a row predicts its target where the target's logit is the
        # maximum and above every earlier class's (NaN: no class). amax over the outer dim is 20x an argmax's speed.
        target = logits.gather(0, self.grid_target)[0]
        earlier = torch.add(logits, self.earlier, out=self.buffer).amax(dim=0)
        hit = target.ge(logits.amax(dim=0)).logical_and_(target.gt(earlier))
        index = hit.mul(self.weight_row).sum(dim=1)  # own * (B + 1) + others predicted as the task's class
        if self.table is not None:
            return self.table.gather(1, index.reshape(self.shape))
        own, rest_pred = index.div(self.stride, rounding_mode="floor"), index.remainder(self.stride)
        return self._odds(own.double(), self.task_total, rest_pred.double(), self.rest_total).reshape(self.shape)

    def propose(self, states: Tensor, flip: Tensor, sign: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` of the masks ``states`` ``[T, C, d]`` with unit ``flip`` ``[T, C]`` set to ``sign > 0``.

        ``sign`` (``[T, C]``, float64): +1 where the proposal keeps the flipped unit, -1 where it zeroes it.
        """
        if self.head is None or self.logits is None:
            proposal = states.clone()
            proposal.scatter_(2, flip[..., None], (sign > 0)[..., None])
            return self(proposal)
        flat = flip.reshape(-1)
        # the flipped unit's z moves from c_j to h_j (kept now) or back: +-(h_j - c_j) W[j], one column per chain
        self.coef = self.delta.take(self.grid_offset + flat[:, None])  # [chains, slots]
        self.column = self.weight_t.index_select(1, flat).mul_(sign.reshape(1, -1))[:, :, None]  # +-W[j]  [K, chains, 1]
        return self._grid_odds(torch.addcmul(self.logits, self.coef, self.column, out=self.proposed))

    def accept(self, accepted: Tensor) -> None:
        """Move the chains where ``accepted`` ``[T, C]`` to their proposals."""
        if self.logits is not None:
            # the rejected chains add 0 x their column: the accepted rows get the proposal's bits exactly
            self.logits.addcmul_(self.coef, self.column * accepted.reshape(1, -1, 1))

    def __call__(self, states: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` of the masks ``states`` ``[T, C, d]``, each row through the head."""
        masks = states.reshape(-1, states.shape[-1])[self.chain]
        return self.log_odds(self.forward.paired_predictions(self.prepared, self.rows, masks))

    def log_odds(self, pred: Tensor) -> Tensor:
        """``log O_t(m)`` ``[T, C]`` from the predicted class of every row ``[R]``."""
        # own rows: correct (predicted as labelled); rest rows: not predicted as the task's class
        hit = (pred == self.target) != self.rest
        counts = torch.zeros(2 * self.shape[0] * self.shape[1], dtype=torch.float64, device=pred.device)
        counts = counts.index_add_(0, self.slot, hit.to(torch.float64)).reshape(*self.shape, 2)
        rest = counts[..., 1] if self.two_sided else None
        p = correct_probability(counts[..., 0], self.num_task, rest, self.num_rest)
        return torch.log(p) - torch.log1p(-p)


@dataclass
class ChainSums:
    """What the kept steps of a Metropolis run leave for the MCMC read-outs, per task and chain.

    ``flips`` ``[T, C, S]``: the unit each step proposed to flip; ``conds``: its conditional
    ``P(m_j = 1 | m_-j)``; ``traces`` ``[T, C, S, d]``: the masks after each step (bool); ``cond_sum``,
    ``cond_cnt``, ``cond_entropy`` ``[T, C, d]``: per unit, the sums of its conditionals, its number of
    proposals and the sums of the conditionals' entropies; ``raw``: the sums of the 0/1 keep indicators.
    """

    flips: Tensor
    conds: Tensor
    traces: Tensor
    cond_sum: Tensor
    cond_cnt: Tensor
    cond_entropy: Tensor
    raw: Tensor
    accepted: Tensor
    seconds_per_step: float

    def chain_joint(self, task: int, chain: int) -> Tensor:
        """Row ``j``: the sum of ``m_i P(m_j = 1 | m_-j)`` over the chain's steps proposing unit ``j`` ``[d, d]``.

        The masks are those after each step, which differ from those it started from in unit ``j`` only (the
        diagonal, which no pair uses).
        """
        rows = self.traces[task, chain].to(torch.float64) * self.conds[task, chain, :, None]
        d = rows.shape[1]
        return torch.zeros(d, d, dtype=torch.float64, device=rows.device).index_add_(0, self.flips[task, chain], rows)


@dataclass
class MetropolisChains:
    """Parallel Metropolis chains of single-unit flips at given sizes, and their Rao-Blackwellised read-outs.

    :class:`~lightning_interp.ablation.BayesianAblation` builds one per fit from its settings (and its pilot one
    of its own, at the pilot's sizes): the sampler's settings are arguments, never attributes changed and restored.

    Attributes:
        num_chains: chains per task.
        num_steps: steps per chain (including burn-in).
        burn_in: steps discarded at the start of each chain.
        prior_keep: prior probability that a unit is kept.
        generator: the ``torch.Generator`` of the chains' first masks, proposals and acceptances.
        on_step: called after every step (no argument), e.g. to advance a progress bar.
    """

    num_chains: int
    num_steps: int
    burn_in: int
    prior_keep: float
    generator: torch.Generator
    on_step: Callable[[], None] | None = None

    def sample(self, scorer: ChainScorer, num_tasks: int, d: int, device: torch.device) -> Estimate:
        """Parallel Metropolis chains of single-unit flips; Rao-Blackwellised read-outs, jackknife over chains."""
        return self.estimate(self.run_chains(scorer, num_tasks, d, device), scorer, num_tasks, device)

    def estimate(self, sums: ChainSums, scorer: ChainScorer, num_tasks: int, device: torch.device) -> Estimate:
        """The MCMC read-outs of the chains' kept steps ``sums``."""
        c, kept = self.num_chains, sums.flips.shape[2]
        marginals = _chain_marginals(sums, range(c), c * kept)
        loo = leave_one_out_marginals(sums, kept) if c >= 2 else None  # each [C, T, d]
        importance = marginals[0]
        complexity = _pairwise_complexity(sums, marginals, loo)
        ess_per_unit = chain_ess(sums.traces)  # [T, d]
        return Estimate(
            importance=importance,
            manifold_complexity=complexity.value,
            complexity_kind="pairwise_mutual_information",
            mask_entropy_bits=torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device),
            method="mcmc",
            num_evaluations=num_tasks * c * (self.num_steps + 1),
            num_rows=scorer.rows_per_step * (self.num_steps + 1),
            replicate_kind="jackknife" if loo is not None else "",
            replicate_importance=loo[0] if loo is not None else None,
            replicate_complexity=complexity.replicates,
            acceptance_rate=sums.accepted / (c * kept),
            ess=ess_per_unit.min(dim=1).values,
            ess_per_unit=ess_per_unit,
            seconds_per_step=sums.seconds_per_step,
            complexity_pairs=complexity.pairs,
            complexity_left_out_bits=complexity.left_out_bits,
            num_draws=c * kept,
        )

    def run_chains(self, scorer: ChainScorer, num_tasks: int, d: int, device: torch.device) -> ChainSums:
        """Run the chains from prior draws; the per-chain sums of the kept steps."""
        c, g, steps = self.num_chains, self.generator, self.num_steps
        state = (torch.rand(num_tasks, c, d, generator=g) < self.prior_keep).to(device)  # prior draws
        # every step's proposed units and uniforms, drawn up front on the generator's device in the order of a
        # draw per step (the same stream, hence the same chains, as drawing them in the loop) and moved to the
        # device at once: no draw, transfer or host sync per step
        draws = [
            (torch.randint(0, d, (num_tasks, c), generator=g), torch.rand(num_tasks, c, generator=g, dtype=torch.float64))
            for _ in range(steps)
        ]
        flips = torch.stack([f for f, _ in draws]).to(device)
        log_u = torch.stack([u for _, u in draws]).log().to(device)
        # the prior odds of keeping a unit: a flip that keeps unit j adds log(keep / (1 - keep)) to the log prior
        prior_odds = math.log(self.prior_keep) - math.log(1 - self.prior_keep)
        plus, minus = (torch.tensor(v, dtype=torch.float64, device=device) for v in (1.0, -1.0))
        current = scorer.start(state)  # log O_t [T, C] (the log prior enters through the flips' differences)
        kept = steps - self.burn_in
        traces = torch.empty(kept, num_tasks, c, d, dtype=torch.bool, device=device)
        signed = torch.empty(steps, num_tasks, c, dtype=torch.float64, device=device)
        accepts = torch.empty(steps, num_tasks, c, dtype=torch.bool, device=device)
        # Rao-Blackwellisation: a step that proposes flipping unit j has the scores of both values of m_j given
        # the rest, hence P(m_j = 1 | m_-j) exactly. The proposed unit is drawn independently of the state, so
        # its average over the steps proposing j estimates P(m_j = 1), and that of m_i P(m_j = 1 | m_-j) the
        # joint P(m_i = 1, m_j = 1), with far less noise than the 0/1 samples (an unused unit gets exactly
        # prior_keep). The proposed units, their conditionals and the masks are kept per chain for the jackknife.
        loop_start = time.perf_counter()
        for step in range(steps):
            flip = flips[step]
            index = flip[..., None]
            was = state.gather(2, index)[..., 0]
            sign = torch.where(was, minus, plus)  # +1 where the proposal keeps unit j
            new = scorer.propose(state, flip, sign)
            diff = new - current  # log posterior ratio, proposal over current
            if prior_odds:
                diff.add_(sign, alpha=prior_odds)
            torch.mul(diff, sign, out=signed[step])  # logit of P(m_j = 1 | m_-j)
            accept = torch.lt(log_u[step], diff, out=accepts[step])
            scorer.accept(accept)
            current = torch.where(accept, new, current)
            state.scatter_(2, index, was.logical_xor(accept)[..., None])
            if step >= self.burn_in:
                traces[step - self.burn_in] = state
            if step % REFRESH_STEPS == REFRESH_STEPS - 1:
                scorer.refresh(state)  # float32 logits: the rounding of the updates does not accumulate
            if self.on_step is not None:
                self.on_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds_per_step = (time.perf_counter() - loop_start) / steps
        flips, conds = flips[self.burn_in :].permute(1, 2, 0), torch.sigmoid(signed[self.burn_in :]).permute(1, 2, 0)
        accepted = accepts[self.burn_in :].sum(dim=(0, 2), dtype=torch.float64)
        return chain_sums(
            flips.contiguous(), conds.contiguous(), traces.permute(1, 2, 0, 3).contiguous(), accepted, seconds_per_step
        )


def chain_sums(flips: Tensor, conds: Tensor, traces: Tensor, accepted: Tensor, seconds_per_step: float) -> ChainSums:
    """The per-chain sums of kept steps: proposed units ``flips`` ``[T, C, S]``, their conditionals, the masks."""
    num_tasks, c, d = traces.shape[0], traces.shape[1], traces.shape[3]

    def per_unit(values: Tensor) -> Tensor:  # sums over each chain's steps proposing each unit  [T, C, d]
        return torch.zeros(num_tasks, c, d, dtype=torch.float64, device=traces.device).scatter_add_(2, flips, values)

    return ChainSums(
        flips=flips,
        conds=conds,
        traces=traces,
        cond_sum=per_unit(conds),
        cond_cnt=per_unit(torch.ones_like(conds)),
        cond_entropy=per_unit(binary_entropy_bits(conds)),
        raw=_count_kept(traces),
        accepted=accepted,
        seconds_per_step=seconds_per_step,
    )


def _count_kept(traces: Tensor) -> Tensor:
    """The kept steps of each unit ``[T, C, d]`` of ``traces`` ``[T, C, S, d]`` (bool), float64.

    Counted in int32 over the bytes (exact, as the float64 sum of 0/1 is), a tenth of the time of a float64 sum.
    """
    if traces.dtype != torch.bool or traces.shape[2] >= 2**31:
        return traces.sum(dim=2, dtype=torch.float64)
    return traces.view(torch.uint8).sum(dim=2, dtype=torch.int32).to(torch.float64)


def _chain_marginals(sums: ChainSums, chains: Sequence[int], count: float) -> tuple[Tensor, Tensor, Tensor]:
    """Importance, dependence ``I(m_j; m_-j)`` and proposal counts ``[T, d]`` from the sums over some chains.

    ``I(m_j; m_-j) = H(m_j) - E[H(m_j | m_-j)]``, from the conditionals: exactly 0 for a unit whose
    conditional never moved (it depends on no other unit, e.g. a unit no task uses).
    """
    idx = list(chains)
    cs, cc, ch, raw = (t[:, idx].sum(1) for t in (sums.cond_sum, sums.cond_cnt, sums.cond_entropy, sums.raw))
    return _marginals(cs, cc, ch, raw, count)


def _marginals(cs: Tensor, cc: Tensor, ch: Tensor, raw: Tensor, count: float) -> tuple[Tensor, Tensor, Tensor]:
    """Importance, dependence and proposal counts from summed conditionals, counts, entropies, indicators."""
    imp = torch.where(cc > 0, cs / cc.clamp_min(1), raw / count).clamp(0, 1)
    h = binary_entropy_bits(imp)
    dependence = (h - torch.where(cc > 0, ch / cc.clamp_min(1), h)).clamp_min(0)
    return imp, dependence, cc


def leave_one_out_marginals(sums: ChainSums, kept: int) -> tuple[Tensor, Tensor, Tensor]:
    """The jackknife's importance, dependence and proposal counts ``[C, T, d]``: chain ``k`` left out in row ``k``.

    The sums run over the other chains in their order (not the total minus the left-out chain, whose rounding
    would differ): a unit whose conditional never moved keeps a dependence of exactly the same value.
    """
    c = sums.cond_sum.shape[1]
    keep = torch.arange(c, device=sums.cond_sum.device)
    others = keep[None, :].expand(c, c)[keep[:, None] != keep[None, :]].reshape(c, c - 1)  # [C, C - 1]
    cs, cc, ch, raw = (t[:, others].sum(2).transpose(0, 1) for t in (sums.cond_sum, sums.cond_cnt, sums.cond_entropy, sums.raw))
    return _marginals(cs, cc, ch, raw, (c - 1) * kept)


def chain_joints(sums: ChainSums) -> Tensor:
    """Every chain's :meth:`ChainSums.chain_joint` at once ``[T, C, d, d]`` (one ``index_add_``, same sums)."""
    num_tasks, c, _, d = sums.traces.shape
    rows = sums.traces.to(torch.float64) * sums.conds[..., None]  # [T, C, S, d]
    # row (task, chain, unit) of the flat [T * C * d, d] result: each destination row adds its steps in order
    index = (torch.arange(num_tasks * c, device=rows.device) * d).reshape(num_tasks, c, 1) + sums.flips
    out = torch.zeros(num_tasks * c * d, d, dtype=torch.float64, device=rows.device)
    return out.index_add_(0, index.reshape(-1), rows.reshape(-1, d)).reshape(num_tasks, c, d, d)


def _pair_information(importance: Tensor, count: Tensor, joint: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Plug-in ``I(m_i; m_j)`` in bits of the pairs ``(i[k], j[k])`` ``[..., P]`` of one task.

    ``joint`` row ``u`` (``[..., d, d]``): the sum, over the steps proposing unit ``u``, of ``m_v P(m_u = 1 |
    m_-u)``, whose mean estimates ``P(m_u = 1, m_v = 1)``; ``count`` ``[..., d]``: those steps per unit. The two
    estimates of a pair's joint (rows ``i`` and ``j``) are averaged and clipped to the range the marginals allow.
    Leading dims (e.g. the jackknife's left-out chain) broadcast.
    """
    n = count.clamp_min(1)
    pi, pj = importance[..., i], importance[..., j]
    j11 = (joint[..., j, i] / n[..., j] + joint[..., i, j] / n[..., i]) / 2
    j11 = torch.maximum(torch.minimum(j11, torch.minimum(pi, pj)), (pi + pj - 1).clamp_min(0))
    cells = torch.stack([j11, pi - j11, pj - j11, 1 - pi - pj + j11]).clamp_min(0)
    p = importance.clamp(0, 1)
    negentropy = torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)  # -H(m_u) in nats
    mi = torch.special.xlogy(cells, cells).sum(dim=0) - negentropy[..., i] - negentropy[..., j]  # H(m_i) + H(m_j) - H(m_i, m_j)
    return (mi / LOG2).clamp_min(0)  # rounding can give -1e-17


@dataclass
class _Complexity:
    """The MCMC manifold complexity ``[T]``, its jackknife replicates ``[C, T]``, the pairs counted and left out."""

    value: Tensor
    replicates: Tensor | None
    pairs: Tensor
    left_out_bits: Tensor


def _pairwise_complexity(
    sums: ChainSums, marginals: tuple[Tensor, Tensor, Tensor], loo: tuple[Tensor, Tensor, Tensor] | None
) -> _Complexity:
    """Sum of the pairwise informations ``I(m_i; m_j)`` of the mask posterior per task, resolved pairs only.

    ``marginals``: :func:`_chain_marginals` over all chains ``[T, d]``; ``loo``: :func:`leave_one_out_marginals`
    ``[C, T, d]`` (``None``: one chain). Every pair's plug-in information is jackknife bias-corrected over the
    chains (it is biased upwards by ``O(1 / samples)``). On a wide layer most of the ``d (d - 1) / 2`` pairs
    carry almost no information while each corrected estimate keeps a noise of its own, and their sum is then
    noise (hundreds of bits, of either sign, at a few proposals per unit and chain). So a pair counts only
    where its information can be resolved: where its bound ``min(I(m_i; m_-i), I(m_j; m_-j))`` (the units'
    dependence on the rest, measured with little noise from the conditionals) exceeds the typical noise of a
    pair's estimate, the median jackknife standard error over the dependent pairs. A left-out pair's
    information is at most its bound, below that noise: leaving it out biases the sum downwards by at most
    ``left_out_bits`` (the sum of those bounds) and removes its noise. Where every dependent pair is
    resolved, as on small layers run long enough, nothing is left out and the sum is the jackknifed sum over
    all pairs. The replicates recompute the sum over the same pairs with one chain left out. All chains of a
    task are computed at once (their joints by one ``index_add_``, the left-out sums broadcast over chains).
    """
    num_tasks, c, d = sums.cond_sum.shape
    device = sums.cond_sum.device
    value = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    pairs = torch.zeros(num_tasks, dtype=torch.long, device=device)
    left_out = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    replicates = torch.zeros(c, num_tasks, dtype=torch.float64, device=device) if c >= 2 else None
    if d * d > MAX_JOINT_ELEMENTS:  # [d, d] matrices do not fit: no estimate
        nan = torch.full((num_tasks,), math.nan, dtype=torch.float64, device=device)
        return _Complexity(nan, None if replicates is None else replicates.fill_(math.nan), pairs, nan.clone())
    imp, dep, cc = marginals
    # the dependent pairs of every task: a unit that depends on no other unit (I(m_u; m_-u) = 0) shares no information
    dependent = torch.triu(dep.gt(0)[:, :, None] & dep.gt(0)[:, None, :], diagonal=1)  # [T, d, d], i < j
    task_pairs = [torch.nonzero(dependent[t]).T for t in range(num_tasks)]
    with_pairs = [t for t in range(num_tasks) if task_pairs[t].shape[1]]
    if replicates is not None:
        replicates[:, [t for t in range(num_tasks) if t not in with_pairs]] = 0.0  # no pair carries information
    if not with_pairs:
        return _Complexity(value, replicates, pairs, left_out)
    # per chain joints of the tasks with pairs [T', C, d, d], and their totals summed chain after chain
    joints = chain_joints(sums) if len(with_pairs) == num_tasks else _subset_joints(sums, with_pairs)
    totals = torch.zeros(joints.shape[0], d, d, dtype=torch.float64, device=device)
    for k in range(c):
        totals = totals + joints[:, k]
    for row, t in enumerate(with_pairs):
        i, j = task_pairs[t]
        bound = torch.minimum(dep[t, i], dep[t, j])
        total = totals[row]
        mi = _pair_information(imp[t], cc[t], total, i, j)
        if replicates is None or loo is None:  # one chain: the plug-in sum, with no error bar
            value[t], pairs[t] = mi.sum(), i.numel()
            continue
        imp_k, dep_k, cc_k = (v[:, t] for v in loo)  # [C, d]
        mi_k = _pair_information(imp_k, cc_k, total - joints[row], i, j)  # [C, P]: chain k left out in row k
        mi_k = torch.where((dep_k[:, i] > 0) & (dep_k[:, j] > 0), mi_k, torch.zeros_like(mi_k))
        s1, s2 = torch.zeros_like(mi), torch.zeros_like(mi)
        for k in range(c):  # in turn, as the jackknife sums them
            s1 += mi_k[k]
            s2 += mi_k[k] * mi_k[k]
        corrected = c * mi - (c - 1) * s1 / c
        se = ((c - 1) / c * (s2 - s1 * s1 / c)).clamp_min(0).sqrt()  # the jackknife SE of each pair
        counted = bound > (se.median() if se.numel() else 0.0)
        value[t], pairs[t], left_out[t] = corrected[counted].sum(), counted.sum(), bound[~counted].sum()
        replicates[:, t] = mi_k[:, counted].sum(dim=1)
    return _Complexity(value, replicates, pairs, left_out)


def _subset_joints(sums: ChainSums, tasks: list[int]) -> Tensor:
    """:func:`chain_joints` of some tasks ``[T', C, d, d]``."""
    index = torch.tensor(tasks, device=sums.traces.device)
    part = ChainSums(
        flips=sums.flips[index], conds=sums.conds[index], traces=sums.traces[index], cond_sum=sums.cond_sum[index],
        cond_cnt=sums.cond_cnt[index], cond_entropy=sums.cond_entropy[index], raw=sums.raw[index],
        accepted=sums.accepted[index], seconds_per_step=sums.seconds_per_step,
    )  # fmt: skip
    return chain_joints(part)


def chain_ess(traces: Tensor) -> Tensor:
    """Multi-chain effective sample size of ``traces`` ``[..., C, S, d]`` (Geyer's initial positive sequence) ``[..., d]``.

    Leading dims (e.g. tasks) are independent sets of chains; they run one (or, when small, a few) at a time: a
    batch of all tasks at once leaves the cache and was 2-3x slower. The chains' mean autocovariance is the inverse
    FFT of their mean power spectrum (the inverse transform is linear): one inverse FFT per unit rather than per
    chain and unit.
    """
    *lead, c, s, d = traces.shape
    flat = traces.reshape(-1, c, s, d)
    per = max(1, 2**18 // max(1, c * s * d))  # sets of chains per FFT batch (two of 10 x 8 x 32 x 1600 were 2x slower)
    parts = [_ess(flat[i : i + per]) for i in range(0, flat.shape[0], per)]
    out = torch.cat(parts) if parts else torch.empty(0, d, dtype=torch.float64, device=traces.device)
    return out.reshape(*lead, d)


def _ess(traces: Tensor) -> Tensor:
    """:func:`chain_ess` of ``traces`` ``[B, C, S, d]`` ``[B, d]``."""
    _, c, s, _ = traces.shape
    x = traces.transpose(2, 3).double()  # [B, C, d, S]: the FFT runs over contiguous steps
    x = x - x.mean(dim=(1, 3), keepdim=True)
    var = (x * x).mean(dim=(1, 3))  # [B, d]
    f = torch.fft.rfft(x, n=2 * s, dim=3)
    squares = torch.view_as_real(f).square()  # contiguous (re^2, im^2): twice the speed of f.real / f.imag views
    power = (squares[..., 0] + squares[..., 1]).mean(dim=1)  # [B, d, s + 1]: the chains' mean |F|^2
    acov = torch.fft.irfft(power, n=2 * s, dim=2)[..., :s].transpose(1, 2) / s  # [B, s, d]
    rho = acov / var.clamp_min(1e-300)[:, None, :]
    # pairs rho_k + rho_{k+1} for k = 1, 3, 5, ..., summed up to (excluding) the first negative pair
    m = len(range(1, s - 1, 2))
    pairs = rho[:, 1 : 1 + 2 * m : 2] + rho[:, 2 : 2 + 2 * m : 2]  # [B, m, d]
    total = (pairs * (pairs >= 0).to(pairs.dtype).cumprod(dim=1)).sum(dim=1)
    ess = torch.where(total > -0.5, c * s / (1 + 2 * total), torch.full_like(total, float(c * s)))
    ess = torch.where(var > 0, ess, torch.full_like(ess, float(c * s)))
    return ess
