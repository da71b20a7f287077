"""Command-line settings the training benchmarks share (``clipforge-benchmark learning``, ``init`` and
``siglip2``), and the argument types every benchmark checks its counts with."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def add_run_args(
    p: argparse.ArgumentParser,
    *,
    out: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seeds: list[int],
    steps_help: str | None = None,
) -> None:
    """``--out`` (where data, runs and results go) and each run's recipe: ``--steps``, ``--batch-size``,
    ``--lr`` (peak, after ``--warmup`` linear steps) and ``--seeds`` (one run per seed), with these defaults."""
    p.add_argument("--out", type=Path, default=Path(out), help="data, runs, results")
    p.add_argument("--steps", type=positive_int, default=steps, help=steps_help)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=warmup, help="linear warm-up steps")
    p.add_argument("--seeds", nargs="+", type=int, default=seeds)


def add_child_args(p: argparse.ArgumentParser, override_example: str = "") -> None:
    """``--threads`` (CPU threads of each training run, a ``clipforge-train`` child process) and
    ``--override`` (more ``clipforge-train`` overrides for every run)."""
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads of each training run")
    help_ = "more clipforge-train overrides for every run" + (
        f", e.g. {override_example}" if override_example else ""
    )
    p.add_argument("--override", nargs="*", default=[], help=help_)
