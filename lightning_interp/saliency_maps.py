"""Final-layer saliency maps: :class:`FinalLayerSaliency`, a ``captum.attr.Attribution``.

Reference:
    Siddhartha, "An interpretation of the final fully connected layer", arXiv:2205.11908 (2022);
    definitions in docs/saliency.md (b).

:class:`FinalLayerSaliency` turns the final ``nn.Linear`` into maps on the spatial feature map ``A`` that is
globally average-pooled into it, in one forward pass: ``policy_gradient`` ``M = sum_k g_k A_k`` with
``g = W[c] - sum_j q_j W[j]`` (the score-function gradient ``d log pi(c|x) / d a``), ``cam``
``M = sum_k W[c, k] A_k``, and the paper's ``discriminative`` / ``confusing`` maps
``relu(sum_{k in S} HW / (2 + sum_ab A_k) A_k)``, min-max normalised, for the last chain subset ``S``
(:func:`~lightning_interp.final_layer.split_chain`). Other heads go through an autograd fallback (see
:mod:`lightning_interp.saliency`).

The class is made on first use (PEP 562): importing this module pulls neither captum nor matplotlib, nor
Lightning. It is also importable from :mod:`lightning_interp.saliency`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_interp.final_layer import bilinear_upsample, chain_masks, full_tensor, minmax_normalize
from lightning_interp.hooks import capture, forward_hooks, get_module, leaves

__all__ = ["METHODS", "FinalLayerSaliency", "Method", "check_images"]

Method = Literal["policy_gradient", "cam", "discriminative", "confusing"]
#: The map kinds of :meth:`FinalLayerSaliency.attribute`.
METHODS: tuple[str, ...] = ("policy_gradient", "cam", "discriminative", "confusing")


def check_images(inputs: Any) -> None:
    """Raise ``TypeError`` unless ``inputs`` is a floating-point image batch ``[N, C, H, W]`` (the message says why)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of images [N, C, H, W], got {type(inputs).__name__}")
    if inputs.ndim != 4 or not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a floating-point image batch [N, C, H, W], got {inputs.dtype} of shape {list(inputs.shape)}; "
            "final-layer saliency maps need spatial inputs"
        )


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


def _spatial(t: Tensor) -> Tensor:
    """:func:`_as_spatial` of a tensor known to be spatial (a resolved feature layer's output or its gradient)."""
    spatial = _as_spatial(t)
    if spatial is None:
        raise ValueError(f"expected a spatial map [N, C, H, W] or tokens [N, T, C], got shape {list(t.shape)}")
    return spatial


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


def _gap_transform(summary: _Summary, pooled: Tensor) -> str | None:
    """``"identity"`` / ``"relu"`` where ``mean_ij`` of the (ReLU'd) map equals the classifier input, else ``None``."""
    if summary.mean is None or pooled.ndim != 2 or summary.shape[:2] != pooled.shape:
        return None
    for kind, m in (("identity", summary.mean), ("relu", summary.relu_mean)):
        if m is not None and torch.allclose(m, pooled, rtol=1e-4, atol=1e-5):
            return kind
    return None


#: The chain side behind each channel-set map.
_SIDES = {"discriminative": "+", "confusing": "-"}

#: ``(method, classes)`` -> per-class coefficients on the channels of the feature map: ``[k, D]`` shared by
#: every sample, or ``[N, k, D]``.
Coefficients = Callable[[str, slice], Tensor]


class _FinalLayerSaliency:
    """Policy-gradient, CAM and the paper's discriminative / confusing maps from the final layer.

    The final ``nn.Linear`` (the one whose output is the model's output) and the spatial feature map
    that is globally average-pooled into it are found on the first batch, or taken by
    ``named_modules()`` path, and the relation ``mean_ij A = classifier input`` is checked (also after a
    ReLU, as in torchvision's DenseNet). Where it holds, every map costs one forward pass and no
    backward pass: the maps of ``k`` classes are one matrix product of per-class channel coefficients
    (``[k, D]`` when every sample has the same classes, as for all classes; else ``[N, k, D]``) with the
    feature map ``[N, D, h * w]``, so the maps of every class cost little more than the forward pass.
    Where it does not (a flatten + Linear head, an MLP after the pool, a token model), the same
    quantities are computed from gradients at the feature layer (one warning; one backward pass per
    target column plus one); without a ``feature_layer`` the fallback picks the last layer with a
    spatial or token output whose gradient reaches the spatial positions.

    Args:
        model: a classifier returning logits ``[N, K]`` for image-like inputs.
        feature_layer: ``named_modules()`` path of the feature map; found automatically when ``None``.
        classifier: ``named_modules()`` path of the final ``nn.Linear``; found automatically when ``None``.
        min_size: ``min_size`` of the recursive split (:func:`split_chain`).

    Attributes:
        chunk_elements: classes are rendered in chunks of at most about this many elements of per-class
            intermediates (coefficients and maps, ``N * k * (D + h * w)``), so that many targets (all
            classes of ImageNet for many images, say) are never held as ``[N, k, D]`` at once. The maps
            are upsampled (``upsample=True``) in one call once all are computed.

    Raises:
        ValueError: unknown layer names, a model without an ``nn.Linear`` producing its output, a
            ``classifier`` that is not an ``nn.Linear``, or no spatial feature layer.
        TypeError: inputs that are not image-like tensors ``[N, C, H, W]``.

    Example:
        >>> from lightning_interp.saliency import FinalLayerSaliency
        >>> from lightning_interp.models import SmallCNN
        >>> model = SmallCNN(in_channels=3, num_classes=5).eval()
        >>> from lightning_interp.saliency import FinalLayerSaliency
        >>> saliency = FinalLayerSaliency(model)
        >>> saliency.attribute(torch.randn(2, 3, 16, 16), method="policy_gradient").shape
        torch.Size([2, 8, 8])
        >>> saliency.feature_layer, saliency.classifier, saliency.uses_closed_form
        ('features', 'fc', True)
        >>> every_class = torch.arange(5).expand(2, 5)  # [N, k] targets: the maps of all five classes
        >>> saliency.attribute(torch.randn(2, 3, 16, 16), target=every_class).shape
        torch.Size([2, 5, 8, 8])
    """

    chunk_elements: int = 1 << 24

    def __init__(
        self, model: nn.Module, feature_layer: str | None = None, classifier: str | None = None, min_size: int = 20
    ) -> None:
        super().__init__(model)  # type: ignore[call-arg]  # the captum Attribution the class is mixed into
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
        # per side: the last chain subset of each class row [K, D], and which rows are filled
        self._chains: dict[str, tuple[Tensor, set[int]]] = {}
        self._chain_version: tuple[int, int] | None = None
        self._chain_weight: Tensor | None = None

    # ------------------------------------------------------------------ layer resolution
    def resolve(self, inputs: Tensor) -> None:
        """Find the classifier and the feature layer on this batch and check the GAP relation.

        Called by the first :meth:`attribute`; call it directly to check a model before attributing.

        Args:
            inputs: images ``[N, C, H, W]`` (a few suffice).

        Raises:
            ValueError: no ``nn.Linear`` producing the output, or no spatial feature layer.

        Example:
            >>> from lightning_interp.models import SmallCNN
            >>> from lightning_interp.saliency import FinalLayerSaliency
            >>> saliency = FinalLayerSaliency(SmallCNN(in_channels=1, num_classes=3).eval())
            >>> saliency.resolve(torch.randn(1, 1, 12, 12))
            >>> saliency.feature_layer, saliency.feature_transform
            ('features', 'identity')
        """
        output, summaries, order, linear_io = self._record_forward(inputs)
        self.classifier = self._find_classifier(output, linear_io)
        pooled = linear_io[self.classifier][0]
        before = order[: max(i for i, n in enumerate(order) if n == self.classifier)]  # layers run before the head
        if self.feature_layer is None:
            self.feature_layer, self.feature_transform = self._find_pooled_layer(before, summaries, pooled)
        else:
            self.feature_transform = self._check_feature_layer(summaries, pooled)
        self.uses_closed_form = self.feature_transform is not None
        if self.uses_closed_form:
            return
        if self.feature_layer is None:
            self.feature_layer = self._pick_fallback_layer(inputs, [n for n in before if summaries[n].spatial])
        warnings.warn(
            f"{type(self.model).__name__}: the head is not global-average-pool -> Linear at {self.feature_layer!r}; "
            "FinalLayerSaliency uses the autograd fallback (gradients at the feature layer).",
            stacklevel=3,
        )

    def _record_forward(self, inputs: Tensor) -> tuple[Tensor, dict[str, _Summary], list[str], dict[str, tuple[Tensor, Tensor]]]:
        """One forward pass with a hook on every module.

        Returns:
            The logits, a :class:`_Summary` of each module's last tensor output, the names of the modules in
            the order their outputs appeared, and each ``nn.Linear``'s ``(input, output)``.
        """
        records: list[tuple[str, _Summary]] = []
        linear_io: dict[str, tuple[Tensor, Tensor]] = {}

        def make_hook(name: str, module: nn.Module) -> Callable[[nn.Module, tuple, object], object]:
            def hook(_m: nn.Module, inp: tuple, out: object) -> None:
                if isinstance(out, Tensor):
                    # keep only what the checks need (shape; spatial means for 4-D maps), not a copy of every output
                    records.append((name, _Summary.of(out)))
                    if isinstance(module, nn.Linear) and inp and isinstance(inp[0], Tensor):
                        linear_io[name] = (inp[0].detach().clone(), out.detach().clone())

            return hook

        hooks = {name: make_hook(name, module) for name, module in self.model.named_modules() if name}
        with forward_hooks(self.model, hooks), torch.no_grad():
            output = self.model(inputs)
        if not isinstance(output, Tensor) or output.ndim != 2:
            got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"the model must return logits [N, K], got {got}")
        return output, dict(records), [n for n, _ in records], linear_io

    def _find_classifier(self, output: Tensor, linear_io: dict[str, tuple[Tensor, Tensor]]) -> str:
        """The given classifier, checked to have run, or the last ``nn.Linear`` whose output is the logits."""
        if self.classifier is not None:
            if self.classifier not in linear_io:
                raise ValueError(f"classifier {self.classifier!r} did not run in the forward pass")
            return self.classifier
        final = [n for n, (_, out) in linear_io.items() if out.shape == output.shape and torch.equal(out, output)]
        if not final:
            raise ValueError(
                f"{type(self.model).__name__} has no nn.Linear whose output is the model's output (the logits); "
                "final-layer saliency needs a final fully connected layer. Pass classifier='<named_modules path>' "
                "if the model wraps it."
            )
        return final[-1]

    @staticmethod
    def _find_pooled_layer(before: list[str], summaries: dict[str, _Summary], pooled: Tensor) -> tuple[str | None, str | None]:
        """The last layer before the head whose (ReLU'd) spatial mean is the classifier input, and the transform."""
        for name in reversed(before):
            kind = _gap_transform(summaries[name], pooled)
            if kind is not None:
                return name, kind
        return None, None

    def _check_feature_layer(self, summaries: dict[str, _Summary], pooled: Tensor) -> str | None:
        """Check that the given feature layer ran and is spatial; its GAP transform (``None``: fallback)."""
        name: str = self.feature_layer  # type: ignore[assignment]
        if name not in summaries:
            raise ValueError(f"feature_layer {name!r} did not return a tensor in the forward pass")
        if not summaries[name].spatial:
            raise ValueError(
                f"feature_layer {name!r} outputs shape {list(summaries[name].shape)}, "
                "not a spatial map [N, C, H, W] or tokens [N, T, C]; choose a convolutional or token layer"
            )
        return _gap_transform(summaries[name], pooled)

    def _pick_fallback_layer(self, inputs: Tensor, candidates: list[str]) -> str:
        """The last candidate whose gradient (of the top logits) reaches its spatial positions."""
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
            if not names or not logits.requires_grad:
                raise ValueError(self._cut_gradient_message(candidates[-1]))
            grads = torch.autograd.grad(logits.max(dim=1).values.sum(), [seen[n] for n in names], allow_unused=True)
        for name, g in zip(reversed(names), reversed(grads), strict=True):
            if g is not None and _spatial(g).abs().sum() > 0:
                return name
        return candidates[-1]

    # ------------------------------------------------------------------ chains
    def class_chain_mask(self, classes: Tensor, side: str, weight: Tensor) -> Tensor:
        """Membership of the last chain subset (:func:`split_chain`) of each class's row of ``weight``.

        The subsets are computed once per class and side and cached until ``weight`` changes (in place,
        as in training, or for another tensor).

        Args:
            classes: class indices, any shape (``[N]``, ``[N, k]``).
            side: ``"+"`` (the discriminative set) or ``"-"`` (the confusing set).
            weight: the classifier's weight ``[K, D]``.

        Returns:
            ``classes.shape + (D,)`` bool on ``weight``'s device.

        Example:
            >>> from lightning_interp.models import SmallCNN
            >>> model = SmallCNN(in_channels=1, num_classes=3).eval()
            >>> from lightning_interp.saliency import FinalLayerSaliency
            >>> s = FinalLayerSaliency(model, min_size=4)
            >>> s.class_chain_mask(torch.tensor([0, 2]), "+", model.fc.weight).shape
            torch.Size([2, 32])
        """
        table = self._chain_table(classes, side, full_tensor(weight))
        return table[classes.to(table.device)]

    def _chain_table(self, classes: Tensor, side: str, weight: Tensor) -> Tensor:
        """The cached ``[K, D]`` chain masks of ``side``, with the rows of ``classes`` filled."""
        version = (weight.data_ptr(), weight._version)  # the cache follows in-place weight updates
        # a sharded model's gathered weight is refilled in the same storage without a version bump (FSDP's
        # unshard after a training step): the cache also compares the values
        kept = self._chain_weight
        same = kept is not None and kept.shape == weight.shape and torch.equal(kept, weight.detach())
        if self._chain_version != version or not same:
            self._chains, self._chain_version = {}, version
            self._chain_weight = weight.detach().clone()
        table, done = self._chains.get(side, (None, set()))
        if table is None:
            table = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        missing = sorted(set(classes.unique().tolist()) - done)  # one host read per call, not one per class
        if missing:
            idx = torch.tensor(missing, device=weight.device)
            # out of place: the table may be an inference tensor from a call inside torch.inference_mode
            table = table.index_put((idx,), chain_masks(weight.detach()[idx], side, self.min_size))
            done = done | set(missing)
        self._chains[side] = (table, done)
        return table

    # ------------------------------------------------------------------ maps
    def attribute_all(
        self, inputs: Tensor, target: int | Sequence[int] | Tensor | None = None, upsample: bool = False
    ) -> dict[str, Tensor]:
        """Every map kind from one forward pass.

        Args:
            inputs: images ``[N, C, H, W]``.
            target: class per sample (an int, ``[N]``), several classes per sample (``[N, k]``; all classes:
                ``torch.arange(K).expand(N, K)``), or ``None`` for the predicted class.
            upsample: bilinearly upsample the maps to the input's ``H x W``.

        Returns:
            ``{method: maps}`` for :data:`METHODS` (``[N, h, w]``, or ``[N, k, h, w]`` for ``[N, k]``
            targets), plus ``logits`` ``[N, K]`` and ``target``.

        Example:
            >>> from lightning_interp.models import SmallCNN
            >>> from lightning_interp.saliency import FinalLayerSaliency
            >>> out = FinalLayerSaliency(SmallCNN(in_channels=1, num_classes=3).eval()).attribute_all(torch.randn(2, 1, 12, 12))
            >>> sorted(out), out["cam"].shape
            (['cam', 'confusing', 'discriminative', 'logits', 'policy_gradient', 'target'], torch.Size([2, 6, 6]))
        """
        check_images(inputs)
        if self.uses_closed_form is None:
            self.resolve(inputs)
        return self._attribute(inputs, target, METHODS, upsample)

    def attribute(
        self,
        inputs: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        method: Method = "policy_gradient",
        upsample: bool = False,
    ) -> Tensor:
        """Saliency maps of ``method`` for ``target``, in one forward pass for a GAP + Linear head.

        Only ``method``'s maps are computed.

        Args:
            inputs: images ``[N, C, H, W]``.
            target: class per sample (an int, ``[N]``), several per sample (``[N, k]``; all classes:
                ``torch.arange(K).expand(N, K)``), or ``None`` for the predicted class.
            method: ``"policy_gradient"`` / ``"cam"`` (raw, signed, unnormalised), ``"discriminative"`` /
                ``"confusing"`` (the paper's min-max normalised maps of the last chain subset).
            upsample: bilinearly upsample to the input's ``H x W``.

        Returns:
            ``[N, h, w]`` maps (``[N, k, h, w]`` for ``[N, k]`` targets) on the inputs' device.

        Raises:
            ValueError: an unknown ``method`` or out-of-range targets.

        Example:
            >>> from lightning_interp.models import SmallCNN
            >>> from lightning_interp.saliency import FinalLayerSaliency
            >>> saliency = FinalLayerSaliency(SmallCNN(in_channels=1, num_classes=3).eval())
            >>> saliency.attribute(torch.randn(2, 1, 12, 12), target=1, method="cam", upsample=True).shape
            torch.Size([2, 12, 12])
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_images(inputs)
        if self.uses_closed_form is None:
            self.resolve(inputs)
        return self._attribute(inputs, target, (method,), upsample)[method]

    def _attribute(
        self, inputs: Tensor, target: int | Sequence | Tensor | None, methods: Sequence[str], upsample: bool
    ) -> dict[str, Tensor]:
        """The maps of ``methods`` (resolved model), squeezed to ``[N, h, w]`` unless the target is ``[N, k]``."""
        with torch.no_grad():
            if self.uses_closed_form:
                feats, logits, tgt, coefs, offset = self._closed_form_coefficients(inputs, target, methods)
            else:
                feats, logits, tgt, coefs, offset = self._fallback_coefficients(inputs, target, methods)
            size = tuple(inputs.shape[-2:]) if upsample else None
            out = self._render(feats, coefs, tgt.shape[1], methods, size, offset)
        squeeze = not (isinstance(target, Tensor) and target.ndim == 2) and not (
            isinstance(target, Sequence) and target and isinstance(target[0], Sequence)
        )
        if squeeze:
            out = {m: v[:, 0] for m, v in out.items()}
        out["logits"] = logits
        out["target"] = tgt[:, 0] if squeeze else tgt
        return out

    def _closed_form_coefficients(
        self, inputs: Tensor, target: int | Sequence | Tensor | None, methods: Sequence[str]
    ) -> tuple[Tensor, Tensor, Tensor, Coefficients, Tensor | None]:
        """One forward pass; coefficients are rows of the classifier's weight or of the cached chain masks.

        The policy-gradient map ``sum_k (W[c, k] - (q W)_k) A_k`` is the CAM of ``c`` minus the map of the
        expected weights ``q W``, which is the same for every class: it is returned as the offset ``q W``.
        """
        feats, logits = self._forward_features(inputs)
        param = full_tensor(get_module(self.model, self.classifier).weight)  # type: ignore[arg-type]
        weight = param.detach().to(feats.dtype)
        tgt = self._targets(target, logits)
        tables = {m: self._chain_table(tgt, _SIDES[m], param) for m in methods if m in _SIDES}
        # the same classes for every sample (all classes, say): rows [k, D] shared by the batch, no [N, k, D] copies
        rows = tgt[0] if tgt.shape[1] > 1 and bool((tgt == tgt[:1]).all()) else tgt
        offset = logits.softmax(dim=1).to(feats.dtype) @ weight if "policy_gradient" in methods else None

        def coefs(method: str, classes: slice) -> Tensor:
            chosen = rows[..., classes]
            return tables[method][chosen] if method in tables else weight[chosen]

        return feats, logits, tgt, coefs, offset

    def _fallback_coefficients(
        self, inputs: Tensor, target: int | Sequence | Tensor | None, methods: Sequence[str]
    ) -> tuple[Tensor, Tensor, Tensor, Coefficients, None]:
        """Coefficients from gradients at the feature layer: effective weights and policy gradients per sample."""
        feats, logits, eff, pg, tgt = self._fallback(inputs, target)
        per_method = {"policy_gradient": pg, "cam": eff}
        for m in methods:
            if m in _SIDES:
                per_method[m] = chain_masks(eff.flatten(0, 1), _SIDES[m], self.min_size).view(eff.shape)
        return feats, logits, tgt, lambda method, classes: per_method[method][:, classes], None

    def _render(
        self,
        feats: Tensor,
        coefs: Coefficients,
        k: int,
        methods: Sequence[str],
        size: tuple[int, ...] | None,
        offset: Tensor | None,
    ) -> dict[str, Tensor]:
        """Maps ``[N, k, h, w]`` (``size`` given: upsampled to it) of each method, in chunks of classes.

        ``policy_gradient`` / ``cam``: ``coefs @ A`` (minus ``offset @ A`` ``[N, D]`` for the policy gradient
        where given). Channel sets: ``relu(sum_{k in S} HW / (2 + sum A_k) A_k)`` of ``A = relu(feats)``
        (:func:`channel_set_map`), min-max normalised. ``coefs`` returns rows ``[k, D]`` shared by every
        sample or ``[N, k, D]`` per sample.
        """
        n, d, h, w = feats.shape
        flat = feats.reshape(n, d, h * w)
        sources = {"policy_gradient": flat, "cam": flat}
        if any(m in _SIDES for m in methods):
            relu_flat = F.relu(flat)
            # the channel-set coefficient HW / (2 + sum_ab A_k) folded into the features, once for every class
            sources["discriminative"] = sources["confusing"] = relu_flat * ((h * w) / (2.0 + relu_flat.sum(dim=2)))[:, :, None]
        step = max(1, self.chunk_elements // (n * (d + h * w)))
        out: dict[str, Tensor] = {}
        for m in methods:
            source, by_position = sources[m], None
            chunks = []
            for start in range(0, k, step):
                c = coefs(m, slice(start, start + step)).to(feats.dtype)
                if c.ndim == 2:  # shared rows: one matrix product over every (sample, position)
                    if by_position is None:
                        by_position = source.transpose(1, 2).reshape(n * h * w, d)
                    maps = (by_position @ c.T).view(n, h * w, -1).transpose(1, 2)
                else:
                    maps = torch.bmm(c, source)
                maps = maps.reshape(n, -1, h, w)
                chunks.append(minmax_normalize(F.relu(maps)) if m in _SIDES else maps)
            maps = chunks[0] if len(chunks) == 1 else torch.cat([feats.new_empty(n, 0, h, w), *chunks], dim=1)
            if m == "policy_gradient" and offset is not None:
                maps = maps - torch.bmm(offset[:, None, :], flat).view(n, 1, h, w)
            # one call on all maps at the feature resolution: the upsampled output is allocated once
            out[m] = maps if size is None else bilinear_upsample(maps, size)
        return out

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
        """Feature map, logits, effective weights ``[N, k, D]``, policy gradients ``[N, k, D]``, targets."""
        seen: dict[str, Tensor] = {}
        name = self.feature_layer
        with torch.inference_mode(False), torch.enable_grad(), leaves(self.model, [name], seen):  # type: ignore[list-item]
            logits = self.model(inputs.clone())
            if name not in seen:
                raise ValueError(f"feature_layer {name!r} did not run in {type(self.model).__name__}'s forward pass")
            leaf = seen[name]
            if not logits.requires_grad:
                raise ValueError(self._cut_gradient_message(name))
            tgt = self._targets(target, logits.detach())
            k = tgt.shape[1]

            def channel_grad(score: Tensor, retain: bool) -> Tensor:
                (grad,) = torch.autograd.grad(score, leaf, retain_graph=retain, allow_unused=True)
                if grad is None:  # the logits do not depend on the layer through autograd
                    raise ValueError(self._cut_gradient_message(name))
                return _spatial(grad).sum(dim=(2, 3))

            # d log q_c / dA = d z_c / dA - sum_j q_j d z_j / dA: one backward pass for the expectation and
            # one per target column, instead of two per column
            expected = channel_grad((logits.detach().softmax(dim=1) * logits).sum(), retain=True)
            eff = torch.stack([channel_grad(logits.gather(1, tgt[:, j : j + 1]).sum(), retain=j < k - 1) for j in range(k)], 1)
        feats = _spatial(leaf.detach())
        return feats, logits.detach(), eff, eff - expected[:, None, :], tgt

    def _cut_gradient_message(self, layer: str | None) -> str:
        return (
            f"{type(self.model).__name__}: the gradient of the logits does not reach the feature layer "
            f"{layer!r}, which the saliency of this head (not global-average-pool + Linear) needs. "
            "A reentrant activation checkpoint hides it: use torch.utils.checkpoint.checkpoint(..., use_reentrant=False) "
            "(or no checkpoint); a detach() or torch.no_grad() inside forward() cuts it as well."
        )

    def has_convergence_delta(self) -> bool:
        """Whether :meth:`attribute` returns a convergence delta (never: the maps are closed forms).

        Returns:
            ``False``.
        """
        return False


if TYPE_CHECKING:
    from captum.attr import Attribution

    class FinalLayerSaliency(_FinalLayerSaliency, Attribution):  # what __getattr__ builds, for type checkers
        ...


def __getattr__(name: str) -> Any:
    # FinalLayerSaliency is a captum Attribution, and importing captum.attr imports matplotlib.pyplot: the class is
    # made on first use (PEP 562), so that importing this module (the maps' arithmetic is pure torch) stays light
    if name == "FinalLayerSaliency":
        from captum.attr import Attribution

        cls = type(
            "FinalLayerSaliency",
            (_FinalLayerSaliency, Attribution),
            {"__module__": __name__, "__qualname__": "FinalLayerSaliency", "__doc__": _FinalLayerSaliency.__doc__},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
