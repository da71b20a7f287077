"""Where clipforge's training step spends its time: torch.profiler over a few steps of the step that
``clipforge-benchmark step`` times (same model, loss, precision, optimizer and compile setting), and the
top kernels by their own device time (on CPU: the top operators by their own CPU time).

It prints torch's table, then one JSON line ``{"kind": "profile", ...}`` whose ``top`` list gives each
kernel's milliseconds per step and share of the step's kernel time.

GPU:  clipforge-benchmark profile --model vit_b16:256 --loss clip --compile
CPU smoke test:  clipforge-benchmark profile --model tiny:8 --device cpu --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from clipforge.bench.args import add_device_args, device_defaults, model_batch, non_negative_int, positive_int
from clipforge.bench.step import StepSpec, _sync, build_step
from clipforge.compilation import COMPILE_MODES


def top_events(prof: profile, on_gpu: bool, steps: int, top: int) -> tuple[float, list[dict[str, Any]]]:
    """(kernel milliseconds per step, the ``top`` kernels): each a dict of name, calls and ms per step,
    and share of the total. On GPU only device kernels count (an operator's own device time is that of
    the kernels it launched, which would count them twice); on CPU, operators' self CPU time."""
    events = [e for e in prof.key_averages() if not getattr(e, "is_user_annotation", False)]
    if on_gpu:
        events = [e for e in events if e.device_type == DeviceType.CUDA]

    def own_us(e: Any) -> float:
        return float(e.self_device_time_total if on_gpu else e.self_cpu_time_total)

    total = sum(own_us(e) for e in events) or 1.0
    ranked = sorted(events, key=own_us, reverse=True)[:top]
    rows = [
        {
            "name": e.key[:120],
            "calls_per_step": round(e.count / steps, 1),
            "ms_per_step": round(own_us(e) / steps / 1e3, 3),
            "share": round(own_us(e) / total, 4),
        }
        for e in ranked
    ]
    return total / steps / 1e3, rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name, batch = args.model
    spec = StepSpec(
        "clipforge", name, args.loss, batch, device, args.precision, args.compile, (), args.compile_mode
    )
    step, images, tokens = build_step(spec)
    for _ in range(args.warmup):  # compiles here when --compile
        step(images, tokens)
    _sync(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(images, tokens)
        _sync(device)
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top), flush=True)
    total_ms, top = top_events(prof, on_gpu, args.steps, args.top)
    row = {
        "kind": "profile",
        "impl": "clipforge",
        "model": name,
        "loss": args.loss,
        "batch": batch,
        "precision": args.precision,
        "compile": args.compile,
        "steps": args.steps,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "timed": "device kernels" if on_gpu else "CPU operators",
        "total_ms_per_step": round(total_ms, 3),
        "top": top,
    }
    print(json.dumps(row), flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=model_batch, default=("vit_b16", 256), help="conf/model name:batch")
    ap.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    add_device_args(ap)
    ap.add_argument("--compile", action="store_true", help="profile the compiled step")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    ap.add_argument("--steps", type=positive_int, default=5, help="profiled steps")
    ap.add_argument(
        "--warmup", type=non_negative_int, default=3, help="steps before profiling (compile included)"
    )
    ap.add_argument("--top", type=positive_int, default=25, help="rows of the table and of the JSON line")
    return device_defaults(ap.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
