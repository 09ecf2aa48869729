"""PottsTask and PottsDataModule: planted parameters, energies, exact and Gibbs sampling, Bayes log-odds, batches."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from scipy.stats import chisquare

from lightning_interp.datamodules import PottsDataModule
from lightning_interp.datamodules.potts import one_hot_flat
from lightning_interp.encoding import zero_sum_gauge
from lightning_interp.models import MLPClassifier
from lightning_interp.tasks import Estimate, PottsTask

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _naive_energy(dm: PottsDataModule, sigma: list[int], c: int) -> float:
    """``E_c(sigma)`` by the definition, one term at a time."""
    h, j = dm.fields[c], dm.couplings[c]
    total = sum(float(h[i, sigma[i]]) for i in range(dm.seq_len))
    total += sum(float(j[i, k, sigma[i], sigma[k]]) for i in range(dm.seq_len) for k in range(i + 1, dm.seq_len))
    return -total


def _exact_marginals(dm: PottsDataModule, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact single-site ``[L, q]`` and pairwise ``[L, L, q, q]`` marginals of class ``c``, by enumeration."""
    states = dm.all_states()
    p = dm.log_prob(states, c).exp()
    x = one_hot_flat(states, dm.num_states).double().reshape(len(states), dm.seq_len, dm.num_states)
    single = torch.einsum("n,nia->ia", p, x)
    pair = torch.einsum("n,nia,njb->ijab", p, x, x)
    return single, pair


def _empirical_marginals(states: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = one_hot_flat(states, q).double().reshape(len(states), states.shape[1], q)
    return x.mean(0), torch.einsum("nia,njb->ijab", x, x) / len(states)


def _assert_close_to(freq: torch.Tensor, prob: torch.Tensor, n: int, z: float = 5.0, slack: float = 0.0) -> None:
    """Empirical frequencies within ``z`` binomial standard errors (plus ``slack``) of the exact probabilities."""
    se = (prob * (1 - prob) / n).sqrt()
    diff = (freq - prob).abs()
    assert torch.all(diff <= z * se + slack + 1e-12), float((diff - z * se).max())


# ---------------------------------------------------------------------------------------------------------------
# planted parameters and energies


def test_planted_parameters_shapes_symmetry_and_structure() -> None:
    dm = PottsDataModule(seq_len=6, num_states=3, num_pairs=3)
    length, q = 6, 3
    assert dm.fields.shape == (2, length, q) and dm.fields.dtype == torch.float64
    assert dm.couplings.shape == (2, length, length, q, q) and dm.couplings.dtype == torch.float64
    assert torch.equal(dm.couplings, dm.couplings.permute(0, 2, 1, 4, 3))
    assert torch.all(dm.couplings[:, range(length), range(length)] == 0)
    assert dm.pairs.shape == (3, 2) and torch.all(dm.pairs[:, 0] < dm.pairs[:, 1])
    # the class-specific couplings live on the planted pairs only (the shared background cancels)
    diff = dm.planted_coupling_difference()
    assert torch.equal(diff, dm.couplings[1] - dm.couplings[0])
    planted = torch.zeros(length, length, dtype=torch.bool)
    planted[dm.pairs[:, 0], dm.pairs[:, 1]] = planted[dm.pairs[:, 1], dm.pairs[:, 0]] = True
    block_norm = diff.abs().amax(dim=(2, 3))
    assert torch.all(block_norm[planted] > 0.1) and torch.all(block_norm[~planted] < 1e-12)
    # the background itself is present (both classes share the same non-zero couplings off the planted pairs)
    assert dm.couplings[0][~planted].abs().max() > 0.01
    assert torch.equal(dm.planted_field_difference(), dm.fields[1] - dm.fields[0])
    # raw, not gauge-fixed: the field difference does not sum to zero over states
    assert dm.planted_field_difference().sum(1).abs().max() > 1e-3
    # the planted blocks are pure interactions: every row and column of each class's block sums to zero
    planted_blocks = diff[dm.pairs[:, 0], dm.pairs[:, 1]]  # D^1 - D^0: the shared background cancels
    assert planted_blocks.sum(-1).abs().max() < 1e-12 and planted_blocks.sum(-2).abs().max() < 1e-12
    block = dm.couplings[0][dm.pairs[:, 0], dm.pairs[:, 1]]  # background + D^0: the background is not zero-sum
    assert block.sum(-1).abs().max() > 0.01


def test_energy_matches_naive_loop() -> None:
    dm = PottsDataModule(seq_len=5, num_states=3, num_pairs=2, seed=3)
    states = torch.randint(0, 3, (40, 5), generator=torch.Generator().manual_seed(0))
    for c in (0, 1):
        naive = torch.tensor([_naive_energy(dm, s, c) for s in states.tolist()], dtype=torch.float64)
        got = dm.energy(states, c)
        assert got.dtype == torch.float64 and got.shape == (40,)
        torch.testing.assert_close(got, naive, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="class"):
        dm.energy(states, 2)
    with pytest.raises(ValueError, match="shape"):
        dm.energy(states[:, :4], 0)


def test_zero_sum_gauge_preserves_energy_and_is_zero_sum() -> None:
    dm = PottsDataModule(seq_len=4, num_states=3, seed=1)
    h, j = dm.planted_field_difference(), dm.planted_coupling_difference()
    _, hg, jg = zero_sum_gauge(h, j)
    assert hg.sum(1).abs().max() < 1e-12
    assert jg.sum(2).abs().max() < 1e-12 and jg.sum(3).abs().max() < 1e-12
    states = dm.all_states()
    x = one_hot_flat(states, 3).double().reshape(len(states), 4, 3)

    def pairwise(hh: torch.Tensor, jj: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nia,ia->n", x, hh) + 0.5 * torch.einsum("nia,ijab,njb->n", x, jj, x)

    delta = pairwise(h, j) - pairwise(hg, jg)  # only a constant may differ
    assert (delta - delta.mean()).abs().max() < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# sampling


def test_exact_sampling_matches_enumerated_probabilities() -> None:
    dm = PottsDataModule(seq_len=3, num_states=3, num_pairs=1, coupling_scale=1.5, seed=2)
    assert dm.enumerable and dm.num_sequences == 27
    states = dm.all_states()
    assert states.shape == (27, 3) and len({tuple(s) for s in states.tolist()}) == 27
    n = 200_000
    g = torch.Generator().manual_seed(5)
    for c in (0, 1):
        prob = dm.log_prob(states, c).exp()
        assert math.isclose(float(prob.sum()), 1.0, abs_tol=1e-12)
        sample = dm.sample_states(c, n, g)
        index = (sample * torch.tensor([9, 3, 1])).sum(1)
        counts = torch.bincount(index, minlength=27).double()
        assert chisquare(counts.numpy(), (n * prob).numpy()).pvalue > 1e-4
        _assert_close_to(counts / n, prob, n)
    # and the two classes really differ: class 0's probabilities are not class 1's
    assert (dm.log_prob(states, 0) - dm.log_prob(states, 1)).abs().max() > 0.5


def test_task_samples_match_the_enumerated_joint() -> None:
    """The task's GenerativeTask sampler (one-hot inputs, labels from the priors) against the exact ``pi_c P_c``."""
    task = PottsTask(seq_len=3, num_states=3, num_pairs=1, coupling_scale=1.5, seed=2)
    n = 60_000
    x, y = task.sample(n, torch.Generator().manual_seed(9))
    assert x.shape == (n, 9) and x.dtype == torch.float32 and torch.equal(x.reshape(n, 3, 3).sum(2), torch.ones(n, 3))
    states = x.reshape(n, 3, 3).argmax(2)
    cell = y * 27 + (states * torch.tensor([9, 3, 1])).sum(1)
    counts = torch.bincount(cell, minlength=54).double()
    every = task.all_states()
    joint = torch.cat([0.5 * task.log_prob(every, c).exp() for c in (0, 1)])
    assert math.isclose(float(joint.sum()), 1.0, abs_tol=1e-12)
    assert chisquare(counts.numpy(), (n * joint).numpy()).pvalue > 1e-4
    _assert_close_to(counts / n, joint, n)
    # the Bayes accuracy is exact here, not a Monte-Carlo estimate
    assert task.bayes_accuracy() == Estimate(task.exact_bayes_accuracy(), 0.0)
    assert math.isclose(task.exact_bayes_accuracy(), float(torch.maximum(joint[:27], joint[27:]).sum()), abs_tol=1e-12)


def test_datamodule_draws_its_splits_through_its_task() -> None:
    """One planted model and one sampler: the datamodule's data are its task's draws, enumerated or Gibbs."""
    model = dict(seq_len=3, num_states=3, num_pairs=1, seed=2)
    # few Gibbs sweeps: equality of the draws is the point here, not their distribution
    for extra in ({}, dict(max_enumeration=10, gibbs_burn_in=2, gibbs_sweeps=1, gibbs_chains=8)):
        dm = PottsDataModule(**model, **extra, n_train=40, n_val=20, n_test=10)
        task = PottsTask(**model, **extra)
        assert dm.enumerable == task.enumerable == (not extra)
        assert torch.equal(dm.fields, task.fields) and torch.equal(dm.couplings, task.couplings)
        assert torch.equal(dm.pairs, task.pairs)
        dm.setup()
        for k, (name, n) in enumerate((("train", 40), ("val", 20), ("test", 10))):
            states, y = task.draw(n, torch.Generator().manual_seed(4 * 2 + 1 + k))
            assert torch.equal(dm.states[name], states) and torch.equal(dm.labels[name], y)
            assert torch.equal(dm._splits[name].tensors[0], one_hot_flat(states, 3))
        states, y = dm.sample(30, torch.Generator().manual_seed(1))
        again = task.draw(30, torch.Generator().manual_seed(1))
        assert torch.equal(states, again[0]) and torch.equal(y, again[1])
    one = PottsDataModule(seq_len=4, num_states=3)
    assert one.task is one.task  # one task per datamodule, which the splits were drawn from
    draws = [f(1, 10, torch.Generator().manual_seed(0)) for f in (one.task.sample_states, one.sample_states)]
    assert torch.equal(*draws)


def test_training_split_single_site_marginals_match() -> None:
    dm = PottsDataModule(n_train=20_000, n_val=10, n_test=10)
    dm.setup()
    states, y = dm.states["train"], dm.labels["train"]
    assert abs(float(y.double().mean()) - 0.5) < 0.02
    for c in (0, 1):
        single, _ = _exact_marginals(dm, c)
        sub = states[y == c]
        freq, _ = _empirical_marginals(sub, dm.num_states)
        _assert_close_to(freq, single, len(sub))


def test_gibbs_sampling_matches_enumeration() -> None:
    kwargs = dict(seq_len=4, num_states=3, num_pairs=2, coupling_scale=1.5, shared_scale=0.5, seed=4)
    exact = PottsDataModule(**kwargs)
    gibbs = PottsDataModule(**kwargs, max_enumeration=1, gibbs_burn_in=50, gibbs_sweeps=5, gibbs_chains=2_000)
    assert not gibbs.enumerable and torch.equal(exact.couplings, gibbs.couplings)
    n = 30_000
    g = torch.Generator().manual_seed(6)
    for c in (0, 1):
        single, pair = _exact_marginals(exact, c)
        sample = gibbs.sample_states(c, n, g)
        assert sample.shape == (n, 4) and sample.dtype == torch.int64
        freq, pair_freq = _empirical_marginals(sample, 3)
        # samples of one chain are a few sweeps apart, so allow a little more than the iid standard error
        _assert_close_to(freq, single, n, z=6.0, slack=0.005)
        _assert_close_to(pair_freq, pair, n, z=6.0, slack=0.005)
    # the classes' pairwise marginals differ by much more than that tolerance on the planted pairs
    _, pair0 = _exact_marginals(exact, 0)
    _, pair1 = _exact_marginals(exact, 1)
    assert (pair0 - pair1).abs().max() > 0.05
    # the exact quantities need the enumeration
    states = torch.zeros(2, 4, dtype=torch.long)
    for call in (lambda: gibbs.log_prob(states, 0), lambda: gibbs.bayes_log_odds(states), gibbs.bayes_accuracy, gibbs.all_states):
        with pytest.raises(ValueError, match="max_enumeration"):
            call()


def test_gibbs_setup_draws_splits() -> None:
    dm = PottsDataModule(seq_len=5, num_states=3, n_train=300, n_val=50, n_test=0, max_enumeration=10, gibbs_burn_in=5)
    dm.setup()
    assert dm.states["train"].shape == (300, 5) and dm.states["test"].shape == (0, 5)
    assert dm.states["train"].min() >= 0 and dm.states["train"].max() < 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 15) and y.shape == (128,)


# ---------------------------------------------------------------------------------------------------------------
# Bayes log-odds


def test_bayes_log_odds_equals_enumerated_posterior() -> None:
    dm = PottsDataModule(seq_len=4, num_states=3, num_pairs=2, seed=7)
    states = dm.all_states()
    # independently: naive energies, normalised by summing over every sequence, then Bayes' rule with priors 1/2
    energies = torch.tensor([[_naive_energy(dm, s, c) for s in states.tolist()] for c in (0, 1)], dtype=torch.float64)
    log_lik = -energies - torch.logsumexp(-energies, dim=1, keepdim=True)
    log_joint = log_lik + math.log(0.5)
    log_post = log_joint - torch.logsumexp(log_joint, dim=0, keepdim=True)
    expected = log_post[1] - log_post[0]
    torch.testing.assert_close(dm.bayes_log_odds(states), expected, rtol=0, atol=1e-10)
    for c in (0, 1):
        torch.testing.assert_close(dm.log_prob(states, c), log_lik[c], rtol=0, atol=1e-10)
    assert math.isclose(dm.bayes_accuracy(), float(log_joint.max(dim=0).values.exp().sum()), abs_tol=1e-12)


def test_task_is_the_exact_posterior_of_the_datamodule() -> None:
    """``dm.task`` (a GenerativeTask over one-hot inputs) has the naive-enumeration posterior and density."""
    dm = PottsDataModule(seq_len=4, num_states=3, num_pairs=2, seed=7)
    states = dm.all_states()
    energies = torch.tensor([[_naive_energy(dm, s, c) for s in states.tolist()] for c in (0, 1)], dtype=torch.float64)
    log_lik = (-energies - torch.logsumexp(-energies, dim=1, keepdim=True)).T  # [N, 2]
    task = dm.task
    x = one_hot_flat(states, 3)
    assert task.dim == 12 and task.num_classes == 2 and task.input_shape == (12,)
    torch.testing.assert_close(task.class_log_likelihood(x.double()), log_lik, rtol=0, atol=1e-10)
    torch.testing.assert_close(task.log_density(x), torch.logsumexp(log_lik + math.log(0.5), dim=1), rtol=0, atol=1e-10)
    # the marginal over all sequences sums to one, and the task's samples are one-hot sequences of both classes
    assert math.isclose(float(task.log_density(x).exp().sum()), 1.0, abs_tol=1e-12)
    xs, ys = task.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(xs.reshape(64, 4, 3).sum(2), torch.ones(64, 4)) and set(ys.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="one_hot"):
        _ = PottsDataModule(seq_len=4, num_states=3, encoding="states").task
    with pytest.raises(ValueError, match="max_enumeration"):
        _ = PottsDataModule(seq_len=4, num_states=3, max_enumeration=10).task


def test_bayes_log_odds_is_the_planted_pairwise_energy() -> None:
    length, q = 4, 3
    dm = PottsDataModule(seq_len=length, num_states=q, num_pairs=2, seed=8)
    f = dm.bayes_log_odds(dm.all_states()).reshape((q,) * length)  # axis i = site i (lexicographic order)
    # brute-force ANOVA under the uniform measure
    e0 = f.mean()
    h = torch.stack([f.mean(dim=tuple(k for k in range(length) if k != i)) - e0 for i in range(length)])
    j = torch.zeros(length, length, q, q, dtype=torch.float64)
    for i, k in itertools.combinations(range(length), 2):
        m = f.mean(dim=tuple(s for s in range(length) if s not in (i, k)))
        j[i, k] = m - h[i][:, None] - h[k][None, :] - e0
        j[k, i] = j[i, k].T
    recon = e0.expand_as(f).clone()
    for i in range(length):
        shape = [1] * length
        shape[i] = q
        recon = recon + h[i].reshape(shape)
    for i, k in itertools.combinations(range(length), 2):
        shape = [1] * length
        shape[i] = shape[k] = q
        recon = recon + j[i, k].reshape(shape)
    assert (f - recon).abs().max() < 1e-10  # no term of order >= 3
    assert f.std() > 0.5  # and a non-trivial function
    _, h_gauge, j_gauge = zero_sum_gauge(dm.planted_field_difference(), dm.planted_coupling_difference())
    torch.testing.assert_close(j, j_gauge, rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h_gauge, rtol=0, atol=1e-10)
    # the strong couplings sit on the planted pairs
    norms = j.abs().amax(dim=(2, 3))
    assert torch.all(norms[dm.pairs[:, 0], dm.pairs[:, 1]] > 0.1)
    assert float(norms.sum() - 2 * norms[dm.pairs[:, 0], dm.pairs[:, 1]].sum()) < 1e-10


def test_bayes_accuracy_with_defaults() -> None:
    dm = PottsDataModule(n_train=0, n_val=0, n_test=20_000)
    acc = dm.bayes_accuracy()
    assert 0.7 < acc < 0.99
    dm.setup()
    states, y = dm.states["test"], dm.labels["test"]
    empirical = float(((dm.bayes_log_odds(states) > 0).long() == y).double().mean())
    assert abs(empirical - acc) < 5 * math.sqrt(acc * (1 - acc) / len(y))


# ---------------------------------------------------------------------------------------------------------------
# batches, seeds, arguments


def test_one_hot_batches_site_major() -> None:
    dm = PottsDataModule(seq_len=5, num_states=4, n_train=100, n_val=70, n_test=30, batch_size=32)
    assert (dm.seq_len, dm.num_states, dm.num_classes) == (5, 4, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 20) and x.dtype == torch.float32 and y.shape == (32,) and y.dtype == torch.int64
    xs, ys = zip(*dm.val_dataloader(), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    states = dm.states["val"]
    assert x.shape == (70, 20) and torch.equal(y, dm.labels["val"])
    for n, i, a in itertools.product(range(70), range(5), range(4)):
        assert x[n, i * 4 + a] == float(states[n, i] == a)
    assert torch.equal(x, one_hot_flat(states, 4))


def test_states_batches() -> None:
    dm = PottsDataModule(seq_len=5, num_states=4, n_train=100, n_val=70, n_test=30, batch_size=32, encoding="states")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (30, 5) and x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(x, dm.states["test"]) and torch.equal(y, dm.labels["test"])


def test_one_hot_flat() -> None:
    states = torch.tensor([[2, 0, 1], [1, 1, 0]])
    x = one_hot_flat(states, 3)
    assert x.dtype == torch.float32 and x.shape == (2, 9)
    assert x[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 0]
    for bad in (torch.tensor([0, 1]), torch.tensor([[0, 3]]), torch.tensor([[-1, 0]]), torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ValueError):
            one_hot_flat(bad, 3)


def test_seeded_reproducibility() -> None:
    kwargs = dict(seq_len=5, num_states=3, n_train=200, n_val=20, n_test=20)
    a, b, other = PottsDataModule(**kwargs), PottsDataModule(**kwargs), PottsDataModule(**kwargs, seed=1)
    for dm in (a, b, other):
        dm.setup()
    assert torch.equal(a.fields, b.fields) and torch.equal(a.couplings, b.couplings)
    for split in ("train", "val", "test"):
        assert torch.equal(a.states[split], b.states[split]) and torch.equal(a.labels[split], b.labels[split])
    assert not torch.equal(a.fields, other.fields)
    assert not torch.equal(a.states["train"], other.states["train"])
    assert not torch.equal(a.states["train"], a.states["val"][:1].expand(200, -1))
    # the gibbs path is seeded too
    g_kwargs = dict(kwargs, max_enumeration=1, gibbs_burn_in=3)
    c, d = PottsDataModule(**g_kwargs), PottsDataModule(**g_kwargs)
    c.setup()
    d.setup()
    assert torch.equal(c.states["train"], d.states["train"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_states=1), "num_states"),
        (dict(seq_len=1), "seq_len"),
        (dict(encoding="onehot"), "encoding"),
        (dict(seq_len=3, num_pairs=4), "num_pairs"),
        (dict(num_pairs=-1), "num_pairs"),
        (dict(coupling_scale=-1.0), "scale"),
        (dict(n_train=-1), "n_train"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_enumeration=2**25), "max_enumeration"),
        (dict(gibbs_sweeps=0), "gibbs"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PottsDataModule(**kwargs)


def test_trains_a_classifier_one_step() -> None:
    dm = PottsDataModule(seq_len=4, num_states=3, n_train=64, n_val=16, n_test=16, batch_size=16)
    model = MLPClassifier(in_features=12, num_classes=2, hidden=(8,))
    before = model.net[0].weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 1
    assert not torch.equal(model.net[0].weight, before)


# ---------------------------------------------------------------------------------------------------------------
# data below methods (issue 24)

METHOD_MODULES = ("posterior", "saliency", "ablation", "correlation", "expansion", "gaussian_closure", "sequences")


def test_the_data_imports_no_method_module() -> None:
    """``tasks/`` and the data modules build on :mod:`lightning_interp.encoding` only, never on a method."""
    code = (
        "import sys, lightning_interp.tasks, lightning_interp.datamodules.potts, lightning_interp.datamodules.synthetic\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('lightning_interp'))))"
    )
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout.split()
    assert {"lightning_interp.tasks.potts", "lightning_interp.encoding"} <= set(loaded), loaded
    assert not {f"lightning_interp.{m}" for m in METHOD_MODULES} & set(loaded), loaded


def test_the_old_import_paths_of_the_shared_algebra_still_work() -> None:
    from lightning_interp import encoding
    from lightning_interp.correlation import Quadratic
    from lightning_interp.expansion import one_hot_flat as expansion_one_hot
    from lightning_interp.expansion import reference_gauge
    from lightning_interp.expansion import zero_sum_gauge as expansion_gauge

    assert Quadratic is encoding.Quadratic and expansion_one_hot is encoding.one_hot_flat is one_hot_flat
    assert expansion_gauge is encoding.zero_sum_gauge and reference_gauge is encoding.reference_gauge
