"""Load a trained classifier from local files, with the preprocessing and class names its weights imply.

Three forms, all local (nothing is ever downloaded):

* a torchvision architecture and a weights file: ``load_classifier(arch="resnet50", weights="r50.pth")``;
* a timm architecture (``pip install lightning-interp[timm]``): ``arch="timm:convnext_tiny"`` with a ``.pth``
  or ``.safetensors`` file;
* your own ``LightningModule``: ``model="package.module.ClassName"`` and ``ckpt="last.ckpt"`` (the class is
  imported and the checkpoint restored with ``load_from_checkpoint``, hyper-parameters included).

Weight files are read with ``torch.load(weights_only=True)`` (or safetensors), so a file cannot run code; an
empty, truncated or non-finite file is a ``ValueError`` naming the file.

Example:
    >>> import tempfile, os, torch, torchvision
    >>> with tempfile.TemporaryDirectory() as d:
    ...     torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), os.path.join(d, "r18.pth"))
    ...     loaded = load_classifier(arch="resnet18", weights=os.path.join(d, "r18.pth"))
    >>> loaded.num_classes, loaded.source, loaded.preprocessing.description.split(":")[0]
    (3, 'torchvision resnet18', 'ImageNet defaults')
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "LoadedClassifier",
    "Preprocessing",
    "build_model",
    "check_weights",
    "imagenet_preprocessing",
    "load_classifier",
    "load_lightning_module",
    "load_weights",
    "num_classes",
]


@dataclass
class Preprocessing:
    """How images become model inputs: a callable on an RGB ``PIL.Image`` and a sentence saying what it does."""

    transform: Callable[[Any], Tensor]
    description: str
    input_size: int = 224
    channels: int = 3


@dataclass
class LoadedClassifier:
    """A classifier ready for the audit.

    Attributes:
        model: the network (eval mode, on the CPU); its forward returns logits ``[N, K]``.
        num_classes: ``K``.
        class_names: names of the ``K`` classes when the weights say (ImageNet-1k), else ``None``.
        preprocessing: the transform from the weights' metadata when known, else the ImageNet defaults.
        source: what was loaded, in words (``"torchvision resnet50"``, ``"timm convnext_tiny"``, a class path).
        files: the files read.
    """

    model: nn.Module
    num_classes: int
    class_names: list[str] | None
    preprocessing: Preprocessing
    source: str
    files: list[str] = field(default_factory=list)


def imagenet_preprocessing(size: int = 224, resize: int | None = None, channels: int = 3) -> Preprocessing:
    """Resize (short side to ``resize``, default ``size * 256 / 224``), centre-crop ``size``, ImageNet mean and std."""
    import torchvision.transforms as T

    resize = resize or round(size * 256 / 224)
    steps: list[Any] = [T.Resize(resize), T.CenterCrop(size)]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        steps.append(T.Grayscale(1))
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    description = (
        f"ImageNet defaults: resize the short side to {resize}, centre-crop {size}x{size}, "
        f"{'grey scale, ' if channels == 1 else ''}normalise with mean {tuple(round(m, 3) for m in mean)} and "
        f"std {tuple(round(s, 3) for s in std)}"
    )
    return Preprocessing(T.Compose(steps), description, size, channels)


def check_weights(state: dict[str, Tensor], path: str) -> None:
    """Raise ``ValueError`` naming ``path`` when a floating-point tensor holds NaN or infinite values."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}: the model diverged "
            "or the file was damaged. Audit a checkpoint from before the divergence."
        )


def _extract_state(obj: Any, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors), nor a checkpoint with a 'state_dict' entry")
    return obj


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A ``state_dict`` from a local ``.pth``/``.pt``/``.ckpt`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Accepts a plain ``state_dict``, ``{"state_dict": ...}`` (Lightning checkpoints), ``{"model": ...}`` or
    ``{"model_state_dict": ...}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, truncated or not a weights file; holds pickled objects other than tensors
            and containers (refused); holds no ``state_dict``; or holds NaN/inf weights.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file not found: {path}. Save the model's weights locally, e.g. "
            "torch.save(model.state_dict(), 'resnet50.pth'), and pass that file"
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"weights file {path} is empty (0 bytes): the download or copy did not finish; copy it again")
    if path.endswith(".safetensors"):
        obj = _load_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" not in str(err) and "Unsupported" not in str(err):
                raise ValueError(f"cannot read weights file {path}: {str(err).splitlines()[0]}. Is it a PyTorch file?") from err
            raise ValueError(
                f"refusing to load {path}: it contains pickled Python objects other than tensors, and weights are loaded "
                f"with torch.load(weights_only=True) so that a file cannot run code. Re-save only the state_dict "
                f"(torch.save(model.state_dict(), path)). Details: {str(err).splitlines()[0]}"
            ) from err
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(
                f"cannot read weights file {path} ({os.path.getsize(path)} bytes): it is truncated or not a PyTorch file "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}); copy it again"
            ) from err
    state = _extract_state(obj, path)
    check_weights(state, path)
    return state


def _load_safetensors(path: str) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{path} is a safetensors file, which needs the safetensors package: pip install 'lightning-interp[timm]'"
        ) from err
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own error types for a damaged header or body
        raise ValueError(
            f"cannot read safetensors file {path} ({os.path.getsize(path)} bytes): truncated or not a safetensors file "
            f"({type(err).__name__}: {err}); copy it again"
        ) from err


def _match_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Strip a common module prefix (``model.``, ``net.``, ``module.``) so keys match ``model``."""
    expected = set(model.state_dict())
    if set(state) >= expected or not state:
        return state
    for key in state:
        for target in expected:
            if key.endswith("." + target):
                prefix = key[: -len(target)]
                stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if set(stripped) >= expected:
                    return stripped
    return state


def num_classes(model: nn.Module) -> int:
    """The output width of the last ``nn.Linear`` (0 when there is none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def _head_width(state: dict[str, Tensor], model: nn.Module) -> int | None:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    key = f"{linears[-1]}.weight" if linears else None
    return int(state[key].shape[0]) if key in state else None


def _load_into(model: nn.Module, state: dict[str, Tensor], path: str, what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the weights in {path} do not fit {what}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Check the architecture name."
        )


def _torchvision(arch: str, path: str) -> LoadedClassifier:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown architecture {arch!r}: use a torchvision classification model name, e.g. resnet50, densenet121, "
            "efficientnet_b0, mobilenet_v3_large, vit_b_16, or timm:<name> for a timm model"
        )
    state = load_weights(path)
    probe = torchvision.models.get_model(arch, weights=None)
    state = _match_keys(state, probe)
    width = _head_width(state, probe)
    model = torchvision.models.get_model(arch, weights=None, num_classes=width) if width else probe
    _load_into(model, state, path, arch)
    k = num_classes(model)
    default = torchvision.models.get_model_weights(arch).DEFAULT
    names = list(default.meta.get("categories") or [])
    if len(names) == k:  # the head has the published weights' classes: their preprocessing applies too
        crop = default.transforms().crop_size[0]
        pre = Preprocessing(
            default.transforms(), f"torchvision {default}.transforms(): {default.transforms()!r}".replace("\n", " "), crop
        )
        return LoadedClassifier(model.eval(), k, names, pre, f"torchvision {arch}", [path])
    return LoadedClassifier(model.eval(), k, None, imagenet_preprocessing(), f"torchvision {arch}", [path])


def _timm(name: str, path: str) -> LoadedClassifier:
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"--arch timm:{name} needs timm, which is not installed: pip install 'lightning-interp[timm]'"
        ) from err
    if name not in timm.list_models():
        raise ValueError(
            f"unknown timm architecture {name!r}: see timm.list_models(), e.g. resnet18, convnext_tiny, vit_tiny_patch16_224"
        )
    state = load_weights(path)
    probe = timm.create_model(name, pretrained=False)
    state = _match_keys(state, probe)
    width = _head_width(state, probe)
    model = timm.create_model(name, pretrained=False, num_classes=width) if width else probe
    _load_into(model, state, path, f"timm:{name}")
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    pre = Preprocessing(transform, f"timm data config of {name}: {config}", int(config["input_size"][-1]))
    k = num_classes(model)
    return LoadedClassifier(model.eval(), k, _imagenet_names(k), pre, f"timm {name}", [path])


def _imagenet_names(k: int) -> list[str] | None:
    if k != 1000:
        return None
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def load_lightning_module(class_path: str, ckpt: str | os.PathLike) -> nn.Module:
    """Import ``package.module.ClassName`` (a ``LightningModule``) and restore ``ckpt`` with ``load_from_checkpoint``.

    Raises:
        ValueError: a malformed class path, a class that is not a ``LightningModule``, or a checkpoint that is
            empty, truncated, non-finite or does not fit the class.
        ModuleNotFoundError / AttributeError: the module or class cannot be found (the message names it).
    """
    import lightning.pytorch as pl

    module_name, _, cls_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"--model must be a full class path such as my_package.models.MyModel, got {class_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"cannot import {module_name!r} for --model {class_path}: {err}. Is the package installed?"
        ) from err
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise AttributeError(f"{module_name} has no class {cls_name!r} (--model {class_path})")
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ValueError(f"--model {class_path} is not a LightningModule subclass; for a torchvision or timm model use --arch")
    ckpt = os.fspath(ckpt)
    load_weights(ckpt)  # the same checks as any weights file, before Lightning reads it
    try:
        model = cls.load_from_checkpoint(ckpt, map_location="cpu")
    except (RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"{ckpt} does not restore {class_path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return model.eval()


def _lightning(class_path: str, ckpt: str) -> LoadedClassifier:
    model = load_lightning_module(class_path, ckpt)
    example = getattr(model, "example_input_array", None)
    if isinstance(example, Tensor) and example.ndim == 4:
        pre = imagenet_preprocessing(size=int(example.shape[-1]), channels=int(example.shape[1]))
        pre.description += f" (size and channels from {type(model).__name__}.example_input_array)"
    else:
        pre = imagenet_preprocessing()
    k = num_classes(model)
    return LoadedClassifier(model, k, _imagenet_names(k), pre, class_path, [ckpt])


def load_classifier(
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    model: str | None = None,
    ckpt: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> LoadedClassifier:
    """Load a classifier in one of the three forms (see the module docstring).

    Args:
        arch: a torchvision model name, or ``"timm:<name>"``; with ``weights``.
        weights: the local weights file of ``arch``.
        model: ``package.module.ClassName`` of a ``LightningModule``; with ``ckpt``.
        ckpt: the Lightning checkpoint of ``model``.
        image_size: override the input size (ImageNet-default preprocessing at this size).
        channels: 1 for grey-scale models, 3 for RGB (with ``image_size``).

    Raises:
        ValueError: not exactly one of the forms, or a bad file (see :func:`load_weights`).
    """
    if (arch is None) == (model is None):
        raise ValueError("give either --arch NAME --weights FILE (torchvision, timm:NAME) or --model CLASS_PATH --ckpt FILE")
    if arch is not None:
        if weights is None:
            raise ValueError(f"--arch {arch} needs --weights FILE (a local .pth/.safetensors file; nothing is downloaded)")
        path = os.fspath(weights)
        loaded = _timm(arch[5:], path) if arch.startswith("timm:") else _torchvision(arch, path)
    else:
        if ckpt is None:
            raise ValueError(f"--model {model} needs --ckpt FILE (a Lightning checkpoint)")
        loaded = _lightning(str(model), os.fspath(ckpt))
    if image_size is not None or channels is not None:
        loaded.preprocessing = imagenet_preprocessing(image_size or loaded.preprocessing.input_size, channels=channels or 3)
    if loaded.num_classes < 2:
        raise ValueError(f"{loaded.source} has no classification head (a final nn.Linear with >= 2 outputs)")
    return loaded


def build_model(arch: str, weights_path: str) -> nn.Module:
    """A torchvision (or ``timm:<name>``) architecture with local weights, in eval mode."""
    return load_classifier(arch=arch, weights=weights_path).model


def _finite(value: float) -> bool:
    return math.isfinite(value)
