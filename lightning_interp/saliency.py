"""Final-layer saliency: discriminative and confusing regions from the last fully connected layer.

Reference:
    Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022).
    Definitions follow docs/saliency.md: (a) is the paper's own analysis as reconstructed from the
    author's public summary and notebooks (the paper's exact formulas are not reproduced here); (b), the
    policy-gradient map, is this project's named extension.

Cross-entropy training is a one-step policy gradient with policy ``pi(c|x) = softmax(W a + b)_c`` over
the pooled feature ``a = mean_ij A[:, i, j]``. From the final ``nn.Linear`` alone:

* :func:`fit_ald` audits each class row of ``W``: on each side (positive weights, magnitudes of
  negative weights) ``log sort(y) ~ slope * r + intercept`` on the normalised rank ``r = i / L``, with
  ``R^2`` and the asymmetric-Laplace parameters ``kappa = sqrt(e^b / (a - e^b))``,
  ``lambda = a * kappa``, ``mean = (1 - kappa^2) / (lambda * kappa)``; plus pooled ("joint") fits;
* :func:`split_chain` is the recursive mean split of a class row: the last ``"+"`` subset is the most
  discriminative channel set, the last ``"-"`` subset the most confusing one;
* :class:`FinalLayerSaliency` (a ``captum.attr.Attribution``) turns those into maps on the spatial
  feature map ``A`` that is globally average-pooled into the final layer, in one forward pass:
  ``policy_gradient`` ``M = sum_k g_k A_k`` with ``g = W[c] - sum_j q_j W[j]`` (the score-function
  gradient ``d log pi(c|x) / d a``), ``cam`` ``M = sum_k W[c, k] A_k``, and the paper's
  ``discriminative`` / ``confusing`` maps ``relu(sum_{k in S} HW / (2 + sum_ab A_k) A_k)``, min-max
  normalised, for the last chain subset ``S``.

For a global-average-pool + Linear head no backward pass is needed; ``policy_gradient / (h * w)``
equals captum's ``LayerGradCam`` of ``log_softmax(model(x))[c]`` with ``relu_attributions=False``.
Other heads (flatten + Linear, an MLP after the pool, token models such as ViT) go through an
autograd fallback that computes the same quantities from gradients at the feature layer: the
effective weight of channel ``k`` for logit ``c`` is ``sum_ij d z_c / d A[k, i, j]`` (which is exactly
``W[c, k]`` for a GAP head).

The module is pure torch (plus captum): it never imports Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import Tensor, nn

from lightning_interp.hooks import capture, forward_hooks, get_module, leaves

__all__ = [
    "METHODS",
    "ALDFit",
    "ALDSide",
    "FinalLayerSaliency",
    "channel_set_map",
    "deletion_curve",
    "fit_ald",
    "negative_share",
    "split_chain",
]

Method = Literal["policy_gradient", "cam", "discriminative", "confusing"]
#: The map kinds of :meth:`FinalLayerSaliency.attribute`.
METHODS: tuple[str, ...] = ("policy_gradient", "cam", "discriminative", "confusing")


# ---------------------------------------------------------------------------------------------
# (a) weight-distribution audit
# ---------------------------------------------------------------------------------------------


@dataclass
class ALDSide:
    """Log-rank fits of one side of the weights. Every field has the same shape (``[K]`` or ``[]``).

    Attributes:
        slope: ``a`` of ``log y ~ a * r + b``.
        intercept: ``b``.
        r2: coefficient of determination of the fit.
        kappa: asymmetric-Laplace asymmetry ``sqrt(e^b / (a - e^b))`` (NaN where ``a <= e^b``).
        lam: asymmetric-Laplace rate ``a * kappa``.
        mean: ``(1 - kappa^2) / (lambda * kappa)``.
        count: number of weights on this side (zeros excluded).
    """

    slope: Tensor
    intercept: Tensor
    r2: Tensor
    kappa: Tensor
    lam: Tensor
    mean: Tensor
    count: Tensor


@dataclass
class ALDFit:
    """Result of :func:`fit_ald`: per-class fits (``[K]``) and pooled fits (0-d) on each side."""

    positive: ALDSide
    negative: ALDSide
    joint_positive: ALDSide
    joint_negative: ALDSide

    def rows(self) -> list[dict[str, float]]:
        """One dict per class (``class``, then ``pos_<field>`` and ``neg_<field>``), for tables."""
        out = []
        for c in range(self.positive.slope.numel()):
            row: dict[str, float] = {"class": c}
            for prefix, side in (("pos", self.positive), ("neg", self.negative)):
                for f in fields(side):
                    row[f"{prefix}_{f.name}"] = float(getattr(side, f.name)[c])
            out.append(row)
        return out


def _fit_side(values: Tensor) -> tuple[float, ...]:
    """Fit one side; ``values`` are positive magnitudes (any order)."""
    n = values.numel()
    nan = math.nan
    if n < 2:
        return (nan, nan, nan, nan, nan, nan, float(n))
    y = torch.sort(values.double()).values.log()
    r = torch.arange(n, dtype=torch.float64) / n
    r_c, y_c = r - r.mean(), y - y.mean()
    slope = (r_c * y_c).sum() / (r_c * r_c).sum()
    intercept = y.mean() - slope * r.mean()
    ss_res = ((y - (slope * r + intercept)) ** 2).sum()
    ss_tot = (y_c * y_c).sum()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else torch.tensor(1.0 if ss_res == 0 else nan, dtype=torch.float64)
    a, b = slope.item(), intercept.item()
    denom = a - math.exp(b)
    kappa = math.sqrt(math.exp(b) / denom) if denom > 0 else nan
    lam = a * kappa
    mean = (1 - kappa**2) / (lam * kappa) if lam * kappa != 0 else nan
    return (a, b, float(r2), kappa, lam, mean, float(n))


def _stack_sides(results: Sequence[tuple[float, ...]]) -> ALDSide:
    t = torch.tensor(results, dtype=torch.float64).reshape(-1, 7)
    cols = [t[:, i] if t.shape[0] > 1 else t[0, i] for i in range(7)]
    return ALDSide(*cols)


def fit_ald(weight: Tensor) -> ALDFit:
    """Asymmetric-Laplace audit of a final layer's weight matrix (docs/saliency.md (a)).

    Per class row ``w = weight[c]`` and side (positive ``w[w > 0]``, negative ``-w[w < 0]``; zeros are
    excluded) the sorted magnitudes are fitted as ``log y ~ slope * (i / L) + intercept`` by least
    squares, and converted to asymmetric-Laplace parameters. The joint fits pool every positive (every
    negative) weight of the matrix. A side with fewer than 2 weights gives NaN, not an exception.

    Args:
        weight: ``[K, D]`` (or ``[D]`` for a single class).

    Returns:
        An :class:`ALDFit` with float64 CPU tensors.

    Example:
        >>> L = 50
        >>> y = torch.exp(2.0 * torch.arange(L) / L - 3.0)
        >>> fit = fit_ald(y[torch.randperm(L)][None])
        >>> round(fit.positive.slope.item(), 6), round(fit.positive.intercept.item(), 6), round(fit.positive.r2.item(), 6)
        (2.0, -3.0, 1.0)
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    w = weight.detach().to("cpu", torch.float64)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2:
        raise ValueError(f"weight must have shape [K, D], got {list(weight.shape)}")
    pos = _stack_sides([_fit_side(row[row > 0]) for row in w])
    neg = _stack_sides([_fit_side(-row[row < 0]) for row in w])
    return ALDFit(
        positive=pos,
        negative=neg,
        joint_positive=_stack_sides([_fit_side(w[w > 0])]),
        joint_negative=_stack_sides([_fit_side(-w[w < 0])]),
    )


def split_chain(w: Tensor, side: Literal["+", "-"] = "+", min_size: int = 20) -> list[Tensor]:
    """The recursive mean split of one class row (docs/saliency.md (a)), every level.

    Level 0 is every channel. Each next level keeps, of the current subset ``S``, the channels with
    ``w_k >= mean(w_S)`` (``"+"``) or ``w_k < mean(w_S)`` (``"-"``), and is split again while it has at
    least ``min_size`` channels. The last ``"+"`` level is the most discriminative channel set, the
    last ``"-"`` level the most confusing one.

    Args:
        w: weights ``[D]``.
        side: ``"+"`` or ``"-"``.
        min_size: a subset with fewer channels is not split further.

    Returns:
        Channel indices (``LongTensor``, increasing) of every level, from all channels to the last.

    Example:
        >>> [c.tolist() for c in split_chain(torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]), "+", min_size=2)]
        [[0, 1, 2, 3, 4], [4]]
    """
    if side not in ("+", "-"):
        raise ValueError(f"side must be '+' or '-', got {side!r}")
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty vector [D], got shape {list(w.shape)}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    values = w.detach().to(torch.float64)
    current = torch.arange(values.numel(), device=w.device)
    chain = [current]
    while current.numel() >= min_size:
        sub = values[current]
        keep = sub >= sub.mean() if side == "+" else sub < sub.mean()
        nxt = current[keep]
        if nxt.numel() == 0 or nxt.numel() == current.numel():
            break
        chain.append(nxt)
        current = nxt
    return chain


def channel_set_map(features: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
    """The paper's map of a channel set (closed-form Grad-CAM++ of ``sum_{k in S} sum_ij A_kij``).

    ``M(i, j) = relu(sum_{k in S} (H * W / (2 + sum_ab A[k, a, b])) * A[k, i, j])``, then min-max
    normalised per sample (a constant map becomes 0). ``A`` is taken after a ReLU: the paper's feature
    maps are post-ReLU activations, and for signed maps (token layers, pre-activation features) this
    keeps the denominator ``2 + sum A >= 2``.

    Args:
        features: ``A`` ``[N, D, H, W]``.
        mask: channel membership ``[D]`` or per sample ``[N, D]`` (bool or 0/1).
        normalize: min-max normalise each map.

    Returns:
        ``[N, H, W]``.
    """
    n, d, h, w = features.shape
    features = F.relu(features)
    mask = mask.to(features.dtype)
    if mask.ndim == 1:
        mask = mask.expand(n, d)
    coef = mask * (h * w) / (2.0 + features.sum(dim=(2, 3)))
    maps = F.relu(torch.einsum("nd,ndhw->nhw", coef, features))
    return _minmax(maps) if normalize else maps


def _minmax(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny)
    out = (maps - lo[:, None, None]) / span[:, None, None]
    return torch.where((hi > lo)[:, None, None], out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# (b) maps
# ---------------------------------------------------------------------------------------------


def _as_spatial(t: Tensor) -> Tensor | None:
    """``[N, C, H, W]`` as is; token layouts ``[N, T, C]`` with ``T`` or ``T - 1`` a square as ``[N, C, s, s]``."""
    if t.ndim == 4 and t.shape[2] * t.shape[3] > 1:
        return t
    if t.ndim == 3:
        tokens = t.shape[1]
        for drop in (1, 0):  # a class token first, as in ViT
            side = math.isqrt(tokens - drop)
            if side > 1 and side * side == tokens - drop:
                return t[:, drop:, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    return None


class _Summary:
    """What layer resolution keeps of a module output: its shape and, for spatial maps, channel means."""

    def __init__(self, shape: torch.Size, mean: Tensor | None, relu_mean: Tensor | None, spatial: bool) -> None:
        self.shape, self.mean, self.relu_mean, self.spatial = shape, mean, relu_mean, spatial

    @classmethod
    def of(cls, out: Tensor) -> _Summary:
        spatial = out.ndim == 4 and out.shape[2] * out.shape[3] > 1
        out = out.detach()
        if spatial:  # means taken now: a later in-place op (DenseNet's relu) may change the tensor
            return cls(out.shape, out.mean(dim=(2, 3)), F.relu(out).mean(dim=(2, 3)), True)
        return cls(out.shape, None, None, _as_spatial(out[:1]) is not None)


class FinalLayerSaliency(Attribution):
    """Policy-gradient, CAM and the paper's discriminative / confusing maps from the final layer.

    The final ``nn.Linear`` (the one whose output is the model's output) and the spatial feature map
    that is globally average-pooled into it are found on the first batch, or taken by
    ``named_modules()`` path, and the relation ``mean_ij A = classifier input`` is checked (also after a
    ReLU, as in torchvision's DenseNet). Where it holds, every map costs one forward pass and no
    backward pass. Where it does not (a flatten + Linear head, an MLP after the pool, a token model),
    the same quantities are computed from gradients at the feature layer (one warning); without a
    ``feature_layer`` the fallback picks the last layer with a spatial or token output whose gradient
    reaches the spatial positions.

    Args:
        model: a classifier returning logits ``[N, K]`` for image-like inputs.
        feature_layer: ``named_modules()`` path of the feature map; found automatically when ``None``.
        classifier: ``named_modules()`` path of the final ``nn.Linear``; found automatically when ``None``.
        min_size: ``min_size`` of the recursive split (:func:`split_chain`).

    Raises:
        ValueError: unknown layer names, a model without an ``nn.Linear`` producing its output, a
            ``classifier`` that is not an ``nn.Linear``, or no spatial feature layer.
        TypeError: inputs that are not image-like tensors ``[N, C, H, W]``.

    Example:
        >>> from lightning_interp.models import SmallCNN
        >>> model = SmallCNN(in_channels=3, num_classes=5).eval()
        >>> saliency = FinalLayerSaliency(model)
        >>> saliency.attribute(torch.randn(2, 3, 16, 16), method="policy_gradient").shape
        torch.Size([2, 8, 8])
        >>> saliency.feature_layer, saliency.classifier, saliency.uses_closed_form
        ('features', 'fc', True)
    """

    def __init__(
        self, model: nn.Module, feature_layer: str | None = None, classifier: str | None = None, min_size: int = 20
    ) -> None:
        super().__init__(model)
        self.model = model
        if feature_layer is not None:
            get_module(model, feature_layer)
        if classifier is not None and not isinstance(get_module(model, classifier), nn.Linear):
            raise ValueError(f"classifier {classifier!r} is a {type(get_module(model, classifier)).__name__}, not an nn.Linear")
        self.feature_layer = feature_layer
        self.classifier = classifier
        self.min_size = min_size
        #: ``"identity"`` or ``"relu"`` where the GAP relation holds; ``None`` for the autograd fallback.
        self.feature_transform: str | None = None
        self.uses_closed_form: bool | None = None
        self._chains: dict[tuple[int, str], Tensor] = {}

    # ------------------------------------------------------------------ layer resolution
    def _check_inputs(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor of images [N, C, H, W], got {type(inputs).__name__}")
        if inputs.ndim != 4 or not inputs.is_floating_point():
            raise TypeError(
                f"inputs must be a floating-point image batch [N, C, H, W], got {inputs.dtype} of shape {list(inputs.shape)}; "
                "final-layer saliency maps need spatial inputs"
            )

    def resolve(self, inputs: Tensor) -> None:
        """Find the classifier and the feature layer on this batch and check the GAP relation.

        Called by the first :meth:`attribute`; call it directly to check a model before attributing.

        Raises:
            ValueError: no ``nn.Linear`` producing the output, or no spatial feature layer.
        """
        names = dict(self.model.named_modules())
        records: list[tuple[str, Tensor]] = []
        linear_io: dict[str, tuple[Tensor, Tensor]] = {}

        def make_hook(name: str, module: nn.Module):
            def hook(_m: nn.Module, inp: tuple, out: object) -> None:
                if isinstance(out, Tensor):
                    # keep only what the checks need (shape; spatial means for 4-D maps), not a copy of every output
                    records.append((name, _Summary.of(out)))
                    if isinstance(module, nn.Linear) and inp and isinstance(inp[0], Tensor):
                        linear_io[name] = (inp[0].detach().clone(), out.detach().clone())

            return hook

        with (
            forward_hooks(self.model, {name: make_hook(name, module) for name, module in names.items() if name}),
            torch.no_grad(),
        ):
            output = self.model(inputs)
        if not isinstance(output, Tensor) or output.ndim != 2:
            got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"the model must return logits [N, K], got {got}")
        if self.classifier is None:
            final = [n for n, (_, out) in linear_io.items() if out.shape == output.shape and torch.equal(out, output)]
            if not final:
                raise ValueError(
                    f"{type(self.model).__name__} has no nn.Linear whose output is the model's output (the logits); "
                    "final-layer saliency needs a final fully connected layer. Pass classifier='<named_modules path>' "
                    "if the model wraps it."
                )
            self.classifier = final[-1]
        elif self.classifier not in linear_io:
            raise ValueError(f"classifier {self.classifier!r} did not run in the forward pass")
        pooled = linear_io[self.classifier][0]
        order = [n for n, _ in records]
        outputs = dict(records)
        cls_pos = max(i for i, n in enumerate(order) if n == self.classifier)

        def gap_transform(a: _Summary) -> str | None:
            if a.mean is None or pooled.ndim != 2 or a.shape[:2] != pooled.shape:
                return None
            for kind, m in (("identity", a.mean), ("relu", a.relu_mean)):
                if torch.allclose(m, pooled, rtol=1e-4, atol=1e-5):
                    return kind
            return None

        if self.feature_layer is None:
            for name in reversed(order[:cls_pos]):
                kind = gap_transform(outputs[name])
                if kind is not None:
                    self.feature_layer, self.feature_transform = name, kind
                    break
        else:
            if self.feature_layer not in outputs:
                raise ValueError(f"feature_layer {self.feature_layer!r} did not return a tensor in the forward pass")
            if not outputs[self.feature_layer].spatial:
                raise ValueError(
                    f"feature_layer {self.feature_layer!r} outputs shape {list(outputs[self.feature_layer].shape)}, "
                    "not a spatial map [N, C, H, W] or tokens [N, T, C]; choose a convolutional or token layer"
                )
            self.feature_transform = gap_transform(outputs[self.feature_layer])
        self.uses_closed_form = self.feature_transform is not None
        if self.uses_closed_form:
            return
        if self.feature_layer is None:
            self.feature_layer = self._pick_fallback_layer(inputs, [n for n in order[:cls_pos] if outputs[n].spatial])
        warnings.warn(
            f"{type(self.model).__name__}: the head is not global-average-pool -> Linear at {self.feature_layer!r}; "
            "FinalLayerSaliency uses the autograd fallback (gradients at the feature layer).",
            stacklevel=3,
        )

    def _pick_fallback_layer(self, inputs: Tensor, candidates: list[str]) -> str:
        if not candidates:
            raise ValueError(
                f"{type(self.model).__name__} has no layer with a spatial [N, C, H, W] or token [N, T, C] output before "
                "the final nn.Linear; final-layer saliency maps need one (pass feature_layer=...)"
            )
        seen: dict[str, Tensor] = {}
        keep = {name: (lambda _m, _i, out, n=name: seen.setdefault(n, out)) for name in candidates}
        with forward_hooks(self.model, keep), torch.inference_mode(False), torch.enable_grad():  # type: ignore[arg-type]
            logits = self.model(inputs.clone().requires_grad_(True))
            names = [n for n in candidates if n in seen and seen[n].requires_grad]
            grads = torch.autograd.grad(logits.max(dim=1).values.sum(), [seen[n] for n in names], allow_unused=True)
        for name, g in zip(reversed(names), reversed(grads), strict=True):
            if g is not None and _as_spatial(g).abs().sum() > 0:
                return name
        return candidates[-1]

    # ------------------------------------------------------------------ maps
    def _chain_mask(self, weight: Tensor, side: str) -> Tensor:
        """Membership ``[N, D]`` of the last chain subset of each row of ``weight`` ``[N, D]``."""
        mask = torch.zeros_like(weight, dtype=torch.bool)
        for i, row in enumerate(weight):
            mask[i, split_chain(row, side, self.min_size)[-1]] = True  # type: ignore[arg-type]
        return mask

    def class_chain_mask(self, classes: Tensor, side: str, weight: Tensor) -> Tensor:
        version = (weight.data_ptr(), weight._version)  # the cache follows in-place weight updates
        if getattr(self, "_chain_version", None) != version:
            self._chains, self._chain_version = {}, version
        rows = []
        for c in classes.tolist():
            key = (c, side)
            if key not in self._chains:
                self._chains[key] = self._chain_mask(weight[c : c + 1], side)[0]
            rows.append(self._chains[key])
        return torch.stack(rows)

    @torch.no_grad()
    def attribute_all(
        self, inputs: Tensor, target: int | Sequence[int] | Tensor | None = None, upsample: bool = False
    ) -> dict[str, Tensor]:
        """Every map kind from one forward pass.

        Args:
            inputs: images ``[N, C, H, W]``.
            target: class per sample (an int, ``[N]``), several classes per sample (``[N, k]``), or
                ``None`` for the predicted class.
            upsample: bilinearly upsample the maps to the input's ``H x W``.

        Returns:
            ``{method: maps}`` for :data:`METHODS` (``[N, h, w]``, or ``[N, k, h, w]`` for ``[N, k]``
            targets), plus ``logits`` ``[N, K]`` and ``target``.
        """
        self._check_inputs(inputs)
        if self.uses_closed_form is None:
            self.resolve(inputs)
        if self.uses_closed_form:
            feats, logits = self._forward_features(inputs)
            param = get_module(self.model, self.classifier).weight  # type: ignore[arg-type]
            weight = param.to(feats.dtype)
            tgt = self._targets(target, logits)
            k = tgt.shape[1]
            flat_t = tgt.reshape(-1)
            q = logits.softmax(dim=1).to(feats.dtype)
            w_c = weight[flat_t].reshape(len(inputs), k, -1)  # [N, k, D]
            expected = (q @ weight)[:, None, :]  # [N, 1, D]
            g = w_c - expected
            disc_mask = self.class_chain_mask(flat_t, "+", param).reshape(len(inputs), k, -1)
            conf_mask = self.class_chain_mask(flat_t, "-", param).reshape(len(inputs), k, -1)
        else:
            feats, logits, w_c, g, tgt = self._fallback(inputs, target)
            k = tgt.shape[1]
            disc_mask = self._chain_mask(w_c.reshape(-1, w_c.shape[-1]), "+").reshape(w_c.shape)
            conf_mask = self._chain_mask(w_c.reshape(-1, w_c.shape[-1]), "-").reshape(w_c.shape)
        out = {
            "policy_gradient": torch.einsum("nkd,ndhw->nkhw", g, feats),
            "cam": torch.einsum("nkd,ndhw->nkhw", w_c, feats),
            "discriminative": self._set_maps(feats, disc_mask),
            "confusing": self._set_maps(feats, conf_mask),
        }
        if upsample:
            size = inputs.shape[-2:]
            out = {m: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for m, v in out.items()}
        squeeze = not (isinstance(target, Tensor) and target.ndim == 2) and not (
            isinstance(target, Sequence) and target and isinstance(target[0], Sequence)
        )
        if squeeze:
            out = {m: v[:, 0] for m, v in out.items()}
        out["logits"] = logits
        out["target"] = tgt[:, 0] if squeeze else tgt
        return out

    def attribute(
        self,
        inputs: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        method: Method = "policy_gradient",
        upsample: bool = False,
    ) -> Tensor:
        """Saliency maps of ``method`` for ``target``, in one forward pass for a GAP + Linear head.

        Args:
            inputs: images ``[N, C, H, W]``.
            target: class per sample (an int, ``[N]``), several per sample (``[N, k]``), or ``None``
                for the predicted class.
            method: ``"policy_gradient"`` / ``"cam"`` (raw, signed, unnormalised), ``"discriminative"`` /
                ``"confusing"`` (the paper's min-max normalised maps of the last chain subset).
            upsample: bilinearly upsample to the input's ``H x W``.

        Returns:
            ``[N, h, w]`` maps (``[N, k, h, w]`` for ``[N, k]`` targets) on the inputs' device.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        return self.attribute_all(inputs, target=target, upsample=upsample)[method]

    def _set_maps(self, feats: Tensor, mask: Tensor) -> Tensor:
        n, k, d = mask.shape
        rep = feats.repeat_interleave(k, dim=0) if k > 1 else feats
        return channel_set_map(rep, mask.reshape(n * k, d)).reshape(n, k, *feats.shape[2:])

    def _targets(self, target: int | Sequence | Tensor | None, logits: Tensor) -> Tensor:
        n, num = logits.shape
        if target is None:
            t = logits.argmax(dim=1)[:, None]
        else:
            t = torch.as_tensor(target, device=logits.device).long()
            if t.ndim == 0:
                t = t.expand(n)
            if t.ndim == 1:
                t = t[:, None]
            if t.ndim != 2 or t.shape[0] != n:
                raise ValueError(f"target must be an int, [N] or [N, k] with N = {n}, got shape {list(t.shape)}")
        if (t < 0).any() or (t >= num).any():
            raise ValueError(f"target classes must lie in [0, {num}), got {t.min().item()}..{t.max().item()}")
        return t

    def _forward_features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        layer: str = self.feature_layer  # type: ignore[assignment]
        with capture(self.model, [layer]) as store:
            logits = self.model(inputs)
        feats = store[layer]
        if self.feature_transform == "relu":
            feats = F.relu(feats)
        return feats, logits

    def _fallback(self, inputs: Tensor, target: int | Sequence | Tensor | None) -> tuple[Tensor, ...]:
        seen: dict[str, Tensor] = {}
        name = self.feature_layer
        with torch.inference_mode(False), torch.enable_grad(), leaves(self.model, [name], seen):  # type: ignore[list-item]
            logits = self.model(inputs.clone())
            leaf = seen[name]  # type: ignore[index]
            tgt = self._targets(target, logits.detach())
            logp = logits.log_softmax(dim=1)
            eff, pg = [], []
            for j in range(tgt.shape[1]):
                sel = tgt[:, j : j + 1]
                (g_z,) = torch.autograd.grad(logits.gather(1, sel).sum(), leaf, retain_graph=True)
                (g_p,) = torch.autograd.grad(logp.gather(1, sel).sum(), leaf, retain_graph=True)
                eff.append(_as_spatial(g_z).sum(dim=(2, 3)))
                pg.append(_as_spatial(g_p).sum(dim=(2, 3)))
        feats = _as_spatial(leaf.detach())
        return feats, logits.detach(), torch.stack(eff, dim=1), torch.stack(pg, dim=1), tgt

    def has_convergence_delta(self) -> bool:
        return False


def deletion_curve(model: nn.Module, inputs: Tensor, maps: Tensor, target: Tensor, steps: int = 10) -> Tensor:
    """Probability of ``target`` as the most salient pixels are deleted (set to the image's mean).

    Args:
        model: the classifier.
        inputs: images ``[N, C, H, W]``.
        maps: saliency ``[N, H, W]`` at the input resolution (higher = deleted first).
        target: classes ``[N]``.
        steps: number of deletion fractions ``1/steps, ..., 1`` (plus the intact image).

    Returns:
        ``[N, steps + 1]`` target probabilities; the mean over fractions is the deletion AUC (lower is
        more faithful).
    """
    n, _, h, w = inputs.shape
    order = maps.reshape(n, -1).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    baseline = inputs.mean(dim=(2, 3), keepdim=True)
    probs = []
    for i in range(steps + 1):
        keep = (rank >= round(i * h * w / steps)).reshape(n, 1, h, w)
        x = torch.where(keep, inputs, baseline)
        probs.append(model(x).softmax(dim=1).gather(1, target[:, None])[:, 0])
    return torch.stack(probs, dim=1)


def negative_share(policy_gradient: Tensor) -> Tensor:
    """Share of each map's policy-gradient mass that is negative (evidence against the class) ``[N]``.

    ``sum relu(-pg) / sum |pg|`` over the map; 0 for an all-zero map.
    """
    pg = policy_gradient.flatten(1)
    return F.relu(-pg).sum(dim=1) / pg.abs().sum(dim=1).clamp_min(torch.finfo(pg.dtype).tiny)
