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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "NO_RESIZE",
    "ImageTransform",
    "LoadedClassifier",
    "Preprocessing",
    "build_model",
    "check_weights",
    "custom_preprocessing",
    "imagenet_preprocessing",
    "load_classifier",
    "load_lightning_module",
    "load_weights",
    "num_classes",
]


@dataclass
class Preprocessing:
    """How images become model inputs: a callable on an RGB ``PIL.Image`` and a sentence saying what it does.

    Attributes:
        transform: the callable.
        description: what it does, in words (printed at the start of an audit and stated in its report).
        input_size: the side of the model's square inputs.
        channels: 1 (grey scale) or 3.
        resize: the short side images are resized to (``None``: no resize).
        crop: the side of the centre crop (``None``: no crop).
        mean: the per-channel mean subtracted (``None``: unknown, a published transform).
        std: the per-channel standard deviation divided by.
        keep_size: images already ``keep_size x keep_size`` are neither resized nor cropped (``None``: all are).
    """

    transform: Callable[[Any], Tensor]
    description: str
    input_size: int = 224
    channels: int = 3
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    keep_size: int | None = None


class ImageTransform:
    """Resize the short side, centre-crop, convert to ``channels``, scale to ``[0, 1]``, normalise.

    Args:
        resize: the short side after resizing (``None``: no resize).
        crop: the side of the centre crop (``None``: no crop).
        mean: per-channel means (one per channel).
        std: per-channel standard deviations.
        channels: 1 (grey scale) or 3 (RGB).
        keep_size: images already ``keep_size x keep_size`` skip the resize and the crop: a model trained on
            28x28 digits sees them as they were, not zoomed by a resize to 32 and a crop of 28.
    """

    def __init__(
        self,
        resize: int | None,
        crop: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels: int = 3,
        keep_size: int | None = None,
    ) -> None:
        self.resize, self.crop, self.keep_size = resize, crop, keep_size
        self.mean, self.std, self.channels = tuple(mean), tuple(std), channels

    def __call__(self, image: Any) -> Tensor:
        import torchvision.transforms.functional as F

        if self.keep_size is None or tuple(image.size) != (self.keep_size, self.keep_size):
            if self.resize is not None:
                image = F.resize(image, self.resize)
            if self.crop is not None:
                image = F.center_crop(image, [self.crop, self.crop])
        image = image.convert("L" if self.channels == 1 else "RGB")
        x = F.to_tensor(image)
        if any(m != 0 for m in self.mean) or any(s != 1 for s in self.std):
            x = F.normalize(x, list(self.mean), list(self.std))
        return x

    def describe(self) -> str:
        """The preprocessing in one sentence, e.g. ``"no resize, no crop, grey scale, no normalisation (mean 0, std 1)"``."""
        size = f"resize the short side to {self.resize}" if self.resize is not None else "no resize"
        size += f", centre-crop {self.crop}x{self.crop}" if self.crop is not None else ", no crop"
        if self.keep_size is not None and (self.resize is not None or self.crop is not None):
            size = f"images of {self.keep_size}x{self.keep_size} as they are, others: {size}"
        if all(m == 0 for m in self.mean) and all(s == 1 for s in self.std):
            norm = "pixels in [0, 1], no normalisation (mean 0, std 1)"
        else:
            norm = f"normalise with mean {_rounded(self.mean)} and std {_rounded(self.std)}"
        return f"{size}, {'grey scale' if self.channels == 1 else 'RGB'}, {norm}"


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 3) for v in values)


def _per_channel(values: Sequence[float] | None, channels: int, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if values is None:
        return default
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"--{name} takes one value or one per channel ({channels}), got {len(values)}: {list(values)}")
    if name == "std" and any(not v > 0 for v in values):
        raise ValueError(f"--std must be > 0, got {list(values)}")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"--{name} must be finite, got {list(values)}")
    return values


def _imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 1:  # the grey image is the mean of the channels: so are its statistics, roughly
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def custom_preprocessing(
    size: int = 224,
    channels: int = 3,
    resize: int | None = None,
    crop: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    keep_size: int | None = None,
    note: str = "",
) -> Preprocessing:
    """A :class:`ImageTransform` pipeline with its description (``mean``/``std``: ImageNet's when ``None``).

    Args:
        size: the model's input side (recorded; ``crop`` decides the output side).
        channels: 1 or 3.
        resize: short side after resizing (``None``: no resize).
        crop: side of the centre crop (``None``: no crop).
        mean: one value or one per channel (``None``: ImageNet's).
        std: one value or one per channel (``None``: ImageNet's).
        keep_size: images of this square size skip resize and crop.
        note: appended to the description in parentheses (where the choices came from).

    Raises:
        ValueError: a mean or std of the wrong length, a std <= 0, a non-positive size.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive number of pixels or 'none', got {value}")
    default_mean, default_std = _imagenet_stats(channels)
    m = _per_channel(mean, channels, "mean", default_mean)
    s = _per_channel(std, channels, "std", default_std)
    transform = ImageTransform(resize, crop, m, s, channels, keep_size)
    description = transform.describe() + (f" ({note})" if note else "")
    return Preprocessing(transform, description, size, channels, resize, crop, m, s, keep_size)


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
        guessed: a sentence when a part of the preprocessing is a guess (a ``LightningModule``'s checkpoint does not
            record its normalisation: ImageNet's mean and std are used unless ``mean`` and ``std`` are given).
    """

    model: nn.Module
    num_classes: int
    class_names: list[str] | None
    preprocessing: Preprocessing
    source: str
    files: list[str] = field(default_factory=list)
    guessed: str | None = None


def imagenet_preprocessing(size: int = 224, resize: int | None = None, channels: int = 3) -> Preprocessing:
    """Resize (short side to ``resize``, default ``size * 256 / 224``), centre-crop ``size``, ImageNet mean and std."""
    resize = resize or round(size * 256 / 224)
    pre = custom_preprocessing(size, channels, resize, size)
    pre.description = f"ImageNet defaults: {pre.description}"
    return pre


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


def _first_mismatch(state: dict[str, Tensor], model: nn.Module) -> tuple[str, str] | None:
    """The first tensor of ``model`` (in its own order) that ``state`` lacks or holds at another shape, and how."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            return key, "missing from the weights"
        if tuple(state[key].shape) != tuple(tensor.shape):
            return key, f"weights {list(state[key].shape)}, model {list(tensor.shape)}"
    extra = [k for k in state if k not in expected]
    return (extra[0], "in the weights, not in the model") if extra else None


def _load_into(model: nn.Module, state: dict[str, Tensor], path: str, what: str) -> None:
    # compare shapes first: load_state_dict reports a size mismatch as a multi-line RuntimeError over every layer
    mismatch = _first_mismatch(state, model)
    if mismatch is not None:
        expected = model.state_dict()
        differ = sum(k not in state or tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items())
        raise ValueError(
            f"the weights in {path} do not fit {what}: first mismatching layer {mismatch[0]!r} ({mismatch[1]}); "
            f"{differ} of the model's {len(expected)} tensors are missing or of another shape. Check --arch "
            "(the architecture the weights were saved from)."
        )
    model.load_state_dict(state, strict=True)


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
        t = default.transforms()
        crop = t.crop_size[0]
        pre = Preprocessing(
            t, f"torchvision {default}.transforms(): {t!r}".replace("\n", " "), crop, 3, t.resize_size[0], crop,
            tuple(t.mean), tuple(t.std),
        )  # fmt: skip
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
    size = int(config["input_size"][-1])
    pre = Preprocessing(
        transform, f"timm data config of {name}: {config}", size, int(config["input_size"][0]),
        math.floor(size / float(config.get("crop_pct") or 1.0)), size, tuple(config["mean"]), tuple(config["std"]),
    )  # fmt: skip
    k = num_classes(model)
    return LoadedClassifier(model.eval(), k, _imagenet_names(k), pre, f"timm {name}", [path])


def _imagenet_names(k: int) -> list[str] | None:
    if k != 1000:
        return None
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _import_user_module(module_name: str, class_path: str) -> Any:
    """Import the module of ``--model``, from the working folder too (as ``python -m`` would).

    The ``lightning-interp`` console script does not put the working folder on ``sys.path`` (``python -m`` and
    ``python script.py`` do): a user's ``userpkg/lit.py`` next to where they run the command is found anyway.
    """
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        top = module_name.split(".")[0]
        missing_is_ours = err.name is not None and (module_name == err.name or module_name.startswith(err.name + "."))
        if missing_is_ours and cwd not in sys.path:
            sys.path.append(cwd)
            try:
                return importlib.import_module(module_name)  # found: cwd stays on sys.path for its own imports
            except ModuleNotFoundError as again:
                sys.path.remove(cwd)
                err = again
        raise ModuleNotFoundError(
            f"cannot import {module_name!r} for --model {class_path} ({err}): install the package, or run from the "
            f"folder that holds {top.replace('.', '/')}/ or add that folder to PYTHONPATH, e.g. "
            f"PYTHONPATH=/path/to/project lightning-interp audit --model {class_path} ..."
        ) from err
    except (ImportError, SyntaxError) as err:  # the module exists but fails to import: its own error, in one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise ModuleNotFoundError(
            f"importing {module_name!r} for --model {class_path} failed: {type(err).__name__}: {first} "
            "(check the module and its dependencies, and PYTHONPATH)"
        ) from err


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
    module = _import_user_module(module_name, class_path)
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
    if isinstance(example, Tensor) and example.ndim == 4 and int(example.shape[1]) in (1, 3):
        size = int(example.shape[-1])
        # images already at the model's input size are what it was trained on: no zoom by a resize and a crop
        pre = custom_preprocessing(
            size, int(example.shape[1]), round(size * 256 / 224), size, keep_size=size,
            note=f"size and channels from {type(model).__name__}.example_input_array; ImageNet mean and std by default",
        )  # fmt: skip
    else:
        pre = imagenet_preprocessing()
    k = num_classes(model)
    guessed = (
        f"the normalisation is a guess: a checkpoint of {type(model).__name__} does not record how its inputs were "
        "normalised, so ImageNet's mean and std were used"
    )
    return LoadedClassifier(model, k, _imagenet_names(k), pre, class_path, [ckpt], guessed)


#: ``resize=NO_RESIZE`` / ``crop=NO_RESIZE``: the ``--resize none`` / ``--crop none`` of the command.
NO_RESIZE = "none"


def _size_option(value: int | str | None, default: int | None) -> int | None:
    if value is None:
        return default
    if (isinstance(value, str) and value.strip().lower() == NO_RESIZE) or value == 0:
        return None
    return int(value)


def load_classifier(
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    model: str | None = None,
    ckpt: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    resize: int | str | None = None,
    crop: int | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedClassifier:
    """Load a classifier in one of the three forms (see the module docstring), with its preprocessing.

    Without the preprocessing arguments the preprocessing is the form's own (see :attr:`LoadedClassifier.preprocessing`);
    each argument given replaces one step, the others keep the form's values.

    Args:
        arch: a torchvision model name, or ``"timm:<name>"``; with ``weights``.
        weights: the local weights file of ``arch``.
        model: ``package.module.ClassName`` of a ``LightningModule``; with ``ckpt``.
        ckpt: the Lightning checkpoint of ``model``.
        image_size: override the input size (ImageNet-default preprocessing at this size).
        channels: 1 for grey-scale models, 3 for RGB (with ``image_size``).
        resize: the short side images are resized to; ``"none"`` (or 0): no resize.
        crop: the side of the centre crop; ``"none"`` (or 0): no crop.
        mean: the per-channel mean to subtract (one value, or one per channel).
        std: the per-channel standard deviation to divide by (one value, or one per channel).

    Raises:
        ValueError: not exactly one of the forms, a bad file (see :func:`load_weights`), weights of another
            architecture, or a bad preprocessing argument.
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
    if loaded.num_classes < 2:
        raise ValueError(f"{loaded.source} has no classification head (a final nn.Linear with >= 2 outputs)")
    pre = loaded.preprocessing
    if image_size is not None:
        pre = imagenet_preprocessing(image_size, channels=channels or 3)
    elif channels is not None and channels != pre.channels:
        pre = custom_preprocessing(
            pre.input_size, channels, pre.resize, pre.crop, keep_size=pre.keep_size, note=f"{channels} channel(s) asked for"
        )
    # --grayscale for a model whose example_input_array already has one channel changes nothing: its images of the
    # model's size stay as they are (the ImageNet-default rebuild would zoom them)
    if any(v is not None for v in (resize, crop, mean, std)):
        given = [f"--{n}" for n, v in (("resize", resize), ("crop", crop), ("mean", mean), ("std", std)) if v is not None]
        keep = pre.keep_size if resize is None and crop is None else None
        default_mean, default_std = _imagenet_stats(pre.channels)
        pre = custom_preprocessing(
            pre.input_size, pre.channels, _size_option(resize, pre.resize), _size_option(crop, pre.crop),
            mean if mean is not None else (pre.mean if pre.mean and len(pre.mean) == pre.channels else default_mean),
            std if std is not None else (pre.std if pre.std and len(pre.std) == pre.channels else default_std),
            keep_size=keep, note=f"{' '.join(given)} given; the rest from {loaded.source}",
        )  # fmt: skip
    loaded.preprocessing = pre
    if mean is not None and std is not None:
        loaded.guessed = None
    return loaded


def build_model(arch: str, weights_path: str) -> nn.Module:
    """A torchvision (or ``timm:<name>``) architecture with local weights, in eval mode."""
    return load_classifier(arch=arch, weights=weights_path).model


def _finite(value: float) -> bool:
    return math.isfinite(value)
