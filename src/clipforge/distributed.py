"""Process-group helpers shared by the losses, the data pipeline and evaluation: who this process is,
which GPUs it sees, where a collective's tensors must live, the sum and (padded) gather that everything else builds on, and
:class:`EvenSteps`, which lets ranks holding different numbers of batches take the same number of steps.

No paper. Everything reads ``torch.distributed`` at call time and reduces to the identity in one process
(or with ``enabled=False``), so the same code runs in one process, in tests and under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist


def world_info(group: dist.ProcessGroup | None = None, enabled: bool = True) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is initialised or not ``enabled``."""
    if enabled and dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def collective_device(fallback: torch.device) -> torch.device:
    """NCCL reduces only CUDA tensors, gloo only CPU ones: pick what the backend needs."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if dist.is_available() and dist.is_initialized():
        return torch.device("cpu")
    return fallback


class NoSuchGPUError(ValueError, RuntimeError):
    """A setting asks for a CUDA GPU this process cannot see: a wrong setting for this machine (a
    ``ValueError``, as other refused settings) found about the runtime (a ``RuntimeError``)."""


def require_cuda(setting: str, hint: str, index: int | None = None) -> None:
    """Raise :class:`NoSuchGPUError`, naming ``setting`` and ending with ``hint``, unless torch sees CUDA
    GPU ``index`` (``None``: any). One check for every setting that can ask for a GPU (the trainer's
    accelerator, evaluation's ``device=``, the GPU JPEG decoder), so each fails before anything is built."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (index or 0) >= count:
        raise NoSuchGPUError(
            f"{setting} asks for a CUDA GPU, but torch sees {count or 'none'} "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): {hint}"
        )


def all_reduce_sum(t: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """Sum ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself in one process)."""
    _, world = world_info(enabled=enabled)
    if world == 1:
        return t
    buf = t.detach().to(collective_device(t.device)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_padded(
    x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank of ``group``, rank ``r`` holding ``sizes[r]`` rows.

    ``all_gather`` needs equal shapes: every rank pads to the largest size, gathers, and the padding is cut
    off, so the result does not depend on how the rows were split.
    """
    m = max(sizes)
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    bufs = [x.new_empty((m, *x.shape[1:])) for _ in sizes]
    dist.all_gather(bufs, x.contiguous(), group=group)
    return torch.cat([buf[:n] for buf, n in zip(bufs, sizes)])


def all_gather_cat(t: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """:func:`all_gather_padded` when the row counts (and, on a rank without rows, the trailing shape) are
    not known in advance: every rank sends its shape first. Returns on ``t``'s device."""
    _, world = world_info(enabled=enabled)
    if world == 1:
        return t
    dev = collective_device(t.device)
    local = t.detach().to(dev)
    shape = torch.tensor(local.shape, device=dev, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    # a rank with no rows may not know the trailing shape: take it from a rank that has rows
    trailing = next((tuple(s[1:].tolist()) for s in shapes if s[0] > 0), tuple(local.shape[1:]))
    return all_gather_padded(local.reshape(local.shape[0], *trailing), rows).to(t.device)


PADDING = "padding"  # the key of the mapping that marks an EvenSteps padding batch


def is_padding(batch: Any) -> bool:
    """Whether ``batch`` is a padding step of :class:`EvenSteps` (to be run but not counted)."""
    return isinstance(batch, tuple | list) and any(
        isinstance(x, Mapping) and x.get(PADDING) for x in batch[2:]
    )


class EvenSteps:
    """``loader``'s batches, then padding batches until every rank's loader is exhausted, so that every
    rank takes the same number of steps (a forward under FSDP, or DDP's buffer broadcast, is a collective).

    Each step costs one all-reduce of one number, in the main process. A padding batch is
    ``(*pad(), {"padding": True})`` (:func:`is_padding`): the step runs the model on it and counts nothing.
    Nothing is repeated or dropped, so sums over the real batches of all ranks are the one-process sums.
    In one process the batches pass through unchanged and nothing is padded.
    """

    def __init__(self, loader: Iterable[Any], pad: Callable[[], tuple]) -> None:
        self.loader, self.pad = loader, pad

    def __iter__(self) -> Iterator[Any]:
        _, world = world_info()
        if world == 1:
            yield from self.loader
            return
        it: Iterator[Any] | None = iter(self.loader)
        while True:
            batch = next(it, None) if it is not None else None
            if batch is None:
                it = None  # exhausted: never ask it again
            if int(all_reduce_sum(torch.tensor([float(batch is not None)])).item()) == 0:
                return
            yield batch if batch is not None else (*self.pad(), {PADDING: True})
