"""Probe data: a fixed, bounded batch drawn from whatever data a user has, read from any batch shape.

The callbacks measure on a fixed *probe set*. It may come from a tensor, an ``(inputs, labels)`` pair, a
map-style :class:`~torch.utils.data.Dataset`, an iterable dataset or a :class:`~torch.utils.data.DataLoader`;
:func:`draw_probe` turns any of these into ``(inputs, labels)`` tensors, and :func:`unpack_batch` reads one
batch (a tensor, a tuple or list, a dict) with the rule a callback's ``unpack=`` argument sets.

Where the probe comes from is resolved here too: :func:`find_probe_source` takes the ``probe=`` argument,
else the first non-empty loader among candidates tried in order (a callback lists a datamodule's and a
trainer's loaders); :func:`read_probe` draws from it with errors that name the source, and
:func:`clean_probe` leaves out examples with non-finite inputs.

This module does not import Lightning: it serves notebooks as well as the callbacks.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.arange(10) % 2), batch_size=4)
    >>> probe = draw_probe(loader, 6, torch.Generator().manual_seed(0))
    >>> probe.inputs.shape, probe.labels.shape, probe.available
    (torch.Size([6, 3]), torch.Size([6]), 10)
    >>> unpack_batch({"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([0, 1])})[1]
    tensor([0, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEYS",
    "Probe",
    "ProbeSource",
    "Unpack",
    "clean_probe",
    "draw_probe",
    "find_probe_source",
    "first_loader",
    "has_items",
    "no_probe_message",
    "read_probe",
    "unpack_batch",
]

#: What ``probe=`` accepts.
ProbeSource = Tensor | tuple | list | Dataset | DataLoader | Iterable
#: How to read a batch: ``(input_key, label_key)`` (dict keys or tuple positions; ``label_key`` may be
#: ``None`` for unlabelled data), or a callable ``batch -> (inputs, labels)`` (or ``batch -> inputs``).
Unpack = Sequence[str | int | None] | Callable[[Any], Any] | None

#: Dict keys tried, in order, for the inputs of a dict batch when ``unpack`` is not given.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "img", "pixel_values", "data", "features")
#: Dict keys tried, in order, for the labels of a dict batch when ``unpack`` is not given.
LABEL_KEYS = ("label", "labels", "y", "target", "targets", "class", "cls")

_HOW = (
    "say which entry is the input and which the label with the callback's unpack= argument: "
    "unpack=('image', 'label') for dict batches, unpack=(0, 1) for tuples, or unpack=lambda batch: (inputs, labels)"
)


@dataclass
class Probe:
    """A drawn probe set.

    Attributes:
        inputs: ``[N, ...]`` inputs.
        labels: ``[N]`` integer class labels, or ``None`` when the data has none.
        available: how many items the source had (``None`` for an iterable that was not exhausted).
        deterministic: whether the same source and generator seed give the same probe set again (map-style
            data: always; iterables: only when their order is).
        indices: ``[N]`` positions of the drawn items in the source (tensors, pairs and map-style data;
            ``None`` for iterables), so a report can name each probe item (e.g. its file).
    """

    inputs: Tensor
    labels: Tensor | None
    available: int | None
    deterministic: bool
    indices: Tensor | None = None


def _as_labels(value: Any) -> Tensor | None:
    """``value`` as ``[N]`` int64 class labels, or ``None`` when it is not label-like (metadata, masks)."""
    if value is None:
        return None
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.ndim != 1:
        return None
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            return None
    elif t.dtype == torch.bool or t.is_complex():
        return None
    return t.long()


def unpack_batch(batch: Any, unpack: Unpack = None) -> tuple[Tensor, Tensor | None]:
    """Read ``(inputs, labels)`` from one batch.

    Without ``unpack``: a tensor is unlabelled inputs; a tuple or list is ``(inputs, labels, ...)`` (extra
    entries such as metadata are ignored); a dict uses the first of :data:`INPUT_KEYS` and of
    :data:`LABEL_KEYS` it has. Labels that are not ``[N]`` class indices are treated as absent.

    Args:
        batch: a collated batch.
        unpack: ``(input_key, label_key)`` or a callable returning ``(inputs, labels)`` or ``inputs``.

    Raises:
        TypeError: the batch cannot be read; the message names the ``unpack`` argument.
    """
    if callable(unpack):
        out = unpack(batch)
        inputs, labels = (out[0], out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
    elif unpack is not None:
        keys = list(unpack)
        if not 1 <= len(keys) <= 2:
            raise TypeError(f"unpack must be (input_key, label_key) or a callable, got {unpack!r}")
        try:
            inputs = batch[keys[0]]
            labels = batch[keys[1]] if len(keys) == 2 and keys[1] is not None else None
        except (KeyError, IndexError, TypeError) as err:
            have = list(batch) if isinstance(batch, Mapping) else f"a {type(batch).__name__} of length {len(batch)}"
            raise TypeError(f"unpack={unpack!r} does not fit the batch ({have}): {type(err).__name__}: {err}") from err
    elif isinstance(batch, Tensor):
        inputs, labels = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        inputs, labels = batch[0], batch[1] if len(batch) > 1 else None
    elif isinstance(batch, Mapping):
        in_key = next((k for k in INPUT_KEYS if k in batch), None)
        if in_key is None:
            raise TypeError(f"cannot find the inputs in a dict batch with keys {list(batch)}; {_HOW}")
        inputs = batch[in_key]
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    else:
        raise TypeError(f"cannot read inputs and labels from a batch of type {type(batch).__name__}; {_HOW}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"the inputs read from the batch are a {type(inputs).__name__}, not a tensor; {_HOW}")
    return inputs, _as_labels(labels)


def _is_map_style(dataset: Any) -> bool:
    return (
        not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
        and not isinstance(dataset, (Tensor, Mapping))
    )


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "ndim")


def _is_pair(source: Any) -> TypeGuard[tuple[Any, ...] | list[Any]]:
    """``(inputs,)`` or ``(inputs, labels)`` as tensors or arrays (a tuple, or a list of two with matching lengths)."""
    if not isinstance(source, (tuple, list)) or not 1 <= len(source) <= 2:
        return False
    if not all(isinstance(part, Tensor) or _is_array(part) for part in source):
        return False
    if isinstance(source, tuple):
        return True
    # a list of two arrays is a pair only when it reads as one: labels [N] beside inputs [N, ...]
    return len(source) == 2 and source[1].ndim == 1 and source[0].ndim > 1 and len(source[0]) == len(source[1])


def _is_batch(element: Any, unpack: Unpack) -> bool:
    """Whether one element of a dataset or iterable is a ready-made batch: its labels read as a vector ``[B]``.

    A single item's label is a scalar, which reads as no label.
    """
    if unpack is None and not isinstance(element, (Mapping, tuple, list)):
        return False
    try:
        labels = unpack_batch(element, unpack)[1]
    except (TypeError, KeyError, IndexError):
        return False
    return labels is not None and labels.ndim == 1


def _concat(parts: list[tuple[Tensor, Tensor | None]], size: int) -> tuple[Tensor, Tensor | None]:
    inputs = torch.cat([p[0] for p in parts])[:size]
    has_labels = all(p[1] is not None for p in parts)
    labels = torch.cat([p[1] for p in parts])[:size] if has_labels else None  # type: ignore[misc]
    return inputs, labels


def draw_probe(
    source: ProbeSource, size: int, generator: torch.Generator, unpack: Unpack = None, sampler: Any = None
) -> Probe:
    """Draw a probe set of at most ``size`` items from ``source``.

    * a tensor (unlabelled inputs) or an ``(inputs, labels)`` tuple of tensors: ``size`` rows drawn
      without replacement;
    * a map-style dataset, or a ``DataLoader`` over one: ``size`` indices drawn without replacement and the
      items collated with the loader's ``collate_fn`` (the loader's sampler and the global RNG are not used,
      so every process of a distributed run draws the same set; a sampler with ``indices``, such as
      ``SubsetRandomSampler``, restricts the draw to its indices);
    * an iterable dataset or loader: its first items, in its own order, until ``size`` (deterministic only
      when its order is); an iterable that yields ready-made batches (labels ``[B]``) is read batch by
      batch.

    Args:
        source: the data.
        size: the most items to draw.
        generator: the only source of randomness.
        unpack: how to read a batch (see :func:`unpack_batch`).
        sampler: the sampler whose ``indices`` restrict a loader's draw, in place of the loader's own (a
            distributed run wraps the user's sampler, hiding its indices).

    Returns:
        A :class:`Probe`; ``available`` tells when the source had fewer than ``size`` items.

    Raises:
        ValueError: an empty source or ``size < 1``.
        TypeError: a source of an unsupported type, or batches that cannot be read.
    """
    if size < 1:
        raise ValueError(f"the probe size must be >= 1, got {size}")
    if isinstance(source, Tensor) or _is_array(source):
        source = (source,)
    if _is_pair(source):
        source = tuple(torch.as_tensor(part) for part in source)
        inputs, labels = unpack_batch(source, unpack)
        n = len(inputs)
        if n == 0:
            raise ValueError("cannot draw a probe set from empty tensors")
        if labels is not None and len(labels) != n:
            raise ValueError(f"the probe has {n} inputs but {len(labels)} labels")
        idx = torch.randperm(n, generator=generator)[:size]
        return Probe(inputs[idx], labels[idx] if labels is not None else None, n, True, idx)

    # a loader collates with its collate_fn only when it batches (it has a batch sampler)
    batched = isinstance(source, DataLoader) and source.batch_sampler is not None
    dataset: Any
    collate: Callable[[list[Any]], Any]
    if isinstance(source, DataLoader):
        dataset, collate = source.dataset, source.collate_fn if batched else default_collate
    else:
        dataset, collate = source, default_collate
    if isinstance(source, DataLoader) and not batched and _is_map_style(dataset) and len(dataset):
        # DataLoader(batch_size=None) over a dataset of ready-made batches: read it batch by batch below
        batched = _is_batch(dataset[0], unpack)
        if batched:
            dataset = None
    if _is_map_style(dataset):
        # a sampler over a subset (SubsetRandomSampler: a split of one dataset) restricts the indices
        subset = getattr(sampler if sampler is not None else getattr(source, "sampler", None), "indices", None)
        pool = torch.as_tensor(list(subset), dtype=torch.long) if subset is not None else None
        n = len(pool) if pool is not None else len(dataset)
        if n == 0:
            raise ValueError(f"cannot draw a probe set from an empty {type(dataset).__name__}")
        idx = torch.randperm(n, generator=generator)[:size]
        if pool is not None:
            idx = pool[idx]
        inputs, labels = unpack_batch(collate([dataset[i] for i in idx.tolist()]), unpack)
        return Probe(inputs, labels, n, True, idx)
    if not isinstance(source, Iterable):
        raise TypeError(
            f"probe data must be a tensor, an (inputs, labels) pair, a Dataset or a DataLoader, got {type(source).__name__}"
        )
    parts: list[tuple[Tensor, Tensor | None]] = []
    count, items = 0, list[Any]()
    for element in source:
        if not batched and not parts and not items:
            # an iterable may yield ready-made batches (e.g. DataLoader(stream, batch_size=None))
            batched = _is_batch(element, unpack)
        if batched:
            part = unpack_batch(element, unpack)
            parts.append(part)
            count += len(part[0])
        else:  # single items: collate them in chunks
            items.append(element)
            count += 1
            if len(items) == 256:
                parts.append(unpack_batch(collate(items), unpack))
                items = []
        if count >= size:
            break
    if items:
        parts.append(unpack_batch(collate(items), unpack))
    if not parts:
        raise ValueError(f"cannot draw a probe set from an empty {type(source).__name__}")
    inputs, labels = _concat(parts, size)
    return Probe(inputs, labels, count if count < size else None, False)


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what ``trainer.val_dataloaders`` / ``train_dataloader`` hold (one, a list, a dict)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def has_items(loader: Any) -> bool:
    """Whether ``loader``'s dataset has items (``True`` without a dataset or for an iterable without a length)."""
    dataset = getattr(loader, "dataset", None)
    try:
        return dataset is None or len(dataset) > 0
    except TypeError:  # an iterable dataset without a length
        return True


def find_probe_source(probe: ProbeSource | None, candidates: Iterable[tuple[Any, str]]) -> tuple[Any, str] | None:
    """Where the probe comes from, ``(source, description)``: ``probe`` if given, else the first candidate.

    Args:
        probe: the ``probe=`` argument (``None``: look among the candidates).
        candidates: ``(loaders, description)`` pairs, read in order and lazily (a generator may prepare a
            trainer's loaders only when it gets that far); ``loaders`` is one loader, a list or a dict of them,
            or ``None``. The first loader of the first candidate whose dataset has items is taken.

    Returns:
        ``(source, description)``, or ``None`` when no candidate holds data.
    """
    if probe is not None:
        return probe, "the probe argument"
    for loaders, where in candidates:
        loader = first_loader(loaders)
        if loader is not None and has_items(loader):
            return loader, where
    return None


def no_probe_message(who: str) -> str:
    """The error for a callback ``who`` that found no probe data: the ways to give it."""
    return (
        f"{who} needs probe data and found none: pass {who}(probe=...) (a tensor, an (inputs, labels) pair, "
        "a Dataset or a DataLoader), or give data to the trainer: trainer.fit(model, train_loader, val_loader), "
        "a LightningDataModule, or trainer.validate(model, loader)."
    )


def read_probe(
    source: ProbeSource, where: str, size: int, generator: torch.Generator, unpack: Unpack, sampler: Any, who: str
) -> Probe:
    """:func:`draw_probe` with errors that name the callback ``who`` and the source (``where``).

    Raises:
        TypeError: batches that cannot be read or items that do not stack (the message names ``unpack``).
        ValueError: an empty source.
    """
    try:
        return draw_probe(source, size, generator, unpack, sampler=sampler)
    except (TypeError, RuntimeError) as err:  # unreadable batches, items that do not stack
        raise TypeError(
            f"{who} could not read probe data from {where}: {type(err).__name__}: {err}. Probe data is a tensor of "
            "inputs, an (inputs, labels) tuple, a Dataset or a DataLoader; unpack= says how to read its batches."
        ) from err
    except ValueError as err:
        raise ValueError(f"{who}: {where}: {err}") from err


def clean_probe(probe: Probe, size: int, where: str, who: str, warn: Callable[[str, str], None]) -> None:
    """Warn when ``probe`` is smaller than ``size``, and leave out (in place) examples with non-finite inputs.

    A NaN pixel in one probe example would turn every pooled statistic NaN (or silently shift it), so such
    examples are dropped with one warning; a probe with no finite example is an error.

    Args:
        probe: the drawn probe (changed in place).
        size: the size asked for.
        where: the source's description, for the messages.
        who: the callback's name, for the messages.
        warn: called with ``(tag, message)`` for each warning (the tag lets a caller warn once per kind).

    Raises:
        ValueError: every probe example has non-finite inputs.
    """
    if len(probe.inputs) < size:
        warn(
            "probe-size",
            f"{who}: probe_size={size} but {where} has only {len(probe.inputs)} items; the probe uses those "
            f"{len(probe.inputs)} (lower probe_size to silence this warning).",
        )
    if not probe.inputs.is_floating_point():
        return
    clean = torch.isfinite(probe.inputs.reshape(len(probe.inputs), -1)).all(dim=1)
    if bool(clean.all()):
        return
    kept = int(clean.sum())
    if kept == 0:
        raise ValueError(
            f"{who}: every one of the {len(clean)} probe examples from {where} has non-finite (NaN or "
            "infinite) inputs; check the data's preprocessing, or pass probe=... with finite inputs."
        )
    warn(
        "probe-nonfinite",
        f"{who}: {len(clean) - kept} of {len(clean)} probe examples from {where} have non-finite (NaN or "
        f"infinite) inputs and are left out; the read-outs are those of the other {kept}.",
    )
    probe.inputs = probe.inputs[clean]
    probe.labels = None if probe.labels is None else probe.labels[clean]
    probe.indices = None if probe.indices is None else probe.indices[clean]
