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

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch._dynamo
import torch.fx
from torch import Tensor, nn

__all__ = [
    "LayerSplit",
    "capture",
    "count_hooks",
    "forward_hooks",
    "get_module",
    "isolate",
    "layer_names",
    "leaves",
    "replace",
    "same_logits",
    "split_at",
    "split_graph",
    "trace_at",
    "uncompiled",
]

#: The attribute under which ``torch.compile`` keeps the original module (``OptimizedModule._orig_mod``).
_COMPILED = "_orig_mod"


def _user_name(name: str) -> str:
    """A ``named_modules()`` path as the user wrote it: without the ``_orig_mod`` step of compiled modules."""
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers by the names the user wrote (``named_modules()`` paths without ``_orig_mod``).

    For a submodule compiled with ``torch.compile`` the name maps to the original module, so hooks and
    ``torch.fx`` see the eager layers.
    """
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            continue  # its name is taken by the module it wraps
        out.setdefault(_user_name(name), module)
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at ``named_modules()`` path ``name`` (``""`` is the model itself).

    Compiled submodules (``torch.compile``) are addressed by the user's names: ``features.0`` finds
    ``features._orig_mod.0``.

    Raises:
        ValueError: no such module; the message lists the available names.
    """
    if not isinstance(name, str):
        raise TypeError(f"layer names are strings (named_modules() paths), got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name in modules and not isinstance(modules[name], torch._dynamo.eval_frame.OptimizedModule):
        return modules[name]
    modules = layer_names(model)
    if name not in modules:
        names = [n for n in modules if n]
        shown = ", ".join(repr(n) for n in names[:30]) + (", ..." if len(names) > 30 else "")
        raise ValueError(f"unknown layer {name!r}: use one of the model's named_modules() paths: {shown}")
    return modules[name]


@contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every ``torch.compile``-d submodule of ``model`` is replaced by its original module.

    A LightningModule compiled as a whole and handed to the Trainer (Lightning compiles its ``forward`` in
    place) runs its original ``forward``.

    A measurement then runs the eager layers: forward hooks fire, ``torch.fx`` can trace, layer names are
    the user's, and no recompilation is triggered. The compiled wrappers are put back in ``finally``; the
    parameters are the same objects throughout.

    Yields:
        ``model``.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    forwards: list[tuple[nn.Module, object]] = []

    def unwrap(parent: nn.Module) -> None:
        # Lightning's trainer.fit(torch.compile(model)) compiles the LightningModule's forward in place and
        # keeps the original in _compiler_ctx
        ctx = getattr(parent, "_compiler_ctx", None)
        if isinstance(ctx, dict) and "forward" in parent.__dict__ and "original_forward" in ctx:
            forwards.append((parent, parent.__dict__["forward"]))
            parent.__dict__["forward"] = ctx["original_forward"]
        for key, child in list(parent._modules.items()):
            if isinstance(child, torch._dynamo.eval_frame.OptimizedModule):
                swapped.append((parent, key, child))
                parent._modules[key] = child = child._orig_mod
            if child is not None:
                unwrap(child)

    try:
        unwrap(model)
        yield model
    finally:
        for parent, key, child in reversed(swapped):
            parent._modules[key] = child
        for module, forward in reversed(forwards):
            module.__dict__["forward"] = forward


@contextmanager
def isolate(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Run a measurement on ``module`` without perturbing training.

    Puts every submodule in eval mode, disables autograd (unless ``grad``), forks the global CPU
    (and CUDA) RNG and Python's and NumPy's global random states, and restores the train/eval mode of
    every submodule and the ``requires_grad`` of every parameter in ``finally``. Gradients needed by a method must be taken with
    ``torch.autograd.grad`` (never ``.backward()``), so ``.grad`` stays untouched. Submodules compiled
    with ``torch.compile`` run their original, eager modules inside the block (see :func:`uncompiled`).
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    # datasets read for a probe may augment with Python's or NumPy's global RNG
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(grad), uncompiled(module):
            module.eval()
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def count_hooks(model: nn.Module) -> int:
    """Number of forward / forward-pre / backward hooks registered on ``model`` and its submodules."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total


#: A forward hook: ``hook(module, inputs, output)``, returning ``None`` or a replacement output.
ForwardHook = Callable[[nn.Module, tuple, object], object]


@contextmanager
def forward_hooks(model: nn.Module, hooks: dict[str, ForwardHook]) -> Iterator[None]:
    """Register forward hooks on the layers named by the keys of ``hooks`` for the duration of the block.

    The one place of the library that registers forward hooks: every hook is removed in ``finally``, also
    when the block raises.

    Args:
        model: the model.
        hooks: ``named_modules()`` path (``""``: the model itself) -> hook.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> shapes = []
        >>> with forward_hooks(model, {"0": lambda _m, _i, out: shapes.append(out.shape)}):
        ...     _ = model(torch.randn(2, 3))
        >>> shapes, count_hooks(model)
        ([torch.Size([2, 4])], 0)
    """
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(get_module(model, name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def leaves(model: nn.Module, layers: Sequence[str], store: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
    """Make the outputs of ``layers`` autograd leaves during forward passes inside the block.

    Each output is replaced by ``leaf + 0``, where ``leaf`` (a detached clone with ``requires_grad``) is
    put in ``store``: gradients with respect to ``store[name]`` are those with respect to the layer's
    output, and in-place operations downstream (DenseNet's ``relu``) stay legal on the non-leaf.

    Yields:
        ``store``.
    """

    def make(name: str) -> ForwardHook:
        def hook(_m: nn.Module, _i: tuple, out: object) -> Tensor:
            if not isinstance(out, Tensor):
                raise TypeError(f"layer {name!r} returns {type(out).__name__}, not a Tensor; choose another layer")
            leaf = out.detach().clone().requires_grad_(True)
            store[name] = leaf
            return leaf + 0

        return hook

    with forward_hooks(model, {name: make(name) for name in layers}):
        yield store


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

    def make(name: str) -> ForwardHook:
        def hook(_m: nn.Module, _inp: tuple, out: object) -> None:
            if not isinstance(out, Tensor):
                raise TypeError(f"layer {name!r} returns {type(out).__name__}, not a Tensor; choose another layer")
            store[name] = out.detach().clone() if detach else out.clone()

        return hook

    with forward_hooks(model, {name: make(name) for name in layers}):
        yield store


@contextmanager
def replace(model: nn.Module, layer: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output of ``layer`` by ``fn(output)`` during forward passes inside the block."""
    with forward_hooks(model, {layer: lambda _m, _i, out: fn(out)}):  # type: ignore[arg-type]
        yield


@contextmanager
def no_hooks_left(model: nn.Module) -> Iterator[None]:
    """Assert that the block leaves as many hooks on ``model`` as it found (a test helper)."""
    before = count_hooks(model)
    yield
    after = count_hooks(model)
    if after != before:
        raise RuntimeError(f"{after - before} hook(s) outlived their use")


# ---------------------------------------------------------------------------------------------
# splitting a model at a layer (torch.fx)
# ---------------------------------------------------------------------------------------------


def trace_at(model: nn.Module, layer: str) -> tuple[torch.fx.Graph, torch.fx.Node]:
    """Trace ``model`` with ``torch.fx`` keeping ``layer`` as one call; the graph and that call's node.

    Raises:
        RuntimeError: the layer is called more or less than once in the graph (tracing errors propagate).
    """
    get_module(model, layer)
    tracer = torch.fx.Tracer()
    tracer.is_leaf_module = lambda m, qualname: qualname == layer or torch.fx.Tracer.is_leaf_module(tracer, m, qualname)  # type: ignore[method-assign,assignment]
    graph = tracer.trace(model)
    targets = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(targets) != 1:
        raise RuntimeError(f"layer {layer!r} is called {len(targets)} times in the traced graph")
    return graph, targets[0]


def as_list(values: object) -> list[Tensor]:
    """A module's output as a list of values (a single tensor becomes a one-element list)."""
    return list(values) if isinstance(values, (tuple, list)) else [values]  # type: ignore[list-item]


def split_graph(root: nn.Module, graph: torch.fx.Graph, node: torch.fx.Node) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Split a traced ``graph`` of ``root`` at ``node``.

    Returns:
        ``(prefix, suffix)``: ``prefix(*inputs)`` returns the values the rest of the graph needs (``node``'s
        output first, then any earlier value used after it, such as a skip connection) and
        ``suffix(node_output, *others)`` returns the model output.
    """
    nodes = list(graph.nodes)
    after: set[torch.fx.Node] = {node}
    on_input: set[torch.fx.Node] = set()  # nodes that depend on a model input (the rest are constants)
    for n in nodes:
        if any(a in after for a in n.all_input_nodes):
            after.add(n)
        if n.op == "placeholder" or any(a in on_input for a in n.all_input_nodes):
            on_input.add(n)
    output = next(n for n in nodes if n.op == "output")
    # values computed before the split and used after it (skip connections); parameters, buffers and other
    # constants used after the split are recomputed in the suffix instead of crossing it
    crossing = [
        n
        for n in nodes
        if n not in after and n in on_input and n.op != "output" and any(u in after and u is not node for u in n.users)
    ]
    boundary = [node, *crossing]
    # suffix: placeholders for the boundary values, then every node after the split (and the constants)
    suffix_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, n in enumerate(boundary):
        env[n] = suffix_graph.placeholder(f"boundary_{i}")
    constants: set[torch.fx.Node] = set()
    stack = [a for n in after | {output} if n is not node for a in n.all_input_nodes if a not in on_input]
    while stack:
        n = stack.pop()
        if n not in constants:
            constants.add(n)
            stack.extend(n.all_input_nodes)
    for n in nodes:
        if n.op != "output" and n not in env and ((n in after and n is not node) or n in constants):
            env[n] = suffix_graph.node_copy(n, lambda a: env[a])
    suffix_graph.output(torch.fx.graph.map_arg(output.args[0], lambda a: env[a]))
    # prefix: every node not after the split (plus the split node), returning the boundary values
    prefix_graph = torch.fx.Graph()
    penv: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        if (n not in after or n is node) and n.op != "output":
            penv[n] = prefix_graph.node_copy(n, lambda a: penv[a])
    prefix_graph.output(tuple(penv[n] for n in boundary))
    return torch.fx.GraphModule(root, prefix_graph), torch.fx.GraphModule(root, suffix_graph)


def same_logits(a: object, b: object) -> bool:
    """Whether two model outputs agree: bitwise on the CPU, to float tolerance on accelerators (reordered sums)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    nan = a.isnan()
    if nan.any():  # NaN != NaN: outputs with NaN in the same places agree where the rest does (diverged weights)
        if not torch.equal(nan, b.isnan()):
            return False
        a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
        if torch.equal(a, b):
            return True
    return a.device.type != "cpu" and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def split_at(model: nn.Module, layer: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(prefix, suffix)`` of ``model`` split at ``layer`` (see :func:`split_graph`).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> prefix, suffix = split_at(model, "1")
        >>> x = torch.randn(5, 3)
        >>> h, *rest = as_list(prefix(x))
        >>> torch.equal(suffix(h, *rest), model(x))
        True
    """
    return split_graph(model, *trace_at(model, layer))


class LayerSplit:
    """A model split at a layer with ``torch.fx``, checked against the model's own forward pass.

    ``prefix(x)`` returns the values the rest of the network needs (the layer's output first, then any
    earlier value used after it, such as a skip connection); ``suffix(h, *rest)`` returns the logits. The
    split is the fast path of every "run the model from layer L" in the library (ablation masks,
    correlation surrogates). Where tracing fails, or the traced graph stops reproducing the model's
    output (``torch.fx`` freezes Python control flow), :attr:`is_split` is ``False`` and callers fall back
    to forward hooks (:func:`replace`).

    Args:
        model: the model.
        layer: ``named_modules()`` path of the layer.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> split = LayerSplit(model, "1")
        >>> x = torch.randn(5, 3)
        >>> split.check(x)
        True
        >>> h, *rest = split.prefix(x)
        >>> torch.equal(split.suffix(h, *rest), model(x))
        True
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        get_module(model, layer)
        self.model, self.layer = model, layer
        self.graph: torch.fx.Graph | None = None
        self.node: torch.fx.Node | None = None
        self.parts: tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None = None
        #: why the model is not split (``None`` when it is)
        self.reason: str | None = None
        self.trace()

    def trace(self) -> None:
        """(Re-)trace the model and split it at the layer; on failure :attr:`is_split` is ``False``."""
        try:
            self.graph, self.node = trace_at(self.model, self.layer)
            self.parts = split_graph(self.model, self.graph, self.node)
            self.reason = None
        except Exception as err:  # tracing arbitrary user models can fail in many ways
            self.graph = self.node = self.parts = None
            name = type(self.model).__name__
            self.reason = f"could not split {name} at {self.layer!r} with torch.fx ({type(err).__name__}: {err})"

    @property
    def is_split(self) -> bool:
        return self.parts is not None

    def check(self, x: Tensor) -> bool:
        """Whether the split computes the model's logits on ``x``; re-traces once, then gives the split up.

        Returns:
            :attr:`is_split` after the check.
        """
        for attempt in range(2):
            if self.parts is None:
                return False
            prefix, suffix = self.parts
            if same_logits(suffix(*as_list(prefix(x))), self.model(x)):
                return True
            if attempt == 0:
                self.trace()
        self.graph = self.node = self.parts = None
        self.reason = f"the torch.fx split of {type(self.model).__name__} at {self.layer!r} no longer computes its logits"
        return False

    def prefix(self, x: Tensor) -> list[Tensor]:
        """The values crossing the split for inputs ``x`` (the layer's output first)."""
        if self.parts is None:
            raise RuntimeError(self.reason or "not split")
        return as_list(self.parts[0](x))

    def suffix(self, *values: Tensor) -> object:
        """The model's output from the values crossing the split."""
        if self.parts is None:
            raise RuntimeError(self.reason or "not split")
        return self.parts[1](*values)

    @property
    def crossing(self) -> int:
        """How many values cross the split besides the layer's output (skip connections)."""
        if self.parts is None:
            return 0
        out_node = next(n for n in self.parts[0].graph.nodes if n.op == "output")
        return len(out_node.args[0]) - 1
