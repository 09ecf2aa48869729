"""Potts (energy) expansion: closed form vs exact, gauges, sampled vs exact, contributions, hidden layers, bad input."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.correlation import Quadratic
from lightning_interp.expansion import Square, expand, one_hot_flat, reference_gauge, zero_sum_gauge

L, Q = 5, 3


def _quadratic_net(out: int = 2, seed: int = 0, act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(L * Q, 7), act or Square(), nn.Linear(7, out)).double()


def _all_states() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(Q), repeat=L)))


def test_quadratic_closed_form_equals_exact_to_machine_precision() -> None:
    for act in (Square(), Quadratic(0.6)):
        model = _quadratic_net(act=act)
        exact = expand(model, L, Q, method="exact")
        closed = expand(model, L, Q, method="quadratic")
        torch.testing.assert_close(closed.constant, exact.constant, rtol=0, atol=1e-13)
        torch.testing.assert_close(closed.fields, exact.fields, rtol=0, atol=1e-13)
        torch.testing.assert_close(closed.couplings, exact.couplings, rtol=0, atol=1e-13)
        assert exact.residual_variance.abs().max() < 1e-25  # no order >= 3 term
        assert exact.variance_explained["residual"].abs().max() < 1e-12


def test_quadratic_terms_match_methods_formulas_before_gauge_fixing() -> None:
    # METHODS.md: f = sum_k v_k (b_k + sum_i W_k,i(sigma_i))^2 gives E0 = sum v b^2,
    # h_i(a) = sum v (2 b W + W^2), J_ij(a, b) = 2 sum v W_k,i(a) W_k,j(b); any sequence's energy must agree
    model = _quadratic_net(out=1, seed=1)
    w = model[0].weight.detach().reshape(7, L, Q)
    b = model[0].bias.detach()
    v = model[2].weight.detach()[0]
    c = model[2].bias.detach()[0]
    h = torch.einsum("k,kia->ia", v, 2 * b[:, None, None] * w + w * w)
    j = 2 * torch.einsum("k,kia,kjb->ijab", v, w, w) * (~torch.eye(L, dtype=torch.bool))[:, :, None, None]
    e0 = (v * b * b).sum() + c
    states = _all_states()
    expansion = expand(model, L, Q, method="exact")
    raw = e0 + h[torch.arange(L), states].sum(1)
    for i, jj in itertools.combinations(range(L), 2):
        raw = raw + j[i, jj, states[:, i], states[:, jj]]
    with torch.no_grad():
        f = model(one_hot_flat(states, Q).double())[:, 0]
    torch.testing.assert_close(raw, f)
    torch.testing.assert_close(expansion.energy(states), f)
    c0, h0, j0 = zero_sum_gauge(h, j, e0)
    torch.testing.assert_close(h0, expansion.fields, rtol=0, atol=1e-12)
    torch.testing.assert_close(j0, expansion.couplings, rtol=0, atol=1e-12)
    torch.testing.assert_close(c0, expansion.constant, rtol=0, atol=1e-12)


def test_gauges_leave_energies_unchanged_and_satisfy_their_conditions() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(L, Q, generator=g, dtype=torch.float64)
    j = torch.randn(L, L, Q, Q, generator=g, dtype=torch.float64)
    j = (j + j.permute(1, 0, 3, 2)) * (~torch.eye(L, dtype=torch.bool))[:, :, None, None]
    e0 = torch.tensor(0.3, dtype=torch.float64)
    states = torch.randint(0, Q, (200, L), generator=g)

    def energy(c: torch.Tensor, hh: torch.Tensor, jj: torch.Tensor) -> torch.Tensor:
        e = c + hh[torch.arange(L), states].sum(1)
        for i, k in itertools.combinations(range(L), 2):
            e = e + jj[i, k, states[:, i], states[:, k]]
        return e

    base = energy(e0, h, j)
    c1, h1, j1 = zero_sum_gauge(h, j, e0)
    torch.testing.assert_close(energy(c1, h1, j1), base)
    assert h1.sum(-1).abs().max() < 1e-12 and j1.sum(-1).abs().max() < 1e-12 and j1.sum(-2).abs().max() < 1e-12
    torch.testing.assert_close(j1, j1.permute(1, 0, 3, 2))
    ref = torch.randint(0, Q, (L,), generator=g)
    c2, h2, j2 = reference_gauge(h, j, ref, e0)
    torch.testing.assert_close(energy(c2, h2, j2), base)
    assert h2[torch.arange(L), ref].abs().max() == 0
    for i, k in itertools.permutations(range(L), 2):
        assert j2[i, k, ref[i], :].abs().max() < 1e-12 and j2[i, k, :, ref[k]].abs().max() < 1e-12
    assert c2.item() == pytest.approx(_e(ref, e0, h, j))  # E0' is the reference sequence's energy
    # the expansion object's gauge change round-trips
    model = _quadratic_net(out=1, seed=2)
    e = expand(model, L, Q)
    back = e.to_gauge("reference", reference=ref).to_gauge("zero_sum")
    torch.testing.assert_close(back.fields, e.fields, rtol=0, atol=1e-12)
    torch.testing.assert_close(back.couplings, e.couplings, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs reference"):
        e.to_gauge("reference")


def _e(seq: torch.Tensor, e0: torch.Tensor, h: torch.Tensor, j: torch.Tensor) -> float:
    total = float(e0) + float(h[torch.arange(L), seq].sum())
    for i, k in itertools.combinations(range(L), 2):
        total += float(j[i, k, seq[i], seq[k]])
    return total


def test_exact_anova_matches_brute_force_conditional_means_and_contributions() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(L * Q, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    e = expand(model, L, Q, target=2)
    states = _all_states()
    with torch.no_grad():
        f = model(one_hot_flat(states, Q).double())[:, 2]
    assert e.constant.item() == pytest.approx(f.mean().item(), abs=1e-12)
    for i in range(L):
        for a in range(Q):
            assert e.fields[i, a].item() == pytest.approx((f[states[:, i] == a].mean() - f.mean()).item(), abs=1e-12)
    i, k, a, b = 1, 3, 2, 0
    sel = (states[:, i] == a) & (states[:, k] == b)
    jj = f[sel].mean() - f[states[:, i] == a].mean() - f[states[:, k] == b].mean() + f.mean()
    assert e.couplings[i, k, a, b].item() == pytest.approx(jj.item(), abs=1e-12)
    # variance split: orders are orthogonal, so the shares and the residual add up to the total
    resid_share = e.residual_variance / e.total_variance
    assert e.variance_explained["residual"].item() == pytest.approx(resid_share.item(), abs=1e-10)
    # contributions sum to the logit up to the residual
    some = states[::17]
    c = e.contributions(some)
    recon = c["constant"] + c["fields"].sum(1) + c["couplings"].sum(dim=(1, 2))
    with torch.no_grad():
        fs = model(one_hot_flat(some, Q).double())[:, 2]
    assert (recon - fs).pow(2).mean().item() == pytest.approx(((e.energy(states) - f)[::17]).pow(2).mean().item(), rel=1e-9)
    assert c["couplings"].tril().abs().max() == 0  # only i < j
    # per-class expansion when no target is chosen
    multi = expand(model, L, Q)
    assert multi.fields.shape == (3, L, Q) and multi.couplings.shape == (3, L, L, Q, Q)
    torch.testing.assert_close(multi.fields[2], e.fields)


def test_sampled_agrees_with_exact_within_standard_errors() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(L * Q, 12), nn.ReLU(), nn.Linear(12, 1)).double()
    exact = expand(model, L, Q)
    sampled = expand(model, L, Q, method="sampled", num_samples=600, generator=torch.Generator().manual_seed(0))
    assert exact.variance_explained["residual"] > 1e-4, "the test needs order >= 3 terms (noise in the estimates)"
    zf = (sampled.fields - exact.fields).abs() / sampled.fields_se.clamp_min(1e-15)
    off = ~torch.eye(L, dtype=torch.bool)
    dj = (sampled.couplings - exact.couplings).abs()[off]
    se = sampled.couplings_se[off]
    assert zf.max() < 4.5
    assert ((dj <= 4.5 * se) | (dj < 1e-12)).all()
    assert (sampled.fields_se > 0).any()
    # and it converges: ten times the samples, closer fields
    more = expand(model, L, Q, method="sampled", num_samples=6000, generator=torch.Generator().manual_seed(1))
    assert (more.fields - exact.fields).abs().max() < (sampled.fields - exact.fields).abs().max()


def test_coupling_strength_finds_the_interacting_pair() -> None:
    # f = 3 * [sigma_1 == sigma_3] + small fields: only the pair (1, 3) is coupled
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.reshape(-1, L, Q)
            return 3.0 * (s[:, 1] * s[:, 3]).sum(-1) + 0.1 * s[:, 0, 0]

    e = expand(Pair(), L, Q)
    strength = e.coupling_strength(apc=False)
    assert strength[1, 3] > 1 and strength.fill_diagonal_(0).max() == strength[1, 3]
    assert e.strongest_pairs(1, apc=True)[0][:2] == (1, 3)
    assert e.variance_explained[2].item() > 0.9


def test_bad_input() -> None:
    model = _quadratic_net()
    with pytest.raises(ValueError, match="num_states must be an int >= 2"):
        expand(model, L, 1)
    with pytest.raises(ValueError, match=r"q\^L = 3\^5 = 243 model evaluations, over max_evaluations=100"):
        expand(model, L, Q, max_evaluations=100)
    with pytest.raises(ValueError, match=r"rejected the encoded input of shape \[243, 15\]"):
        expand(nn.Sequential(nn.Linear(16, 2)).double(), L, Q)
    with pytest.raises(ValueError, match="method='quadratic' needs"):
        expand(nn.Sequential(nn.Linear(L * Q, 4), nn.ReLU(), nn.Linear(4, 1)), L, Q, method="quadratic")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        expand(model, L, Q, order=3)


def test_trained_network_recovers_planted_coupling_differences() -> None:
    from lightning_interp.datamodules import PottsDataModule

    dm = PottsDataModule(seed=0)
    dm.setup("fit")
    x, y = next(iter(torch.utils.data.DataLoader(dm.train_dataloader().dataset, batch_size=len(dm.train_dataloader().dataset))))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dm.seq_len * dm.num_states, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        idx = torch.randint(0, len(x), (256,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    e = expand(model, dm.seq_len, dm.num_states, method="exact", target=(1, 0))
    _, h0, j0 = zero_sum_gauge(
        torch.as_tensor(dm.planted_field_difference(), dtype=torch.float64),
        torch.as_tensor(dm.planted_coupling_difference(), dtype=torch.float64),
    )
    corr = torch.corrcoef(torch.stack([e.couplings.flatten(), j0.flatten()]))[0, 1]
    field_corr = torch.corrcoef(torch.stack([e.fields.flatten(), h0.flatten()]))[0, 1]
    assert corr > 0.8 and field_corr > 0.8, (corr, field_corr)
    planted = {tuple(sorted(p)) for p in torch.as_tensor(dm.pairs).tolist()}
    top = {(i, j) for i, j, _ in e.strongest_pairs(len(planted), apc=False)}
    assert top == planted


def test_sampled_variance_fractions_have_calibrated_errors() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(L * Q, 12), nn.ReLU(), nn.Linear(12, 1)).double()
    exact = expand(model, L, Q)
    runs = [expand(model, L, Q, method="sampled", num_samples=300, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert exact.variance_explained_se is None
    for key in (1, 2, "residual"):
        values = torch.stack([r.variance_explained[key] for r in runs])
        errors = torch.stack([r.variance_explained_se[key] for r in runs])
        assert (errors > 0).all()
        # the reported SE is about the seed-to-seed spread (the estimates are not unbiased for the fractions
        # of a finite sample, so only the spread is checked here) and the runs lie near the exact fraction
        assert 0.4 < (errors.mean() / values.std()).item() < 2.5, key
        assert (values.mean() - exact.variance_explained[key]).abs() < 4 * errors.mean() + 1e-3, key
    quadruple = expand(model, L, Q, method="sampled", num_samples=1200, generator=torch.Generator().manual_seed(0))
    ratio = (quadruple.variance_explained_se[1] / runs[0].variance_explained_se[1]).item()
    assert 0.3 < ratio < 0.8, ratio  # 4x the samples: about half the error


# ---------------------------------------------------------------------------------------------
# hidden layers: expand(..., layer=, unit=) and LogitExpansionCallback(units=)
# ---------------------------------------------------------------------------------------------


def _deep_net() -> nn.Sequential:
    """Linear -> Square -> Linear -> Tanh -> Linear: orders 1 and 2 exactly at the first two Linear layers, not at the logits."""
    torch.manual_seed(5)
    layers = OrderedDict(hidden=nn.Linear(L * Q, 6), square=Square(), mid=nn.Linear(6, 4), act=nn.Tanh(), out=nn.Linear(4, 3))
    return nn.Sequential(layers).double()


@pytest.fixture(scope="module")
def deep_net() -> nn.Sequential:
    return _deep_net()


def test_first_linear_layer_unit_is_exactly_first_order(deep_net: nn.Sequential) -> None:
    # z_u = b_u + sum_i W_u,i(sigma_i): zero-sum fields W - mean_a W, constant b + sum_i mean_a W, no couplings
    w = deep_net.hidden.weight.detach().reshape(6, L, Q)
    b = deep_net.hidden.bias.detach()
    every = expand(deep_net, L, Q, layer="hidden")
    assert every.fields.shape == (6, L, Q)
    for u in (0, 4):
        e = expand(deep_net, L, Q, layer="hidden", unit=u)
        torch.testing.assert_close(e.fields, w[u] - w[u].mean(-1, keepdim=True), rtol=0, atol=1e-13)
        assert e.constant.item() == pytest.approx((b[u] + w[u].mean(-1).sum()).item(), abs=1e-13)
        assert e.couplings.abs().max() < 1e-13
        assert e.variance_explained[1].item() == pytest.approx(1.0, abs=1e-12)
        assert e.variance_explained[2].item() < 1e-24 and e.residual_variance.item() < 1e-24
        torch.testing.assert_close(every.fields[u], e.fields, rtol=0, atol=0)
    # substitution into background sequences is exact for a first-order function: the sampled method too
    sampled = expand(deep_net, L, Q, layer="hidden", unit=4, method="sampled", num_samples=20)
    torch.testing.assert_close(sampled.fields, w[4] - w[4].mean(-1, keepdim=True), rtol=0, atol=1e-13)
    assert sampled.couplings.abs().max() < 1e-13 and sampled.fields_se.max() < 1e-13


def test_second_layer_behind_a_square_is_exactly_second_order_with_closed_form_terms(deep_net: nn.Sequential) -> None:
    # g = c + sum_k v_k z_k^2 with z_k = m_k + sum_i Wc_k,i(sigma_i) (Wc centred over states, m_k = b_k + sum_i mean W):
    # E0 = c + sum_k v_k (m_k^2 + sum_i s_k,i), h_i(a) = sum_k v_k (2 m_k Wc + Wc^2 - s_k,i),
    # J_ij(a, b) = 2 sum_k v_k Wc_k,i(a) Wc_k,j(b), with s_k,i = mean_a Wc_k,i(a)^2 (all zero-sum already)
    w = deep_net.hidden.weight.detach().reshape(6, L, Q)
    wc = w - w.mean(-1, keepdim=True)
    m = deep_net.hidden.bias.detach() + w.mean(-1).sum(-1)
    s = wc.pow(2).mean(-1)
    off = (~torch.eye(L, dtype=torch.bool))[:, :, None, None]
    pair = expand(deep_net, L, Q, layer="mid", unit=[3, 1])
    for k, u in enumerate((3, 1)):
        v, c = deep_net.mid.weight.detach()[u], deep_net.mid.bias.detach()[u]
        e = expand(deep_net, L, Q, layer="mid", unit=u)
        assert e.variance_explained["residual"].item() < 1e-12 and e.residual_variance.item() < 1e-24
        assert (e.variance_explained[1] + e.variance_explained[2]).item() == pytest.approx(1.0, abs=1e-12)
        assert e.variance_explained[2].item() > 0.05  # the couplings carry real variance
        torch.testing.assert_close(e.couplings, 2 * torch.einsum("k,kia,kjb->ijab", v, wc, wc) * off, rtol=0, atol=1e-12)
        h = torch.einsum("k,kia->ia", v, 2 * m[:, None, None] * wc + wc * wc - s[:, :, None])
        torch.testing.assert_close(e.fields, h, rtol=0, atol=1e-12)
        assert e.constant.item() == pytest.approx((c + v @ (m * m + s.sum(-1))).item(), abs=1e-12)
        torch.testing.assert_close(pair.select(k).couplings, e.couplings, rtol=0, atol=1e-15)  # a list keeps its order


def test_last_layer_is_the_logit_expansion_and_layer_none_is_unchanged(deep_net: nn.Sequential) -> None:
    logit = expand(deep_net, L, Q, target=2)
    same = expand(deep_net, L, Q, layer="out", unit=2)
    assert torch.equal(same.fields, logit.fields) and torch.equal(same.couplings, logit.couplings)
    assert logit.variance_explained["residual"] > 1e-6  # the tanh makes the logits higher-order: the layers above are not
    with torch.no_grad():
        f = deep_net(one_hot_flat(_all_states(), Q).double())[:, 2]
    assert logit.constant.item() == pytest.approx(f.mean().item(), abs=1e-12)  # layer=None expands the logits


def test_units_of_a_multi_dim_output_are_flattened_indices() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(L * Q, 6), nn.Unflatten(1, (2, 3)), nn.Flatten(), nn.Linear(6, 2)).double()
    e = expand(model, L, Q, layer="1", unit=4)  # [N, 2, 3]: unit 4 is channel 1, position 1
    torch.testing.assert_close(e.fields, expand(model, L, Q, layer="0", unit=4).fields, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unit 6 is out of range: layer '1' has 6 units \(output of shape \[2, 3\]"):
        expand(model, L, Q, layer="1", unit=[0, 6])


def test_bad_layer_and_unit(deep_net: nn.Sequential) -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(L * Q, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"layer": "hiden"}, r"unknown layer 'hiden' in Sequential; close names: 'hidden'"),
        ({"layer": "zzz"}, r"unknown layer 'zzz'.*the model's layers: 'hidden', 'square', 'mid'"),
        ({"layer": "hidden", "unit": 6}, r"unit 6 is out of range: layer 'hidden' has 6 units"),
        ({"layer": "hidden", "unit": -1}, r"unit must be a unit index >= 0"),
        ({"layer": "hidden", "unit": True}, r"unit must be a unit index >= 0"),
        ({"layer": "hidden", "unit": []}, r"unit must be a unit index >= 0"),
        ({"unit": 0}, r"unit=0 needs layer="),
        ({"layer": "hidden", "target": 1}, r"target=1 selects logits"),
        ({"layer": "hidden", "method": "quadratic"}, r"closed form of the logits"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            expand(deep_net, L, Q, **kwargs)
    with pytest.raises(ValueError, match=r"layer 'spare' did not run in Unused's forward pass"):
        expand(Unused().double(), L, Q, layer="spare")


def _square_mlp() -> pl.LightningModule:
    from lightning_interp.models import MLPClassifier

    torch.manual_seed(7)
    model = MLPClassifier(4 * 3, 2, hidden=(5, 4), lr=1e-2)
    model.net[1] = Square()  # net.0 Linear, net.1 Square, net.2 Linear (behind the square), ...
    return model


def _fit(callback: Any, model: pl.LightningModule) -> pl.Trainer:
    g = torch.Generator().manual_seed(8)
    states = torch.randint(0, 3, (64, 4), generator=g)
    data = TensorDataset(one_hot_flat(states, 3), (states[:, 0] == states[:, 2]).long())
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(data, batch_size=32))
    return trainer


def test_callback_expands_hidden_units_under_their_own_keys() -> None:
    from lightning_interp.callbacks import LogitExpansionCallback

    units = [("net.0", 1), ("net.2", 3), ("net.2", 0)]
    cb = LogitExpansionCallback(4, 3, method="exact", units=units, log_images=False)
    model = _square_mlp()
    trainer = _fit(cb, model)
    last = cb.history[-1]
    for name in ("var_order1", "var_order2", "var_residual", "max_coupling", "field_corr"):
        assert (name in last) == (name != "field_corr")  # the logit's keys as before (no planted terms here)
    assert last["net.0/unit1/var_order1"] == pytest.approx(1.0, abs=1e-6) and last["net.0/unit1/max_coupling"] < 1e-4
    assert last["net.2/unit3/var_residual"] < 1e-6 and last["net.2/unit0/var_residual"] < 1e-6
    assert "expansion/net.2/unit0/var_order2" in trainer.callback_metrics
    model.eval()
    for layer, unit in units[1:]:
        e = expand(model, 4, 3, layer=layer, unit=unit)
        assert last[f"{layer}/unit{unit}/var_order2"] == pytest.approx(e.variance_explained[2].item(), abs=1e-9)
    assert last["net.2/unit3/var_order2"] != pytest.approx(last["net.2/unit0/var_order2"], abs=1e-6)
    figures = cb.figures(cb.last)
    assert set(figures) == {
        "coupling_strength",
        "net.0/unit1/coupling_strength",
        "net.2/unit3/coupling_strength",
        "net.2/unit0/coupling_strength",
    }
    assert set(cb.tables(cb.last)) == {"strongest_pairs", *(f"{layer}/unit{unit}/strongest_pairs" for layer, unit in units)}
    default = LogitExpansionCallback(4, 3)
    assert "units" not in default.state_key and "net.2" in cb.state_key


def test_callback_units_are_validated() -> None:
    from lightning_interp.callbacks import LogitExpansionCallback

    bad_init: list[tuple[Any, str]] = [
        ("net.0", r"units must be a list of \(layer, unit\) pairs"),
        ([("net.0", -1)], r"got \('net.0', -1\) in units"),
        ([("", 0)], r"got \('', 0\) in units"),
        ([("net.0", 1), ["net.0", 1]], r"units names \('net.0', 1\) twice"),
    ]
    for units, match in bad_init:
        with pytest.raises(ValueError, match=match):
            LogitExpansionCallback(4, 3, units=units)
    with pytest.raises(ValueError, match="closed form of the logits"):
        LogitExpansionCallback(4, 3, method="quadratic", units=[("net.0", 0)])
    for units, match in (
        ([("net.9", 0)], r"unknown layer 'net.9' in MLPClassifier; close names: 'net\.\d'"),
        ([("net.0", 1), ("net.0", 5)], r"unit 5 is out of range: layer 'net.0' has 5 units"),
    ):
        cb = LogitExpansionCallback(4, 3, method="exact", units=units, log_images=False)
        model = _square_mlp()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=match):
            _fit(cb, model)
        assert cb.history == [] and all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # no step
