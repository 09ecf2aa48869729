"""Figures without pyplot: matplotlib ``Figure`` objects, PNG bytes and image arrays.

Library code never chooses or changes the user's matplotlib backend: a ``matplotlib.figure.Figure``
made directly needs none, and PNG bytes are what loggers and reports take.

Example:
    >>> fig, ax = subplots(figsize=(2, 2))
    >>> _ = ax.plot([0, 1], [0, 1])
    >>> png = figure_to_png(fig)
    >>> png[:4], png_to_array(png).shape[-1]
    (b'\\x89PNG', 3)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "ald_figure",
    "array_to_png",
    "figure_to_array",
    "figure_to_png",
    "gap_by_density_figure",
    "png_to_array",
    "posterior_figure",
    "posterior_gap_figures",
    "reliability_figure",
    "saliency_figures",
    "saliency_grid",
    "subplots",
]


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` and its axes, made without pyplot: no backend is chosen or changed.

    Arguments as :meth:`matplotlib.figure.Figure.subplots` (``squeeze``, ``sharex``, ``gridspec_kw``, ...).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_to_png(fig: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a ``Figure`` (a pyplot figure is also released from pyplot's registry)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if hasattr(fig, "number"):  # a pyplot figure
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buf.getvalue()


def figure_to_array(fig: Any, dpi: int = 100, pad: int = 6) -> Any:
    """An RGB ``numpy`` array ``[H, W, 3]`` of a ``Figure``, cropped to its content (what loggers take).

    One Agg rendering: ``savefig(bbox_inches="tight")`` renders twice and a PNG must then be encoded and
    decoded again, which made up most of a cheap measurement's cost in a training run. The crop keeps
    ``pad`` pixels of margin around everything that is not the background, as a tight bounding box does.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # attaches an Agg canvas to this figure only; the user's backend is untouched
    fig.set_dpi(dpi)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    content = np.nonzero((rgb != rgb[0, 0]).any(axis=2))
    if hasattr(fig, "number"):  # a pyplot figure
        import matplotlib.pyplot as plt

        plt.close(fig)
    if not len(content[0]):
        return rgb.copy()
    top, bottom = max(0, content[0].min() - pad), content[0].max() + pad + 1
    left, right = max(0, content[1].min() - pad), content[1].max() + pad + 1
    return rgb[top:bottom, left:right].copy()


def array_to_png(array: Any) -> bytes:
    """PNG bytes of an RGB ``numpy`` array ``[H, W, 3]`` of ``uint8``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png")
    return buf.getvalue()


def png_to_array(png: bytes) -> Any:
    """An RGB ``numpy`` array ``[H, W, 3]`` of PNG bytes (what wandb and TensorBoard loggers take)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def saliency_grid(
    maps: dict[str, Tensor], inputs: Tensor, rows: int = 8, labels: Sequence[str] | None = None, start: int = 0
) -> Any:
    """Input, discriminative, confusing and policy-gradient panels of the first ``rows`` images, stacked.

    Each panel is a single image (the maps blended over the inputs in torch rather than by matplotlib), so
    rendering costs four ``imshow`` calls whatever the number of images. Discriminative and confusing maps
    are in ``[0, 1]``; the policy-gradient map is divided by its largest magnitude per image.

    Args:
        maps: :meth:`~lightning_interp.saliency.FinalLayerSaliency.attribute_all` output (``discriminative``,
            ``confusing``, ``policy_gradient`` ``[N, h, w]`` and ``target`` ``[N]``).
        inputs: the images ``[N, C, H, W]``.
        rows: images shown.
        labels: one row label per image (e.g. ``"cat.jpg: tabby cat 0.93"``); default ``"class <k>"`` of the target.
        start: the first image shown (so a long probe can be drawn as several grids).

    Returns:
        A matplotlib ``Figure``.
    """
    from matplotlib import colormaps

    x = inputs.detach().float().cpu()[start:]
    n = min(len(x), rows)
    size = x.shape[-2:]

    def up(m: Tensor) -> Tensor:
        part = m[start : start + n, None].float()
        return F.interpolate(part, size=size, mode="bilinear", align_corners=False)[:, 0].cpu()

    disc, conf, pg = up(maps["discriminative"]), up(maps["confusing"]), up(maps["policy_gradient"])
    img = x[:n]
    lo = img.flatten(1).min(1).values.view(n, 1, 1, 1)
    hi = img.flatten(1).max(1).values.view(n, 1, 1, 1)
    img = (img - lo) / (hi - lo).clamp_min(1e-12)
    rgb = img.expand(n, 3, *size) if img.shape[1] == 1 else img[:, :3]
    rgb = rgb.permute(0, 2, 3, 1)  # [n, H, W, 3]
    pg = pg / pg.flatten(1).abs().max(1).values.clamp_min(1e-12).view(n, 1, 1)  # per image, in [-1, 1]

    def overlay(values: Tensor, cmap: str, vmin: float, vmax: float) -> Tensor:
        colours = torch.as_tensor(colormaps[cmap](((values - vmin) / (vmax - vmin)).clamp(0, 1).numpy())[..., :3])
        return 0.4 * rgb + 0.6 * colours.float()

    panels = [
        ("input", rgb, None),
        ("discriminative", overlay(disc, "inferno", 0, 1), ("inferno", 0, 1)),
        ("confusing", overlay(conf, "inferno", 0, 1), ("inferno", 0, 1)),
        ("policy gradient / max |.|", overlay(pg, "RdBu_r", -1, 1), ("RdBu_r", -1, 1)),
    ]
    fig, axes = subplots(1, 4, figsize=(7, 0.9 * n + 1.0), squeeze=False)
    height = size[0] + 1  # a white row between images
    ticks = [height * (i + 0.5) for i in range(n)]
    for ax, (title, stack, bar) in zip(axes[0], panels, strict=True):
        stack = torch.cat([stack, torch.ones(n, 1, size[1], 3)], dim=1)
        ax.imshow(stack.reshape(n * height, size[1], 3).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if bar is not None:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            fig.colorbar(ScalarMappable(Normalize(bar[1], bar[2]), bar[0]), ax=ax, fraction=0.08, pad=0.02)
    names = (
        list(labels[start : start + n]) if labels is not None else [f"class {int(t)}" for t in maps["target"][start : start + n]]
    )
    axes[0][0].set_yticks(ticks, names, fontsize=7)
    axes[0][0].set_ylabel("probe image (explained class)", fontsize=8)
    return fig


def ald_figure(weight: Tensor, fit: Any) -> Any:
    """Histogram of final-layer weights and the joint log-rank fits of both signs (Siddhartha 2022).

    Args:
        weight: the final ``nn.Linear`` weight ``[K, C]``.
        fit: its :func:`~lightning_interp.saliency.fit_ald` result.

    Returns:
        A matplotlib ``Figure``.
    """
    w = weight.detach().double().cpu().flatten()
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.5))
    ax1.hist(w.numpy(), bins=200, color="gray")
    ax1.set_yscale("log")
    ax1.set_xlabel("final-layer weight")
    ax1.set_ylabel("count")
    ax1.set_title("weight histogram (all classes)")
    for side, values, joint in (("+", w[w > 0], fit.joint_positive), ("-", -w[w < 0], fit.joint_negative)):
        if values.numel() < 2:
            continue
        y = values.sort().values
        r = torch.arange(y.numel(), dtype=torch.float64) / y.numel()
        step = max(1, y.numel() // 2000)
        ax2.plot(r[::step], y.log()[::step], lw=1, label=f"{side} side (R^2 = {float(joint.r2):.3f})")
        ax2.plot(r, float(joint.slope) * r + float(joint.intercept), ls="--", lw=1, color="black")
    ax2.set_xlabel("normalised rank r")
    ax2.set_ylabel("log |w|")
    ax2.set_title("log-rank fit (joint)")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def saliency_figures(result: Any, class_names: Sequence[str] | None = None, rows: int = 8) -> dict[str, Any]:
    """The figures of a :class:`~lightning_interp.saliency.SaliencyResult`: ``{"maps": saliency_grid(...)}``.

    Args:
        result: what :func:`~lightning_interp.saliency.measure_saliency` returned.
        class_names: names of the classes, to label the rows (``"class <k>"`` past their end; default ``"class <k>"``).
        rows: images shown.

    Returns:
        ``{"maps": Figure}``.
    """
    labels = None
    if class_names is not None:
        labels = [class_names[int(t)] if int(t) < len(class_names) else f"class {int(t)}" for t in result.maps["target"]]
    return {"maps": saliency_grid(result.maps, result.inputs, rows=rows, labels=labels)}


def posterior_figure(x: Tensor, p: Tensor, q: Tensor, density: Tensor) -> Any:
    """A 1-D task's true posterior ``p(c|x)`` (solid) and the model's softmax ``q(c|x)`` (dashed) over ``x``, and ``p(x)``.

    Args:
        x: grid ``[G]``.
        p: true posterior on the grid ``[G, K]``.
        q: model softmax on the grid ``[G, K]``.
        density: input density on the grid ``[G]``.

    Returns:
        A matplotlib ``Figure``.
    """
    import matplotlib

    fig, (ax, ax2) = subplots(2, 1, figsize=(6, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for c in range(p.shape[1]):
        color = colors[c % len(colors)]
        ax.plot(x, p[:, c], color=color, lw=2, label=f"true p(c={c}|x)")
        ax.plot(x, q[:, c], color=color, lw=2, ls="--", label=f"model q(c={c}|x)")
    ax.set_ylabel("probability")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Model softmax vs. Bayesian posterior")
    ax2.fill_between(x, density, alpha=0.4, color="gray")
    ax2.set_ylabel("p(x)")
    ax2.set_xlabel("x")
    return fig


def reliability_figure(p: Tensor, q: Tensor, max_points: int = 3000) -> Any:
    """Scatter of the model's softmax ``q(c|x)`` against the true posterior ``p(c|x)`` (the first ``max_points`` examples).

    Returns:
        A matplotlib ``Figure``.
    """
    fig, ax = subplots(figsize=(4.5, 4.5))
    n = min(len(p), max_points)
    for c in range(p.shape[1]):
        ax.scatter(p[:n, c], q[:n, c], s=4, alpha=0.4, label=f"class {c}")
    ax.plot([0, 1], [0, 1], color="black", lw=1)
    ax.set_xlabel("true posterior p(c|x)")
    ax.set_ylabel("model softmax q(c|x)")
    ax.set_title("q vs. p on the probe set")
    ax.legend(fontsize=8, markerscale=3)
    return fig


def gap_by_density_figure(gap: dict[str, Tensor]) -> Any:
    """Bars of the mean KL and TV gaps (± 1 SE) per input-density bin, from :class:`~lightning_interp.posterior.PosteriorGap`.

    Args:
        gap: the metric's ``compute()`` with density bins (``kl_by_density``, ``kl_se_by_density``, ``tv_...``).

    Returns:
        A matplotlib ``Figure``.
    """
    fig, ax = subplots(figsize=(6, 3.2))
    bins = torch.arange(len(gap["kl_by_density"]))
    for shift, k, label in ((-0.2, "kl", "KL(p||q)"), (0.2, "tv", "TV")):
        values, errors = gap[f"{k}_by_density"].cpu(), gap[f"{k}_se_by_density"].cpu()
        ax.bar(bins + shift, values, width=0.4, label=label, yerr=errors, capsize=2)
    ax.set_xlabel("input-density bin (0 = lowest density)")
    ax.set_ylabel("mean gap (± 1 SE)")
    ax.set_title("Posterior gap by input density")
    ax.legend()
    return fig


def posterior_gap_figures(result: Any) -> dict[str, Any]:
    """The figures of a :class:`~lightning_interp.posterior.PosteriorGapResult`.

    ``posterior`` (:func:`posterior_figure`, for a 1-D task with its grid) or ``reliability``
    (:func:`reliability_figure`), and ``gap_by_density`` (:func:`gap_by_density_figure`) with density bins.
    """
    exact, figs = result.exact, {}
    if result.grid_logits is not None and exact.grid is not None:
        figs["posterior"] = posterior_figure(
            exact.grid[:, 0],
            exact.grid_log_posterior.exp(),
            result.grid_logits.softmax(dim=1).double().cpu(),
            exact.grid_log_density.exp(),
        )
    else:
        figs["reliability"] = reliability_figure(exact.log_posterior.exp(), result.logits.softmax(dim=1).double().cpu())
    if "kl_by_density" in result.gap:
        figs["gap_by_density"] = gap_by_density_figure(result.gap)
    return figs
