"""The options of ``lightning-interp audit``, declared once: :class:`AuditOptions`.

Each field is one option: its type, its default and its help (in the field's metadata). The command's parser
(:func:`add_arguments`, used by ``lightning-interp audit``) and :func:`lightning_interp.audit.run_audit`'s
keywords are both built from the fields, so an option added here is a flag, a keyword and a line of
``--help`` at once.

This module imports neither torch nor Lightning (``lightning-interp audit --help`` answers at once).

Example:
    >>> options = AuditOptions(arch="resnet18", weights="r18.pth", images="imgs", methods="saliency, weights")
    >>> options.methods, options.batch_size
    (('saliency', 'weights'), 16)
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_interp import methods as registry

__all__ = ["AUDIT_METHODS", "AuditOptions", "add_arguments", "parse_floats", "parse_size"]

#: The sections of an image-folder audit, in report order: the ``audit_sections`` of every record of
#: :data:`lightning_interp.methods.METHODS` (``weights`` is the saliency paper's fit of the final layer).
AUDIT_METHODS: tuple[str, ...] = tuple(s for m in registry.METHODS for s in m.audit_sections)


def parse_floats(text: str) -> list[float]:
    """``"0.5"`` or ``"0.485,0.456,0.406"`` as floats (argparse type of ``--mean`` and ``--std``)."""
    try:
        return [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or comma-separated numbers, got {text!r}") from None


def parse_size(text: str) -> int | str:
    """``"28"`` or ``"none"`` (argparse type of ``--resize`` and ``--crop``)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or 'none', got {value}")
    return value


#: Argument groups of ``--help``: name -> (title, description).
GROUPS: dict[str, tuple[str, str | None]] = {
    "model": ("model (required, one form)", None),
    "data": ("data and output (required)", None),
    "preprocessing": (
        "preprocessing",
        "Default: the weights' own (torchvision, timm); --model: images at its example_input_array size as they are, "
        "others resized and centre-cropped, ImageNet mean and std (a guess: give yours, e.g. --mean 0 --std 1).",
    ),
}

_UNSET: Any = object()


def _option(
    default: Any,
    help: str,
    *,
    group: str | None = None,
    flag: str | None = None,
    cli: bool = True,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    cli_default: Any = _UNSET,
    from_cli: Callable[[Any], Any] | None = None,
) -> Any:
    """A field of :class:`AuditOptions` with what its command-line flag needs in the metadata.

    Args:
        default: the keyword's default (a tuple, not a list: defaults are shared).
        help: one line, for ``--help`` and the docs.
        group: a key of :data:`GROUPS` (``None``: the general options).
        flag: the flag, when not ``--`` plus the name with dashes.
        cli: ``False``: a keyword of ``run_audit`` only.
        required: the command needs the flag (the keyword keeps its default).
        parse: the flag's argparse ``type`` (default: from the field's type: ``int``, ``bool`` is a switch, else text).
        metavar: the flag's metavar.
        cli_default: the flag's default, when not the keyword's.
        from_cli: turns the flag's value into the keyword's.
    """
    meta = dict(help=help, group=group, flag=flag, cli=cli, required=required, parse=parse, metavar=metavar,
                cli_default=cli_default, from_cli=from_cli)  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass
class AuditOptions:
    """Everything an audit can be told: ``run_audit(**fields)`` and the flags of ``lightning-interp audit``.

    Each field's help is in its metadata (``dataclasses.fields(AuditOptions)``); the list below is made from it.
    Methods given as text (``"saliency,weights"``) become a tuple; ``0`` images for ``deletion_images`` or
    ``correlation_images`` means all (``None``).
    """

    arch: str | None = _option(
        None, "torchvision model name (resnet50, densenet121, vit_b_16, ...) or timm:<name>", group="model"
    )
    weights: str | None = _option(
        None, "local weights of --arch: a state_dict, Lightning checkpoint or .safetensors", group="model"
    )
    model: str | None = _option(None, "package.module.ClassName of your LightningModule (with --ckpt)", group="model")
    ckpt: str | None = _option(None, "the Lightning checkpoint of --model (or of the --config model)", group="model")
    config: str | None = _option(None, "a LightningCLI config naming model, data and lightning-interp callbacks", group="model")
    images: str | None = _option(None, "a folder of images (flat, or one sub-folder per class; not with --config)", group="data")
    out: str = _option(
        "audit_out", "output folder: new, empty or an earlier audit's (replaced whole when the audit succeeds)", group="data",
        required=True,
    )  # fmt: skip
    methods: Sequence[str] = _option(
        AUDIT_METHODS, f"comma-separated subset of {','.join(AUDIT_METHODS)}", cli_default=",".join(AUDIT_METHODS)
    )
    limit: int | None = _option(None, "audit at most N images")
    batch_size: int = _option(16, "images per forward pass")
    image_size: int | None = _option(None, "input size, when the weights do not say")
    channels: int | None = _option(
        None, "one input channel (with --image-size)", flag="--grayscale", parse=bool, cli_default=False,
        from_cli=lambda grey: 1 if grey else None,
    )  # fmt: skip
    mean: Sequence[float] | None = _option(
        None, "mean to subtract from pixels in [0, 1]: one value or one per channel", group="preprocessing",
        parse=parse_floats, metavar="M[,M,M]",
    )  # fmt: skip
    std: Sequence[float] | None = _option(
        None, "standard deviation to divide by: one value or one per channel", group="preprocessing",
        parse=parse_floats, metavar="S[,S,S]",
    )  # fmt: skip
    resize: int | str | None = _option(
        None, "resize the short side to N pixels, or not at all", group="preprocessing", parse=parse_size, metavar="N|none"
    )
    crop: int | str | None = _option(
        None, "centre-crop N x N pixels, or not at all", group="preprocessing", parse=parse_size, metavar="N|none"
    )
    min_size: int = _option(20, "min_size of the saliency channel split")
    max_tasks: int = _option(20, "most ablation class tasks")
    ablation_steps: int = _option(1000, "MCMC steps per chain of the ablation")
    min_per_class: int = _option(5, "fewest images a class needs for the correlation orders", cli=False)
    deletion_images: int | None = _option(50, "images with saliency deletion curves (0: all images)")
    correlation_images: int | None = _option(500, "most images of the correlation orders (0: all)")
    device: str | None = _option(None, "cpu or cuda (default: cuda when available)")
    use_wandb: bool = _option(False, "also log to wandb (offline unless WANDB_MODE=online)", flag="--wandb")
    seed: int = _option(0, "seed of the sampled parts (ablation chains, surrogates)")
    progress: bool | None = _option(
        None, "None: bars when stderr is a terminal, else one line per method; True: bars; False: neither", cli=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        else:
            self.methods = tuple(self.methods)
        # 0 images would measure nothing; the flags have always meant "all" by it
        self.deletion_images = self.deletion_images or None
        self.correlation_images = self.correlation_images or None

    @classmethod
    def from_keywords(cls, **settings: Any) -> AuditOptions:
        """The options from keywords (``run_audit``'s); an unknown keyword is a ``TypeError`` listing the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"unknown audit option(s) {', '.join(unknown)}; the options are {', '.join(known)}")
        return cls(**settings)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> AuditOptions:
        """The options from the namespace of a parser :func:`add_arguments` filled."""
        values = {}
        for f in dataclasses.fields(cls):
            if not f.metadata["cli"]:
                continue
            value = getattr(args, f.name)
            convert = f.metadata["from_cli"]
            values[f.name] = convert(value) if convert is not None else value
        return cls(**values)


def _parse(f: dataclasses.Field, hints: dict[str, Any]) -> Any:
    """The argparse ``type`` of a field: its ``parse``, else from its type hint (``int``, ``bool``, else text)."""
    if f.metadata["parse"] is not None:
        return f.metadata["parse"]
    kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, bool) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per field of :class:`AuditOptions` to ``parser`` (``dest`` is the field's name), in field order."""
    hints = typing.get_type_hints(AuditOptions)
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(AuditOptions):
        meta = f.metadata
        if not meta["cli"]:
            continue
        group = meta["group"]
        if group not in groups:
            title, description = GROUPS[group]
            groups[group] = parser.add_argument_group(title, description)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        parse = _parse(f, hints)
        if parse is bool:
            kwargs["action"] = "store_true"
        elif parse is not None:
            kwargs["type"] = parse
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if meta["required"]:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if meta["cli_default"] is _UNSET else meta["cli_default"]
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        groups[group].add_argument(flag, **kwargs)


def _document() -> None:
    """Append an ``Attributes:`` list made from the fields' help to :class:`AuditOptions`' docstring."""
    lines = ["", "    Attributes:"]
    for f in dataclasses.fields(AuditOptions):
        lines.append(f"        {f.name}: {f.metadata['help']} (default: {f.default!r}).")
    AuditOptions.__doc__ = (AuditOptions.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"


_document()
