"""Benchmark of the contrastive losses, CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023), against
open_clip's ``ClipLoss`` / ``SigLipLoss``: loss forward + backward time and memory, side by side in the
same run.

One device, per batch size (the goal on GPU: batch 262,144 in <= 4 GiB extra for both losses, clipforge
faster at 65,536):
    python scripts/benchmark_loss.py --device cuda
    python scripts/benchmark_loss.py --batches 1024 2048 --dim 64 --device cpu

Several processes on CPU (gloo), per world size ``W`` and local batch: clipforge's ``ring`` and ``gather``
(the ring of CLIP after Inf-CL, Wang et al., 2024) against open_clip's ``ClipLoss(local_loss=True,
gather_with_grad=True)`` and ``SigLipLoss`` (its default ``bidir`` exchange):
    python scripts/benchmark_loss.py --world-sizes 2 4 8 --batches 512 1024 --dim 256

Prints one JSON object per measurement, then a table. "Extra" memory is ``max_memory_allocated`` during
forward + backward minus what was allocated before (inputs), so it includes the returned gradients. On CPU
it is not measured; ``saved_mib`` (bytes autograd saves for backward, from a separate forward under
``saved_tensors_hooks``) is reported on every device. A run that runs out of memory is marked ``oom``.
With several processes, time is the slowest rank's median and ``saved_mib`` the largest of any rank; each
process uses one thread, so ``W`` above the number of cores shares them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from clipforge.bench.args import device_name, non_negative_int, positive_int
from clipforge.losses.clip import ClipLoss
from clipforge.losses.siglip import SigLipLoss
from clipforge.losses.tiled import use_tiled

MIB = 2**20
DEFAULT_BATCHES = [8192, 16384, 32768, 65536, 131072, 262144]
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=positive_int, nargs="+", default=DEFAULT_BATCHES)
    ap.add_argument("--dim", type=positive_int, default=768)
    ap.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    ap.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--impl", default="auto", choices=["auto", "dense", "tiled"], help="clipforge's impl")
    ap.add_argument("--tile-size", type=positive_int, default=8192)
    ap.add_argument(
        "--repeats", type=positive_int, default=3, help="timed runs per measurement (median reported)"
    )
    ap.add_argument("--warmup", type=non_negative_int, default=1)
    ap.add_argument("--no-open-clip", action="store_true", help="measure clipforge only")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (both implementations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--world-sizes",
        type=positive_int,
        nargs="+",
        help="run W gloo processes on CPU for each W; --batches are then local batches (per process)",
    )
    args = ap.parse_args(argv)
    if args.world_sizes and args.device != "cpu":
        ap.error("--world-sizes runs gloo processes on CPU: use --device cpu")
    return args


def open_clip_loss_module() -> ModuleType:
    """open_clip's own ``loss.py``, loaded from the installed package without running
    ``open_clip/__init__.py`` (which imports timm and transformers: seconds per spawned process)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open_clip is not installed"
    path = os.path.join(next(iter(spec.submodule_search_locations)), "loss.py")
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def _drop_bias(fn: Callable[..., Tensor]) -> LossFn:
    return lambda x, y, scale, bias: fn(x, y, scale)


def loss_fns(loss: str, args: argparse.Namespace, rank: int = 0, world: int = 1) -> dict[str, LossFn]:
    """``{name: fn}``, each ``fn(image_features, text_features, scale, bias)``: ``clipforge`` and
    ``open_clip`` on one device; with ``world > 1`` clipforge's ``ring`` and ``gather`` and open_clip's
    distributed loss (``ClipLoss(local_loss=True, gather_with_grad=True)`` or ``SigLipLoss``)."""
    cls = ClipLoss if loss == "clip" else SigLipLoss
    impls = ["ring", "gather"] if world > 1 else ["ring"]  # one device: no exchange, dist_impl unused
    fns: dict[str, LossFn] = {}
    for dist_impl in impls:
        ours = cls(impl=args.impl, dist_impl=dist_impl, tile_size=args.tile_size)
        name = f"clipforge-{dist_impl}" if world > 1 else "clipforge"
        fns[name] = ours if loss == "siglip" else _drop_bias(ours)
    if not args.no_open_clip:
        oc = open_clip_loss_module()
        kw = {"rank": rank, "world_size": world}
        if loss == "clip":
            dist_kw = {"local_loss": True, "gather_with_grad": True} if world > 1 else {}
            fns["open_clip"] = _drop_bias(oc.ClipLoss(**dist_kw, **kw))
        else:
            fns["open_clip"] = oc.SigLipLoss(**kw)
    return fns


def make_inputs(batch: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """Unit features (as the model hands them to the loss), the exponentiated scale and the bias."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return [x, y, scale, bias]


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate" in msg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def step(fn: LossFn, inputs: list[Tensor]) -> None:
    """One forward + backward (gradients of every input that requires them)."""
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad], allow_unused=True)
    del loss, grads


def measure(fn: LossFn, inputs: list[Tensor], repeats: int, warmup: int) -> dict[str, Any]:
    """Median forward + backward time, peak extra memory (CUDA) and bytes saved for backward."""
    device = inputs[0].device
    out: dict[str, Any] = {"status": "ok", "time_ms": None, "peak_extra_mib": None, "saved_mib": None}
    try:
        for _ in range(warmup):
            step(fn, inputs)
        times = []
        for _ in range(repeats):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step(fn, inputs)
            _sync(device)
            times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - base) / MIB  # the largest over the repeats
                out["peak_extra_mib"] = max(peak, out["peak_extra_mib"] or 0.0)
        out["time_ms"] = 1e3 * statistics.median(times)
        out["saved_mib"] = saved_bytes(lambda: fn(*inputs)) / MIB
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        out["status"] = "oom"
    _free(device)
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every (loss, batch, implementation); print JSON lines, then the table. Returns the rows."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    rows = []
    for loss in args.losses:
        fns = loss_fns(loss, args)
        for batch in args.batches:
            inputs = make_inputs(batch, args.dim, device, dtype, args.seed)
            for name, fn in fns.items():
                row = {"loss": loss, "impl": name, "batch": batch, "dim": args.dim, "device": device.type}
                row |= {"dtype": args.dtype, **measure(fn, inputs, args.repeats, args.warmup)}
                if name == "clipforge":
                    row["path"] = "tiled" if use_tiled(args.impl, batch, batch, args.tile_size) else "dense"
                print(json.dumps(row), flush=True)
                rows.append(row)
            del inputs
            _free(device)
    print(format_table(rows))
    return rows


def _cell(row: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"].upper()
    return "-" if row[key] is None else f"{row[key]:.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (loss, batch): time and memory of both implementations and open_clip's time / ours."""
    mem = "peak_extra_mib" if any(r["peak_extra_mib"] is not None for r in rows) else "saved_mib"
    head = f"{'loss':<7}{'batch':>8}{'path':>7} | {'clipforge ms':>13}{mem:>16} | {'open_clip ms':>13}{mem:>16} | speedup"
    lines = [head, "-" * len(head)]
    keys = sorted({(r["loss"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for loss, batch in keys:
        ours = next(
            (r for r in rows if (r["loss"], r["batch"], r["impl"]) == (loss, batch, "clipforge")), None
        )
        theirs = next(
            (r for r in rows if (r["loss"], r["batch"], r["impl"]) == (loss, batch, "open_clip")), None
        )
        speedup = "-"
        if ours and theirs and ours["status"] == theirs["status"] == "ok":
            speedup = f"{theirs['time_ms'] / ours['time_ms']:.2f}x"
        path = ours.get("path", "-") if ours else "-"
        lines.append(
            f"{loss:<7}{batch:>8}{path:>7} | {_cell(ours, 'time_ms'):>13}{_cell(ours, mem):>16} | "
            f"{_cell(theirs, 'time_ms'):>13}{_cell(theirs, mem):>16} | {speedup}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ several CPU processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, worlds: list[int], ports: list[int], out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # W processes share the cores; more threads each would only contend
    for world, port in zip(worlds, ports):
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
            torch.save(result, os.path.join(out_dir, f"w{world}_rank{rank}.pt"))
        finally:
            dist.destroy_process_group()


def run_distributed(fn: Callable, worlds: list[int], *args: Any) -> dict[int, list[Any]]:
    """``{W: [fn(rank, W, *args) for rank in range(W)]}`` for each world size ``W``, in CPU processes
    joined by gloo.

    One start of ``max(worlds)`` processes serves every world size (each start costs seconds of imports on
    a shared CPU): for each ``W`` in turn, the first ``W`` processes form a fresh default
    process group. ``fn`` must be importable (module level); results travel back through ``torch.save``.
    """
    # forkserver: fresh processes as with spawn (no inherited threads or process-group state), but torch
    # and the worker's module are imported once in the server rather than once per rank.
    mp.set_forkserver_preload([fn.__module__])
    with tempfile.TemporaryDirectory() as out_dir:
        ports = [free_port() for _ in worlds]
        mp.start_processes(
            _entry, args=(fn, worlds, ports, out_dir, args), nprocs=max(worlds), start_method="forkserver"
        )
        return {w: [torch.load(os.path.join(out_dir, f"w{w}_rank{r}.pt")) for r in range(w)] for w in worlds}


def _dist_worker(rank: int, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (loss, local batch, implementation) on this rank, with this rank's time of every step."""
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    # open_clip gathers with torch.distributed.nn.all_gather, which warns once per process and step
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    rows = []
    for loss in args.losses:
        fns = loss_fns(loss, args, rank, world)
        for batch in args.batches:
            inputs = make_inputs(batch, args.dim, device, dtype, args.seed + rank)
            # The implementations take turns, step by step, so that a change of load on a shared machine
            # falls on all of them alike; every step starts on all ranks together.
            times: dict[str, list[float]] = {name: [] for name in fns}
            for repeat in range(args.warmup + args.repeats):
                for name, fn in fns.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    step(fn, inputs)
                    if repeat >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            for name, fn in fns.items():
                saved = saved_bytes(partial(fn, *inputs)) / MIB
                rows.append(
                    {"loss": loss, "impl": name, "batch": batch, "times": times[name], "saved_mib": saved}
                )
    return rows


def run_multiprocess(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``run`` for ``--world-sizes``: one row per (loss, W, local batch, implementation) with the median
    over steps of the slowest rank's time and the largest rank's saved bytes; prints JSON lines after each
    W, then the table."""
    rows = []
    for world in args.world_sizes:
        per_rank = run_distributed(_dist_worker, [world], args)[world]
        for measured in zip(*per_rank):  # the same measurement on every rank
            first = measured[0]
            slowest = [max(ts) for ts in zip(*(m["times"] for m in measured))]
            row = {"loss": first["loss"], "impl": first["impl"], "world": world, "batch": first["batch"]}
            row |= {"global_batch": world * first["batch"], "dim": args.dim, "device": "cpu"}
            row |= {"dtype": args.dtype, "status": "ok", "peak_extra_mib": None}
            row |= {
                "time_ms": 1e3 * statistics.median(slowest),
                "saved_mib": max(m["saved_mib"] for m in measured),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(format_multiprocess_table(rows))
    return rows


DIST_COLUMNS = ["clipforge-ring", "clipforge-gather", "open_clip"]


def format_multiprocess_table(rows: list[dict[str, Any]]) -> str:
    """One line per (loss, W, local batch): time and saved MiB per rank of each implementation."""
    head = f"{'loss':<7}{'W':>3}{'batch':>7}{'global':>8}"
    for name in DIST_COLUMNS:
        head += f" | {name + ' ms':>21}{'saved MiB':>10}"
    head += " | gather/ring time"
    lines = [head, "-" * len(head)]
    keys = sorted({(r["loss"], r["world"], r["batch"]) for r in rows})
    for loss, world, batch in keys:
        found = {r["impl"]: r for r in rows if (r["loss"], r["world"], r["batch"]) == (loss, world, batch)}
        line = f"{loss:<7}{world:>3}{batch:>7}{world * batch:>8}"
        for name in DIST_COLUMNS:
            line += f" | {_cell(found.get(name), 'time_ms'):>21}{_cell(found.get(name), 'saved_mib', 2):>10}"
        ring, gather = found.get("clipforge-ring"), found.get("clipforge-gather")
        ratio = "-"
        if ring and gather and ring["status"] == gather["status"] == "ok":
            ratio = f"{gather['time_ms'] / ring['time_ms']:.2f}x"
        lines.append(f"{line} | {ratio:>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.world_sizes:
        run_multiprocess(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
