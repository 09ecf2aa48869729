"""Bayesian ablation: planted models against METHODS.md closed forms, MCMC vs exact, read-outs, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_interp.ablation import BayesianAblation, MaskedForward, distributedness, polysemanticity
from lightning_interp.hooks import count_hooks


class Planted(nn.Module):
    """Correctness depends only on ``rule(units)``; half the examples are correct regardless (a coin).

    Input columns: ``d`` unit values (all 1), a coin, the label. With 8 examples of which 4 have the
    coin, the smoothed accuracy is ``(8 + 1) / 10 = 0.9`` when the rule holds and ``(4 + 1) / 10 = 0.5``
    otherwise: ``O_hi = 9``, ``O_lo = 1``.
    """

    def __init__(self, d: int, rule: str) -> None:
        super().__init__()
        self.d, self.rule = d, rule
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units(x[:, : self.d]) > 0.5
        ok = {"one": u[:, 0], "or": u[:, 0] | u[:, 1], "and": u[:, 0] & u[:, 1]}[self.rule] | (x[:, self.d] > 0.5)
        y = x[:, self.d + 1]
        pred = torch.where(ok, y, 1 - y)
        return torch.stack([1 - pred, pred], dim=1) * 10.0


def planted_data(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    x = torch.zeros(8, d + 2)
    x[:, :d] = 1.0
    x[:4, d] = 1.0
    x[:, d + 1] = y.float()
    return x, y


def brute_force(d: int, rule: str, o_hi: float = 9.0, o_lo: float = 1.0) -> tuple[np.ndarray, float, float]:
    """Independent enumeration: importance, total correlation and H(M) in bits."""
    masks = np.array(list(itertools.product([0, 1], repeat=d)))
    ok = {"one": masks[:, 0] == 1, "or": (masks[:, 0] == 1) | (masks[:, 1] == 1), "and": (masks[:, 0] == 1) & (masks[:, 1] == 1)}[
        rule
    ]
    w = np.where(ok, o_hi, o_lo)
    p = w / w.sum()
    imp = p @ masks
    h_m = -(p * np.log2(p)).sum()
    hb = -(imp * np.log2(imp) + (1 - imp) * np.log2(1 - imp))
    return imp, hb.sum() - h_m, h_m


@pytest.mark.parametrize("rule", ["one", "or", "and"])
def test_planted_models_match_closed_forms(rule: str) -> None:
    d = 6
    x, y = planted_data(d)
    r = BayesianAblation(Planted(d, rule), "units", method="exact").fit(x, y, tasks="all")
    imp, tc, h_m = brute_force(d, rule)
    np.testing.assert_allclose(r.importance[0].numpy(), imp, atol=1e-12)
    assert r.manifold_complexity.item() == pytest.approx(tc, abs=1e-10)
    assert r.mask_entropy_bits.item() == pytest.approx(h_m, abs=1e-10)
    assert r.complexity_kind == "total_correlation" and r.split
    if rule == "one":  # METHODS.md: importance_1 = 0.9, others 0.5, TC 0, H(M) = d - 1 + 0.469
        assert r.importance[0, 0].item() == pytest.approx(0.9, abs=1e-12)
        assert r.importance[0, 1:].tolist() == pytest.approx([0.5] * (d - 1), abs=1e-12)
        assert r.manifold_complexity.item() == pytest.approx(0.0, abs=1e-10)
        hb = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
        assert r.mask_entropy_bits.item() == pytest.approx(d - 1 + hb, abs=1e-10)
        assert round(hb, 3) == 0.469
        assert r.distributedness.item() == pytest.approx(1 / d, abs=1e-9)  # one unit carries all information
    if rule == "or":  # METHODS.md: importance_1 = 2 O_hi / (3 O_hi + O_lo), TC > 0
        assert r.importance[0, 0].item() == pytest.approx(2 * 9 / (3 * 9 + 1), abs=1e-12)
        assert r.manifold_complexity.item() > 0.05
    assert r.full_accuracy.item() == pytest.approx(0.9)
    top = r.top_masks[0][0]
    assert top[0] and (rule == "one" or top[1] or rule == "or")


def test_masked_forward_split_and_whole_forward_agree() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 4)).eval()
    x = torch.randn(20, 3)
    masks = torch.rand(9, 7) > 0.4
    split = MaskedForward(model, "1")
    whole = MaskedForward(model, "1", split=False)
    assert split.is_split and not whole.is_split
    a = split.predictions(split.prepare(x), masks)
    b = whole.predictions(whole.prepare(x), masks)
    # reference: a per-mask python loop
    ref = []
    for m in masks:
        h = model[1](model[0](x)) * m.float()
        ref.append(model[4](model[3](model[2](h))).argmax(1))
    assert torch.equal(a, torch.stack(ref)) and torch.equal(b, torch.stack(ref))
    assert count_hooks(model) == 0
    # memory bound: tiny max_batch gives the same answer in more chunks
    assert torch.equal(MaskedForward(model, "1", max_batch=25).predictions(split.prepare(x), masks), a)
    # one mask per row: row r is example rows[r] under mask which[r], on both paths and in small chunks
    rows, which = torch.randint(0, 20, (50,)), torch.randint(0, 9, (50,))
    for mf in (split, whole, MaskedForward(model, "1", max_batch=7)):
        assert torch.equal(mf.paired_predictions(mf.prepare(x), rows, masks[which]), a[which, rows])
    assert count_hooks(model) == 0


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(torch.relu(self.b(h)) + h)  # a skip connection around the ablated layer


def test_split_handles_skip_connections_and_conv_channels() -> None:
    torch.manual_seed(1)
    model = _Skip().eval()
    x = torch.randn(10, 4)
    masks = torch.rand(5, 6) > 0.5
    mf = MaskedForward(model, "b")
    assert mf.is_split
    got = mf.predictions(mf.prepare(x), masks)
    for i, m in enumerate(masks):
        h = torch.relu(model.a(x))
        ref = model.head(torch.relu(model.b(h) * m.float()) + h).argmax(1)
        assert torch.equal(got[i], ref)
    conv = nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    xi = torch.randn(4, 1, 6, 6)
    mfc = MaskedForward(conv, "1")
    m = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)
    ref = conv[4](conv[3](conv[2](conv[1](conv[0](xi)) * m.float()[:, :, None, None]))).argmax(1)
    assert mfc.num_units(mfc.prepare(xi)) == 5
    assert torch.equal(mfc.predictions(mfc.prepare(xi), m)[0], ref)


class _TokenPool(nn.Module):
    """Token output ``[N, T, C]`` (units on the last dim), then a shape-keeping ``MaxPool1d`` that mixes units."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.embed(x))).flatten(1))


def test_mask_is_pushed_past_commuting_ops_only_when_exact() -> None:
    """The mask moves past ReLU / pooling / flatten when that gives identical logits, and only then."""
    torch.manual_seed(3)
    cases = [
        # conv block -> ReLU -> max pool -> GAP -> flatten -> Linear: pushed to after the flatten
        (nn.Sequential(nn.Conv2d(1, 5, 3), nn.Identity(), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(5, 3)), "1", torch.randn(30, 1, 8, 8), "5"),
        # flatten of an unpooled map changes the unit count: the push stops being valid, plain split kept
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Identity(), nn.Flatten(), nn.Linear(4 * 36, 3)), "1", torch.randn(30, 1, 8, 8),
         None),
        # MaxPool1d on a token output pools over neighbouring units (same shape, other logits): pushed past the ReLU only
        (_TokenPool(), "embed", torch.randn(30, 4, 3), "act"),
    ]  # fmt: skip
    for model, layer, x, expect in cases:
        model.eval()
        masks = torch.rand(16, {"5": 5, None: 4, "act": 6}[expect]) > 0.5
        split = MaskedForward(model, layer)
        whole = MaskedForward(model, layer, split=False)
        got = split.predictions(split.prepare(x), masks)
        assert split.mask_after == expect
        assert torch.equal(got, whole.predictions(whole.prepare(x), masks))
        assert count_hooks(model) == 0


def test_mcmc_per_task_rows_match_whole_forward() -> None:
    """Chains scored on their task's rows and a sample of the others: the fx split and the whole forward agree."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 20, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 3)).eval()
    x = torch.randn(60, 1, 6, 6)
    y = torch.arange(60) % 3
    for likelihood, rest in (("balanced", 7), ("sensitivity", 7), ("balanced", 64)):
        runs = [
            BayesianAblation(model, "1", method="mcmc", num_chains=4, num_steps=60, burn_in=10, split=split,
                             generator=torch.Generator().manual_seed(0), likelihood=likelihood, rest_per_chain=rest).fit(x, y)
            for split in (True, False)
        ]  # fmt: skip
        assert runs[0].method == "mcmc" and runs[0].split and not runs[1].split
        assert len(runs[0].tasks) == len(set(y.tolist())) > 1
        assert torch.equal(runs[0].importance, runs[1].importance)
        assert torch.equal(runs[0].acceptance_rate, runs[1].acceptance_rate)
        # rows per step: every chain on its task's 20 examples, plus (balanced) min(rest, 40) others
        others = min(rest, 40) if likelihood == "balanced" else 0
        assert runs[0].num_rows == 61 * 3 * 4 * (20 + others) and runs[0].num_evaluations == 61 * 3 * 4
        ablation = BayesianAblation(model, "1", num_chains=4, likelihood=likelihood, rest_per_chain=rest)
        assert ablation.rows_per_step(y) == runs[0].num_rows // 61  # what the budget's pilot scales by
        assert ablation.rows_per_step(y, [2]) == 4 * (20 + others)
        assert ablation.rows_per_step(y, "all") == 4 * 60


def test_mcmc_agrees_with_exact_on_ten_units() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(200, 5)
    y = model(x).argmax(1)
    exact = BayesianAblation(model, "1", method="exact").fit(x, y, tasks="all")
    mcmc = BayesianAblation(
        model, "1", method="mcmc", num_chains=32, num_steps=1500, burn_in=300, generator=torch.Generator().manual_seed(0)
    ).fit(x, y, tasks="all")
    assert (exact.importance - mcmc.importance).abs().max().item() < 0.03
    assert exact.importance.std() > 0.05, "the test needs units of different importance"
    assert 0.05 < mcmc.acceptance_rate.item() < 1.0
    assert mcmc.ess.item() > 100
    assert mcmc.complexity_kind == "pairwise_mutual_information"
    assert mcmc.manifold_complexity.item() >= 0


def test_readout_metrics() -> None:
    d = 8
    one = torch.zeros(1, d)
    one[0, 3] = 0.7
    assert distributedness(one).item() == pytest.approx(1 / d)
    assert distributedness(torch.full((1, d), 0.2)).item() == pytest.approx(1.0)
    assert math.isnan(distributedness(torch.zeros(1, d)).item())
    # an importance that rounds to just below 0.5 carries zero (not negative) information
    from lightning_interp.ablation import information_bits

    info_rounding = information_bits(torch.tensor([[0.5 - 5.55e-17, 0.9]], dtype=torch.float64))
    assert info_rounding[0, 0].item() == 0.0 and distributedness(info_rounding).item() == pytest.approx(0.5)
    # unit 0 informs only task 0 -> 1; unit 1 informs two tasks equally -> 2; unit 2 nothing -> NaN
    info = torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.3, 0.0]])
    poly = polysemanticity(info)
    assert poly[0].item() == pytest.approx(1.0) and poly[1].item() == pytest.approx(2.0) and math.isnan(poly[2].item())


class _TwoTask(nn.Module):
    """Class-0 examples need unit 0, class-1 examples need unit 1 (each with a coin)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units(x[:, :4]) > 0.5
        y = x[:, 5]
        need = torch.where(y < 0.5, u[:, 0], u[:, 1])
        pred = torch.where(need | (x[:, 4] > 0.5), y, 1 - y)
        return torch.stack([1 - pred, pred], dim=1) * 10.0


def test_class_tasks_and_monosemantic_units() -> None:
    y = torch.tensor([0] * 8 + [1] * 8)
    x = torch.zeros(16, 6)
    x[:, :4] = 1.0
    x[[0, 1, 2, 3, 8, 9, 10, 11], 4] = 1.0
    x[:, 5] = y.float()
    # one-sided: the closed form of a unit that only its class's examples need (under the balanced
    # likelihood the class-0 examples' errors are false positives of class 1, and unit 0 informs both)
    r = BayesianAblation(_TwoTask(), "units", method="exact", likelihood="sensitivity").fit(x, y, tasks="classes")
    assert r.tasks == ["class 0", "class 1"]
    assert r.importance[0, 0].item() == pytest.approx(0.9) and r.importance[1, 1].item() == pytest.approx(0.9)
    assert r.importance[0, 1].item() == pytest.approx(0.5) and r.importance[1, 0].item() == pytest.approx(0.5)
    assert r.polysemanticity[0].item() == pytest.approx(1.0) and r.polysemanticity[1].item() == pytest.approx(1.0)
    assert math.isnan(r.polysemanticity[2].item())
    # a dataloader of (inputs, labels) batches gives the same result
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    r2 = BayesianAblation(_TwoTask(), "units", method="exact", likelihood="sensitivity").fit(loader, tasks="classes")
    assert torch.allclose(r2.importance, r.importance)


def test_model_state_untouched() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(30, 3)
    BayesianAblation(model, "1", method="mcmc", num_steps=40, burn_in=10).fit(x, model(x).argmax(1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert count_hooks(model) == 0 and all(p.grad is None for p in model.parameters())


def test_bad_input() -> None:
    model = nn.Sequential(nn.Linear(3, 20), nn.ReLU(), nn.Linear(20, 2)).eval()
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"unknown layer 'nope'"):
        BayesianAblation(model, "nope")
    with pytest.raises(ValueError, match=r"method='exact' enumerates 2\^d masks and needs d <= 16, but layer '1' has 20 units"):
        BayesianAblation(model, "1", method="exact").fit(x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"task 'class 1' has no probe examples"):
        BayesianAblation(model, "1").fit(x, torch.zeros(10, dtype=torch.long), tasks=[0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        BayesianAblation(model, "1").fit(x, torch.full((10,), 5))
    with pytest.raises(ValueError, match="prior_keep"):
        BayesianAblation(model, "1", prior_keep=1.0)
    with pytest.raises(ValueError, match="labels are required"):
        BayesianAblation(model, "1").fit(x)


def test_ess_matches_a_loop_over_geyers_initial_positive_sequence() -> None:
    """The vectorised effective sample size equals a per-unit loop, and is near ``n (1 - a) / (1 + a)`` for AR(1)."""
    from lightning_interp.ablation import chain_ess as _ess

    g = torch.Generator().manual_seed(0)
    c, s, d = 4, 400, 3
    z = torch.randn(c, s, d, generator=g, dtype=torch.float64)
    x = torch.zeros_like(z)
    a = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)  # per-unit autocorrelation
    for t in range(s):
        x[:, t] = (a * x[:, t - 1] if t else 0) + z[:, t]
    traces = torch.cat([x, torch.zeros(c, s, 1, dtype=torch.float64)], dim=2)  # plus a constant unit
    got = _ess(traces)
    xc = traces - traces.mean(dim=(0, 1), keepdim=True)
    var = (xc * xc).mean(dim=(0, 1))
    f = torch.fft.rfft(xc, n=2 * s, dim=1)
    rho = (torch.fft.irfft(f * f.conj(), n=2 * s, dim=1)[:, :s].mean(dim=0) / s) / var.clamp_min(1e-300)
    for j in range(d + 1):
        total = 0.0
        for k in range(1, s - 1, 2):
            pair = float(rho[k, j] + rho[k + 1, j])
            if pair < 0:
                break
            total += pair
        ref = c * s if var[j] <= 0 or total <= -0.5 else c * s / (1 + 2 * total)
        assert math.isclose(float(got[j]), ref, rel_tol=1e-9), (j, float(got[j]), ref)
    theory = c * s * (1 - a) / (1 + a)
    assert ((got[:d] - theory).abs() / theory < 0.35).all(), (got, theory)
    assert got[d] == c * s


class Flagged(nn.Module):
    """A Python branch after the layer (frozen by torch.fx at trace time) and a parameter used after it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b, self.c = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(8, 3)
        self.temp = nn.Parameter(torch.tensor(1.5))
        self.use_c = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        return (self.c(h) if self.use_c else self.b(h)) * self.temp


def test_split_follows_model_changes_and_keeps_constants_inside() -> None:
    torch.manual_seed(5)
    model = Flagged().eval()
    x = torch.randn(40, 4)
    masks = torch.rand(12, 8) > 0.5
    mf = MaskedForward(model, "act")
    whole = MaskedForward(model, "act", split=False)
    assert mf.is_split and len(mf.prepare(x)) == 1  # the parameter `temp` does not cross the split
    assert torch.equal(mf.predictions(mf.prepare(x), masks), whole.predictions(whole.prepare(x), masks))
    model.use_c = True  # the traced graph still calls `b`: prepare() notices and traces again
    got = mf.predictions(mf.prepare(x), masks)
    assert mf.is_split and torch.equal(got, whole.predictions(whole.prepare(x), masks))


def test_push_is_not_taken_on_uninformative_logits() -> None:
    """With a zero head every candidate 'agrees'; the push waits until masks change the logits, then is checked."""
    torch.manual_seed(6)
    # conv [N, 4, 2, 2] -> Flatten(2) gives [N, 4, 4]: four units on the last dim, but they are not the channels
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(2), nn.Flatten(1), nn.Linear(16, 3)).eval()
    nn.init.zeros_(model[3].weight)
    x = torch.randn(32, 1, 4, 4)
    masks = torch.rand(10, 4) > 0.5
    mf, whole = MaskedForward(model, "0"), MaskedForward(model, "0", split=False)
    mf.prepare(x)
    assert mf.mask_after is None
    nn.init.normal_(model[3].weight)
    got = mf.predictions(mf.prepare(x), masks)
    assert mf.mask_after is None
    assert torch.equal(got, whole.predictions(whole.prepare(x), masks))


def test_push_on_torchvision_resnet_last_stage() -> None:
    """ResNet-18's layer4 -> avgpool -> flatten -> fc: the mask moves to after the flatten, same predictions."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(12, 3, 64, 64)
    masks = torch.rand(6, 512) > 0.5
    split, whole = MaskedForward(model, "layer4"), MaskedForward(model, "layer4", split=False)
    got = split.predictions(split.prepare(x), masks)
    assert split.mask_after == "flatten"
    assert torch.equal(got, whole.predictions(whole.prepare(x), masks))
    mid = MaskedForward(model, "layer3.1")  # followed by a conv block: nothing to push past
    mid.prepare(x)
    assert mid.is_split and mid.mask_after is None


def test_callback_logs_ess_and_warns_on_a_short_chain() -> None:
    import lightning.pytorch as pl

    from lightning_interp.callbacks import AblationProbeCallback
    from lightning_interp.models import MLPClassifier
    from tests.contract import gaussian3_datamodule

    pl.seed_everything(0, verbose=False)
    model = MLPClassifier(2, 3, hidden=(24,), lr=1e-2)
    kw: dict = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    short = AblationProbeCallback(layers=["net.1"], probe_size=96, method="mcmc", num_chains=2, num_steps=20, burn_in=5)
    with pytest.warns(UserWarning, match=r"effective sample size is \d+ \(median over units \d+\), below min_ess=100"):
        pl.Trainer(max_epochs=1, callbacks=[short], **kw).fit(model, gaussian3_datamodule())
    from lightning_interp.ablation import effective_sample_size

    h = short.history[-1]
    r = short.last.data["results"]["net.1"]
    assert 0 < h["net.1/ess"] <= h["net.1/ess_median"] and h["net.1/ess"] < 100
    ess = effective_sample_size(r)
    assert h["net.1/ess"] == pytest.approx(float(ess[~ess.isnan()].min()))
    assert 0 < h["net.1/ess_indicator"] <= 2 * 15  # the 0/1 indicators: at most chains x kept steps
    assert h["net.1/manifold_complexity_left_out"] == pytest.approx(float(r.complexity_left_out_bits.mean()))
    # the definition: p (1 - p) / SE^2
    t, unit = divmod(int(r.importance_se.argmax()), r.importance.shape[1])
    p, se = r.importance[t, unit], r.importance_se[t, unit]
    assert float(ess[t, unit]) == pytest.approx(float(p * (1 - p) / se**2))


def test_informative_units_ignore_information_within_mcmc_noise() -> None:
    from lightning_interp.ablation import AblationFit, information_bits, informative_units

    importance = torch.tensor([[0.5, 0.62, 0.95, 0.20]], dtype=torch.float64)  # [T=1, d=4]
    info = information_bits(importance)
    base = dict(
        tasks=["class 0"],
        importance=importance,
        information_bits=info,
        distributedness=torch.zeros(1),
        manifold_complexity=torch.zeros(1),
        complexity_kind="pairwise_mutual_information",
        polysemanticity=torch.zeros(4),
        mask_entropy_bits=torch.zeros(1),
        full_accuracy=torch.ones(1),
        num_evaluations=1,
    )
    threshold = 0.02  # KL(Bern(0.62) || Bern(0.5)) = 0.042 bits, KL(Bern(0.2) || Bern(0.5)) = 0.278 bits
    exact = AblationFit(method="exact", **base)
    assert informative_units(exact, threshold).tolist() == [False, True, True, True]
    # 20 effective samples: 0.62 - 2 * 0.109 reaches 0.5, 0.20 + 2 * 0.089 = 0.38 does not; 0.95 stays informative
    noisy = AblationFit(method="mcmc", ess_per_unit=torch.full((1, 4), 20.0), **base)
    assert informative_units(noisy, threshold).tolist() == [False, False, True, True]
    lower = 0.20 + 2 * (0.20 * 0.80 / 20) ** 0.5
    assert float(information_bits(torch.tensor(lower))) > threshold
    precise = AblationFit(method="mcmc", ess_per_unit=torch.full((1, 4), 5000.0), **base)
    assert informative_units(precise, threshold).tolist() == [False, True, True, True]
    # a reported SE takes precedence; 0.62 is 1.5 SE from 0.5 (noise), 0.20 is 3.75 SE from it
    se = AblationFit(method="mcmc", importance_se=torch.full((1, 4), 0.08, dtype=torch.float64), **base)
    assert informative_units(se, threshold).tolist() == [False, False, True, True]


# ------------------------------------------------------------------ Rao-Blackwellised read-outs and error bars
def _exact_pairwise_bits(result_model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str) -> tuple[torch.Tensor, float]:
    """Importance and sum of pairwise informations of the exact posterior, by independent enumeration."""
    from lightning_interp.ablation import pairwise_information_bits

    d = BayesianAblation(result_model, layer, method="exact").fit(x, y, tasks="all").importance.shape[1]
    masks = torch.tensor(list(itertools.product([0, 1], repeat=d)), dtype=torch.float64)
    with torch.no_grad():
        correct = []
        for m in masks:
            handle = result_model.get_submodule(layer).register_forward_hook(lambda _m, _i, h, m=m: h * m.to(h.dtype))
            correct.append((result_model(x).argmax(1) == y).sum().item())
            handle.remove()
    p = (torch.tensor(correct, dtype=torch.float64) + 1) / (len(y) + 2)
    w = p / (1 - p) * 0.5**d
    w = w / w.sum()
    imp = w @ masks
    joint = torch.einsum("m,mi,mj->ij", w, masks, masks)
    return imp, float(pairwise_information_bits(imp, joint))


def test_unused_units_get_exactly_the_prior_and_no_pairwise_information() -> None:
    d = 6
    x, y = planted_data(d)
    r = BayesianAblation(Planted(d, "one"), "units", method="mcmc", num_chains=4, num_steps=60, burn_in=10).fit(x, y, tasks="all")
    # units 1..5 never change a prediction: every conditional is the prior, so the estimate is exact, SE 0
    assert torch.equal(r.importance[0, 1:], torch.full((d - 1,), 0.5, dtype=torch.float64))
    assert torch.equal(r.importance_se[0, 1:], torch.zeros(d - 1, dtype=torch.float64))
    assert r.manifold_complexity.item() == 0.0 and r.manifold_complexity_se.item() == 0.0
    assert r.complexity_pairs.item() == 0 and r.complexity_left_out_bits.item() == 0.0  # no dependent pair
    # unit 0: P(m_0 = 1) = O_hi / (O_hi + O_lo) = 0.9 (METHODS.md closed form); every conditional says so
    assert r.importance[0, 0].item() == pytest.approx(0.9, abs=1e-12)


def test_mcmc_pairwise_information_is_unbiased_against_enumeration() -> None:
    """The jackknife-corrected pairwise sum matches the exact one within its error bars (the plug-in does not)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(200, 5)
    y = model(x).argmax(1)
    imp, exact_pairwise = _exact_pairwise_bits(model, x, y, "1")
    values, errors = [], []
    for seed in range(8):
        r = BayesianAblation(
            model, "1", method="mcmc", num_chains=8, num_steps=400, burn_in=50, generator=torch.Generator().manual_seed(seed)
        ).fit(x, y, tasks="all")
        values.append(r.manifold_complexity.item())
        errors.append(r.manifold_complexity_se.item())
        # a small layer run long enough resolves every pair: nothing is left out of the sum
        assert r.complexity_pairs.item() == 45 and r.complexity_left_out_bits.item() == 0.0
        assert (r.importance[0] - imp).abs().max().item() < 5 * r.importance_se.max().item() + 1e-9
    assert exact_pairwise > 0.1, "the test needs dependent units"
    v = torch.tensor(values, dtype=torch.float64)
    # unbiased: the mean over seeds is within 3 of its standard errors of the exact value (the plug-in sum
    # without the jackknife is biased upwards by several times that)
    assert abs(v.mean().item() - exact_pairwise) < 3 * v.std().item() / len(v) ** 0.5, (values, exact_pairwise)
    # calibrated: the reported SE is, on average, the seed-to-seed spread
    assert 0.5 < (sum(errors) / len(errors)) / v.std().item() < 2.0, (errors, v.std().item())


class WidePlanted(nn.Module):
    """A wide layer whose mask posterior is known exactly: units 0 and 1 carry the task, the rest act only in bulk.

    Input columns: ``d`` unit values (all 1), the example's kind, a threshold ``theta`` and the label. Kind 0
    is answered correctly when unit 0 or unit 1 is kept, kind 1 when at least ``theta`` of units ``2..d-1``
    are kept, kind 2 always. The odds depend on the mask through ``(m_0, m_1, s)`` only (``s``: units ``2..``
    kept), so the posterior, its marginals and pairwise joints follow from an enumeration of ``4 (d - 1)``
    states for any ``d``. The ``d - 2`` bulk units depend on the rest (through ``s``), but each pair of them
    shares almost no information: like most pairs of a wide layer, they only add noise to a sum over pairs.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units(x[:, : self.d]) > 0.5
        kind, theta, y = x[:, self.d], x[:, self.d + 1], x[:, self.d + 2]
        bulk = u[:, 2:].sum(dim=1) >= theta
        ok = torch.where(kind == 0, u[:, 0] | u[:, 1], torch.where(kind == 1, bulk, torch.ones_like(bulk)))
        pred = torch.where(ok, y, 1 - y)
        return torch.stack([1 - pred, pred], dim=1) * 10.0


def wide_planted_data(d: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """8 OR examples, 8 bulk examples with thresholds around ``(d - 2) / 2``, 4 always correct; labels alternate."""
    thetas = [(d - 2) / 2 + 2 * o for o in (-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5)]
    kinds = [0.0] * 8 + [1.0] * 8 + [2.0] * 4
    y = torch.arange(len(kinds)) % 2
    x = torch.ones(len(kinds), d + 3)
    x[:, d] = torch.tensor(kinds)
    x[:, d + 1] = torch.tensor([0.0] * 8 + thetas + [0.0] * 4)
    x[:, d + 2] = y.float()
    return x, y, thetas


def wide_planted_pairwise_bits(d: int, thetas: list[float]) -> float:
    """Exact ``sum_{i<j} I(m_i; m_j)`` of :class:`WidePlanted`'s posterior (task "all"), by enumerating ``(m_0, m_1, s)``."""
    r, n = d - 2, 20
    states = np.array([(a0, a1, s) for a0 in (0, 1) for a1 in (0, 1) for s in range(r + 1)], dtype=np.float64)
    a0, a1, s = states.T
    k = 8 * np.maximum(a0, a1) + (np.array(thetas)[None, :] <= s[:, None]).sum(axis=1) + 4  # examples correct
    log_w = np.log((k + 1) / (n + 1 - k)) + np.array(
        [math.lgamma(r + 1) - math.lgamma(v + 1) - math.lgamma(r - v + 1) for v in s]
    )
    w = np.exp(log_w - log_w.max())
    w /= w.sum()

    def mi(p: float, q: float, both: float) -> float:
        cells = [(both, p * q), (p - both, p * (1 - q)), (q - both, (1 - p) * q), (1 - p - q + both, (1 - p) * (1 - q))]
        return sum(c * math.log2(c / m) for c, m in cells if c > 0)

    p0, p1, pb = w @ a0, w @ a1, w @ s / r  # a bulk unit is kept with probability E[s] / r (exchangeable)
    return (
        mi(p0, p1, w @ (a0 * a1))
        + r * (mi(p0, pb, w @ (a0 * s) / r) + mi(p1, pb, w @ (a1 * s) / r))
        + r * (r - 1) / 2 * mi(pb, pb, w @ (s * (s - 1)) / (r * (r - 1)))
    )


def test_wide_planted_enumeration_matches_brute_force() -> None:
    d = 9  # small enough to enumerate all 2^9 masks
    x, y, thetas = wide_planted_data(d)
    _, brute = _exact_pairwise_bits(WidePlanted(d), x, y, "units")
    assert wide_planted_pairwise_bits(d, thetas) == pytest.approx(brute, abs=1e-12)


def test_wide_layer_manifold_complexity_counts_the_pairs_it_resolves() -> None:
    """200 units at 8 chains x 800 steps (3-4 proposals per unit and chain): the sum over all ~20,000 jackknifed
    pairs came out at tens of bits of either sign with SEs of 20-50 bits; the truth is 0.14 bits."""
    d = 200
    x, y, thetas = wide_planted_data(d)
    truth = wide_planted_pairwise_bits(d, thetas)
    assert 0.1 < truth < 0.2
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        r = BayesianAblation(WidePlanted(d), "units", method="mcmc", num_chains=8, num_steps=800, burn_in=100, generator=g).fit(
            x, y, tasks="all"
        )
        value, se = r.manifold_complexity.item(), r.manifold_complexity_se.item()
        assert abs(value - truth) < 0.5 and 0 < se < 0.3, (seed, value, se, truth)
        # the OR pair is resolved, the bulk pairs are left out (their bounds, loose, add up to far more than they carry)
        assert 1 <= r.complexity_pairs.item() <= 50, r.complexity_pairs
        assert r.complexity_left_out_bits.item() > truth


def test_jackknife_errors_are_calibrated_and_shrink_like_one_over_sqrt_n() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(200, 5)
    y = model(x).argmax(1)

    def run(steps: int, seed: int):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(seed)
        ablation = BayesianAblation(model, "1", method="mcmc", num_chains=8, num_steps=steps + 50, burn_in=50, generator=g)
        return ablation.fit(x, y, tasks="all")

    short = [run(100, s) for s in range(12)]
    spread = torch.stack([r.importance[0] for r in short]).std(dim=0)  # seed-to-seed SD, per unit
    reported = torch.stack([r.importance_se[0] for r in short]).mean(dim=0)
    moving = spread > 1e-6
    ratio = (reported[moving] / spread[moving]).median().item()
    assert 0.6 < ratio < 1.6, ratio
    long = [run(400, s) for s in range(3)]
    shrink = (torch.stack([r.importance_se[0] for r in long]).mean(0)[moving] / reported[moving]).median().item()
    assert 0.35 < shrink < 0.7, shrink  # 4x the samples: half the error (1 / sqrt(4))


def test_exact_bootstrap_errors_shrink_with_the_probe() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(1600, 5)
    y = (model(x) + 1.0 * torch.randn(1600, 3)).argmax(1)  # noisy labels: importance depends on the probe
    small = BayesianAblation(model, "1", method="exact", num_bootstrap=40).fit(x[:400], y[:400], tasks="all")
    large = BayesianAblation(model, "1", method="exact", num_bootstrap=40).fit(x, y, tasks="all")
    assert small.replicate_kind == "bootstrap" and small.replicate_importance.shape == (40, 1, 8)
    moving = small.importance_se[0] > 1e-4
    assert moving.sum() >= 2
    ratio = (large.importance_se[0][moving] / small.importance_se[0][moving]).median().item()
    assert 0.3 < ratio < 0.75, ratio  # 4x the probe: about half the error
    assert BayesianAblation(model, "1", method="exact", num_bootstrap=0).fit(x, y, tasks="all").importance_se is None


def test_summarize_gives_every_readout_an_error() -> None:
    from lightning_interp.ablation import summarize

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(200, 5)
    y = model(x).argmax(1)
    r = BayesianAblation(model, "1", method="mcmc", num_chains=6, num_steps=150, burn_in=30).fit(x, y)
    out = summarize(r, 0.05)
    names = {"distributedness", "manifold_complexity", "polysemanticity", "max_importance", "informative_units", "full_accuracy"}
    assert set(out) == names
    for name, (value, se) in out.items():
        assert value.dtype == torch.float64 and se.dtype == torch.float64
        if name != "full_accuracy":
            assert torch.isfinite(se) and se >= 0, name
    assert out["max_importance"][0] == r.importance.max()


# ------------------------------------------------------------------ the two-sided likelihood (issue 15)
class Collapse(nn.Module):
    """Zeroing unit 0 makes the network answer class 0 for every input.

    Input columns: ``d`` unit values (all 1), the label (0 or 1). With unit 0 kept, a class-0 example is
    answered correctly when unit 1 is kept (else class 1), a class-1 example when unit 2 is kept (else
    class 0); units 3.. are unused. Every other-class example behaves alike under a mask, so the fraction of
    them not predicted as a task's class, and the specificity on any sample of them, depends on the mask only.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units(x[:, : self.d]) > 0.5
        y = x[:, self.d]
        right = torch.where(y < 0.5, u[:, 1], u[:, 2])
        pred = torch.where(u[:, 0], torch.where(right, y, 1 - y), torch.zeros_like(y))
        return torch.stack([1 - pred, pred], dim=1) * 10.0


COLLAPSE_D = 5


@pytest.fixture(scope="module")
def collapse() -> tuple[Collapse, torch.Tensor, torch.Tensor]:
    y = torch.tensor([0] * 6 + [1] * 10)
    x = torch.ones(16, COLLAPSE_D + 1)
    x[:, COLLAPSE_D] = y.float()
    return Collapse(COLLAPSE_D), x, y


def collapse_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str, rest: int | None = None
) -> np.ndarray:
    """Importance ``[2, d]`` by brute force: the model run on inputs masked by hand, counts, odds, posterior.

    ``rest``: the specificity is computed on a sample of that many other examples (their fraction not
    predicted as the task's class, the same for every sample here, times ``rest``).
    """
    d = COLLAPSE_D
    masks = np.array(list(itertools.product([0, 1], repeat=d)), dtype=float)
    yn = y.numpy()
    out = np.zeros((2, d))
    for c in (0, 1):
        odds = []
        for m in masks:
            xm = x.clone()
            xm[:, :d] *= torch.tensor(m, dtype=x.dtype)
            pred = model(xm).argmax(1).numpy()
            own, other = pred[yn == c], pred[yn != c]
            sens = ((own == c).sum() + 1) / (len(own) + 2)
            if likelihood == "sensitivity":
                p = sens
            else:
                frac = (other != c).mean()
                assert frac in (0.0, 1.0)  # the premise of the sampled reference
                n = len(other) if rest is None else min(rest, len(other))
                p = (sens + (frac * n + 1) / (n + 2)) / 2
            odds.append(p / (1 - p))
        w = np.array(odds) / np.sum(odds)  # uniform prior
        out[c] = w @ masks
    return out


@pytest.mark.parametrize("likelihood", ["sensitivity", "balanced"])
def test_one_sided_likelihood_favours_the_collapse_two_sided_does_not(collapse, likelihood: str) -> None:  # type: ignore[no-untyped-def]
    """Exact enumeration against brute force; only the one-sided likelihood prefers zeroing unit 0 for class 0."""
    model, x, y = collapse
    r = BayesianAblation(model, "units", method="exact", likelihood=likelihood).fit(x, y)
    ref = collapse_reference(model, x, y, likelihood)
    assert r.tasks == ["class 0", "class 1"] and r.likelihood == likelihood
    np.testing.assert_allclose(r.importance.numpy(), ref, atol=1e-12)
    assert r.importance[:, 3:].flatten().tolist() == pytest.approx([0.5] * 4, abs=1e-12)
    top = r.top_masks[0][0].tolist()  # the most probable mask for task "class 0"
    if likelihood == "sensitivity":
        # m_0 = 0 gives sensitivity 7/8 (odds 7) whatever else; m_0 = 1 needs m_1 = 1 (else odds 1/7)
        assert r.importance[0, 0].item() == pytest.approx((7 + 1 / 7) / (3 * 7 + 1 / 7), abs=1e-12) and ref[0, 0] < 0.5
        assert not top[0]
        assert r.full_accuracy[0].item() == pytest.approx(7 / 8)
    else:
        # zeroing unit 0 now costs the specificity on the ten class-1 examples: p = (7/8 + 1/12) / 2
        assert r.importance[0, 0].item() > 0.7 and top[:3] == [True, True, True]
        assert r.full_accuracy[0].item() == pytest.approx((7 / 8 + 11 / 12) / 2)


@pytest.mark.parametrize(("likelihood", "rest"), [("sensitivity", 64), ("balanced", 64), ("balanced", 4)])
def test_mcmc_matches_brute_force_for_both_likelihoods(collapse, likelihood: str, rest: int) -> None:  # type: ignore[no-untyped-def]
    """MCMC within 4 SE of the enumeration; with ``rest`` below the other examples, of the enumeration on a sample."""
    model, x, y = collapse
    r = BayesianAblation(
        model, "units", method="mcmc", num_chains=8, num_steps=600, burn_in=100, likelihood=likelihood, rest_per_chain=rest,
        generator=torch.Generator().manual_seed(1),
    ).fit(x, y)  # fmt: skip
    ref = collapse_reference(model, x, y, likelihood, rest=rest)
    assert r.method == "mcmc" and r.replicate_kind == "jackknife"
    err = (r.importance.numpy() - ref) / (r.importance_se.numpy() + 1e-12)
    assert np.abs(err).max() < 4, (r.importance, ref, r.importance_se)
    assert (r.importance_se[:, :3] < 0.03).all()  # precise enough for the test to tell the likelihoods apart
    assert (r.importance[0, 0].item() < 0.5) == (likelihood == "sensitivity")
    if rest == 4:  # the sampled specificity differs from the full one: the enumeration on all examples is off
        full = collapse_reference(model, x, y, likelihood)
        assert np.abs(full - ref).max() > 0.02


def test_bootstrap_replicate_is_the_fit_on_the_resampled_probe() -> None:
    """A bootstrap replicate (weighted counts, TN included) equals an exact fit on the resampled examples."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(60, 5)
    y = (model(x) + 1.0 * torch.randn(60, 3)).argmax(1)
    draw = torch.randint(0, 60, (60,), generator=torch.Generator().manual_seed(5))
    for likelihood in ("balanced", "sensitivity"):
        g = torch.Generator().manual_seed(5)
        r = BayesianAblation(model, "1", method="exact", num_bootstrap=1, likelihood=likelihood, generator=g).fit(
            x, y, tasks=[0, 1, 2]
        )
        ref = BayesianAblation(model, "1", method="exact", num_bootstrap=0, likelihood=likelihood).fit(
            x[draw], y[draw], [0, 1, 2]
        )
        assert torch.allclose(r.replicate_importance[0], ref.importance, atol=1e-12, rtol=0)
        assert (r.replicate_importance[0] - r.importance).abs().max() > 1e-3, "the resample must change the posterior"


def test_likelihood_functions_and_bad_values() -> None:
    from lightning_interp.ablation import correct_probability, mask_log_posterior

    tp, tn = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([5.0, 9.0], dtype=torch.float64)
    n_t, n_r = torch.tensor(4.0, dtype=torch.float64), torch.tensor(9.0, dtype=torch.float64)
    assert correct_probability(tp, n_t).tolist() == pytest.approx([4 / 6, 1 / 6])
    assert correct_probability(tp, n_t, tn, n_r).tolist() == pytest.approx([(4 / 6 + 6 / 11) / 2, (1 / 6 + 10 / 11) / 2])
    with pytest.raises(ValueError, match="num_rest is required"):
        correct_probability(tp, n_t, tn)
    # a uniform prior and odds 1, 3: posterior 1/4, 3/4; a prior of 0.8 for keeping the unit: 1/13, 12/13
    masks, p = torch.tensor([[False], [True]]), torch.tensor([0.5, 0.75], dtype=torch.float64)
    assert mask_log_posterior(p, masks).exp().tolist() == pytest.approx([0.25, 0.75])
    assert mask_log_posterior(p, masks, 0.8).exp().tolist() == pytest.approx([1 / 13, 12 / 13])
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"likelihood must be one of 'balanced', 'sensitivity', got 'odds'"):
        BayesianAblation(model, "1", likelihood="odds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rest_per_chain must be an int >= 1"):
        BayesianAblation(model, "1", rest_per_chain=0)


def test_callback_checks_passes_and_keys_the_likelihood() -> None:
    from lightning_interp.callbacks import AblationProbeCallback

    with pytest.raises(ValueError, match=r"likelihood must be one of 'balanced', 'sensitivity', got 'specificity'"):
        AblationProbeCallback(layers="1", likelihood="specificity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rest_per_chain must be an int >= 1, got 0"):
        AblationProbeCallback(layers="1", rest_per_chain=0)
    balanced = AblationProbeCallback(layers="1")
    one_sided = AblationProbeCallback(layers="1", likelihood="sensitivity", rest_per_chain=9)
    assert balanced.state_key != one_sided.state_key and "'likelihood': 'balanced'" in balanced.state_key
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    ablation = one_sided._ablation(model, "1")
    assert (ablation.likelihood, ablation.rest_per_chain) == ("sensitivity", 9)


class _ScaledHead(nn.Module):
    """A linear head whose logits are multiplied by 1.0: the same numbers, but not a structurally affine head."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 1.0


def _pooled_cnn(head: nn.Module) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 24, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def test_affine_head_steps_add_one_column_and_match_the_head() -> None:
    """A Linear head after the pool: logits read off as (h * m) @ W + b; each step's update equals a pass through the head."""
    fc = nn.Linear(24, 7)
    model = _pooled_cnn(fc)
    x = torch.randn(70, 1, 6, 6)
    y = torch.where(torch.arange(70) < 35, model(x).argmax(1), torch.arange(70) % 7)  # half agree with the model
    forward = MaskedForward(model, "1")
    prepared = forward.prepare(x)
    assert forward.mask_after == "3" and prepared[0].shape == (70, 24)  # pushed past the pool and flatten
    head = forward.linear_head(prepared)
    assert head is not None
    torch.testing.assert_close(head[0], fc.weight.detach().double().T)
    torch.testing.assert_close(head[1], fc.bias.detach().double())
    # not affine: a ReLU in the head, or an op outside the linear ones
    mlp = _pooled_cnn(nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 7)))
    scaled = _pooled_cnn(_ScaledHead(nn.Linear(24, 7)))
    for other in (mlp, scaled):
        f = MaskedForward(other, "1")
        assert f.linear_head(f.prepare(x)) is None
    f = MaskedForward(model, "0")  # the conv output: the mask commutes with the ReLU and the pool, the head is affine
    assert f.linear_head(f.prepare(x)) is not None and f.mask_after == "3"
    # the incremental chains give the same fit as passing every row through the head
    twin = _pooled_cnn(_ScaledHead(nn.Linear(24, 7)))
    twin.load_state_dict({k.replace("4.", "4.fc."): v for k, v in model.state_dict().items()})
    runs = [
        BayesianAblation(m, "1", method="mcmc", num_chains=4, num_steps=300, burn_in=50, rest_per_chain=9,
                         generator=torch.Generator().manual_seed(1)).fit(x, y)
        for m in (model, twin)
    ]  # fmt: skip
    assert len(runs[0].tasks) >= 4
    assert torch.equal(runs[0].acceptance_rate, runs[1].acceptance_rate)
    assert torch.equal(runs[0].importance, runs[1].importance)
    assert runs[0].num_rows == runs[1].num_rows


def test_many_tasks_run_in_blocks_that_equal_separate_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of class tasks (memory bounds) give, per block, exactly the fit of that block's tasks alone."""
    import lightning_interp.ablation.core as ablation_module  # the engine reads the memory bounds there

    model = _pooled_cnn(nn.Linear(24, 5))
    x = torch.randn(60, 1, 6, 6)
    y = torch.arange(60) % 3

    def fit(tasks: list[int]) -> object:
        return BayesianAblation(model, "1", method="mcmc", num_chains=3, num_steps=80, burn_in=20,
                                generator=torch.Generator().manual_seed(2)).fit(x, y, tasks=tasks)  # fmt: skip

    alone = fit([0])
    together = fit([0, 1, 2])
    monkeypatch.setattr(ablation_module, "_MAX_TRACE_BYTES", 3 * 60 * 24)  # one task per block
    blocked = fit([0, 1, 2])
    assert blocked.tasks == together.tasks == ["class 0", "class 1", "class 2"]
    assert torch.equal(blocked.importance[0], alone.importance[0])
    assert torch.equal(blocked.acceptance_rate[:1], alone.acceptance_rate)
    for name in ("importance", "manifold_complexity", "ess", "acceptance_rate", "information_bits", "importance_se"):
        assert getattr(blocked, name).shape == getattr(together, name).shape, name
    assert blocked.num_rows == together.num_rows and blocked.num_evaluations == together.num_evaluations
    assert blocked.manifold_complexity_se is not None and blocked.manifold_complexity_se.shape == (3,)


def test_callback_names_tasks_by_class_and_keeps_wide_figures_readable() -> None:
    """Class names label the tasks in figures and tables; a 300-unit layer's figures stay a readable size."""
    from lightning_interp.ablation import AblationResult
    from lightning_interp.callbacks import AblationProbeCallback
    from lightning_interp.callbacks.measurement import Measurement

    with pytest.raises(TypeError, match="class_names must be a list of strings"):
        AblationProbeCallback(layers="1", class_names="cat")  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 300), nn.ReLU(), nn.Linear(300, 4)).eval()
    x = torch.randn(40, 6)
    y = torch.arange(40) % 4
    r = BayesianAblation(model, "1", method="mcmc", num_chains=2, num_steps=30, burn_in=5).fit(x, y, tasks=[1, 3])
    assert r.task_classes == [1, 3]
    cb = AblationProbeCallback(layers="1", class_names=["ant", "bee", "cat", "dog"])
    named = AblationResult({"1": r}, {}, 2, 30, 40, class_names=cb.class_names)
    assert named.task_labels(r) == ["bee", "dog"]
    assert AblationResult({"1": r}, {}, 2, 30, 40).task_labels(r) == ["class 1", "class 3"]
    measurement = Measurement(scalars={}, data={"result": named, "results": {"1": r}})
    figs = cb.figures(measurement)
    heat, bars = figs["1/importance"], figs["1/importance_errors"]
    assert [t.get_text() for t in heat.axes[0].get_yticklabels()] == ["bee", "dog"]
    assert max(heat.get_size_inches()) <= 14 and max(bars.get_size_inches()) <= 14
    assert len(bars.axes[0].get_xticklabels()) == 64 and "64 most informative of 300 units" in bars.axes[0].get_title()
    assert {row[2] for row in cb.tables(measurement)["top_units"][1]} <= {"bee", "dog"}


# ---------------------------------------------------------------------------------------------
# issue 21: user-written CNNs get the pooled fast path; pilot; ESS bound; NaN logits; the budget's sizes
# ---------------------------------------------------------------------------------------------


def _bn(c: int) -> nn.BatchNorm2d:
    """An eval BatchNorm with trained-looking statistics: a zeroed channel comes out at its shift, not 0."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


class _AttrCNN(nn.Module):
    """The issue's CNN written with attributes and functional calls: F.relu, F.max_pool2d, x.mean((2, 3))."""

    def __init__(self, act: str = "relu", pool: str = "mean") -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), _bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), _bn(16)
        self.c3, self.b3 = nn.Conv2d(16, 24, 3, padding=1), _bn(24)
        self.act, self.pool = act, pool
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        x = self.b3(self.c3(x))
        x = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "leaky": lambda t: F.leaky_relu(t, 0.1)}[self.act](x)
        if self.pool == "mean":
            x = x.mean((2, 3))
        elif self.pool == "adaptive":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        else:  # global max pool, then a view with the batch size (two users of the pooled map)
            x = F.adaptive_max_pool2d(x, 1)
            x = x.view(x.size(0), -1)
        return self.fc(x)


def _sequential_cnn(act: type[nn.Module], pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), _bn(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), _bn(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1), _bn(24), act(), pool, nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip


def _user_cnns() -> list[tuple[str, nn.Module, str]]:
    """(description, model in eval mode, layer): the conv followed by BN, an activation and a global pool."""
    torch.manual_seed(21)
    return [
        ("Sequential ReLU GAP", _sequential_cnn(nn.ReLU, nn.AdaptiveAvgPool2d(1)).eval(), "8"),
        ("Sequential GELU global MaxPool2d", _sequential_cnn(nn.GELU, nn.MaxPool2d(3)).eval(), "8"),
        ("Sequential SiLU AvgPool2d", _sequential_cnn(nn.SiLU, nn.AvgPool2d(3)).eval(), "8"),
        ("Sequential LeakyReLU", _sequential_cnn(lambda: nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1)).eval(), "8"),  # type: ignore[arg-type]
        ("Sequential Hardswish, layer = BN", _sequential_cnn(nn.Hardswish, nn.AdaptiveAvgPool2d(1)).eval(), "9"),
        ("attributes F.relu x.mean", _AttrCNN("relu", "mean").eval(), "c3"),
        ("attributes F.gelu adaptive pool flatten", _AttrCNN("gelu", "adaptive").eval(), "c3"),
        ("attributes F.silu max pool view", _AttrCNN("silu", "max").eval(), "c3"),
        ("attributes F.leaky_relu, layer = BN", _AttrCNN("leaky", "mean").eval(), "b3"),
    ]


def _masked_logits(model: nn.Module, layer: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The slow path by hand: the full forward with the layer's channels multiplied by the mask (a hook)."""
    from lightning_interp.hooks import replace

    with replace(model, layer, lambda h: h * mask.to(h.dtype)[None, :, None, None]), torch.no_grad():
        return model(x)


@pytest.mark.parametrize("case", range(9))
def test_user_written_cnns_get_the_pooled_affine_path_with_the_slow_paths_results(case: int) -> None:
    """Conv -> BN -> activation -> global pool -> Linear, written as users do: the mask moves to the pooled features
    (a masked channel at its BN shift pushed through the activation and the pool), the head is affine, and the
    predictions equal the full forward with masked channels bit for bit; the affine logits equal it in float64."""
    name, model, layer = _user_cnns()[case]
    x = torch.randn(40, 1, 12, 12)  # 3 x 3 maps at the layer
    masks = torch.rand(12, 24, generator=torch.Generator().manual_seed(case)) < 0.5
    fast, slow = MaskedForward(model, layer), MaskedForward(model, layer, split=False)
    prepared = fast.prepare(x)
    features = fast.features(prepared)
    assert fast.mask_after is not None and features is not None and features.shape == (40, 24), name
    if layer not in ("9", "b3"):  # the conv: a masked channel leaves the BN at its shift, BN(0) != 0
        assert fast.masked_value is not None and fast.masked_value.abs().max() > 0.01, name
    assert torch.equal(fast.predictions(prepared, masks), slow.predictions(slow.prepare(x), masks)), name
    # float64: the affine head z @ W + b with z = where(m, h, c) is the full forward with masked channels
    model64, x64 = model.double(), x.double()
    fast64 = MaskedForward(model64, layer)
    head = fast64.linear_head(fast64.prepare(x64))
    assert head is not None, name
    h, c = fast64.features(fast64.prepare(x64)), fast64.masked_value
    assert h is not None
    for mask in masks[:4]:
        affine = torch.where(mask, h, c.reshape(-1) if c is not None else 0.0) @ head[0] + head[1]
        torch.testing.assert_close(affine, _masked_logits(model64, layer, x64, mask), rtol=1e-10, atol=1e-10)
    # the chains (flip one column at a time, float64 logits) give the fit of the whole forward
    y = torch.arange(40) % 5
    runs = [
        BayesianAblation(model64, layer, method="mcmc", num_chains=2, num_steps=40, burn_in=10, split=split, rest_per_chain=8,
                         generator=torch.Generator().manual_seed(0)).fit(x64, y)
        for split in (True, False)
    ]  # fmt: skip
    assert torch.equal(runs[0].importance, runs[1].importance), name
    assert torch.equal(runs[0].acceptance_rate, runs[1].acceptance_rate), name


def test_push_past_batchnorm_needs_eval_mode() -> None:
    """A BatchNorm in training mode normalises with the batch: a masked channel has no fixed value, no push past it."""
    _, model, layer = _user_cnns()[5]
    model.b3.train()
    mf = MaskedForward(model, layer)
    mf.prepare(torch.randn(16, 1, 12, 12))
    assert mf.mask_after is None and mf.masked_value is None
    model.b3.eval()
    mf.prepare(torch.randn(16, 1, 12, 12))
    assert mf.mask_after == "mean"


def test_nan_logits_give_nan_readouts_not_numbers() -> None:
    """NaN weights: argmax(NaN) must not pass for a prediction; every read-out of the fit and the callback is NaN."""
    from lightning_interp.ablation import summarize
    from lightning_interp.callbacks import AblationProbeCallback

    torch.manual_seed(0)
    x, y = torch.randn(60, 4), torch.arange(60) % 3
    for method, width in (("mcmc", 20), ("exact", 8)):
        model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)).eval()
        with torch.no_grad():
            model[2].weight[1, 3] = math.nan
        ablation = BayesianAblation(model, "1", method=method, num_chains=2, num_steps=20, burn_in=5)  # type: ignore[arg-type]
        r = ablation.fit(x, y)
        assert r.split and r.method == method  # NaN logits in the same places: the split still computes the model
        assert r.importance.isnan().all() and r.full_accuracy.isnan().all() and r.distributedness.isnan().all()
        assert all(v.isnan() and se.isnan() for v, se in summarize(r, 0.05).values())
    cb = AblationProbeCallback(layers="1", method="mcmc", num_chains=2, num_steps=30, burn_in=5, probe_size=60)
    cb._probe = (x, y)
    scalars = cb.measure(model).scalars
    for key in ("full_accuracy", "max_importance", "ess", "ess_median", "acceptance_rate", "distributedness"):
        assert math.isnan(float(scalars[f"1/{key}"])), key


def test_effective_sample_size_is_bounded_by_the_draws() -> None:
    """p (1 - p) / SE^2, capped at chains x kept steps; NaN for a zero or rounding-level SE (not 1e27)."""
    from lightning_interp.ablation import AblationFit, effective_sample_size

    p = torch.tensor([[0.5, 0.2, 0.5, 0.5, 0.5]], dtype=torch.float64)
    se = torch.tensor([[0.05, 0.02, 1e-4, 2.7e-15, 0.0]], dtype=torch.float64)
    zeros = torch.zeros(1, dtype=torch.float64)
    r = AblationFit(tasks=["all"], importance=p, information_bits=torch.zeros_like(p), distributedness=zeros,
                       manifold_complexity=zeros, complexity_kind="", polysemanticity=p[0], mask_entropy_bits=zeros,
                       full_accuracy=zeros + 1, method="mcmc", num_evaluations=1, importance_se=se, num_draws=800)  # fmt: skip
    ess = effective_sample_size(r)[0]
    assert ess[0] == pytest.approx(100.0) and ess[1] == pytest.approx(0.16 / 0.0004)
    assert ess[2] == 800  # 0.25 / 1e-8 = 2.5e7 draws' worth: capped at the 800 draws
    assert ess[3:].isnan().all()  # 0.25 / 2.7e-15^2 would be 3e28
    # a real run: every finite ESS within (0, draws]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 30), nn.ReLU(), nn.Linear(30, 3)).eval()
    x = torch.randn(90, 4)
    run = BayesianAblation(model, "1", method="mcmc", num_chains=4, num_steps=200, burn_in=20).fit(x, model(x).argmax(1))
    real = effective_sample_size(run)
    assert run.num_draws == 4 * 180 and (real[~real.isnan()] > 0).all() and (real[~real.isnan()] <= 720).all()


def _timed(fn: object) -> float:
    import time

    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def test_pilot_is_within_twice_the_measurement_on_three_shapes() -> None:
    """estimate_cost (a full measurement's seconds) against the timed measure(): median ratio in [0.5, 2]."""
    from lightning_interp.callbacks import AblationProbeCallback

    torch.manual_seed(0)
    torch.set_num_threads(1)
    wide = nn.Sequential(nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 6)).eval()  # affine head, wide layer
    mlp_head = nn.Sequential(nn.Linear(10, 48), nn.ReLU(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 6)).eval()
    cnn = _user_cnns()[5][1]
    cnn.fc = nn.Linear(24, 6)
    shapes = [(wide, "1", torch.randn(256, 10)), (mlp_head, "1", torch.randn(256, 10)), (cnn, "c3", torch.randn(256, 1, 28, 28))]
    for model, layer, x in shapes:
        y = torch.arange(len(x)) % 6
        ratios = []
        for _ in range(3):
            cb = AblationProbeCallback(layers=layer, method="mcmc", num_chains=4, num_steps=400, burn_in=50, probe_size=len(x))
            cb._probe = (x, y)
            estimate = cb.estimate_cost(model)
            assert estimate is not None
            ratios.append(estimate / _timed(lambda cb=cb, model=model: cb.measure(model)))
        assert 0.5 <= float(np.median(ratios)) <= 2.0, (layer, ratios)


def test_budget_sizes_scale_steps_then_probe_and_keep_every_class() -> None:
    """work < 1: kept steps first (floor max(100, kept / 4)), then the probe (floor 64, every class); logged sizes."""
    from lightning_interp.ablation.measure import round_robin_order, step_rows
    from lightning_interp.callbacks import AblationProbeCallback
    from lightning_interp.callbacks.ablation import MIN_KEPT_STEPS, MIN_PROBE

    assert AblationProbeCallback(layers="1").every_n_epochs == 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 10)).eval()
    x, y = torch.randn(300, 4), torch.arange(300) % 10
    cb = AblationProbeCallback(layers="1", method="mcmc", num_chains=2, num_steps=1000, burn_in=100, probe_size=300)
    cb._probe = (x, y)

    def rows(size: int) -> int:  # the rows of a step on the first `size` examples of the round-robin order
        return step_rows(y[round_robin_order(y)[:size]], "classes", 2, "balanced", 64)

    assert rows(300) == BayesianAblation(model, "1", num_chains=2).rows_per_step(y)  # the engine's own count
    assert rows(MIN_PROBE) == BayesianAblation(model, "1", num_chains=2).rows_per_step(y[round_robin_order(y)[:MIN_PROBE]])
    floor = cb.work_floor()
    kept_floor = max(MIN_KEPT_STEPS, 900 // 4)
    assert floor == pytest.approx((100 + kept_floor) / 1000 * rows(MIN_PROBE) / rows(300))
    for work, steps in ((1.0, 1000), (0.5, 500), (0.33, 330)):
        cb.work = work
        assert cb._sizes() == (steps, 300)
    for work in (0.3, 0.2, floor, floor / 2):
        cb.work = work
        steps, size = cb._sizes()
        assert steps == 100 + kept_floor and MIN_PROBE <= size < 300
        # the cost model (steps x rows of a step) stays within the work asked, down to the floor
        assert steps / 1000 * rows(size) / rows(300) <= max(work, floor) + 1e-9
    cb.work = floor
    scalars = cb.measure(model).scalars
    assert scalars["num_steps"] == 100 + kept_floor and scalars["probe_size"] == MIN_PROBE
    assert math.isfinite(float(scalars["1/max_importance"]))
    kept = y[round_robin_order(y)[:MIN_PROBE]]
    assert set(kept.tolist()) == set(range(10))  # every class task keeps examples (6 or 7 each)


def test_callback_rejects_a_layer_that_never_runs() -> None:
    import lightning.pytorch as pl

    from lightning_interp.callbacks import AblationProbeCallback
    from lightning_interp.models import MLPClassifier
    from tests.contract import gaussian3_datamodule

    model = MLPClassifier(2, 3, hidden=(16,), lr=1e-2)
    model.unused = nn.Linear(16, 16)
    kw: dict = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    cb = AblationProbeCallback(layers=["unused"], probe_size=32, method="mcmc", num_steps=20, burn_in=5)
    with pytest.raises(ValueError, match=r"do not run in its forward"):
        pl.Trainer(max_epochs=1, callbacks=[cb], **kw).fit(model, gaussian3_datamodule())


def _random_chain_sums(num_tasks: int, c: int, s: int, d: int, seed: int):  # type: ignore[no-untyped-def]
    """Chain sums of random walks of single-unit flips: dependent units, units at exactly the prior, unproposed units."""
    from lightning_interp.ablation.mcmc import chain_sums

    g = torch.Generator().manual_seed(seed)
    flips = torch.randint(0, d - 1, (num_tasks, c, s), generator=g)  # the last unit is never proposed
    state = torch.rand(num_tasks, c, d, generator=g) < 0.5
    weight = torch.randn(num_tasks, d, d, generator=g, dtype=torch.float64)
    weight[:, :, : d // 3] = 0.0  # the first third's conditionals do not depend on the mask ...
    weight[0] = 0.0  # ... nor any of task 0's (no dependent pair)
    traces = torch.empty(num_tasks, c, s, d, dtype=torch.bool)
    conds = torch.empty(num_tasks, c, s, dtype=torch.float64)
    for step in range(s):
        j = flips[:, :, step]
        logit = torch.einsum("tcd,tcd->tc", weight.gather(1, j[..., None].expand(-1, -1, d)), state.double())
        conds[:, :, step] = torch.sigmoid(logit)  # exactly 0.5 where the unit's row is 0
        keep = torch.rand(num_tasks, c, generator=g, dtype=torch.float64) < conds[:, :, step]
        state.scatter_(2, j[..., None], keep[..., None])
        traces[:, :, step] = state
    accepted = torch.rand(num_tasks, generator=g, dtype=torch.float64) * c * s
    return chain_sums(flips, conds, traces, accepted, 0.0)


def _loop_readouts(sums, kept: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The MCMC read-outs by straightforward loops over tasks and chains (the pre-vectorised code)."""
    from lightning_interp.ablation.readouts import LOG2, binary_entropy_bits

    num_tasks, c, d = sums.cond_sum.shape

    def marginals(chains: list[int], count: float):  # type: ignore[no-untyped-def]
        cs, cc, ch, raw = (t[:, chains].sum(1) for t in (sums.cond_sum, sums.cond_cnt, sums.cond_entropy, sums.raw))
        imp = torch.where(cc > 0, cs / cc.clamp_min(1), raw / count).clamp(0, 1)
        h = binary_entropy_bits(imp)
        return imp, (h - torch.where(cc > 0, ch / cc.clamp_min(1), h)).clamp_min(0), cc

    def joint(t: int, k: int) -> torch.Tensor:
        out = torch.zeros(d, d, dtype=torch.float64)
        for step in range(kept):
            out[sums.flips[t, k, step]] += sums.traces[t, k, step].double() * sums.conds[t, k, step]
        return out

    def pair_information(imp, cc, jt, i, j):  # type: ignore[no-untyped-def]
        n = cc.clamp_min(1)
        pi, pj = imp[i], imp[j]
        j11 = (jt[j, i] / n[j] + jt[i, j] / n[i]) / 2
        j11 = torch.maximum(torch.minimum(j11, torch.minimum(pi, pj)), (pi + pj - 1).clamp_min(0))
        cells = torch.stack([j11, pi - j11, pj - j11, 1 - pi - pj + j11]).clamp_min(0)
        p = imp.clamp(0, 1)
        neg = torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)
        return ((torch.special.xlogy(cells, cells).sum(dim=0) - neg[i] - neg[j]) / LOG2).clamp_min(0)

    imp, dep, cc = marginals(list(range(c)), c * kept)
    loo = [marginals([i for i in range(c) if i != k], (c - 1) * kept) for k in range(c)]
    value, left_out = torch.zeros(num_tasks, dtype=torch.float64), torch.zeros(num_tasks, dtype=torch.float64)
    pairs = torch.zeros(num_tasks, dtype=torch.long)
    replicates = torch.zeros(c, num_tasks, dtype=torch.float64)
    for t in range(num_tasks):
        i, j = torch.nonzero(dep[t, :, None].gt(0) & dep[t, None, :].gt(0)).T
        i, j = i[i < j], j[i < j]
        if not i.numel():
            continue
        bound = torch.minimum(dep[t, i], dep[t, j])
        joints = [joint(t, k) for k in range(c)]
        total = sum(joints, torch.zeros(d, d, dtype=torch.float64))
        mi = pair_information(imp[t], cc[t], total, i, j)
        if c == 1:
            value[t], pairs[t] = mi.sum(), i.numel()
            continue

        def one_out(k: int, i: torch.Tensor, j: torch.Tensor, t: int = t, total=total, joints=joints) -> torch.Tensor:  # type: ignore[no-untyped-def]
            imp_k, dep_k, cc_k = loo[k]
            mi_k = pair_information(imp_k[t], cc_k[t], total - joints[k], i, j)
            return torch.where((dep_k[t, i] > 0) & (dep_k[t, j] > 0), mi_k, torch.zeros_like(mi_k))

        s1, s2 = torch.zeros_like(mi), torch.zeros_like(mi)
        for k in range(c):
            s1 += one_out(k, i, j)
            s2 += one_out(k, i, j) ** 2
        se = ((c - 1) / c * (s2 - s1 * s1 / c)).clamp_min(0).sqrt()
        counted = bound > se.median()
        value[t], pairs[t], left_out[t] = (c * mi - (c - 1) * s1 / c)[counted].sum(), counted.sum(), bound[~counted].sum()
        for k in range(c):
            replicates[k, t] = one_out(k, i[counted], j[counted]).sum()
    ess = torch.zeros(num_tasks, d, dtype=torch.float64)
    for t in range(num_tasks):  # Geyer's initial positive sequence, per task and unit, from the chains' mean autocovariance
        x = sums.traces[t].double()  # [C, S, d]
        x = x - x.mean(dim=(0, 1))
        var = (x * x).mean(dim=(0, 1))
        f = torch.fft.rfft(x, n=2 * kept, dim=1)
        rho = (torch.fft.irfft(f * f.conj(), n=2 * kept, dim=1)[:, :kept].mean(dim=0) / kept) / var.clamp_min(1e-300)
        for u in range(d):
            total_rho = 0.0
            for lag in range(1, kept - 1, 2):
                pair = float(rho[lag, u] + rho[lag + 1, u])
                if pair < 0:
                    break
                total_rho += pair
            bad = var[u] <= 0 or total_rho <= -0.5
            ess[t, u] = c * kept if bad else c * kept / (1 + 2 * total_rho)
    out = {"importance": imp, "complexity": value, "pairs": pairs, "left_out": left_out, "ess": ess}
    if c >= 2:
        out["replicate_importance"], out["replicate_complexity"] = torch.stack([m[0] for m in loo]), replicates
    return out


@pytest.mark.parametrize(("num_tasks", "c", "s", "d", "seed"), [(3, 4, 120, 9, 0), (2, 1, 80, 7, 1), (4, 8, 64, 6, 2)])
def test_vectorised_mcmc_readouts_equal_loops_over_tasks_and_chains(num_tasks: int, c: int, s: int, d: int, seed: int) -> None:
    """Every read-out of MetropolisChains.estimate (batched over tasks and chains) equals loops to 1e-12 relative."""
    from types import SimpleNamespace

    from lightning_interp.ablation.mcmc import MetropolisChains, chain_joints

    sums = _random_chain_sums(num_tasks, c, s, d, seed)
    ref = _loop_readouts(sums, s)
    chains = MetropolisChains(num_chains=c, num_steps=s + 5, burn_in=5, prior_keep=0.5, generator=torch.Generator())
    got = chains.estimate(sums, SimpleNamespace(rows_per_step=1), num_tasks, torch.device("cpu"))  # type: ignore[arg-type]

    def close(a: torch.Tensor | None, b: torch.Tensor) -> None:
        assert a is not None and a.shape == b.shape
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=0.0), (a, b)

    close(got.importance, ref["importance"])
    close(got.manifold_complexity, ref["complexity"])
    close(got.complexity_pairs, ref["pairs"])
    close(got.complexity_left_out_bits, ref["left_out"])
    close(got.ess_per_unit, ref["ess"])
    close(got.ess, ref["ess"].min(dim=1).values)
    close(got.acceptance_rate, sums.accepted / (c * s))
    assert ref["pairs"][0] == 0 and (ref["pairs"][1:] > 0).all()  # task 0 has no dependent pair; the others have some
    assert (got.importance[:, -1] == sums.raw[:, :, -1].sum(1) / (c * s)).all()  # never proposed: the 0/1 draws
    if c >= 2:
        close(got.replicate_importance, ref["replicate_importance"])
        close(got.replicate_complexity, ref["replicate_complexity"])
    else:
        assert got.replicate_importance is None and got.replicate_kind == ""
    joints = chain_joints(sums)
    for t in range(num_tasks):
        for k in range(c):
            assert torch.equal(joints[t, k], sums.chain_joint(t, k))
    assert torch.equal(sums.raw, sums.traces.sum(dim=2, dtype=torch.float64))
