"""Final-layer saliency: closed forms, captum equivalence, the autograd fallback and bad input."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn

from lightning_interp.callbacks import FinalLayerSaliencyCallback
from lightning_interp.hooks import forward_hooks, get_module
from lightning_interp.models import SmallCNN
from lightning_interp.saliency import FinalLayerSaliency, channel_set_map, fit_ald, split_chain


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=12).eval()


def _forced_fallback(model: nn.Module, layer: str) -> FinalLayerSaliency:
    s = FinalLayerSaliency(model, feature_layer=layer)
    s.uses_closed_form, s.feature_transform = False, None
    return s


# ------------------------------------------------------------------------------------ captum and CAM
def test_policy_gradient_equals_captum_layer_gradcam(resnet: nn.Module) -> None:
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 5, 11, 3])
    s = FinalLayerSaliency(resnet)
    pg = s.attribute(x, target=target, method="policy_gradient")
    assert (s.feature_layer, s.classifier, s.uses_closed_form) == ("layer4", "fc", True)
    ref = LayerGradCam(lambda inp: torch.log_softmax(resnet(inp), dim=1), resnet.layer4).attribute(
        x, target=target, relu_attributions=False
    )[:, 0]
    h, w = pg.shape[-2:]
    torch.testing.assert_close(pg / (h * w), ref.detach(), rtol=1e-4, atol=1e-6)
    assert pg.min() < 0 < pg.max(), "raw policy-gradient maps are signed"


def test_cam_is_the_weighted_sum_of_feature_maps(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    feats = {}
    handle = resnet.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("a", o.detach()))
    with torch.no_grad():
        logits = resnet(x)
    handle.remove()
    cam = FinalLayerSaliency(resnet).attribute(x, method="cam")  # target: predicted class
    pred = logits.argmax(dim=1)
    manual = torch.stack([(resnet.fc.weight[c][:, None, None] * feats["a"][i]).sum(0) for i, c in enumerate(pred)])
    torch.testing.assert_close(cam, manual, rtol=1e-5, atol=1e-5)


def test_topk_targets_in_one_call_equal_separate_calls(resnet: nn.Module) -> None:
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    s = FinalLayerSaliency(resnet)
    top = resnet(x).topk(3, dim=1).indices
    together = s.attribute_all(x, target=top)
    for j in range(3):
        single = s.attribute_all(x, target=top[:, j])
        for m in ("policy_gradient", "cam", "discriminative", "confusing"):
            torch.testing.assert_close(together[m][:, j], single[m], rtol=1e-5, atol=1e-6)
    assert together["policy_gradient"].shape == (3, 3, 2, 2)


def _every_class(model: nn.Module, n: int) -> torch.Tensor:
    k = model.fc.out_features
    return torch.arange(k).expand(n, k)


def test_all_class_maps_in_one_call_equal_per_class_references(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    every = _every_class(resnet, 2)
    s = FinalLayerSaliency(resnet)
    together = s.attribute_all(x, target=every)
    up = s.attribute(x, target=every, method="policy_gradient", upsample=True)
    s.chunk_elements = 1  # one class per chunk
    in_chunks = s.attribute_all(x, target=every, upsample=True)
    s.chunk_elements = FinalLayerSaliency.chunk_elements
    feats: dict[str, torch.Tensor] = {}
    with forward_hooks(resnet, {"layer4": lambda _m, _i, out: feats.__setitem__("a", out.detach())}), torch.no_grad():
        q = resnet(x).softmax(dim=1)
    a, weight = feats["a"], resnet.fc.weight.detach()
    for c in range(weight.shape[0]):
        # independent references, one class at a time: the formulas of docs/saliency.md on the captured map
        refs = {
            "cam": torch.einsum("d,ndhw->nhw", weight[c], a),
            "policy_gradient": torch.einsum("nd,ndhw->nhw", weight[c] - q @ weight, a),
        }
        for method, side in (("discriminative", "+"), ("confusing", "-")):
            mask = torch.zeros(weight.shape[1], dtype=torch.bool)
            mask[split_chain(weight[c], side, 20)[-1]] = True
            refs[method] = channel_set_map(a, mask)
        for method, ref in refs.items():
            torch.testing.assert_close(together[method][:, c], ref, rtol=1e-5, atol=1e-5)
            ref_up = F.interpolate(ref[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
            torch.testing.assert_close(in_chunks[method][:, c], ref_up, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up[:, c], in_chunks["policy_gradient"][:, c])
    for c in (0, 7):  # one class at a time through the same code
        single = s.attribute_all(x, target=c)
        for method in refs:
            torch.testing.assert_close(together[method][:, c], single[method], rtol=1e-5, atol=1e-6)
    assert together["cam"].shape == (2, weight.shape[0], 2, 2) and in_chunks["cam"].shape == (2, weight.shape[0], 64, 64)


def test_all_class_fallback_equals_closed_form(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    every = _every_class(resnet, 2)
    closed = FinalLayerSaliency(resnet).attribute_all(x, target=every)
    got = _forced_fallback(resnet, "layer4").attribute_all(x, target=every)  # one backward per class, plus one
    for m in ("policy_gradient", "cam", "discriminative", "confusing"):
        torch.testing.assert_close(got[m], closed[m], rtol=1e-4, atol=1e-5)


def test_all_class_maps_cost_about_one_forward_pass() -> None:
    torch.manual_seed(13)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    x = torch.randn(2, 3, 160, 160)
    every = _every_class(model, 2)
    s = FinalLayerSaliency(model)
    s.attribute_all(x, target=every)  # resolves the layers and fills the chain cache of every class
    passes = []
    with forward_hooks(model, {"": lambda _m, _i, _o: passes.append(1)}):
        s.attribute_all(x, target=every)
    assert len(passes) == 1

    def forward() -> None:
        with torch.no_grad():
            model(x)

    calls = {"forward": forward, "pg": lambda: s.attribute(x, target=every), "all": lambda: s.attribute_all(x, target=every)}
    best = dict.fromkeys(calls, math.inf)
    for _ in range(3):  # interleaved, best of three: the ratio is robust to a busy machine
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    # the policy-gradient maps of 1000 classes are one [2, 1000, 512] x [2, 512, 25] product (~2% of the
    # forward pass); the feature map repeated per class ([N * k, D, h, w]) and all four kinds computed for
    # one made it about 4x
    assert best["pg"] < 1.5 * best["forward"], best
    assert best["all"] < 2.0 * best["forward"], best


def test_chain_masks_are_cached_per_class_and_follow_weight_updates() -> None:
    torch.manual_seed(11)
    model = SmallCNN(in_channels=1, num_classes=6, channels=(4, 40)).eval()
    s = FinalLayerSaliency(model, min_size=5)
    weight = model.fc.weight

    def reference(side: str) -> torch.Tensor:
        masks = torch.zeros(6, 40, dtype=torch.bool)
        for c in range(6):
            masks[c, split_chain(weight[c].detach(), side, 5)[-1]] = True
        return masks

    with torch.inference_mode():
        first = s.class_chain_mask(torch.tensor([4, 1]), "+", weight)
    assert torch.equal(first, reference("+")[[4, 1]])
    # outside inference mode, on a cache filled inside it; [N, k] classes
    both = s.class_chain_mask(torch.tensor([[0, 1, 2], [3, 4, 5]]), "+", weight)
    assert both.shape == (2, 3, 40) and torch.equal(both.flatten(0, 1), reference("+"))
    assert torch.equal(s.class_chain_mask(torch.arange(6), "-", weight), reference("-"))
    before = reference("+")
    with torch.no_grad():
        weight.mul_(-1.0)  # an in-place update, as an optimizer step makes
    after = s.class_chain_mask(torch.arange(6), "+", weight)
    assert torch.equal(after, reference("+")) and not torch.equal(after, before)


class _UnusedClassifier(nn.Module):
    def __init__(self, squeeze: bool = True) -> None:
        super().__init__()
        self.conv, self.fc, self.spare = nn.Conv2d(3, 5, 3), nn.Linear(5, 4), nn.Linear(5, 4)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.conv(x).mean(dim=(2, 3)))
        return logits if self.squeeze else logits[:, :, None]


def test_resolution_errors() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="classifier 'spare' did not run in the forward pass"):
        FinalLayerSaliency(_UnusedClassifier(), classifier="spare").resolve(x)
    with pytest.raises(ValueError, match=r"must return logits \[N, K\], got \[1, 4, 1\]"):
        FinalLayerSaliency(_UnusedClassifier(squeeze=False)).resolve(x)
    s = FinalLayerSaliency(_UnusedClassifier())
    s.resolve(x)
    assert (s.classifier, s.feature_layer, s.feature_transform) == ("fc", "conv", "identity")


def test_upsample_and_inference_mode(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    s = FinalLayerSaliency(resnet)
    plain = s.attribute(x, method="discriminative", upsample=True)
    assert plain.shape == (2, 64, 64)
    with torch.inference_mode():
        inside = s.attribute(x, method="discriminative", upsample=True)
    torch.testing.assert_close(inside, plain)


# ------------------------------------------------------------------------------------ ALD audit
def test_ald_exact_recovery_in_shuffled_order() -> None:
    L, a0, b0 = 200, 3.0, -4.0
    y = torch.exp(a0 * torch.arange(L, dtype=torch.float64) / L + b0)
    g = torch.Generator().manual_seed(0)
    row_pos = y[torch.randperm(L, generator=g)]
    row_neg = -y[torch.randperm(L, generator=g)] * math.e  # negative side: intercept b0 + 1
    weight = torch.cat([row_pos, row_neg, torch.zeros(7, dtype=torch.float64)])[torch.randperm(2 * L + 7, generator=g)][None]
    fit = fit_ald(weight)
    assert fit.positive.slope.item() == pytest.approx(a0, abs=1e-9)
    assert fit.positive.intercept.item() == pytest.approx(b0, abs=1e-9)
    assert fit.positive.r2.item() == pytest.approx(1.0, abs=1e-12)
    assert fit.negative.slope.item() == pytest.approx(a0, abs=1e-9)
    assert fit.negative.intercept.item() == pytest.approx(b0 + 1, abs=1e-9)
    assert fit.positive.count.item() == L and fit.negative.count.item() == L  # zeros excluded
    kappa = math.sqrt(math.exp(b0) / (a0 - math.exp(b0)))
    assert fit.positive.kappa.item() == pytest.approx(kappa, rel=1e-9)
    assert fit.positive.lam.item() == pytest.approx(a0 * kappa, rel=1e-9)
    assert fit.positive.mean.item() == pytest.approx((1 - kappa**2) / (a0 * kappa * kappa), rel=1e-9)


def test_ald_joint_fits_nan_sides_and_rows() -> None:
    L = 64
    y = torch.exp(1.5 * torch.arange(L, dtype=torch.float64) / L - 2.0)
    weight = torch.stack(
        [y, torch.cat([torch.tensor([1.0, -0.5], dtype=torch.float64), torch.zeros(L - 2, dtype=torch.float64)])]
    )
    fit = fit_ald(weight)
    assert math.isnan(fit.negative.slope[0].item())  # no negative weight in row 0
    assert math.isnan(fit.positive.r2[1].item())  # a single positive weight in row 1
    # joint positive fit pools the 65 positive weights of the matrix
    pooled = torch.cat([y, torch.tensor([1.0], dtype=torch.float64)])
    r = torch.arange(pooled.numel(), dtype=torch.float64) / pooled.numel()
    ly = pooled.sort().values.log()
    slope = ((r - r.mean()) * (ly - ly.mean())).sum() / ((r - r.mean()) ** 2).sum()
    assert fit.joint_positive.slope.item() == pytest.approx(slope.item(), rel=1e-12)
    assert fit.joint_positive.count.item() == L + 1
    rows = fit.rows()
    assert len(rows) == 2 and rows[0]["pos_slope"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        fit_ald(torch.zeros(2, 2, 2))


# ------------------------------------------------------------------------------------ split chains and maps
def test_split_chain_on_a_hand_made_vector() -> None:
    w = torch.tensor([5.0, -1.0, 3.0, 0.0, 8.0, -6.0, 2.0, 7.0])
    # "+": mean 2.25 -> {0, 2, 4, 7} (5, 3, 8, 7); mean 5.75 -> {4, 7}; size 2 < 3 stops
    plus = split_chain(w, "+", min_size=3)
    assert [c.tolist() for c in plus] == [list(range(8)), [0, 2, 4, 7], [4, 7]]
    # "-": mean 2.25 -> {1, 3, 5, 6} (-1, 0, -6, 2); mean -1.25 -> {5}
    minus = split_chain(w, "-", min_size=3)
    assert [c.tolist() for c in minus] == [list(range(8)), [1, 3, 5, 6], [5]]
    # below min_size nothing is split; constant vectors stop
    assert [c.tolist() for c in split_chain(w, "+", min_size=20)] == [list(range(8))]
    assert [c.tolist() for c in split_chain(torch.ones(30), "-", min_size=2)] == [list(range(30))]
    with pytest.raises(ValueError, match="side"):
        split_chain(w, "x")  # type: ignore[arg-type]


def test_channel_set_map_closed_form_by_hand() -> None:
    a = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],  # sum 2: coefficient 4 / 4 = 1
            [[0.0, 2.0], [2.0, 0.0]],  # sum 4: coefficient 4 / 6
            [[9.0, 9.0], [9.0, 9.0]],  # not in the set
        ]
    )[None]
    raw = channel_set_map(a, torch.tensor([True, True, False]), normalize=False)
    expected = torch.tensor([[1.0, 4 / 6 * 2], [4 / 6 * 2, 1.0]])
    torch.testing.assert_close(raw[0], expected)
    norm = channel_set_map(a, torch.tensor([1, 1, 0]))
    torch.testing.assert_close(norm[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # negative activations are dropped (post-ReLU feature maps), and a constant map normalises to zero
    assert channel_set_map(-a, torch.tensor([1, 0, 0]), normalize=False).eq(0).all()
    assert channel_set_map(a, torch.tensor([0, 0, 1])).eq(0).all()


def test_discriminative_maps_use_the_last_chain_subset() -> None:
    torch.manual_seed(5)
    model = SmallCNN(in_channels=3, num_classes=4, channels=(8, 48)).eval()
    x = torch.randn(2, 3, 12, 12)
    s = FinalLayerSaliency(model, min_size=5)
    out = s.attribute_all(x, target=torch.tensor([1, 3]))
    feats = torch.relu(model.features(x)).detach()
    for i, c in enumerate((1, 3)):
        for method, side in (("discriminative", "+"), ("confusing", "-")):
            mask = torch.zeros(48, dtype=torch.bool)
            mask[split_chain(model.fc.weight[c].detach(), side, 5)[-1]] = True
            torch.testing.assert_close(out[method][i], channel_set_map(feats[i : i + 1], mask)[0])


# ------------------------------------------------------------------------------------ fallback
def test_fallback_equals_closed_form_on_a_gap_model(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([[2, 7], [1, 0]])
    closed = FinalLayerSaliency(resnet).attribute_all(x, target=target)
    fb_forced = _forced_fallback(resnet, "layer4")
    with torch.inference_mode():
        got = fb_forced.attribute_all(x, target=target)
    for m in ("policy_gradient", "cam", "discriminative", "confusing"):
        torch.testing.assert_close(got[m], closed[m], rtol=1e-4, atol=1e-5)
    params = list(resnet.parameters())
    assert all(p.grad is None for p in params), ".grad is never touched"


class _FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def test_flatten_head_uses_fallback_with_one_warning_and_exact_gradients() -> None:
    torch.manual_seed(7)
    model = _FlattenHead().eval()
    x = torch.randn(2, 3, 6, 6)
    s = FinalLayerSaliency(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = s.attribute(x, target=torch.tensor([0, 2]), method="cam")
        s.attribute(x, method="cam")
    assert sum("autograd fallback" in str(w.message) for w in caught) == 1
    assert (s.feature_layer, s.uses_closed_form) == ("features", False)
    # effective weight of channel k for class c: sum over positions of W[c] reshaped to [4, 6, 6]
    feats = model.features(x).detach()
    for i, c in enumerate((0, 2)):
        eff = model.fc.weight[c].detach().reshape(4, 6, 6).sum(dim=(1, 2))
        torch.testing.assert_close(cam[i], (eff[:, None, None] * feats[i]).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "size", "layer", "closed"),
    [
        ("densenet121", 64, "features", True),
        ("efficientnet_b0", 64, "features", True),
        ("mobilenet_v3_small", 64, "features", False),
        ("vit_b_16", 224, "encoder.layers.encoder_layer_11.ln_1", False),
    ],
)
def test_torchvision_families(arch: str, size: int, layer: str, closed: bool) -> None:
    torch.manual_seed(8)
    model = getattr(torchvision.models, arch)(num_classes=6).eval()
    for m in model.modules():  # torchvision zero-initialises some heads; random weights make maps non-trivial
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    x = torch.randn(2, 3, size, size)
    s = FinalLayerSaliency(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = s.attribute_all(x, target=torch.tensor([1, 4]))
    assert s.feature_layer == layer and s.uses_closed_form is closed
    assert out["policy_gradient"].abs().sum() > 0
    assert all(torch.isfinite(out[m]).all() for m in ("policy_gradient", "cam", "discriminative", "confusing"))
    if s.feature_transform == "identity":
        ref = LayerGradCam(lambda inp: torch.log_softmax(model(inp), dim=1), get_module(model, layer)).attribute(
            x, target=torch.tensor([1, 4]), relu_attributions=False
        )[:, 0]
        h, w = out["policy_gradient"].shape[-2:]
        torch.testing.assert_close(out["policy_gradient"] / (h * w), ref.detach(), rtol=1e-4, atol=1e-6)
    if s.feature_transform == "relu":  # DenseNet: the map that is pooled is relu(features)
        assert arch == "densenet121"
        feats = torch.relu(model.features(x)).detach()
        cam = torch.stack([(model.classifier.weight[c][:, None, None] * feats[i]).sum(0) for i, c in enumerate((1, 4))])
        torch.testing.assert_close(out["cam"], cam.detach(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ bad input
class _NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_errors_are_clear(resnet: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"no nn\.Linear whose output is the model's output"):
        FinalLayerSaliency(_NoLinear()).attribute(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"image batch \[N, C, H, W\]"):
        FinalLayerSaliency(resnet).attribute(torch.randn(4, 10))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        FinalLayerSaliency(resnet).attribute([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        FinalLayerSaliency(resnet, feature_layer="layer9")
    with pytest.raises(ValueError, match=r"not an nn\.Linear"):
        FinalLayerSaliency(resnet, classifier="layer4")
    with pytest.raises(ValueError, match="method must be one of"):
        FinalLayerSaliency(resnet).attribute(torch.randn(1, 3, 32, 32), method="gradcam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"target classes must lie in \[0, 12\)"):
        FinalLayerSaliency(resnet).attribute(torch.randn(1, 3, 32, 32), target=12)
    with pytest.raises(ValueError, match="not a spatial map"):
        FinalLayerSaliency(resnet, feature_layer="fc").attribute(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------ callback helpers
def test_deletion_curve_end_points_and_order() -> None:
    from lightning_interp.saliency import deletion_curve

    torch.manual_seed(9)
    model = SmallCNN(in_channels=1, num_classes=3, channels=(4, 8)).eval()
    x = torch.randn(2, 1, 6, 6)
    target = torch.tensor([0, 2])
    maps = torch.arange(36.0).reshape(6, 6).expand(2, 6, 6)  # deletes the bottom-right pixel first
    with torch.no_grad():
        curve = deletion_curve(model, x, maps, target, steps=4)
        intact = model(x).softmax(1).gather(1, target[:, None])[:, 0]
        blank = model(x.mean(dim=(2, 3), keepdim=True).expand_as(x)).softmax(1).gather(1, target[:, None])[:, 0]
        x_quarter = x.clone()
        x_quarter.view(2, 1, 36)[:, :, 27:] = x.mean(dim=(2, 3), keepdim=True).view(2, 1, 1)
        quarter = model(x_quarter).softmax(1).gather(1, target[:, None])[:, 0]
    assert curve.shape == (2, 5)
    torch.testing.assert_close(curve[:, 0], intact)
    torch.testing.assert_close(curve[:, 1], quarter)
    torch.testing.assert_close(curve[:, -1], blank)


def test_saliency_callback_with_label_targets_and_explicit_probe() -> None:
    import lightning.pytorch as pl

    from lightning_interp.callbacks import FinalLayerSaliencyCallback
    from tests.contract import ImageDataModule

    dm = ImageDataModule()
    cb = FinalLayerSaliencyCallback(probe_size=4, target="label", min_size=4, deletion_steps=0, log_images=False)
    trainer = pl.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(SmallCNN(in_channels=1, num_classes=4, channels=(8, 16)), dm)
    assert torch.equal(cb.last.data["maps"]["target"], cb.probe_labels)
    assert "deletion_auc_pg" not in cb.history[-1]
    assert 0.0 <= cb.history[-1]["neg_pg_share"] <= 1.0
    explicit = FinalLayerSaliencyCallback(probe=torch.randn(3, 1, 12, 12), probe_size=3, target="label")
    with pytest.raises(ValueError, match="target='label' needs labelled probe data"):
        pl.Trainer(max_steps=1, callbacks=[explicit], logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
            SmallCNN(in_channels=1, num_classes=4, channels=(8, 16)), dm
        )


def test_saliency_callback_deletion_curves_on_the_first_images_only() -> None:
    """deletion_images=k: faithfulness from the first k probe images (NaN for the rest), equal to the curves of those."""
    import lightning.pytorch as pl

    from lightning_interp.callbacks import FinalLayerSaliencyCallback
    from lightning_interp.saliency import bilinear_upsample, deletion_curve
    from lightning_interp.stats import mean_and_se
    from tests.contract import ImageDataModule

    cb = FinalLayerSaliencyCallback(probe_size=6, min_size=4, deletion_steps=3, deletion_images=2, log_images=False)
    model = SmallCNN(in_channels=1, num_classes=4, channels=(8, 16))
    trainer = pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, ImageDataModule())
    per_image = cb.last.data["per_image"]
    faithful = per_image["faithfulness_pg"]
    assert faithful.shape == (6,) and not faithful[:2].isnan().any() and faithful[2:].isnan().all()
    assert not per_image["target_prob"].isnan().any()
    x, maps = cb.last.data["inputs"], cb.last.data["maps"]
    model.eval()
    with torch.no_grad():
        up = bilinear_upsample(maps["policy_gradient"][:2, None], x.shape[-2:])[:, 0]
        auc = deletion_curve(model, x[:2], up, maps["target"][:2], 3).mean(dim=1)
    torch.testing.assert_close(per_image["deletion_auc_pg"][:2], auc.double())
    mean, se = mean_and_se(faithful[:2])
    assert cb.history[-1]["faithfulness_pg"] == pytest.approx(float(mean))
    assert cb.history[-1]["faithfulness_pg_se"] == pytest.approx(float(se))


def test_bilinear_upsample_equals_interpolate() -> None:
    from lightning_interp.saliency import bilinear_upsample

    torch.manual_seed(0)
    for shape, size in (((2, 30, 7, 7), (224, 224)), ((2, 3, 5, 6), (17, 23)), ((1, 2, 7, 7), (7, 7)), ((3, 4, 8, 8), (4, 5))):
        maps = torch.randn(*shape)
        ref = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(bilinear_upsample(maps, size), ref)


# ------------------------------------------------------------------------------------ issue 21: cost, scaling, checks
def _loop_deletion_curve(
    model: nn.Module, inputs: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, steps: int
) -> torch.Tensor:
    """The per-step loop (one forward pass per deletion fraction) that deletion_curves batches."""
    n, _, h, w = inputs.shape
    order = maps.reshape(n, -1).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1))
    baseline = inputs.mean(dim=(2, 3), keepdim=True)
    probs = []
    for i in range(steps + 1):
        keep = (rank >= round(i * h * w / steps)).reshape(n, 1, h, w)
        probs.append(model(torch.where(keep, inputs, baseline)).softmax(dim=1).gather(1, target[:, None])[:, 0])
    return torch.stack(probs, dim=1)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_batched_deletion_curves_equal_the_per_step_loop(steps: int) -> None:
    from lightning_interp.saliency import deletion_curves, deletion_rows

    torch.manual_seed(3)
    model = SmallCNN(in_channels=2, num_classes=4, channels=(4, 8)).eval()
    x, maps, target = torch.randn(5, 2, 7, 6), torch.randn(5, 3, 7, 6), torch.tensor([0, 3, 1, 2, 0])
    calls: list[int] = []
    with torch.no_grad(), forward_hooks(model, {"": lambda _m, inp, _o: calls.append(len(inp[0]))}):
        ref = torch.stack([_loop_deletion_curve(model, x, maps[:, j], target, steps) for j in range(3)], dim=1)
        calls.clear()
        got = deletion_curves(model, x, maps, target, steps)
        assert calls == [5 * deletion_rows(steps, 3)], "one batched pass; the intact and blank images once per image"
        calls.clear()
        intact = model(x).softmax(1).gather(1, target[:, None])[:, 0]
        calls.clear()
        chunked = deletion_curves(model, x, maps, target, steps, intact=intact, batch_size=4)
        assert sum(calls) == 5 * deletion_rows(steps, 3, intact=True) and max(calls) <= 4
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(chunked, ref)


def _prepared_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: object) -> FinalLayerSaliencyCallback:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    cb = FinalLayerSaliencyCallback(probe=(x, y), probe_size=len(x), min_size=4, log_images=False, **kw)  # type: ignore[arg-type]
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(callbacks=[cb], **kw)  # type: ignore[arg-type]
    trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    return cb


def test_scaled_saliency_equals_the_full_measurement_of_the_first_images() -> None:
    from lightning_interp.callbacks.saliency import MIN_IMAGES
    from lightning_interp.hooks import isolate
    from lightning_interp.results import flat_scalars
    from lightning_interp.saliency import measure_saliency
    from lightning_interp.stats import mean_and_se

    torch.manual_seed(4)
    model = SmallCNN(in_channels=1, num_classes=4, channels=(8, 16))
    x, y = torch.randn(10, 1, 12, 12), torch.randint(0, 4, (10,))
    cb = _prepared_saliency(model, x, y, deletion_steps=4)
    assert cb.work_floor() == pytest.approx(MIN_IMAGES / 10)
    assert cb.history[-1]["probe_size"] == 10 and "disc_channels_se" in cb.history[-1]
    full = cb.last
    cb.work = 0.5
    with isolate(model):
        half = cb.measure(model)
    cb.work = 1.0
    assert half.scalars["probe_size"] == 5
    # the same measurement, made at full work on a probe of those first five images (the random baseline maps of
    # five images are the first five of ten: a draw of fewer images from the same generator state is a prefix)
    generator = torch.Generator()
    generator.set_state(cb.baseline_state)
    probe, labels = cb.probe_inputs[:5], cb.probe_labels[:5]
    ref = measure_saliency(model.eval(), probe, labels, generator=generator, min_size=4, deletion_steps=4)
    assert set(half.scalars) == set(flat_scalars(ref)) == set(full.scalars)
    for name, value in flat_scalars(ref).items():
        torch.testing.assert_close(torch.as_tensor(half.scalars[name]), torch.as_tensor(value), msg=name)
    # every read-out is a mean over images with its standard error; chain sizes from the classes' masks
    sizes = cb.saliency.class_chain_mask(ref.maps["target"], "+", model.fc.weight).sum(1)
    mean, se = mean_and_se(sizes)
    assert float(ref.scalars()["disc_channels"][0]) == pytest.approx(float(mean))
    assert float(ref.scalars()["disc_channels"][1]) == pytest.approx(float(se))
    assert all(f"{k}_se" in full.scalars for k in full.scalars if k != "probe_size" and not k.endswith("_se"))
    # the pilot: the measurement on half the images, each part scaled to the full probe
    with isolate(model):
        estimate = cb.estimate_cost(model)
    maps_s, deletion_s = cb._timing
    assert estimate == pytest.approx(maps_s * 10 / 5 + deletion_s * 10 / 5)


def test_saliency_read_outs_are_nan_for_non_finite_logits() -> None:
    from lightning_interp.hooks import isolate

    torch.manual_seed(5)
    model = SmallCNN(in_channels=1, num_classes=3, channels=(4, 8))
    x, y = torch.randn(6, 1, 10, 10), torch.randint(0, 3, (6,))
    cb = _prepared_saliency(model, x, y, deletion_steps=2)
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
    with isolate(model):
        m = cb.measure(model)
    assert m.scalars["probe_size"] == 6
    for name, value in m.scalars.items():
        if name != "probe_size":
            assert math.isnan(float(value)), name


def test_saliency_label_targets_outside_the_classes_fail_before_the_first_step() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_interp.callbacks import FinalLayerSaliencyCallback

    x, y = torch.randn(16, 1, 10, 10), torch.tensor([0, 1, 2, 3] * 4)  # label 3 for a 3-class model
    model = SmallCNN(in_channels=1, num_classes=3, channels=(4, 8))
    cb = FinalLayerSaliencyCallback(target="label", probe_size=8, every_n_steps=1)
    trainer = pl.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"outside the model's 3 classes \[0, 2\].*target='predicted'"):
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert trainer.global_step == 0
    # labels in range: the same setup measures
    cb = FinalLayerSaliencyCallback(target="label", probe_size=8, every_n_steps=1)
    trainer = pl.Trainer(max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y % 3), batch_size=4))
    assert cb.history and cb.history[-1]["probe_size"] == 8


class _CheckpointedFlattenHead(SmallCNN):
    """A conv body run through torch.utils.checkpoint and a flatten + Linear head (the autograd fallback)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__(in_channels=1, num_classes=3, channels=(4, 8))
        self.reentrant = reentrant
        self.flat = nn.Linear(8 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.features, x, use_reentrant=self.reentrant)
        return self.flat(h.flatten(1))


def test_a_reentrant_checkpoint_that_hides_the_gradient_fails_before_the_first_step() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_interp.callbacks import FinalLayerSaliencyCallback

    data = DataLoader(TensorDataset(torch.randn(16, 1, 10, 10), torch.randint(0, 3, (16,))), batch_size=4)
    kw: dict = dict(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    for feature_layer in (None, "features"):
        cb = FinalLayerSaliencyCallback(probe_size=4, min_size=2, deletion_steps=2, feature_layer=feature_layer, log_images=False)
        trainer = pl.Trainer(callbacks=[cb], **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's warning, torch's about inputs without gradients
            with pytest.raises(ValueError, match="use_reentrant=False"):
                trainer.fit(_CheckpointedFlattenHead(reentrant=True), data)
        assert trainer.global_step == 0
    cb = FinalLayerSaliencyCallback(probe_size=4, min_size=2, deletion_steps=2, log_images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(callbacks=[cb], **kw).fit(_CheckpointedFlattenHead(reentrant=False), data)
    assert cb.history and not math.isnan(cb.history[-1]["neg_pg_share"])


class _UnusedLayer(SmallCNN):
    def __init__(self) -> None:
        super().__init__(in_channels=1, num_classes=3, channels=(4, 8))
        self.unused = nn.Conv2d(8, 8, 1)


def test_a_feature_layer_that_never_runs_fails_before_the_first_step() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_interp.callbacks import FinalLayerSaliencyCallback

    data = DataLoader(TensorDataset(torch.randn(16, 1, 10, 10), torch.randint(0, 3, (16,))), batch_size=4)
    cb = FinalLayerSaliencyCallback(probe_size=4, feature_layer="unused")
    trainer = pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"\['unused'\] exist in _UnusedLayer but do not run"):
        trainer.fit(_UnusedLayer(), data)
    assert trainer.global_step == 0
