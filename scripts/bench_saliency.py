"""Benchmark FinalLayerSaliency against a plain forward pass and captum baselines (time and peak memory).

Run (from the repository root)::

    .venv/bin/python scripts/bench_saliency.py

(defaults: ``--batch-size 8 --image-size 224 --warmup 1 --repeats 7 --ig-repeats 1 --ig-top5-repeats 0
--ig-steps 50 --internal-batch-size 16 --seed 0 --out outputs/bench_saliency``, ``--device`` cuda if
available else cpu, torch's default thread count).

Setup: torchvision ResNet-50 with random weights (``torch.manual_seed(seed)``; no download) in eval
mode, one random batch ``[8, 3, 224, 224]``. The targets are the model's predicted classes (top-1,
``[N]``) and its five highest-scoring classes (top-5, ``[N, 5]``), computed once; every method gets
them explicitly.

Measured, per method:

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

Wall time: ``time.perf_counter`` (``torch.cuda.synchronize`` on CUDA); ``--warmup`` untimed calls of
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

Outputs: a markdown table (absolute median ms and peak MB, ratios to the forward pass) and pass/fail
lines for the targets, printed and written to ``--out``/``results.md``; every number (raw times
included) in ``--out``/``results.json``.

Targets: each of our methods (top-1) <= 1.15x a forward pass and no slower than LayerGradCam; top-5
maps >= 3x faster than LayerGradCam (5 calls) and >= 40x faster than IntegratedGradients (5 calls);
lower peak memory than LayerGradCam (top-1 and top-5).
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

from lightning_interp.saliency import METHODS, FinalLayerSaliency

#: Short names of our methods, for the pass/fail lines.
SHORT = {"policy_gradient": "pg", "cam": "cam", "discriminative": "disc", "confusing": "conf"}
OURS = tuple(f"ours:{m}" for m in METHODS)
CAPTUM = ("captum:LayerGradCam", "captum:Saliency", "captum:IntegratedGradients")
FIRST_CALL = "ours:policy_gradient 1st call"
TOP_K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device, help="device to run on")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width")
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's random weights and of the batch")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_saliency"), help="output folder")
    parser.add_argument("--measure-memory", metavar="KEY", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--targets", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    for name in ("batch_size", "image_size", "repeats", "ig_steps", "internal_batch_size", "memory_jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "ig_repeats", "ig_top5_repeats"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[nn.Module, Tensor]:
    """ResNet-50 with random weights (eval mode) and a random batch, both seeded."""
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50(weights=None).eval().to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed + 1))
    return model, x.to(args.device)


def ig_memory_steps(args: argparse.Namespace) -> int:
    """``n_steps`` of one internal batch (captum puts ``internal_batch_size // N`` steps in each)."""
    return min(args.ig_steps, max(1, args.internal_batch_size // args.batch_size))


def first_call(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The first call of a new :class:`FinalLayerSaliency`: layer resolution + one map."""
    return FinalLayerSaliency(model).attribute(x, target=target, method="policy_gradient")


def make_calls(
    model: nn.Module, x: Tensor, top1: Tensor, top5: Tensor, saliency: FinalLayerSaliency, args: argparse.Namespace
) -> dict[str, Callable[[], object]]:
    """Every benchmarked call, keyed ``"<top1|top5>/<method>"``."""
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

    calls: dict[str, Callable[[], object]] = {"top1/forward": forward}
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


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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
    rows = [[int(v) for v in row.split(",")] for row in args.targets.split(";")]
    top5 = torch.tensor(rows, device=args.device)
    saliency = FinalLayerSaliency(model)
    group, name = key.split("/", 1)
    tiny = torch.zeros(1, 3, 64, 64, device=args.device)
    if name.startswith("ours:") and name != FIRST_CALL:
        saliency.attribute(tiny)  # resolves the layers on a tiny batch (one small no-grad forward)
    elif name != FIRST_CALL:
        with torch.no_grad():
            model(tiny)  # the same small forward, for every method
    calls = make_calls(model, x, top5[:, 0], top5, saliency, args)
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
    repeats[f"top1/{FIRST_CALL}"] = min(3, args.repeats)  # a new FinalLayerSaliency each call
    repeats["top1/captum:IntegratedGradients"] = args.ig_repeats
    repeats["top5/captum:IntegratedGradients"] = args.ig_top5_repeats
    times: dict[str, list[float]] = {k: [] for k in repeats}

    for _ in tqdm(range(args.warmup + 1), desc="warm-up forward", unit="call"):
        timed(calls["top1/forward"], dev)
    timed(calls["top1/ours:policy_gradient"], dev)  # the first call of ours resolves the layers
    warm = [k for k in fast for _ in range(args.warmup) if not k.endswith(FIRST_CALL)]
    if args.ig_repeats or args.ig_top5_repeats:
        warm.append("ig-short/top1")
    for k in tqdm(warm, desc="warm-up methods", unit="call"):
        timed(calls[k], dev)

    order = list(repeats)
    total = sum(repeats.values())
    with tqdm(total=total, desc="timed (round-robin)", unit="call") as bar:
        for r in range(max(repeats.values())):
            shift = r % len(order)
            for k in order[shift:] + order[:shift]:
                if len(times[k]) < repeats[k]:
                    bar.set_postfix_str(k)
                    times[k].append(timed(calls[k], dev))
                    bar.update()
    resolved = {"feature_layer": saliency.feature_layer, "classifier": saliency.classifier}
    resolved["feature_transform"] = saliency.feature_transform
    return {"times": times, "resolved": resolved}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def build_rows(timing: dict[str, Any], memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    times = timing["times"]
    fwd_t = statistics.median(times["top1/forward"])
    fwd_m = memory.get("top1/forward", {}).get("peak_mb")
    rows = []
    names = ["forward", *OURS, "ours:attribute_all", FIRST_CALL, *CAPTUM]
    for group in ("top1", "top5"):
        for name in names:
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
    head = "| maps | method | calls | repeats | median ms | min-max ms | x forward (time) | peak MB | x forward (mem) |"
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        est = " (est.)" if r["estimated"] else ""
        spread = "-" if r["min_ms"] is None else f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
        lines.append(
            f"| {r['group']} | {r['method']} | {r['calls']} | {r['repeats'] if not r['estimated'] else '-'} | "
            f"{_fmt(r['median_ms'], '.1f')}{est} | {spread} | {_fmt(r['time_ratio'], '.2f')}x{est} | "
            f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['mem_ratio'], '.2f')}x |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass/fail of the issue's targets, each over our four methods."""
    by = {(r["group"], r["method"]): r for r in rows}

    def ratio(group: str, num: str, den: str, field: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for m in METHODS:
            a, b = by[(group, num.format(m=m))].get(field), by[(group, den.format(m=m))].get(field)
            out[m] = None if a is None or b is None or b == 0 else a / b
        return out

    specs = [
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
            "top-5 >= 40x faster than IntegratedGradients (5 calls)",
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
    if by[("top5", "captum:IntegratedGradients")]["estimated"]:
        specs[3] = (specs[3][0] + " [IG top-5 estimated as 5 x top-1]", *specs[3][1:])
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
    start = time.perf_counter()
    load_start = os.getloadavg()
    model, x = build(args)
    with torch.no_grad():
        top5 = model(x).topk(TOP_K, dim=1).indices
    top1 = top5[:, 0].contiguous()
    saliency = FinalLayerSaliency(model)
    calls = make_calls(model, x, top1, top5, saliency, args)
    phases = {"setup_s": time.perf_counter() - start}
    timing = measure_time(calls, saliency, args)
    phases["timing_s"] = time.perf_counter() - start - phases["setup_s"]
    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        memory = measure_memory(list(timing["times"]), args, top5)
    phases["memory_s"] = time.perf_counter() - start - phases["setup_s"] - phases["timing_s"]
    rows = build_rows(timing, memory)
    targets = check_targets(rows)
    wall = time.perf_counter() - start

    config = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "batch": [args.batch_size, 3, args.image_size, args.image_size],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ig_repeats": args.ig_repeats,
        "ig_top5_repeats": args.ig_top5_repeats,
        "ig_steps": args.ig_steps,
        "ig_memory_steps": ig_memory_steps(args),
        "internal_batch_size": args.internal_batch_size,
        "seed": args.seed,
        "resolved": timing["resolved"],
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": wall,
        "phases_s": phases,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    header = (
        f"ResNet-50 (random weights, eval), batch {config['batch']}, {args.device} ({config['device_name']}, "
        f"{config['threads']} threads), torch {torch.__version__}; median of {args.repeats} round-robin repeats "
        f"(IntegratedGradients: {args.ig_repeats}, n_steps={args.ig_steps}, internal_batch_size={args.internal_batch_size}); "
        f"captum on log_softmax(logits), LayerGradCam at layer4, top-5 = 5 captum calls (results detached); "
        f"ratios to the plain no-grad forward pass (top-1 row). "
        f"Peak memory: increase during one call"
        + (
            " (new process per method, VmHWM after - VmRSS before, MALLOC_MMAP_THRESHOLD_=65536)"
            if args.device == "cpu"
            else " (cuda max_memory_allocated)"
        )
        + f", IntegratedGradients with n_steps={ig_memory_steps(args)} (peak independent of n_steps). "
        f"'{FIRST_CALL}': the first call of a new FinalLayerSaliency, which also resolves the layers "
        f"(one-time cost; {min(3, args.repeats)} repeats). "
        f"Load average start/end: {load_start[0]:.2f}/{config['loadavg_end'][0]:.2f}. Wall time {wall:.0f} s "
        f"(setup {phases['setup_s']:.0f}, timing {phases['timing_s']:.0f}, memory {phases['memory_s']:.0f})."
    )
    text = "\n\n".join([header, markdown_table(rows), "Targets:\n" + format_targets(targets)])
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    result = {"config": config, "rows": rows, "targets": targets, "memory": memory}
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
