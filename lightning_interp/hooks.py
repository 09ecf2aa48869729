"""Capture or replace layer outputs inside context managers, addressing layers by ``named_modules()`` path.

Every hook registered here is removed in a ``finally`` block, so no hook outlives the ``with`` block,
also when the forward pass raises. Captured outputs are cloned (and detached unless asked otherwise),
because the next operation may change a hooked output in place (torchvision's DenseNet applies
``F.relu(inplace=True)``).

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with capture(model, ["0"]) as acts:
    ...     _ = model(torch.randn(5, 3))
    >>> acts["0"].shape
    torch.Size([5, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["capture", "count_hooks", "get_module", "replace"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at ``named_modules()`` path ``name`` (``""`` is the model itself).

    Raises:
        ValueError: no such module; the message lists the available names.
    """
    if not isinstance(name, str):
        raise TypeError(f"layer names are strings (named_modules() paths), got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        shown = ", ".join(repr(n) for n in names[:30]) + (", ..." if len(names) > 30 else "")
        raise ValueError(f"unknown layer {name!r}: use one of the model's named_modules() paths: {shown}")
    return modules[name]


def count_hooks(model: nn.Module) -> int:
    """Number of forward / forward-pre / backward hooks registered on ``model`` and its submodules."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``layers`` during forward passes inside the block.

    Args:
        model: the model.
        layers: ``named_modules()`` paths.
        detach: detach the clones (set ``False`` to keep the autograd graph).

    Yields:
        A dict filled with the (cloned) output of each layer at the most recent forward pass.
    """
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name in layers:
            module = get_module(model, name)

            def hook(_m: nn.Module, _inp: tuple, out: Tensor, name: str = name) -> None:
                if not isinstance(out, Tensor):
                    raise TypeError(f"layer {name!r} returns {type(out).__name__}, not a Tensor; choose another layer")
                store[name] = out.detach().clone() if detach else out.clone()

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replace(model: nn.Module, layer: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output of ``layer`` by ``fn(output)`` during forward passes inside the block."""
    module = get_module(model, layer)
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def no_hooks_left(model: nn.Module) -> Iterator[None]:
    """Assert that the block leaves as many hooks on ``model`` as it found (a test helper)."""
    before = count_hooks(model)
    yield
    after = count_hooks(model)
    if after != before:
        raise RuntimeError(f"{after - before} hook(s) outlived their use")
