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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:  # the ablation is imported only by whoever draws its figures
    from lightning_interp.ablation import AblationFit, AblationResult

__all__ = [
    "ablation_errorbar_figure",
    "ablation_figures",
    "ablation_importance_figure",
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


# ---------------------------------------------------------------------------------------------
# correlation orders and the expansion
# ---------------------------------------------------------------------------------------------

__all__ += ["correlation_orders_figure", "coupling_strength_figure", "expansion_figures"]

if TYPE_CHECKING:
    from lightning_interp.correlation import CorrelationResult
    from lightning_interp.expansion import ExpansionResult


def correlation_orders_figure(result: CorrelationResult, history: Sequence[dict[str, float]] = ()) -> Any:
    """The correlation orders' figure: the accuracies per layer now, and the higher-order gap over training.

    Args:
        result: :func:`~lightning_interp.correlation.measure_correlation`'s result (left: ``acc_real`` and the
            three orders per layer, ± 1 SE).
        history: earlier measurements' scalars with a ``step`` (right: ``<layer>/higher_order_gap`` ± 1 SE per
            layer over the steps); empty: the right panel stays empty.

    Returns:
        A matplotlib ``Figure``.
    """
    layers = result.layers
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.8))
    pos = torch.arange(len(layers)).float()
    names = ("acc_real", "acc_order2", "acc_order1", "acc_order0")
    for i, label in enumerate(("real", "order 2", "order 1", "order 0")):
        values = [float(v[names[i]][0]) for v in layers.values()]
        ses = [float(v[names[i]][1]) for v in layers.values()]
        ax1.bar(pos + (i - 1.5) * 0.2, values, width=0.2, label=label, yerr=ses, capsize=2)
    ax1.set_xticks(pos.tolist(), list(layers), rotation=30, fontsize=7)
    ax1.set_ylabel("probe accuracy (± 1 SE)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=7)
    ax1.set_title("Gaussian surrogates per layer")
    for layer in layers:
        key = f"{layer}/higher_order_gap"
        pts = [(h["step"], h[key], h.get(f"{key}_se", float("nan"))) for h in history if key in h]
        if pts:
            steps, gaps, gap_ses = (torch.tensor(v, dtype=torch.float64) for v in zip(*pts, strict=True))
            ax2.errorbar(steps, gaps, yerr=gap_ses, marker="o", capsize=3, label=layer)
    ax2.set_xlabel("step")
    ax2.set_ylabel("acc_real - acc_order2 (± 1 SE)")
    ax2.set_title("higher-order gap over training")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def coupling_strength_figure(strength: Tensor, title: str) -> Any:
    """A map of coupling strengths ``[L, L]`` between sites (e.g. :meth:`PottsExpansion.coupling_strength`).

    Returns:
        A matplotlib ``Figure``.
    """
    s = strength.double().cpu()
    fig, ax = subplots(figsize=(4.5, 4))
    im = ax.imshow(s, cmap="viridis")
    ax.set_xlabel("site j")
    ax.set_ylabel("site i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return fig


def expansion_figures(result: ExpansionResult) -> dict[str, Any]:
    """The expansion's figures: the logit's coupling-strength map and one per expanded hidden unit.

    Args:
        result: :func:`~lightning_interp.expansion.measure_expansion`'s result.

    Returns:
        ``{"coupling_strength": Figure, "<layer>/unit<u>/coupling_strength": Figure, ...}``.
    """
    figs = {"coupling_strength": coupling_strength_figure(result.strength, "coupling strength (Frobenius, APC)")}
    for key, (_, strength) in result.units.items():
        figs[f"{key}/coupling_strength"] = coupling_strength_figure(strength, f"{key}: coupling strength (Frobenius, APC)")
    return figs
def ablation_figures(measurement: AblationResult) -> dict[str, Any]:
    """The figures of a :func:`~lightning_interp.ablation.measure_ablation` result, by key, per layer ``L``.

    ``L/importance``: the importance of every unit for every task (:func:`ablation_importance_figure`);
    ``L/importance_errors``: the importances with error bars where the fit has them (:func:`ablation_errorbar_figure`).
    """
    figs = {}
    for layer, r in measurement.results.items():
        labels = measurement.task_labels(r)
        figs[f"{layer}/importance"] = ablation_importance_figure(layer, r, labels)
        if r.importance_se is not None:
            figs[f"{layer}/importance_errors"] = ablation_errorbar_figure(layer, r, labels)
    return figs


def ablation_importance_figure(layer: str, r: AblationFit, labels: Sequence[str]) -> Any:
    """An image of ``P(unit kept | task correct)`` (tasks x units) of one layer's result (:class:`AblationFit`).

    Wide layers (a ResNet's 2048 channels) and many tasks: the figure stays a readable size (at most 14 x 12
    inches; task names on the axis up to 40 tasks).
    """
    imp = r.importance.double().cpu()
    width, height = min(14.0, max(4, 0.25 * imp.shape[1] + 2)), min(12.0, max(2.5, 0.3 * imp.shape[0] + 1.5))
    fig, ax = subplots(figsize=(width, height))
    im = ax.imshow(imp, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if len(labels) <= 40:
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("task")
    ax.set_xlabel("unit")
    ax.set_title(f"{layer}: P(unit kept | task correct) ({r.method})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="importance")
    return fig


def ablation_errorbar_figure(layer: str, r: AblationFit, labels: Sequence[str], max_units: int = 64) -> Any:
    """Importance with +-2 SE bars, one line per task (at most 10 tasks), of a result with ``importance_se``.

    On a wide layer the ``max_units`` units with the most information (summed over the tasks), labelled by their index.
    """
    if r.importance_se is None:
        raise ValueError("the result has no importance errors (one chain, or num_bootstrap=0): no error bars to draw")
    imp, se = r.importance.double().cpu(), r.importance_se.double().cpu()
    shown = torch.arange(imp.shape[1])
    if imp.shape[1] > max_units:
        shown = r.information_bits.double().cpu().nan_to_num().sum(0).argsort(descending=True)[:max_units].sort().values
    fig, ax = subplots(figsize=(max(5, 0.12 * len(shown) + 3), 3.2))
    units = torch.arange(len(shown))
    for t in range(min(10, imp.shape[0])):
        offset = 0.6 * (t / max(1, imp.shape[0]) - 0.3)
        ax.errorbar(units + offset, imp[t, shown], yerr=2 * se[t, shown], fmt=".", ms=3, lw=0.8, label=labels[t])
    which = ""
    if len(shown) < imp.shape[1]:
        ax.set_xticks(units.tolist(), [str(u) for u in shown.tolist()], fontsize=5, rotation=90)
        which = f", the {len(shown)} most informative of {imp.shape[1]} units"
    ax.axhline(0.5, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("unit")
    ax.set_ylabel("P(unit kept | task correct)")
    kind = {"jackknife": "jackknife over chains", "bootstrap": "bootstrap over probe"}.get(r.replicate_kind, r.replicate_kind)
    ax.set_title(f"{layer}: importance +- 2 SE ({kind}){which}", fontsize=9)
    ax.legend(fontsize=6, ncol=5, loc="lower right")
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
