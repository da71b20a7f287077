"""Collectives for the contrastive losses under data parallelism.

* A differentiable all-gather for shards of unequal size. The CLIP loss (Radford et al., 2021) of each
  rank uses its local rows against the gathered features, as open_clip's ``local_loss=True,
  gather_with_grad=True`` does; backward sums the gradients of all ranks (a reduce-scatter), so the
  gradient of every shard is that of the full-batch loss.
* A bidirectional ring for the chunked SigLIP loss (Zhai et al., 2023, "Sigmoid Loss for Language Image
  Pre-Training", Sec. 3.3): each rank splits its block in two halves; the first half travels to the right
  neighbour (rank + 1), the second to the left (rank - 1), so both directions of every link carry data
  at each step and no rank ever holds more than one foreign block.

Rank and world size are read from ``torch.distributed`` at call time; without an initialised process
group everything reduces to a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@torch.compiler.disable
def gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Local batch size of every rank (the last batch of an epoch may be uneven)."""
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.cat(out).tolist()


def _all_gather_cat(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    # all_gather needs equal shapes: pad every shard to the largest one, then drop the padding.
    m = max(sizes)
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    bufs = [x.new_empty((m, *x.shape[1:])) for _ in sizes]
    dist.all_gather(bufs, x.contiguous(), group=group)
    return torch.cat([buf[:n] for buf, n in zip(bufs, sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_cat(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        start = sum(sizes[:rank])
        # Every rank used every shard, so the gradient of this shard is the sum over ranks.
        if dist.get_backend(group) == dist.Backend.NCCL:
            m = max(sizes)
            if all(n == m for n in sizes):
                padded = grad.contiguous()
            else:
                padded = grad.new_zeros((len(sizes) * m, *grad.shape[1:]))
                for r, n in enumerate(sizes):
                    padded[r * m : r * m + n] = grad[sum(sizes[:r]) : sum(sizes[:r]) + n]
            out = grad.new_empty((m, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, padded, group=group)
            return out[: sizes[rank]], None, None, None
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep our rows.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[start : start + sizes[rank]], None, None, None


@torch.compiler.disable
def all_gather_with_grad(
    x: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Concatenate the shards of all ranks along dim 0 (``(sum(sizes), ...)``), differentiably."""
    return _AllGather.apply(x, sizes, rank, group)


class Ring:
    """Bidirectional neighbour exchange over the ranks of ``group``.

    A block of ``n`` rows is split into a right-moving half (the first ``ceil(n / 2)`` rows) and a
    left-moving half. After ``k`` shifts, this rank holds the right-moving half of rank ``rank - k`` and
    the left-moving half of rank ``rank + k``; after ``W`` shifts both are back home, which the SigLIP
    backward uses to carry gradient accumulators around the ring.
    """

    def __init__(self, sizes: list[int], rank: int, group: dist.ProcessGroup | None = None) -> None:
        self.sizes, self.rank, self.group = sizes, rank, group
        self.world = len(sizes)
        self.halves = [((n + 1) // 2, n // 2) for n in sizes]
        right, left = (rank + 1) % self.world, (rank - 1) % self.world
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self._right, self._left = to_global(right), to_global(left)

    def sources(self, step: int) -> tuple[int, int]:
        """Owners of the (right-moving, left-moving) halves held after ``step`` shifts."""
        return (self.rank - step) % self.world, (self.rank + step) % self.world

    def shift(self, to_right: Tensor, to_left: Tensor, rows_from_left: int, rows_from_right: int) -> _Pending:
        """Start sending ``to_right`` to rank + 1 and ``to_left`` to rank - 1; returns a handle whose
        ``wait()`` gives ``(from_left, from_right)`` with the given numbers of rows."""
        from_left = to_right.new_empty((rows_from_left, *to_right.shape[1:]))
        from_right = to_left.new_empty((rows_from_right, *to_left.shape[1:]))
        # Both sides skip empty messages (sizes are known everywhere), and post the right-moving chain
        # first with its own tag, so the two messages still match when left == right (W = 2).
        to_right, to_left = to_right.contiguous(), to_left.contiguous()
        ops = []
        if to_right.shape[0]:
            ops.append(dist.P2POp(dist.isend, to_right, self._right, self.group, tag=0))
        if to_left.shape[0]:
            ops.append(dist.P2POp(dist.isend, to_left, self._left, self.group, tag=1))
        if rows_from_left:
            ops.append(dist.P2POp(dist.irecv, from_left, self._left, self.group, tag=0))
        if rows_from_right:
            ops.append(dist.P2POp(dist.irecv, from_right, self._right, self.group, tag=1))
        reqs = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(reqs, (from_left, from_right), keep_alive=(to_right, to_left))


class _Pending:
    """Handle of an exchange in flight; holds the send buffers until it completes."""

    def __init__(self, reqs: list, result: tuple[Tensor, Tensor], keep_alive: tuple[Tensor, ...]) -> None:
        self._reqs, self._result, self._keep_alive = reqs, result, keep_alive

    def wait(self) -> tuple[Tensor, Tensor]:
        for req in self._reqs:
            req.wait()
        self._keep_alive = ()
        return self._result
