"""Benchmark of the contrastive losses, CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023), against
open_clip's ``ClipLoss`` / ``SigLipLoss`` on one device: loss forward + backward time and peak extra memory
per batch size, side by side in the same run.

GPU (the goal: batch 262,144 in <= 4 GiB extra for both losses, clipforge faster at 65,536):
    python scripts/benchmark_loss.py --device cuda
CPU smoke run:
    python scripts/benchmark_loss.py --batches 1024 2048 --dim 64 --device cpu

Prints one JSON object per measurement, then a table. "Extra" memory is ``max_memory_allocated`` during
forward + backward minus what was allocated before (inputs), so it includes the returned gradients. On CPU
it is not measured; ``saved_mib`` (bytes autograd saves for backward, from a separate forward under
``saved_tensors_hooks``) is reported on every device. A run that runs out of memory is marked ``oom``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.losses.clip import ClipLoss
from clipforge.losses.siglip import SigLipLoss
from clipforge.losses.tiled import use_tiled

MIB = 2**20
DEFAULT_BATCHES = [8192, 16384, 32768, 65536, 131072, 262144]
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--impl", default="auto", choices=["auto", "dense", "tiled"], help="clipforge's impl")
    ap.add_argument("--tile-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-open-clip", action="store_true", help="measure clipforge only")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (both implementations)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def loss_fns(loss: str, args: argparse.Namespace) -> dict[str, LossFn]:
    """``{"clipforge": fn, "open_clip": fn}``, each ``fn(image_features, text_features, scale, bias)``."""
    ours = (ClipLoss if loss == "clip" else SigLipLoss)(impl=args.impl, tile_size=args.tile_size)
    fns: dict[str, LossFn] = {"clipforge": ours if loss == "siglip" else lambda x, y, s, b: ours(x, y, s)}
    if not args.no_open_clip:
        from open_clip.loss import ClipLoss as OpenClipLoss
        from open_clip.loss import SigLipLoss as OpenSigLipLoss

        if loss == "clip":
            theirs = OpenClipLoss()
            fns["open_clip"] = lambda x, y, s, b: theirs(x, y, s)
        else:
            fns["open_clip"] = OpenSigLipLoss()
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


def measure(fn: LossFn, inputs: list[Tensor], repeats: int, warmup: int) -> dict[str, Any]:
    """Median forward + backward time, peak extra memory (CUDA) and bytes saved for backward."""
    device = inputs[0].device
    wrt = [t for t in inputs if t.requires_grad]

    def step() -> None:
        loss = fn(*inputs)
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        del loss, grads

    out: dict[str, Any] = {"status": "ok", "time_ms": None, "peak_extra_mib": None, "saved_mib": None}
    try:
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                out["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        out["time_ms"] = 1e3 * statistics.median(times)
        saved = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(*inputs)
        del loss
        out["saved_mib"] = saved / MIB
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


def _cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"].upper()
    return "-" if row[key] is None else f"{row[key]:.1f}"


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


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
