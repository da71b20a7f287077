"""Command-line settings the training benchmarks share (``clipforge-benchmark learning``, ``init`` and
``siglip2``), the device and precision of the step benchmarks (``step``, ``profile``, ``memory``), and the
argument types every benchmark checks its counts and its ``name:batch`` models with."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.conf import CONF_DIR
from clipforge.data.config import check_at_least


def _int_at_least(low: int, text: str, expected: str) -> int:
    """``text`` as an integer checked as config settings are (:func:`check_at_least`), or an argparse
    error saying what was ``expected``."""
    try:
        value = int(text)
        check_at_least(low, "argument", value=value)
    except ValueError:  # not an integer ("2.5", "²"), or below low
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return value


def model_batch(text: str) -> tuple[str, int]:
    """``name:batch`` on the command line -> ``(name, batch)``: a ``conf/model`` name and a positive batch,
    checked before anything is built (argparse names the argument that is wrong)."""
    name, _, batch = text.partition(":")
    if not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected conf/model name:batch, e.g. vit_b16:256")
    known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}: conf/model has {', '.join(known)}")
    return name, int(batch)


def positive_int(text: str) -> int:
    return _int_at_least(1, text, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(0, text, "an integer >= 0")


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


def device_name(text: str) -> str:
    """An argparse ``type``: a device this machine can run (:func:`clipforge.eval.runtime.check_device`)."""
    from clipforge.eval.runtime import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` of a step benchmark; :func:`device_defaults` fills them in."""
    p.add_argument(
        "--device", type=device_name, default=None, help="default: cuda where there is a GPU, else cpu"
    )
    p.add_argument(
        "--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu"
    )


def device_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the defaults of :func:`add_device_args` filled in."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args
