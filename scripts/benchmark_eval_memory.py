"""Peak extra CPU memory of evaluation steps, per batch: prints one JSON line per measurement.

    python scripts/benchmark_eval_memory.py --batch 256 --size 224 --dtypes float32 bfloat16 uint8

``image_hashes`` is retrieval's fingerprint of every image batch (clipforge.eval.retrieval). "Extra" is
the most memory the torch CPU allocator held during the call beyond what it held when the call began
(the batch itself and the cached hash weights), read from the profiler's memory timeline; ``x_batch`` is
that over the batch's own size. Run it against another checkout with ``PYTHONPATH=<checkout>/src``.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

MIB = 2**20


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Most bytes the CPU allocator held while ``fn()`` ran, beyond those it held when it started."""
    fn()  # warm caches (hash weights) outside the measurement
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        fn()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
    held = [sum(s) for s in sizes]
    return max(held) - held[0] if held else 0


def main() -> None:
    from clipforge.eval.retrieval import image_hashes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "uint8"])
    args = ap.parse_args()
    for name in args.dtypes:
        images = (torch.rand(args.batch, 3, args.size, args.size) * 255).to(getattr(torch, name))
        extra = peak_extra_bytes(functools.partial(image_hashes, images))
        row = {"fn": "image_hashes", "dtype": name, "batch": args.batch, "size": args.size}
        row |= {"batch_mib": round(images.nbytes / MIB, 1), "peak_extra_mib": round(extra / MIB, 1)}
        print(json.dumps(row | {"x_batch": round(extra / images.nbytes, 2)}), flush=True)


if __name__ == "__main__":
    main()
