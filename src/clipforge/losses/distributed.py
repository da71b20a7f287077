"""Collectives for the contrastive losses under data parallelism.

* A differentiable all-gather for shards of unequal size. The ``gather`` implementation of the CLIP loss
  (Radford et al., 2021) scores each rank's rows against the gathered features, as open_clip's
  ``local_loss=True, gather_with_grad=True`` does; backward sums the gradients of all ranks (a
  reduce-scatter), so the gradient of every shard is that of the full-batch loss.
* A bidirectional ring (``Ring``) for the ``ring`` implementations: the chunked SigLIP loss (Zhai et al.,
  2023, "Sigmoid Loss for Language Image Pre-Training", Sec. 3.3) and the CLIP loss with an online
  log-sum-exp (Inf-CL: Wang et al., 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling
  for Contrastive Loss"). Each rank splits its block in two halves; the first half travels to the right
  neighbour (rank + 1), the second to the left (rank - 1), so both directions of every link carry data at
  each step and no rank ever holds more than two foreign blocks. Accumulators can travel with a block and
  come home after ``W`` shifts (``Ring.circulate``).

Rank and world size are read from ``torch.distributed`` at call time; without an initialised process
group everything reduces to a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

from clipforge.distributed import all_gather_padded

DIST_IMPLS = ("ring", "gather")


def check_dist_impl(dist_impl: str) -> None:
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")


@torch.compiler.disable
def gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Local batch size of every rank (the last batch of an epoch may be uneven)."""
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.cat(out).tolist()


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup | None
    ) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor):
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
    the left-moving half of rank ``rank + k``; after ``W`` shifts both are back home, which ``circulate``
    uses to bring accumulators that travelled with a half back to its owner.
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

    def rows(self, step: int) -> tuple[int, int]:
        """Rows of the (right-moving, left-moving) halves held after ``step`` shifts."""
        src_r, src_l = self.sources(step)
        return self.halves[src_r][0], self.halves[src_l][1]

    def shift(
        self,
        to_right: Sequence[Tensor],
        to_left: Sequence[Tensor],
        rows_from_left: int,
        rows_from_right: int,
        tag: int = 0,
    ) -> _Pending:
        """Start sending the tensors ``to_right`` to rank + 1 and ``to_left`` to rank - 1; returns a handle
        whose ``wait()`` gives ``(from_left, from_right)``, lists of as many tensors with the given numbers
        of rows (and the dtype and trailing shape of the tensors sent the same way).

        Each direction may carry several tensors that share their rows but not their dtype (features and
        float32 statistics). Exchanges in flight at the same time need distinct ``tag`` ranges (tensor
        ``k`` of a direction uses ``tag + 2 k`` or ``tag + 2 k + 1``).
        """
        assert len(to_right) == len(to_left)
        to_right = [t.contiguous() for t in to_right]
        to_left = [t.contiguous() for t in to_left]
        from_left = [t.new_empty((rows_from_left, *t.shape[1:])) for t in to_right]
        from_right = [t.new_empty((rows_from_right, *t.shape[1:])) for t in to_left]
        # Both sides skip empty messages (sizes are known everywhere), and post the right-moving chain
        # first with its own tags, so the messages still match when left == right (W = 2): in that order
        # also by backends that ignore tags (NCCL matches point-to-point messages by issue order).
        ops = []
        for k, t in enumerate(to_right):
            if t.shape[0]:
                ops.append(dist.P2POp(dist.isend, t, self._right, self.group, tag=tag + 2 * k))
        for k, t in enumerate(to_left):
            if t.shape[0]:
                ops.append(dist.P2POp(dist.isend, t, self._left, self.group, tag=tag + 2 * k + 1))
        for k, t in enumerate(from_left):
            if rows_from_left:
                ops.append(dist.P2POp(dist.irecv, t, self._left, self.group, tag=tag + 2 * k))
        for k, t in enumerate(from_right):
            if rows_from_right:
                ops.append(dist.P2POp(dist.irecv, t, self._right, self.group, tag=tag + 2 * k + 1))
        reqs = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(reqs, (from_left, from_right), keep_alive=(*to_right, *to_left))

    def circulate(
        self,
        block: Sequence[Tensor],
        fresh: Callable[[int], list[Tensor]],
        visit: Callable[[int, Sequence[Tensor], Sequence[Tensor]], None],
    ) -> list[Tensor]:
        """Show every rank's block to this rank: ``visit(owner, block, carry)`` on the two halves received
        at each of the ``W - 1`` shifts, then on the own block.

        ``block``: tensors of this rank's rows that travel unchanged (texts, their statistics).
        ``fresh(n)``: empty accumulators for ``n`` rows (zeros, or ``-inf`` for a log-sum-exp) that
        ``visit`` updates in place (running column statistics, gradients). The first rank to visit a
        foreign half starts them; they travel with the half and, after ``W`` shifts, come home holding
        the contributions of all other ranks; the own visit adds this rank's, and they are returned.
        Each rank holds at most its own block and two foreign ones (one in use, one arriving).
        """
        block = list(block)
        if self.world == 1:
            carry = fresh(block[0].shape[0])
            visit(self.rank, block, carry)
            return carry
        h = self.halves[self.rank][0]
        carry_tag = 2 * len(block)  # blocks and accumulators are in flight together
        pending = self.shift([t[:h] for t in block], [t[h:] for t in block], *self.rows(1))
        carried = None
        for step in range(1, self.world):
            blk_r, blk_l = pending.wait()
            if step < self.world - 1:  # pass the blocks on while this rank works with them
                pending = self.shift(blk_r, blk_l, *self.rows(step + 1))
            # Accumulators start where a half is first visited, so that no rank waits for another's
            # first visit; later ones wait for the previous rank's update.
            car_r, car_l = (fresh(n) for n in self.rows(1)) if carried is None else carried.wait()
            src_r, src_l = self.sources(step)
            visit(src_r, blk_r, car_r)
            visit(src_l, blk_l, car_l)
            # on to the next rank; after the last step (rows(W) are this rank's halves) back home
            carried = self.shift(car_r, car_l, *self.rows(step + 1), tag=carry_tag)
        home_r, home_l = carried.wait()
        carry = [torch.cat(halves) for halves in zip(home_r, home_l)]
        visit(self.rank, block, carry)
        return carry


class _Pending:
    """Handle of an exchange in flight; holds the send buffers until it completes."""

    def __init__(
        self, reqs: list, result: tuple[list[Tensor], list[Tensor]], keep_alive: tuple[Tensor, ...]
    ) -> None:
        self._reqs, self._result, self._keep_alive = reqs, result, keep_alive

    def wait(self) -> tuple[list[Tensor], list[Tensor]]:
        for req in self._reqs:
            req.wait()
        self._keep_alive = ()
        return self._result
