"""The content mode of the patch-image task: patterns, exact posterior, sampler, and saliency maps that find the evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import chisquare, norm

from lightning_interp.datamodules import PatchImageDataModule
from lightning_interp.models import SmallCNN
from lightning_interp.saliency import FinalLayerSaliency
from lightning_interp.tasks import PatchImageTask
from lightning_interp.tasks.patches import patch_patterns
from tests.test_contract import one_thread, quiet_trainer


def test_patterns_are_the_four_named_ones_and_bad_layouts_fail() -> None:
    """Bars, cross and checkerboard as drawn by hand for a 3x3 and a 4x4 square; clear errors otherwise."""
    three = [
        [[1, 1, 1], [0, 0, 0], [1, 1, 1]],
        [[1, 0, 1], [1, 0, 1], [1, 0, 1]],
        [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]],
    ]
    assert patch_patterns(4, 3).tolist() == three
    cross4 = [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]
    assert patch_patterns(4, 4)[2].tolist() == cross4
    assert patch_patterns(2, 3).tolist() == three[:2]
    with pytest.raises(ValueError, match=r"4 patterns .*num_classes must be in \[2, 4\], got 5.*evidence='position'"):
        PatchImageTask(num_classes=5, evidence="content")
    with pytest.raises(ValueError, match="patch must be >= 3"):
        PatchImageTask(patch=2, evidence="content")
    with pytest.raises(ValueError, match=r"patch \(13\) must be at most image_size \(12\)"):
        PatchImageTask(patch=13, evidence="content")
    with pytest.raises(ValueError, match="evidence must be one of"):
        PatchImageDataModule(evidence="colour")  # type: ignore[arg-type]
    # the content mode ignores the grid, so a patch larger than a cell is fine
    assert PatchImageTask(image_size=12, grid=4, patch=5, evidence="content").span == 8


def test_content_likelihood_matches_enumeration_over_positions() -> None:
    """``log p(x|c)``: one conv2d + logsumexp against scipy normal log-densities of every placed pattern."""
    size, ch, p, contrast, noise = 6, 2, 3, 1.5, 0.8
    task = PatchImageTask(
        num_classes=4, image_size=size, channels=ch, patch=p, contrast=contrast, noise=noise, evidence="content"
    )
    x, _ = task.sample(10, torch.Generator().manual_seed(0))
    xs = x.double().numpy().reshape(10, ch, size, size)
    patterns = np.array(patch_patterns(4, p).tolist())
    ref = np.zeros((10, 4))
    for c in range(4):
        terms = []
        for r in range(size - p + 1):
            for s in range(size - p + 1):
                mean = np.zeros((ch, size, size))
                mean[:, r : r + p, s : s + p] = contrast * patterns[c]
                terms.append(norm.logpdf(xs, loc=mean, scale=noise).reshape(10, -1).sum(1))
        ref[:, c] = logsumexp(np.stack(terms), axis=0) - np.log(len(terms))
    got = task.class_log_likelihood(x.double())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-8)
    assert torch.allclose(task.log_posterior(x.reshape(10, ch, size, size)), task.log_posterior(x))


def test_content_sampler_places_the_pattern_uniformly_and_its_mask() -> None:
    """Noise-free images are exactly the scaled pattern on its mask and zero elsewhere; every corner equally likely."""
    dm = PatchImageDataModule(image_size=7, patch=3, contrast=1.5, noise=0.0, n_train=8, n_val=3000, evidence="content", seed=2)
    dm.setup()
    x, y = dm.val_dataloader().dataset.tensors
    masks = dm.masks["val"]
    patterns = patch_patterns(4, 3)
    assert masks.shape == (3000, 7, 7) and bool((masks.sum(dim=(1, 2)) == 9).all())
    assert bool((x[:, 0][~masks] == 0).all())
    assert torch.equal(x[:, 0][masks].reshape(-1, 3, 3), 1.5 * patterns[y])
    corners = masks.float().flatten(1).argmax(dim=1)  # the first pixel of the square, row by row
    counts = torch.bincount(corners, minlength=49).reshape(7, 7)
    assert counts[5:].sum() == 0 and counts[:, 5:].sum() == 0  # the square stays inside the image
    assert chisquare(counts[:5, :5].flatten().numpy()).pvalue > 1e-3
    assert chisquare(torch.bincount(y).numpy()).pvalue > 1e-3


def test_content_posterior_is_calibrated_on_its_own_samples() -> None:
    """The sampler and the likelihood are one model: ``E[p(y|x)] = E[sum_c p(c|x)^2]`` for ``(x, y)`` from the task."""
    task = PatchImageTask(num_classes=4, image_size=8, patch=3, contrast=1.0, noise=1.0, evidence="content")
    x, y = task.sample(4000, torch.Generator().manual_seed(1))
    post = task.posterior(x)
    diff = post.gather(1, y[:, None])[:, 0] - (post * post).sum(dim=1)
    assert abs(diff.mean().item()) < 4 * diff.std().item() / len(diff) ** 0.5
    acc = (post.argmax(1) == y).double().mean().item()
    assert 0.4 < acc < 0.98, acc  # neither chance (0.25) nor trivial: the check above has something to test
    # a model that placed the patterns elsewhere would not be calibrated: shuffle the labels' patterns
    wrong = PatchImageTask(num_classes=4, image_size=8, patch=3, contrast=1.0, noise=1.0, evidence="content")
    wrong.templates = wrong.templates[[1, 0, 3, 2]]
    post_w = wrong.posterior(x)
    diff_w = post_w.gather(1, y[:, None])[:, 0] - (post_w * post_w).sum(dim=1)
    assert abs(diff_w.mean().item()) > 8 * diff_w.std().item() / len(diff_w) ** 0.5


@pytest.fixture(scope="module", params=["content", "position"])
def trained(request: pytest.FixtureRequest) -> tuple[SmallCNN, PatchImageDataModule]:
    """``SmallCNN(1, 4, channels=(8, 16))`` trained for 3 epochs on each task (the saliency config's setup)."""
    torch.manual_seed(0)
    dm = PatchImageDataModule(n_train=2048, n_val=256, batch_size=32, seed=0, evidence=request.param)
    model = SmallCNN(in_channels=1, num_classes=4, channels=(8, 16), lr=1e-2)
    with one_thread():  # tiny convolutions: a second thread only adds contention on a busy machine
        quiet_trainer([], max_epochs=3, limit_val_batches=0).fit(model, dm)
    return model.eval(), dm


def test_saliency_maxima_fall_on_the_evidence_only_in_the_content_mode(trained: tuple[SmallCNN, PatchImageDataModule]) -> None:
    """The maximum of the CAM, discriminative and policy-gradient maps lies on the evidence square for most
    validation images of the content task, far above a random map; on the position task, solved from border
    effects, the CAM and policy-gradient maxima are rarely there (docs/saliency.md)."""
    model, dm = trained
    x, y = dm.val_dataloader().dataset.tensors
    masks = dm.masks["val"]
    maps = FinalLayerSaliency(model, min_size=4).attribute_all(x, target=y, upsample=True)
    accuracy = (maps["logits"].argmax(1) == y).double().mean().item()
    random_rate = dm.patch**2 / dm.image_size**2  # a uniformly random argmax pixel: mask area / image area
    hits = {}
    for method in ("cam", "discriminative", "policy_gradient"):
        peak = maps[method].flatten(1).argmax(dim=1)
        hits[method] = masks.flatten(1).gather(1, peak[:, None])[:, 0].double().mean().item()
    print(f"{dm.evidence}: accuracy {accuracy:.3f}, maxima on the square {hits}, random map {random_rate:.4f}")
    assert accuracy > 0.9  # both tasks are learnt: the maps of a model that has not learnt would prove nothing
    if dm.evidence == "content":
        assert all(h > 0.5 and h > 8 * random_rate for h in hits.values()), hits
    else:
        assert hits["cam"] < 2 * random_rate and hits["policy_gradient"] < 2 * random_rate, hits
