"""Measuring a model that a distributed strategy shards: gathering, refusing, and the probe's sampler.

The callbacks measure whole layers and read whole weights. Under Lightning's sharded strategies each rank
holds a part of every parameter, so every measurement runs inside :func:`gathered`, which asks the
strategy's own engine for the full parameters:

* FSDP (``strategy="fsdp"``, torch's ``FullyShardedDataParallel``):
  ``FullyShardedDataParallel.summon_full_params`` on the strategy's root wrapper (``trainer.strategy.model``),
  so inner units are never set up as roots by a forward pass of their own; inside it the units' wrapped
  modules run directly on the summoned parameters;
* FSDP2 (``fully_shard`` in ``configure_model``, e.g. under ``ModelParallelStrategy``): ``unshard()`` on every
  ``FSDPModule``, with resharding after forward held off for the measurement, then ``reshard()``: every
  layer (also one that a ``torch.fx`` split calls directly, past its module's hooks) sees full weights,
  and the measurement's forward passes make no collective call;
* DeepSpeed ZeRO-3 (where ``deepspeed`` is installed; found by the parameters' ``ds_id``, so also for a raw
  ``deepspeed.initialize`` engine's module, or by a ``DeepSpeedStrategy`` config with stage 3):
  ``deepspeed.zero.GatheredParameters`` on all of the module's parameters, released unchanged afterwards.

Tensor parallelism (``parallelize_module``) leaves parameters that stay sharded after the gather, and layer
outputs that are parts of the full output; :func:`tensor_parallel_parameters` finds them so that a callback
refuses before the first training step (:func:`check_not_tensor_parallel`).

The gathers are collectives: every rank must enter them in the same order, which the callbacks ensure by
measuring at the same steps on every rank (the budget's plan is rank 0's) on the same probe (rank 0's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
from torch import nn

__all__ = [
    "check_not_tensor_parallel",
    "gathered",
    "sharding_kind",
    "tensor_parallel_parameters",
    "user_sampler",
]


def _fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: FSDP2 lived under _composable
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef,unused-ignore]
        except ImportError:
            return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _fsdp1_root(trainer: pl.Trainer | None, module: nn.Module) -> nn.Module | None:
    """The outermost ``FullyShardedDataParallel`` wrapper around ``module``'s parameters, if any."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    candidates = [getattr(getattr(trainer, "strategy", None), "model", None), module]
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and any(isinstance(m, FullyShardedDataParallel) for m in candidate.modules()):
            return candidate
    return None


def _deepspeed_zero3(trainer: pl.Trainer | None, module: nn.Module) -> bool:
    # by the parameters first: ZeRO-3 marks each one it partitions with a ``ds_id`` (Lightning's DeepSpeedStrategy
    # and a raw ``deepspeed.initialize`` engine alike); the strategy's config covers a model not yet partitioned
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return True
    strategy = getattr(trainer, "strategy", None)
    config = getattr(strategy, "config", None)
    if type(strategy).__name__ != "DeepSpeedStrategy" or not isinstance(config, dict):
        return False
    return int(config.get("zero_optimization", {}).get("stage", 0)) == 3


def sharding_kind(trainer: pl.Trainer | None, module: nn.Module) -> str | None:
    """How the strategy shards ``module``: ``"fsdp"``, ``"fsdp2"``, ``"deepspeed"`` or ``None`` (whole on every rank)."""
    if _fsdp2_modules(module):
        return "fsdp2"
    if _fsdp1_root(trainer, module) is not None:
        return "fsdp"
    if _deepspeed_zero3(trainer, module):
        return "deepspeed"
    return None


@contextmanager
def _fsdp2_unsharded(roots: list[nn.Module]) -> Iterator[None]:
    # The post-forward reshard is held off so that a layer called directly (a torch.fx split calls a sharded
    # container's children, skipping its hooks) still sees full weights after an earlier forward pass; the
    # reshard-after-forward setting is private state of each parameter group, restored exactly in finally.
    groups = [g for m in roots for g in getattr(m._get_fsdp_state(), "_fsdp_param_groups", [])]  # type: ignore[operator]
    saved = [(g, g.post_forward_mesh_info) for g in groups if hasattr(g, "post_forward_mesh_info")]
    try:
        for m in roots:
            m.unshard()  # type: ignore[operator]
        for g, _ in saved:
            g.post_forward_mesh_info = None
        yield
    finally:
        for g, info in saved:
            g.post_forward_mesh_info = info
        for m in roots:
            m.reshard()  # type: ignore[operator]


@contextmanager
def _fsdp1_units_direct(module: nn.Module) -> Iterator[None]:
    """Inside ``summon_full_params``, every FSDP unit's forward runs its wrapped module directly.

    FSDP's own forward ends by switching a unit back to its sharded flat parameter (also inside
    ``summon_full_params``), so a weight read after a forward pass (the saliency's classifier weight) would
    see this rank's shard. The summoned full parameters are what the wrapped modules hold, so calling them
    directly computes the same outputs, with no collective and no change to FSDP's state.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]
    try:
        for unit in units:
            # an instance attribute shadows the class's forward for this block only; hooks on the unit still fire
            unit.__dict__["forward"] = unit.module.__call__
        yield
    finally:
        for unit in units:
            unit.__dict__.pop("forward", None)


def _is_deepspeed_hook(hook: Any) -> bool:
    return str(getattr(hook, "__module__", "") or "").startswith("deepspeed.")


@contextmanager
def _deepspeed_hooks_off(module: nn.Module) -> Iterator[None]:
    """Inside ``GatheredParameters``, ZeRO-3's forward hooks of ``module``'s submodules are held off.

    ZeRO-3 fetches a submodule's parameters in a forward pre-hook and partitions them again in a forward hook,
    also inside ``GatheredParameters``: a weight read after a forward pass (the saliency's classifier weight)
    would see this rank's empty partition, and a copy of a layer (the ablation's float64 head) would carry hooks
    that expect partitioned parameters. The gathered parameters are what the layers hold, so running them
    without those hooks computes the same outputs, with no collective. Restored, in order, in finally.
    """
    saved: list[tuple[dict[int, Any], list[tuple[int, Any]]]] = []
    try:
        for m in module.modules():
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                if any(_is_deepspeed_hook(h) for h in hooks.values()):
                    saved.append((hooks, list(hooks.items())))
                    for key in [k for k, h in hooks.items() if _is_deepspeed_hook(h)]:
                        del hooks[key]
        yield
    finally:
        for hooks, items in saved:
            added = [(k, h) for k, h in hooks.items() if k not in dict(items)]
            hooks.clear()
            hooks.update(items)
            hooks.update(added)


@contextmanager
def gathered(trainer: pl.Trainer | None, module: nn.Module) -> Iterator[None]:
    """Full parameters of ``module`` on every rank for the block, through the strategy's own engine.

    A no-op for unsharded models (single device, DDP). Must be entered on every rank at the same point
    (it is a collective under sharding).

    Args:
        trainer: the trainer (its strategy decides the engine); ``None`` outside a fit.
        module: the LightningModule (or any module) to measure.
    """
    kind = sharding_kind(trainer, module)
    with ExitStack() as stack:
        if kind == "fsdp2":
            stack.enter_context(_fsdp2_unsharded(_fsdp2_modules(module)))
        elif kind == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel

            root = _fsdp1_root(trainer, module)
            # on the root wrapper, not the inner module: a forward pass on an inner unit first would set it
            # up as a root and break the next training step; no writeback, the measurement changes nothing
            stack.enter_context(FullyShardedDataParallel.summon_full_params(root, writeback=False))  # type: ignore[arg-type]
            stack.enter_context(_fsdp1_units_direct(module))
        elif kind == "deepspeed":
            try:
                import deepspeed
            except ImportError:  # the strategy would not run without it
                pass
            else:
                params = list(module.parameters())
                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
                stack.enter_context(_deepspeed_hooks_off(module))
        yield


def tensor_parallel_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that are sharded ``DTensor`` s (tensor parallelism, or FSDP2 outside
    :func:`gathered`)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # torch without DTensor: nothing can be sharded this way
        return []
    return [
        name
        for name, p in module.named_parameters()
        if isinstance(p, DTensor) and any(not isinstance(placement, Replicate) for placement in p.placements)
    ]


def check_not_tensor_parallel(trainer: pl.Trainer | None, module: nn.Module, who: str) -> None:
    """Refuse a model whose layers stay sharded after :func:`gathered` (tensor parallelism).

    A forward hook on a tensor-parallel layer sees this rank's part of the output (a ``ColwiseParallel``
    layer's output is split over the ranks) and a weight read sees a part of the weight: the numbers would be
    silently wrong. Call inside :func:`gathered`.

    Raises:
        ValueError: naming the sharded layers and what to do.
    """
    names = tensor_parallel_parameters(module)
    if not names:
        return
    layers = sorted({n.rpartition(".")[0] or n for n in names})
    raise ValueError(
        f"{who}: layer(s) {layers} of {type(module).__name__} are tensor-parallel (their weights are sharded "
        "DTensors that stay sharded when the callback gathers the model), so a hook would see one rank's part of "
        "their output. The callbacks measure whole layers: train with FSDP/FSDP2 or DDP (data parallel only, "
        "ModelParallelStrategy(tensor_parallel_size=1)), or measure a saved checkpoint in one process with "
        "trainer.validate(model, loader, ckpt_path=...)."
    )


def user_sampler(loader: Any) -> Any:
    """The sampler the user gave ``loader``, under the ``DistributedSamplerWrapper`` that Lightning puts around it.

    Lightning replaces a custom sampler (``SubsetRandomSampler`` over a validation split) with a
    ``DistributedSamplerWrapper`` in distributed runs; the user's split is the wrapped sampler's.
    """
    sampler = getattr(loader, "sampler", None)
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    if isinstance(sampler, DistributedSamplerWrapper):
        # the wrapper's dataset wraps the user's sampler (lightning.fabric's _DatasetSamplerWrapper._sampler)
        inner = getattr(sampler.dataset, "_sampler", None)
        if inner is not None:
            return inner
    return sampler
