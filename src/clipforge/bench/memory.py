"""Peak memory and time of a training step with and without gradient checkpointing, clipforge beside open_clip.

Gradient (activation) checkpointing keeps only each block's input in the forward pass and recomputes the
block in the backward pass (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"):
``clipforge-train grad_checkpointing=true``, open_clip's ``--grad-checkpointing``. It buys a larger batch in
the same memory for about one more forward pass. This benchmark measures both sides of that trade for the
same step ``clipforge-benchmark step`` times (both towers, the loss, backward, AdamW; ``bench.step``).

Each measurement runs in a fresh process, so that it is not charged for memory an earlier one left in the
allocator. The peak is, on CUDA, the most the caching allocator held (``max_memory_allocated``); on the
CPU, the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
warm-up), which also holds the weights, gradients and optimizer state: the activations are the difference
between the rows. ``x_plain`` is a row's peak and step time over the same implementation without
checkpointing.

GPU:  clipforge-benchmark memory --models vit_b16:256 vit_l14:128
CPU:  clipforge-benchmark memory --models vit_b32:32 --losses clip --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from typing import Any

import torch

from clipforge.bench.args import add_device_args, device_defaults, model_batch, non_negative_int, positive_int
from clipforge.bench.step import StepSpec, _sync, build_step, format_table, run_steps

GIB = 2**30
MEMORY_COLUMNS = (
    "impl",
    "model",
    "loss",
    "batch",
    "grad_checkpointing",
    "peak_gib",
    "peak_x_plain",
    "step_ms",
    "time_x_plain",
)


def _cpu_peak_bytes(reset: bool = False) -> int:
    """The process's peak resident set, ``VmHWM``; ``reset`` first lowers it to the current one. Without
    Linux's ``/proc`` (macOS), the peak since the process began (``ru_maxrss``): model building included."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "reset the peak resident set size" (proc(5), Linux >= 4.0)
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def measure(spec: StepSpec, steps: int, warmup: int) -> dict[str, Any]:
    """Build ``spec``'s step, run ``warmup`` steps, then ``steps`` timed ones: their peak memory and time."""
    step, images, tokens = build_step(spec)
    device = spec.device
    for _ in range(warmup):
        step(images, tokens)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _cpu_peak_bytes(reset=True)
    dt, loss = run_steps(step, images, tokens, steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_peak_bytes()
    return {
        "kind": "memory",
        "impl": spec.impl,
        "model": spec.model,
        "loss": spec.loss,
        "batch": spec.batch,
        "precision": spec.precision,
        "grad_checkpointing": spec.grad_checkpointing,
        "peak_gib": round(peak / GIB, 3),
        "peak_of": "allocated" if device.type == "cuda" else "resident set",
        "step_ms": round(dt * 1e3, 1),
        "final_loss": round(float(loss), 4),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def _in_fresh_process(spec: StepSpec, steps: int, warmup: int) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (spec, steps, warmup))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    for name, batch in args.models:
        for loss in args.losses:
            for impl in args.impls:
                plain = None
                for ckpt in (False, True):
                    spec = StepSpec(impl, name, loss, batch, device, args.precision, grad_checkpointing=ckpt)
                    print(  # a step of a large model on the CPU takes a minute: say what is running
                        f"{impl} {name}:{batch} {loss}, grad_checkpointing {'on' if ckpt else 'off'}: "
                        f"{args.warmup} warm-up + {args.steps} timed steps in a fresh process",
                        flush=True,
                    )
                    row = _in_fresh_process(spec, args.steps, args.warmup)
                    if plain is None:
                        plain = row
                    else:
                        row["peak_x_plain"] = round(row["peak_gib"] / plain["peak_gib"], 3)
                        row["time_x_plain"] = round(row["step_ms"] / plain["step_ms"], 3)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(format_table(rows, MEMORY_COLUMNS), flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=model_batch, default=[("vit_b16", 256)], help="name:batch")
    ap.add_argument("--losses", nargs="+", default=["clip"], choices=["clip", "siglip"])
    ap.add_argument(
        "--impls", nargs="+", default=["open_clip", "clipforge"], choices=["open_clip", "clipforge"]
    )
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps before them")
    add_device_args(ap)
    return device_defaults(ap.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
