"""Run a function in W CPU processes joined by a gloo process group (torch.multiprocessing spawn)."""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``[fn(rank, world, *args) for rank in range(world)]``, each call in its own process.

    ``fn`` must be importable (a module-level function); its results travel back through ``torch.save``.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry, args=(fn, world, free_port(), out_dir, args), nprocs=world, start_method="spawn"
        )
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


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
