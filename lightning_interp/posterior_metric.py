"""The torchmetrics metric :class:`PosteriorGap`, apart from :mod:`lightning_interp.posterior`.

It lives in its own module because ``import torchmetrics`` pulls torchvision, scipy and matplotlib (seconds);
:mod:`lightning_interp.posterior` imports it on first use of ``lightning_interp.posterior.PosteriorGap``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_interp.posterior import GAP_MEASURES, per_sample_gap
from lightning_interp.stats import mean_standard_error

__all__ = ["PosteriorGap"]


class PosteriorGap(Metric):
    """Streaming posterior-gap metric (torchmetrics) over :func:`posterior_gap`.

    ``update(logits, true_posterior, target=None, log_density=None)`` accumulates, in float64, the sums
    of every measure of :data:`GAP_MEASURES`; with labels ``target`` it also accumulates the
    cross-entropy of the network and the conditional entropy of the posterior on the same samples, so
    ``excess_ce = CE(q) - H(C|X)`` is a paired, low-variance estimate (its expectation is the mean
    KL), and ``accuracy_gap = bayes_accuracy - accuracy`` compares the posterior's and the network's
    argmax on the same samples. With ``density_edges`` (increasing log-density bin edges) and
    ``log_density`` in ``update``, each measure is also reported per bin of input density, which
    shows *where* the gap is (the low-density regions of the post's preset 3).

    Args:
        log_target: whether ``true_posterior`` holds log-probabilities.
        density_edges: ``B - 1`` increasing inner bin edges of ``log p(x)``; bins are
            ``(-inf, e_0], (e_0, e_1], ..., (e_{B-2}, inf)``.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = PosteriorGap()
        >>> metric.update(torch.zeros(2, 2), torch.tensor([[0.5, 0.5], [0.9, 0.1]]), target=torch.tensor([0, 0]))
        >>> out = metric.compute()
        >>> sorted(out)[:4]
        ['accuracy', 'accuracy_gap', 'accuracy_gap_se', 'accuracy_se']
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    # the states add_state registers (declared for type checkers: a Module attribute is otherwise Tensor | Module)
    gap_sum: Tensor
    gap_sq_sum: Tensor
    gap_worst: Tensor
    count: Tensor
    label_sum: Tensor
    label_sq_sum: Tensor
    bin_sum: Tensor
    bin_sq_sum: Tensor
    bin_count: Tensor
    density_edges: Tensor | None

    def __init__(self, log_target: bool = False, density_edges: Tensor | Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_target = log_target
        num = len(GAP_MEASURES)
        self.add_state("gap_sum", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gap_sq_sum", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gap_worst", torch.zeros(num, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # ce, entropy, correct (network), correct (posterior), labelled count
        self.add_state("label_sum", torch.zeros(5, dtype=torch.float64), dist_reduce_fx="sum")
        # squares of the per-example excess cross-entropy and of the per-example accuracy difference
        self.add_state("label_sq_sum", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        if density_edges is not None:
            edges = torch.as_tensor(density_edges, dtype=torch.float64).flatten()
            if edges.numel() and (edges[1:] <= edges[:-1]).any():
                raise ValueError("density_edges must be strictly increasing")
            self.register_buffer("density_edges", edges, persistent=False)
            bins = edges.numel() + 1
            self.add_state("bin_sum", torch.zeros(num, bins, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("bin_sq_sum", torch.zeros(num, bins, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("bin_count", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        else:
            self.density_edges = None

    def update(
        self,
        logits: Tensor,
        true_posterior: Tensor,
        target: Tensor | None = None,
        log_density: Tensor | None = None,
    ) -> None:
        """Accumulate a batch; see the class docstring for the arguments."""
        per = per_sample_gap(logits, true_posterior, self.log_target)
        stacked = torch.stack([per[k] for k in GAP_MEASURES])  # [M, N]
        self.gap_sum += stacked.sum(dim=1)
        self.gap_sq_sum += stacked.pow(2).sum(dim=1)
        if stacked.shape[1]:
            self.gap_worst = torch.maximum(self.gap_worst, stacked.max(dim=1).values)
        self.count += logits.shape[0]
        if target is not None:
            if target.shape != logits.shape[:1]:
                raise ValueError(f"target must have shape [{logits.shape[0]}], got {list(target.shape)}")
            target = target.to(logits.device).long()
            lq = torch.log_softmax(logits.double(), dim=1)
            t = true_posterior.to(device=logits.device, dtype=torch.float64)
            lp = t if self.log_target else t.log()
            ce_i = -lq.gather(1, target[:, None])[:, 0]
            ent_i = -torch.where(lp > -math.inf, lp.exp() * lp, torch.zeros_like(lp)).sum(dim=1)
            hit_q = (lq.argmax(dim=1) == target).double()
            hit_p = (lp.argmax(dim=1) == target).double()
            ce, ent, correct_q, correct_p = ce_i.sum(), ent_i.sum(), hit_q.sum(), hit_p.sum()
            self.label_sq_sum += torch.stack([(ce_i - ent_i).pow(2).sum(), (hit_p - hit_q).pow(2).sum()])
            self.label_sum += torch.stack(
                [
                    ce,
                    ent,
                    correct_q.double(),
                    correct_p.double(),
                    torch.tensor(float(len(target)), dtype=torch.float64, device=logits.device),
                ]
            )
        if self.density_edges is not None:
            if log_density is None:
                raise ValueError("this PosteriorGap has density_edges: pass log_density=task.log_density(x) to update()")
            idx = torch.bucketize(log_density.to(device=logits.device, dtype=torch.float64), self.density_edges.to(logits.device))
            self.bin_sum.index_add_(1, idx, stacked)
            self.bin_sq_sum.index_add_(1, idx, stacked.pow(2))
            self.bin_count += torch.bincount(idx, minlength=self.bin_count.numel()).double()

    def compute(self) -> dict[str, Tensor]:
        """The mean of every gap measure, plus the labelled and per-density-bin summaries when available.

        Returns:
            ``{measure: mean}`` for :data:`GAP_MEASURES`, with ``<measure>_se`` (the standard error of
            that mean over the examples, :func:`~lightning_interp.stats.mean_standard_error`) and ``<measure>_worst`` (the
            largest per-example value: ``max_abs_worst`` is the worst ``|p - q|`` over the examples);
            with labels also ``cross_entropy``, ``conditional_entropy``, ``excess_ce``, ``accuracy``,
            ``bayes_accuracy`` and ``accuracy_gap`` (the last four with ``_se``); with density bins
            ``<measure>_by_density`` and ``<measure>_se_by_density`` (``[B]``, NaN for an empty bin)
            and ``count_by_density``.
        """
        out = {k: self.gap_sum[i] / self.count for i, k in enumerate(GAP_MEASURES)}
        for i, k in enumerate(GAP_MEASURES):
            out[f"{k}_se"] = mean_standard_error(self.gap_sum[i], self.gap_sq_sum[i], self.count)
            out[f"{k}_worst"] = self.gap_worst[i].clone()
        n = self.label_sum[4]
        if n > 0:
            ce, ent, cq, cp = (self.label_sum[i] / n for i in range(4))
            out.update(
                cross_entropy=ce,
                conditional_entropy=ent,
                excess_ce=ce - ent,
                excess_ce_se=mean_standard_error(self.label_sum[0] - self.label_sum[1], self.label_sq_sum[0], n),
                accuracy=cq,
                accuracy_se=mean_standard_error(self.label_sum[2], self.label_sum[2], n),  # 0/1 values: x^2 = x
                bayes_accuracy=cp,
                bayes_accuracy_se=mean_standard_error(self.label_sum[3], self.label_sum[3], n),
                accuracy_gap=cp - cq,
                accuracy_gap_se=mean_standard_error(self.label_sum[3] - self.label_sum[2], self.label_sq_sum[1], n),
            )
        if self.density_edges is not None:
            count = self.bin_count[None, :]
            per_bin = self.bin_sum / count.clamp_min(1)
            per_bin = torch.where(count > 0, per_bin, torch.full_like(per_bin, math.nan))
            se_bin = mean_standard_error(self.bin_sum, self.bin_sq_sum, count)
            for i, k in enumerate(GAP_MEASURES):
                out[f"{k}_by_density"] = per_bin[i]
                out[f"{k}_se_by_density"] = se_bin[i]
            out["count_by_density"] = self.bin_count.clone()
        return out
