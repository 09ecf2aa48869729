"""Benchmark FinalLayerSaliency against a plain forward pass and captum baselines (time and peak memory).

Run (from the repository root)::

    .venv/bin/python scripts/bench_saliency.py [--sections top-k,all-class,scale] [--quick] [--out DIR]

(defaults: ``--batch-size 8 --all-batch-size 4 --image-size 224 --num-classes 1000 --warmup 1 --repeats 7 --ig-repeats 1
--ig-top5-repeats 0 --ig-steps 50 --internal-batch-size 16 --scale-images 1000 --scale-classes 100
--scale-batch 50 --seed 0 --out outputs/bench_saliency``, ``--device`` cuda if available else cpu, torch's
default thread count). ``--quick`` is a smoke run of a few seconds (64 x 64 images, batches of 2, a
10-class head, one repeat, no memory measurement, 4 images at scale): the numbers mean nothing, the code path
is the real one.

Setup: torchvision ResNet-50 with random weights (``torch.manual_seed(seed)``; no download) in eval
mode, one random batch ``[8, 3, 224, 224]``. The targets are the model's predicted classes (top-1,
``[N]``) and its five highest-scoring classes (top-5, ``[N, 5]``), computed once; every method gets
them explicitly. The all-class section uses a second random batch ``[4, 3, 224, 224]`` and the target
``[4, 1000]`` (every class of the head, ``torch.arange(1000).expand(4, 1000)``).

Sections (``--sections``):

* ``top-k``: the table of the method page (batch 8, top-1 and top-5 maps, captum baselines);
* ``all-class``: the maps of all 1000 classes for batch 4 in ONE call per method, against a no-grad
  forward pass of the same batch (the issue's target: <= 1.2x for ``policy_gradient``), also
  ``attribute_all`` (all four kinds) and ``policy_gradient`` with ``upsample=True`` (the output alone is
  ``[4, 1000, 224, 224]``, 800 MB in float32; ``upsampling alone``: that one ``bilinear_upsample`` call on
  ready maps, the floor of any upsampled all-class maps); the one-time cost of a new ``FinalLayerSaliency``
  (layer resolution, and the recursive splits of all 1000 classes on each side, cached per class) is
  measured once on its own;
* ``scale``: a reduced ImageNet-scale audit: ``--scale-images`` synthetic (``randn``) 224 x 224 images
  in batches of ``--scale-batch``, each with the maps of ``--scale-classes`` classes spread over the
  1000 of the head (``[B, C]`` targets, one call per batch), against the forward pass of the same
  batches (interleaved, rotating the order per batch). Reported: seconds per image, the cost of one
  class task (the maps of one class for one image: ``(T_method - T_forward) / (images x classes)``),
  the one-time recursive split per class ``t_split`` (both sides, cached), and the extrapolation to 50
  images x 1000 classes on this CPU, ``T = 50 x (T_forward / images + 1000 x t_task) + 1000 x t_split``. The GPU line is an
  EXTRAPOLATION, not a measurement: ``T_gpu = 50 x (F_forward + 1000 x F_task) / R_gpu``, with the
  FLOPs ``F`` counted by ``torch.utils.flop_counter`` on this machine and ``R_gpu`` the ASSUMED
  achieved float32 rate ``--gpu-tflops`` (default 20 TFLOP/s; kernel launches and transfers ignored).

Measured, per method (``top-k``):

* ``forward``: ``model(x)`` under ``torch.no_grad()`` (the reference of every ratio, top-5 included);
* ``ours:<method>``: ``FinalLayerSaliency(model).attribute(x, target, method=...)`` for the four
  methods, and ``ours:attribute_all`` (all four maps at once). Top-5: ONE call with the ``[N, 5]``
  target. The first call resolves the layers (an extra forward with hooks on every module); it is
  done in warm-up and reported on its own row (``1st call``: a new ``FinalLayerSaliency`` per call,
  at most 3 repeats);
* captum, on ``log_softmax(model(x))`` (``nn.Sequential(model, nn.LogSoftmax(1))``, the quantity whose
  Grad-CAM is the policy-gradient map): ``LayerGradCam`` at ``layer4`` (``relu_attributions=False``),
  ``Saliency`` (``abs=True``) and ``IntegratedGradients`` (``n_steps=--ig-steps``, zero baseline,
  ``internal_batch_size=--internal-batch-size``). Top-5: captum takes one target per sample, so five
  calls (``target[:, j]``), each result detached (LayerGradCam's result otherwise keeps the autograd
  graph of its forward pass, all saved activations, alive: five kept results hold five graphs).

Wall time: ``time.perf_counter`` (``torch.cuda.synchronize`` on CUDA); with ``--clock cpu``,
``time.process_time`` instead: the CPU seconds of this process, which other processes on a busy machine
inflate far less than wall time (use it with ``--threads 1``: with more threads, one that waits for a
preempted one spins and counts); ``--warmup`` untimed calls of
every method (one more of the forward pass, before the first call of ours), then ``--repeats``
timed calls per method, interleaved round-robin (one call of each method per round, the order
rotated every round) so that machine noise hits every method alike; the median is reported.
IntegratedGradients (50 steps x a ResNet-50 forward + backward of 8 images, about a minute per call
on 2 CPU cores) gets ``--ig-repeats`` timed calls (default 1: a second one would push the default
run past 6 minutes on 2 cores) after one short warm-up call (``n_steps`` = one internal batch). Its
top-5 row (5 calls, about 5 minutes) is by default NOT run but estimated as 5 x the single-target
median (``--ig-top5-repeats 0``, marked ``est.``; captum's cost does not depend on the target);
``--ig-top5-repeats 1`` measures it.

Peak memory: on CPU, each method runs once in a new process, ``--memory-jobs`` at a time, forked
from a ``multiprocessing`` fork server that has only imported torch, torchvision, captum and
``lightning_interp.saliency`` (a new interpreter would cost ~6 s of imports per method; where
``forkserver`` is unavailable it is one, running this script with ``--measure-memory KEY``). The
process builds the same model and batch, runs one tiny ``[1, 3, 64, 64]`` no-grad forward (for
``ours`` that forward resolves the layers; the ``1st call`` row skips it and resolves on the real
batch), resets the kernel's resident high-water mark (writes ``5`` to ``/proc/self/clear_refs``),
reads its resident size ``VmRSS``, makes ONE call (top-5: the five captum calls, results kept) and
reports the high-water mark ``VmHWM`` minus that resident size: the peak resident memory increase
of the call. (``ru_maxrss`` is the same high-water mark, but it also keeps the all-time peak reached
while importing and building, so it is only the fallback where ``clear_refs`` is unavailable:
``ru_maxrss`` after minus before the call.) The processes run with ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc): every allocation of 64 KiB or more is its own mapping, unmapped when freed, so the resident
size follows the live tensors rather than glibc's caching (without it the same call varied by
~60 MB between methods). IntegratedGradients' memory is measured with ``n_steps`` = one internal
batch (2 steps of 8 images): captum runs the steps in sequential chunks of ``internal_batch_size``
images and sums them, so the peak does not depend on ``n_steps`` (up to one ``[N, 3, H, W]``
accumulator). On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
the allocated memory before the call, in this process.

Outputs: markdown tables (absolute median ms and peak MB, ratios to the forward pass of the same
batch; the scale table) and pass/fail lines for the targets, printed and written to
``--out``/``results.md``; every number (raw times included) in ``--out``/``results.json``
(``scripts/harness.py``).

Targets: each of our methods (top-1) <= 1.15x a forward pass and no slower than LayerGradCam; top-5
maps >= 3x faster than LayerGradCam (5 calls) and >= 40x faster than IntegratedGradients (5 calls);
lower peak memory than LayerGradCam (top-1 and top-5); the maps of all 1000 classes (batch 4) <= 1.2x
a forward pass of the same batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from torch import Tensor, nn
from tqdm import tqdm

from lightning_interp.saliency import METHODS, FinalLayerSaliency, bilinear_upsample

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported by path (tests)
import harness

#: Short names of our methods, for the pass/fail lines.
SHORT = {"policy_gradient": "pg", "cam": "cam", "discriminative": "disc", "confusing": "conf"}
OURS = tuple(f"ours:{m}" for m in METHODS)
CAPTUM = ("captum:LayerGradCam", "captum:Saliency", "captum:IntegratedGradients")
FIRST_CALL = "ours:policy_gradient 1st call"
TOP_K = 5
#: The all-class rows: ours only (captum would need one call per class), plus upsampled policy-gradient maps.
ALL_CLASS = (*OURS, "ours:attribute_all", "ours:policy_gradient upsampled", "upsampling alone")
SECTIONS = ("top-k", "all-class", "scale")
#: Groups of calls (keys ``"<group>/<method>"``) by section; each group has its own forward pass.
GROUPS = {"top-k": ("top1", "top5"), "all-class": ("all",)}
#: The issue's bound on the all-class maps, in forward passes of the same batch.
ALL_CLASS_BOUND = 1.2
#: The extrapolation's target: images x classes of an ImageNet-scale audit.
EXTRAPOLATE = (50, 1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, "outputs/bench_saliency", seed="seed of the model's random weights and of the batches")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device, help="device to run on")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or CPU time of this process (cpu only)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (top-k section)")
    parser.add_argument("--all-batch-size", type=int, default=4, help="images per batch (all-class section)")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the model's head (all-class targets)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of every method (forward: one more) before timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per method (IntegratedGradients: --ig-repeats)")
    parser.add_argument("--ig-repeats", type=int, default=1, help="timed IntegratedGradients calls (top-1)")
    parser.add_argument(
        "--ig-top5-repeats",
        type=int,
        default=0,
        help="timed top-5 IntegratedGradients repeats (5 calls each); 0: 5 x top-1 estimate",
    )
    parser.add_argument("--ig-steps", type=int, default=50, help="IntegratedGradients n_steps")
    parser.add_argument("--internal-batch-size", type=int, default=16, help="IntegratedGradients internal_batch_size")
    parser.add_argument("--memory-jobs", type=int, default=2, help="memory-measurement processes run at a time (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--scale-images", type=int, default=1000, help="synthetic images of the scale section")
    parser.add_argument("--scale-classes", type=int, default=100, help="classes per image of the scale section")
    parser.add_argument("--scale-batch", type=int, default=50, help="images per call of the scale section")
    parser.add_argument(
        "--gpu-tflops", type=float, default=20.0, help="ASSUMED achieved float32 TFLOP/s of the GPU extrapolation"
    )
    parser.add_argument("--measure-memory", metavar="KEY", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--targets", default=None, help=argparse.SUPPRESS)
    quick = {"batch_size": 2, "all_batch_size": 2, "image_size": 64, "num_classes": 10, "warmup": 0, "repeats": 1, "ig_steps": 2}
    quick.update({"internal_batch_size": 4, "no_memory": True, "scale_images": 4, "scale_classes": 10, "scale_batch": 2})
    args = harness.parse(parser, argv, quick=quick)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    ints = ("batch_size", "all_batch_size", "image_size", "num_classes", "repeats", "ig_steps", "internal_batch_size")
    ints += ("memory_jobs",)
    for name in (*ints, "scale_images", "scale_classes", "scale_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "ig_repeats", "ig_top5_repeats"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time: use it with --device cpu")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.gpu_tflops <= 0:
        parser.error("--gpu-tflops must be > 0")
    args.sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    return args


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[nn.Module, Tensor]:
    """ResNet-50 with random weights (eval mode) and a random batch, both seeded."""
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50(weights=None, num_classes=args.num_classes).eval().to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed + 1))
    return model, x.to(args.device)


def build_all(args: argparse.Namespace, model: nn.Module) -> tuple[Tensor, Tensor]:
    """The all-class batch ``[all_batch_size, 3, S, S]`` (seeded) and its target: every class of the head."""
    x = torch.randn(
        args.all_batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed + 2)
    )
    num_classes = model.fc.out_features
    every = torch.arange(num_classes, device=args.device).expand(args.all_batch_size, num_classes)
    return x.to(args.device), every


def ig_memory_steps(args: argparse.Namespace) -> int:
    """``n_steps`` of one internal batch (captum puts ``internal_batch_size // N`` steps in each)."""
    return min(args.ig_steps, max(1, args.internal_batch_size // args.batch_size))


def first_call(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The first call of a new :class:`FinalLayerSaliency`: layer resolution + one map."""
    return FinalLayerSaliency(model).attribute(x, target=target, method="policy_gradient")


def make_calls(
    model: nn.Module,
    batches: dict[str, Tensor],
    saliency: FinalLayerSaliency,
    args: argparse.Namespace,
) -> dict[str, Callable[[], object]]:
    """Every benchmarked call, keyed ``"<top1|top5|all>/<method>"`` (the groups of ``args.sections``).

    ``batches``: ``x``, ``top5`` (top-k section) and ``x_all``, ``every`` (all-class section).
    """
    calls: dict[str, Callable[[], object]] = {}
    if "all-class" in args.sections:
        calls.update(all_class_calls(model, batches["x_all"], batches["every"], saliency))
    if "top-k" not in args.sections:
        return calls
    x, top5 = batches["x"], batches["top5"]
    top1 = top5[:, 0].contiguous()
    head = nn.Sequential(model, nn.LogSoftmax(dim=1)).eval()
    gradcam, sal, ig = LayerGradCam(head, model.layer4), Saliency(head), IntegratedGradients(head)
    ig_kw = {"n_steps": args.ig_steps, "internal_batch_size": args.internal_batch_size}

    def forward() -> Tensor:
        with torch.no_grad():
            return model(x)

    def each_target(fn: Callable[..., Tensor], **kw: Any) -> list[Tensor]:
        # detached: LayerGradCam's result carries the autograd graph of the whole forward pass (all saved
        # activations); five kept results would hold five graphs
        return [fn(x, target=top5[:, j], **kw).detach() for j in range(top5.shape[1])]

    calls["top1/forward"] = forward
    for group, target in (("top1", top1), ("top5", top5)):
        for m in METHODS:
            calls[f"{group}/ours:{m}"] = functools.partial(saliency.attribute, x, target=target, method=m)
        calls[f"{group}/ours:attribute_all"] = functools.partial(saliency.attribute_all, x, target=target)
    calls[f"top1/{FIRST_CALL}"] = functools.partial(first_call, model, x, top1)
    calls["top1/captum:LayerGradCam"] = functools.partial(gradcam.attribute, x, target=top1)
    calls["top1/captum:Saliency"] = functools.partial(sal.attribute, x, target=top1)
    calls["top1/captum:IntegratedGradients"] = functools.partial(ig.attribute, x, target=top1, **ig_kw)
    calls["top5/captum:LayerGradCam"] = functools.partial(each_target, gradcam.attribute)
    calls["top5/captum:Saliency"] = functools.partial(each_target, sal.attribute)
    calls["top5/captum:IntegratedGradients"] = functools.partial(each_target, ig.attribute, **ig_kw)
    # short IntegratedGradients calls (one internal batch) for warm-up and the memory measurement
    short = {**ig_kw, "n_steps": ig_memory_steps(args)}
    calls["ig-short/top1"] = functools.partial(ig.attribute, x, target=top1, **short)
    calls["ig-short/top5"] = functools.partial(each_target, ig.attribute, **short)
    return calls


def all_class_calls(model: nn.Module, x: Tensor, every: Tensor, saliency: FinalLayerSaliency) -> dict[str, Callable[[], object]]:
    """The all-class group: a forward pass of ``x`` and ONE call per method with the ``[N, K]`` target ``every``."""

    def forward() -> Tensor:
        with torch.no_grad():
            return model(x)

    calls: dict[str, Callable[[], object]] = {"all/forward": forward}
    for m in METHODS:
        calls[f"all/ours:{m}"] = functools.partial(saliency.attribute, x, target=every, method=m)
    calls["all/ours:attribute_all"] = functools.partial(saliency.attribute_all, x, target=every)
    calls["all/ours:policy_gradient upsampled"] = functools.partial(saliency.attribute, x, target=every, upsample=True)
    # the floor of any upsampled all-class maps: the one interpolation call that writes the [N, K, H, W] output
    feature_maps = torch.zeros(*every.shape, *saliency_map_size(model, x), device=x.device)
    calls["all/upsampling alone"] = functools.partial(bilinear_upsample, feature_maps, x.shape[-2:])
    return calls


def saliency_map_size(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """``(h, w)`` of the maps (the feature map that is pooled into ``fc``) for inputs shaped like ``x``."""
    with torch.no_grad():
        maps = FinalLayerSaliency(model).attribute(x[:1])
    return int(maps.shape[-2]), int(maps.shape[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: ``--clock``: wall time, or the CPU time of this process (all its threads), which other processes on a
#: busy machine inflate far less (with ``--threads 1`` nothing spins waiting for a preempted thread).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: str, clock: str = "wall") -> float:
    """Seconds of one call of ``fn`` on ``clock`` (``CLOCKS``)."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_mb() -> float:
    """``ru_maxrss`` in MB (kB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def measure_memory_here(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory increase (MB) of one call of ``key`` in this (fresh) process; see the module docstring."""
    model, x = build(args)
    x_all, every = build_all(args, model)
    rows = [[int(v) for v in row.split(",")] for row in args.targets.split(";")]
    top5 = torch.tensor(rows, device=args.device)
    saliency = FinalLayerSaliency(model)
    group, name = key.split("/", 1)
    tiny = torch.zeros(1, 3, 64, 64, device=args.device)
    if name.startswith("ours:") and name != FIRST_CALL:
        # resolves the layers on a tiny batch (one small no-grad forward); for the all-class group also the
        # recursive splits of every class, which later calls read from the cache
        saliency.attribute_all(tiny, target=every[:1] if group == "all" else None)
    elif name != FIRST_CALL:
        with torch.no_grad():
            model(tiny)  # the same small forward, for every method
    calls = make_calls(model, {"x": x, "top5": top5, "x_all": x_all, "every": every}, saliency, args)
    fn = calls[f"ig-short/{group}"] if name == "captum:IntegratedGradients" else calls[key]
    reset = False
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        how = "torch.cuda.max_memory_allocated"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident high-water mark (VmHWM) to the current RSS
            reset = True
        except OSError:
            pass
        rss = _status_kb("VmRSS")
        if reset and rss is not None:
            before = rss / 1024
            out = fn()
            peak = (_status_kb("VmHWM") or 0) / 1024
            how = "VmHWM after - VmRSS before (high-water mark reset)"
        else:
            before = _maxrss_mb()
            out = fn()
            peak = _maxrss_mb()
            how = "ru_maxrss after - ru_maxrss before"
    del out
    return {"key": key, "peak_mb": max(0.0, peak - before), "before_mb": before, "peak_abs_mb": peak, "how": how}


#: glibc: a fixed mmap threshold makes every allocation >= 64 KiB its own mapping, returned to the system
#: when freed, so the resident size follows the live tensors instead of glibc's heap caching.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
#: Imported once by the fork server; every measurement process is forked from it.
PRELOAD = ["torch", "torchvision", "captum.attr", "lightning_interp.saliency"]


def _memory_worker(job: tuple[str, argparse.Namespace]) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
    return measure_memory_here(*job)


def memory_subprocess(key: str, args: argparse.Namespace, targets: str) -> dict[str, Any]:
    """Fallback where ``forkserver`` is unavailable: a new interpreter running ``--measure-memory KEY``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory", key, "--targets", targets]
    cmd += ["--device", args.device, "--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
    cmd += ["--all-batch-size", str(args.all_batch_size), "--sections", ",".join(args.sections)]
    cmd += ["--num-classes", str(args.num_classes)]
    cmd += ["--ig-steps", str(args.ig_steps), "--internal-batch-size", str(args.internal_batch_size), "--seed", str(args.seed)]
    env = {**MALLOC_ENV, **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {key} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(keys: list[str], args: argparse.Namespace, top5: Tensor) -> dict[str, dict[str, Any]]:
    targets = ";".join(",".join(str(int(v)) for v in row) for row in top5.tolist())
    if args.device == "cuda":  # in process: the peak statistics are reset before each call
        args.targets = targets
        return {k: measure_memory_here(k, args) for k in tqdm(keys, desc="peak memory", unit="method")}
    results: dict[str, dict[str, Any]] = {}
    if "forkserver" not in multiprocessing.get_all_start_methods():
        with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
            futures = {pool.submit(memory_subprocess, k, args, targets): k for k in keys}
            for fut in tqdm(futures, desc="peak memory (subprocesses)", unit="method"):
                results[futures[fut]] = fut.result()
        return results
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update({k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()})  # inherited by the fork server
    child_args = argparse.Namespace(**{**vars(args), "targets": targets})
    try:
        with ctx.Pool(processes=args.memory_jobs, maxtasksperchild=1) as pool:  # a new process per method
            jobs = [(k, child_args) for k in keys]
            for res in tqdm(pool.imap_unordered(_memory_worker, jobs), total=len(jobs), desc="peak memory", unit="method"):
                results[res["key"]] = res
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def measure_time(
    calls: dict[str, Callable[[], object]], saliency: FinalLayerSaliency, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm-up, then round-robin timed repeats; raw times in seconds per key."""
    dev = args.device
    fast = [k for k in calls if not k.startswith("ig-short") and not k.endswith("IntegratedGradients")]
    repeats = {k: args.repeats for k in fast}
    if "top-k" in args.sections:
        repeats[f"top1/{FIRST_CALL}"] = min(3, args.repeats)  # a new FinalLayerSaliency each call
        repeats["top1/captum:IntegratedGradients"] = args.ig_repeats
        repeats["top5/captum:IntegratedGradients"] = args.ig_top5_repeats
    times: dict[str, list[float]] = {k: [] for k in repeats}

    forwards = [k for k in calls if k.endswith("/forward")]
    for _ in tqdm(range(args.warmup + 1), desc="warm-up forward", unit="call"):
        for k in forwards:
            timed(calls[k], dev, args.clock)
    # the first call of ours resolves the layers; with every class as target it also computes (and caches)
    # the recursive splits of every class
    for k in ("top1/ours:policy_gradient", "all/ours:attribute_all"):
        if k in calls:
            timed(calls[k], dev, args.clock)
    warm = [k for k in fast for _ in range(args.warmup) if not k.endswith(FIRST_CALL)]
    if "top-k" in args.sections and (args.ig_repeats or args.ig_top5_repeats):
        warm.append("ig-short/top1")
    for k in tqdm(warm, desc="warm-up methods", unit="call"):
        timed(calls[k], dev, args.clock)

    order = list(repeats)
    total = sum(repeats.values())
    with tqdm(total=total, desc="timed (round-robin)", unit="call") as bar:
        for r in range(max(repeats.values())):
            shift = r % len(order)
            for k in order[shift:] + order[:shift]:
                if len(times[k]) < repeats[k]:
                    bar.set_postfix_str(k)
                    times[k].append(timed(calls[k], dev, args.clock))
                    bar.update()
    resolved = {"feature_layer": saliency.feature_layer, "classifier": saliency.classifier}
    resolved["feature_transform"] = saliency.feature_transform
    return {"times": times, "resolved": resolved}


def measure_one_time_cost(model: nn.Module, x: Tensor, every: Tensor, args: argparse.Namespace) -> dict[str, float]:
    """The first call of a new :class:`FinalLayerSaliency` on the all-class batch, and its split part alone.

    Returns:
        ``first_call_s`` (resolution + recursive splits of every class on both sides + all four maps),
        ``splits_s`` (the splits alone, on another new instance) and ``splits_per_class_ms``.
    """
    first_call_s = timed(functools.partial(FinalLayerSaliency(model).attribute_all, x, target=every), args.device, args.clock)
    fresh, weight = FinalLayerSaliency(model), model.fc.weight
    classes = every[0]
    splits_s = sum(
        timed(functools.partial(fresh.class_chain_mask, classes, side, weight), args.device, args.clock) for side in "+-"
    )
    return {"first_call_s": first_call_s, "splits_s": splits_s, "splits_per_class_ms": 1000 * splits_s / classes.numel()}


# ---------------------------------------------------------------------------------------------
# the scale section: a reduced ImageNet-scale audit
# ---------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """FLOPs (``torch.utils.flop_counter``) of one image's forward pass and of one class task (one map)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = torch.zeros(1, 3, args.image_size, args.image_size, device=args.device)
    feats: dict[str, Tensor] = {}
    saliency = FinalLayerSaliency(model)
    saliency.resolve(one)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(one)
    with torch.no_grad():
        feats["a"] = saliency.attribute(one, method="cam")  # [1, h, w]
    d = model.fc.in_features
    h, w = feats["a"].shape[-2:]
    # one class task: a map sum_k g_k A_k (2 D h w) and g = W[c] - q W (D)
    return {"forward": float(counter.get_total_flops()), "task": float(2 * d * h * w + d), "map_hw": [int(h), int(w)]}


def measure_scale(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per image and per class task of all-class maps on synthetic images, and the extrapolation."""
    num = model.fc.out_features
    count = min(args.scale_classes, num)
    classes = torch.linspace(0, num - 1, count).round().long().to(args.device)  # spread over the head
    saliency = FinalLayerSaliency(model)
    gen = torch.Generator().manual_seed(args.seed + 3)
    dev = args.device
    saliency.resolve(torch.randn(1, 3, args.image_size, args.image_size, generator=gen).to(dev))
    # one-time: the recursive splits of the classes on both sides, cached, not part of the per-image cost
    weight = model.fc.weight
    split_s = sum(timed(functools.partial(saliency.class_chain_mask, classes, side, weight), dev, args.clock) for side in "+-")
    totals = {"forward": 0.0, "ours:policy_gradient": 0.0, "ours:attribute_all": 0.0}
    images = 0
    for start in tqdm(range(0, args.scale_images, args.scale_batch), desc="scale", unit="batch"):
        b = min(args.scale_batch, args.scale_images - start)
        x = torch.randn(b, 3, args.image_size, args.image_size, generator=gen).to(dev)
        target = classes.expand(b, count)

        def forward(x: Tensor = x) -> None:
            with torch.no_grad():
                model(x)

        calls = {
            "forward": forward,
            "ours:policy_gradient": functools.partial(saliency.attribute, x, target=target),
            "ours:attribute_all": functools.partial(saliency.attribute_all, x, target=target),
        }
        order = list(calls)
        shift = (start // args.scale_batch) % len(order)
        for name in order[shift:] + order[:shift]:
            totals[name] += timed(calls[name], dev, args.clock)
        images += b
    flops = count_flops(model, args)
    n_img, n_cls = EXTRAPOLATE
    fwd_per_image = totals["forward"] / images
    rows = []
    for name, total in totals.items():
        task = None if name == "forward" else (total - totals["forward"]) / (images * count)
        # a difference of two measured totals: on a noisy machine it can come out below zero (then 0 is used)
        cpu = None if task is None else n_img * (fwd_per_image + n_cls * max(task, 0.0)) + n_cls * split_s / count
        rows.append(
            {
                "method": name,
                "images": images,
                "classes": count,
                "total_s": total,
                "per_image_s": total / images,
                "per_task_ms": None if task is None else 1000 * task,
                "time_ratio": total / totals["forward"],
                "extrapolated_cpu_s": cpu,
            }
        )
    rate = args.gpu_tflops * 1e12
    gpu_s = n_img * (flops["forward"] + n_cls * flops["task"]) / rate
    return {
        "rows": rows,
        "split_s": split_s,
        "split_per_class_ms": 1000 * split_s / count,
        "flops": flops,
        "cpu_rate_tflops": flops["forward"] * images / totals["forward"] / 1e12,
        "gpu_tflops_assumed": args.gpu_tflops,
        "gpu_extrapolated_s": gpu_s,
        "extrapolate": list(EXTRAPOLATE),
    }


def scale_text(scale: dict[str, Any], device: str) -> str:
    """The scale table, the one-time cost and the labelled extrapolations."""
    n_img, n_cls = scale["extrapolate"]
    head = [
        "method",
        "images",
        "classes",
        "total s",
        "s / image",
        "ms / class task",
        "x forward",
        f"{n_img} x {n_cls} on this {device} (s)",
    ]
    rows = [
        [
            r["method"],
            r["images"],
            r["classes"],
            f"{r['total_s']:.2f}",
            f"{r['per_image_s']:.4f}",
            _fmt(r["per_task_ms"], ".4f"),
            f"{r['time_ratio']:.3f}x",
            _fmt(r["extrapolated_cpu_s"], ".1f"),
        ]
        for r in scale["rows"]
    ]
    pg = next(r for r in scale["rows"] if r["method"] == "ours:policy_gradient")
    f = scale["flops"]
    lines = [
        harness.markdown_table(head, rows, align="lrrrrrrr"),
        "",
        f"One-time: the recursive splits of the {pg['classes']} classes on both sides, {scale['split_s']:.3f} s "
        f"(t_split = {scale['split_per_class_ms']:.3f} ms per class), cached per class afterwards.",
        f"Extrapolation to {n_img} images x {n_cls} classes on this {device} (policy_gradient; t_task below 0, "
        f"noise, counts as 0): {n_img} x (T_forward / image + {n_cls} x t_task) + {n_cls} x t_split = "
        f"{n_img} x ({pg['per_image_s'] / pg['time_ratio']:.4f} + {n_cls} x {max(pg['per_task_ms'], 0.0) / 1000:.2e}) + "
        f"{n_cls} x {scale['split_per_class_ms'] / 1000:.2e} = {pg['extrapolated_cpu_s']:.1f} s.",
        f"GPU: EXTRAPOLATION, not a measurement: T_gpu = {n_img} x (F_forward + {n_cls} x F_task) / R_gpu with "
        f"F_forward = {f['forward'] / 1e9:.2f} GFLOP / image and F_task = {f['task'] / 1e6:.3f} MFLOP (counted here, "
        f"map {f['map_hw'][0]}x{f['map_hw'][1]}), R_gpu = {scale['gpu_tflops_assumed']:g} TFLOP/s ASSUMED achieved float32 "
        f"(this machine achieved {scale['cpu_rate_tflops'] * 1000:.0f} GFLOP/s on the forward pass): "
        f"{scale['gpu_extrapolated_s']:.3f} s, kernel launches and transfers ignored.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


#: The forward pass each group's ratios are taken against.
BASELINE = {"top1": "top1/forward", "top5": "top1/forward", "all": "all/forward"}


def build_rows(timing: dict[str, Any], memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    times = timing["times"]
    rows = []
    names = {"top1": ["forward", *OURS, "ours:attribute_all", FIRST_CALL, *CAPTUM]}
    names["top5"] = names["top1"]
    names["all"] = ["forward", *ALL_CLASS]
    for group, group_names in names.items():
        if BASELINE[group] not in times:
            continue
        fwd_t = statistics.median(times[BASELINE[group]])
        fwd_m = memory.get(BASELINE[group], {}).get("peak_mb")
        for name in group_names:
            key = f"{group}/{name}"
            if key not in times:
                continue
            estimated = False
            if times[key]:
                raw, median = times[key], statistics.median(times[key])
            elif name == "captum:IntegratedGradients" and times["top1/captum:IntegratedGradients"]:
                raw, median, estimated = [], TOP_K * statistics.median(times["top1/captum:IntegratedGradients"]), True
            else:
                raw, median = [], None
            mem = memory.get(key, {}).get("peak_mb")
            calls = TOP_K if (group == "top5" and name.startswith("captum:")) else 1
            rows.append(
                {
                    "group": group,
                    "method": name,
                    "calls": calls,
                    "repeats": len(raw),
                    "estimated": estimated,
                    "median_ms": None if median is None else 1000 * median,
                    "min_ms": min(raw) * 1000 if raw else None,
                    "max_ms": max(raw) * 1000 if raw else None,
                    "time_ratio": None if median is None else median / fwd_t,
                    "peak_mb": mem,
                    "mem_ratio": None if mem is None or not fwd_m else mem / fwd_m,
                    "raw_s": raw,
                }
            )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["maps", "method", "calls", "repeats", "median ms", "min-max ms", "x forward (time)", "peak MB", "x forward (mem)"]
    cells = []
    for r in rows:
        est = " (est.)" if r["estimated"] else ""
        spread = "-" if r["min_ms"] is None else f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
        cells.append(
            [
                r["group"],
                r["method"],
                r["calls"],
                r["repeats"] if not r["estimated"] else "-",
                f"{_fmt(r['median_ms'], '.1f')}{est}",
                spread,
                f"{_fmt(r['time_ratio'], '.2f')}x{est}",
                _fmt(r["peak_mb"], ".1f"),
                "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}x",
            ]
        )
    return harness.markdown_table(head, cells, align="llrrrrrrr")


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass/fail of the issues' targets, each over our four methods (for the sections that ran)."""
    by = {(r["group"], r["method"]): r for r in rows}

    def ratio(group: str, num: str, den: str, field: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for m in METHODS:
            a, b = by[(group, num.format(m=m))].get(field), by[(group, den.format(m=m))].get(field)
            out[m] = None if a is None or b is None or b == 0 else a / b
        return out

    specs = []
    if ("top1", "forward") in by:
        specs += [
            ("top-1 time <= 1.15x forward", ratio("top1", "ours:{m}", "forward", "median_ms"), "<=", 1.15, "x forward"),
            (
                "top-1 no slower than LayerGradCam",
                ratio("top1", "ours:{m}", "captum:LayerGradCam", "median_ms"),
                "<=",
                1.0,
                "x LayerGradCam",
            ),
            (
                "top-5 >= 3x faster than LayerGradCam (5 calls)",
                ratio("top5", "captum:LayerGradCam", "ours:{m}", "median_ms"),
                ">=",
                3.0,
                "x faster",
            ),
            (
                "top-5 >= 40x faster than IntegratedGradients (5 calls)"
                + (" [IG top-5 estimated as 5 x top-1]" if by[("top5", "captum:IntegratedGradients")]["estimated"] else ""),
                ratio("top5", "captum:IntegratedGradients", "ours:{m}", "median_ms"),
                ">=",
                40.0,
                "x faster",
            ),
            (
                "top-1 lower peak memory than LayerGradCam",
                ratio("top1", "ours:{m}", "captum:LayerGradCam", "peak_mb"),
                "<",
                1.0,
                "x LayerGradCam",
            ),
            (
                "top-5 lower peak memory than LayerGradCam (5 calls)",
                ratio("top5", "ours:{m}", "captum:LayerGradCam", "peak_mb"),
                "<",
                1.0,
                "x LayerGradCam",
            ),
        ]
    if ("all", "forward") in by:
        specs.append(
            (
                f"all-class maps (one call) <= {ALL_CLASS_BOUND}x a forward pass of the same batch",
                ratio("all", "ours:{m}", "forward", "median_ms"),
                "<=",
                ALL_CLASS_BOUND,
                "x forward",
            )
        )
    results = []
    for label, values, op, bound, unit in specs:
        ok = {
            m: None if v is None else (v <= bound if op == "<=" else v >= bound if op == ">=" else v < bound)
            for m, v in values.items()
        }
        status = "n/a" if any(v is None for v in ok.values()) else "PASS" if all(ok.values()) else "FAIL"
        results.append({"target": label, "status": status, "values": values, "passed": ok, "unit": unit})
    return results


def format_targets(results: list[dict[str, Any]]) -> str:
    lines = []
    for t in results:
        vals = ", ".join(
            f"{SHORT[m]} {'-' if v is None else f'{v:.2f}'}{'' if t['passed'][m] in (True, None) else ' (fail)'}"
            for m, v in t["values"].items()
        )
        lines.append(f"[{t['status']}] {t['target']}: {vals} ({t['unit']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
    if args.measure_memory is not None:  # child process of the CPU memory measurement
        print(json.dumps(measure_memory_here(args.measure_memory, args)))
        return {}
    run = harness.start(args)
    model, x = build(args)
    x_all, every = build_all(args, model)
    with torch.no_grad():
        top5 = model(x).topk(TOP_K, dim=1).indices
    saliency = FinalLayerSaliency(model)
    calls = make_calls(model, {"x": x, "top5": top5, "x_all": x_all, "every": every}, saliency, args)
    phases = {"setup_s": run.seconds()}
    one_time = measure_one_time_cost(model, x_all, every, args) if "all-class" in args.sections else None
    timing = measure_time(calls, saliency, args) if calls else {"times": {}, "resolved": {}}
    phases["timing_s"] = run.seconds() - phases["setup_s"]
    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory and timing["times"]:
        memory = measure_memory(list(timing["times"]), args, top5)
    phases["memory_s"] = run.seconds() - phases["setup_s"] - phases["timing_s"]
    scale = measure_scale(model, args) if "scale" in args.sections else None
    phases["scale_s"] = run.seconds() - sum(phases.values())
    rows = build_rows(timing, memory)
    targets = check_targets(rows)
    machine = run.stop()

    config = {
        **harness.config(args),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "batch": [args.batch_size, 3, args.image_size, args.image_size],
        "all_class_batch": list(every.shape),
        "ig_memory_steps": ig_memory_steps(args),
        "resolved": timing["resolved"],
        "phases_s": phases,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    header = (
        f"ResNet-50 (random weights, eval), {args.device} ({config['device_name']}, {machine['threads']} threads), "
        f"torch {torch.__version__}; times on the {args.clock} clock"
        + (" (CPU seconds of this process, all threads)" if args.clock == "cpu" else "")
        + f"; median of {args.repeats} round-robin repeats; ratios to the plain no-grad forward "
        f"pass of the same batch. Load average start/end: {harness.fmt_load(machine['loadavg_start'])} / "
        f"{harness.fmt_load(machine['loadavg_end'])}. Wall time {machine['wall_s']:.0f} s "
        f"(setup {phases['setup_s']:.0f}, timing {phases['timing_s']:.0f}, memory {phases['memory_s']:.0f}, "
        f"scale {phases['scale_s']:.0f})."
    )
    parts = [header]
    memory_note = "Peak memory: increase during one call" + (
        " (new process per method, VmHWM after - VmRSS before, MALLOC_MMAP_THRESHOLD_=65536)."
        if args.device == "cpu"
        else " (cuda max_memory_allocated)."
    )
    if args.no_memory:
        memory_note = "Peak memory: not measured (--no-memory)."
    if "top-k" in args.sections:
        parts.append(
            f"## Top-1 / top-5 maps (batch {config['batch']})\n\n"
            f"IntegratedGradients: {args.ig_repeats} repeat(s), n_steps={args.ig_steps}, "
            f"internal_batch_size={args.internal_batch_size}; captum on log_softmax(logits), LayerGradCam at layer4, "
            f"top-5 = 5 captum calls (results detached). '{FIRST_CALL}': the first call of a new FinalLayerSaliency, "
            f"which also resolves the layers (one-time cost; {min(3, args.repeats)} repeats). {memory_note} "
            f"IntegratedGradients' peak with n_steps={ig_memory_steps(args)} (independent of n_steps).\n\n"
            + markdown_table([r for r in rows if r["group"] != "all"])
        )
    if "all-class" in args.sections and one_time is not None:
        parts.append(
            f"## All-class maps (batch {list(x_all.shape)}, target {list(every.shape)}: every class, one call)\n\n"
            f"{memory_note} One-time cost of a new FinalLayerSaliency (not in the table): first all-class "
            f"attribute_all {one_time['first_call_s']:.2f} s, of which the recursive splits of all {every.shape[1]} classes "
            f"on both sides {one_time['splits_s']:.2f} s ({one_time['splits_per_class_ms']:.2f} ms per class), cached "
            f"per class afterwards.\n\n" + markdown_table([r for r in rows if r["group"] == "all"])
        )
    if scale is not None:
        parts.append(
            f"## Reduced ImageNet scale ({args.scale_images} synthetic {args.image_size}x{args.image_size} images in "
            f"batches of {args.scale_batch}, maps of {scale['rows'][0]['classes']} classes each)\n\n"
            + scale_text(scale, args.device)
        )
    if targets:
        parts.append("Targets:\n" + format_targets(targets))
    text = "\n\n".join(parts)
    print("\n" + text)
    result = {"config": config, "machine": machine, "rows": rows, "targets": targets, "memory": memory}
    result.update({"one_time": one_time, "scale": scale})
    return harness.write_results(args.out, text, result)


if __name__ == "__main__":
    main()
