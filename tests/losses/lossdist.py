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


def _entry(rank: int, fn: Callable, worlds: list[int], ports: list[int], out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
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
    """``{W: [fn(rank, W, *args) for rank in range(W)]}`` for each world size ``W``.

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
