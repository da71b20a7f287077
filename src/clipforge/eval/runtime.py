"""Runtime settings shared by the evaluations of CLIP (Radford et al., 2021) in this package:
device choice, bf16 autocast on GPU, eval-mode with the caller's mode restored, progress bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from clipforge.distributed import require_cuda, world_info

T = TypeVar("T")


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_device(device: str | torch.device | None) -> None:
    """A ``device`` setting this machine cannot run, named before a model loads: a misspelt one made torch
    list its 20 device types, and a missing GPU failed at the first tensor moved (``None`` and ``"auto"``
    always run)."""
    if device is None or device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: auto, cpu, cuda or cuda:<index>") from e
    if dev.type == "cuda":
        require_cuda(
            f"device={str(device)!r}",
            "device=auto takes the first GPU where there is one, the CPU otherwise",
            index=dev.index,
        )


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """``None`` means the model's device; ``"auto"`` means CUDA when available, else CPU."""
    check_device(device)
    if device is None:
        return model_device(model)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``precision`` is ``"auto"`` or ``"bf16"``; full precision otherwise.

    Features leave the encoders in bf16 and are cast to float32 by the callers before any
    comparison, so only the towers run in reduced precision.
    """
    if precision not in ("auto", "bf16", "fp32", "32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode under ``torch.inference_mode`` and restore each submodule's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def progress_bar(iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm bar on rank 0 only (other ranks would print the same bar again)."""
    rank, _ = world_info()
    if not enabled or rank != 0:
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
