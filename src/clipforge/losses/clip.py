"""Symmetric softmax contrastive loss of CLIP (Radford et al., 2021, "Learning Transferable Visual Models
From Natural Language Supervision").

With logits ``S = scale * x @ y.T`` over a batch of ``B`` pairs, the loss is the mean of the image-to-text
and text-to-image cross-entropies with the matching pair as the target:

    L = 1/(2B) * sum_i [lse_j S_ij + lse_j S_ji - 2 S_ii]

``impl="tiled"`` computes the log-sum-exps with the online softmax (Milakov & Gimelshein, 2018; as in
FlashAttention, Dao et al., 2022) in ``tiles.TiledLSE``, so memory is ``O(B d + tile^2)``.

Under data parallelism, rank ``r`` holds ``b`` pairs and its loss takes the row log-sum-exps of its images
and the column log-sum-exps of its texts, each over all ``B`` of the other modality:

* ``dist_impl="ring"``, after Inf-CL (Wang et al., 2024, "Breaking the Memory Barrier: Near Infinite Batch
  Size Scaling for Contrastive Loss"): images stay home and text blocks travel a bidirectional ring
  (``distributed.Ring``). Each rank merges every visiting block into the row log-sum-exps of its images
  (online, tile by tile), and every text block carries the running log-sum-exps of its columns, to which
  each rank it passes adds its images; after ``W`` shifts the block is home with its complete column
  statistics. Backward runs the ring again, recomputing each tile's softmaxes from the saved row and
  column statistics, and each text block carries its gradient accumulator home. A rank keeps only its own
  features and ``O(b)`` statistics for backward and works in ``tile``-square pieces:
  ``O(b d + tile^2)`` memory, whatever ``W``, and half the logit matmuls of ``gather`` (one product
  ``x_r @ y_s.T`` serves both directions).
* ``dist_impl="gather"`` (the reference): local rows against all-gathered features, ``b x B`` logits per
  direction; the differentiable gather sums the gradients of all ranks.

Loss-value convention (the same as open_clip's ``local_loss=True, gather_with_grad=True`` when all ranks
have ``b`` rows): rank ``r`` returns ``W / B * 1/2 * sum_{i on r} [...]``, its share of the full-batch loss
times ``W``. The mean over ranks (what is logged after a ``sync_dist`` mean) is the full-batch loss, and
DDP's gradient averaging gives exactly the full-batch gradient. Uneven last batches are handled by
gathering the sizes first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from clipforge.losses.base import ContrastiveLoss, Layout, contrastive_loss
from clipforge.losses.distributed import Ring, all_gather_with_grad
from clipforge.losses.tiled import lse_grad_tiles, lse_tiles, stat_dtype, tiled_lse, without_autocast


def clip_loss_dense(
    image_features: Tensor,
    text_features: Tensor,
    all_image_features: Tensor,
    all_text_features: Tensor,
    logit_scale: Tensor,
    offset: int = 0,
    coef: float | None = None,
) -> Tensor:
    """``coef / 2 * sum_i [CE(local image i -> all texts) + CE(local text i -> all images)]``, the target
    of row ``i`` being column ``offset + i``. ``coef`` defaults to ``1 / b`` (the mean)."""
    b = image_features.shape[0]
    labels = offset + torch.arange(b, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_text_features.T  # (b, B)
    if all_image_features is image_features and all_text_features is text_features:
        logits_per_text = logits_per_image.T  # single device: one matrix serves both directions
    else:
        logits_per_text = logit_scale * text_features @ all_image_features.T  # (b, B)
    coef = 1.0 / b if coef is None else coef
    ce = F.cross_entropy(logits_per_image, labels, reduction="sum")
    ce = ce + F.cross_entropy(logits_per_text, labels, reduction="sum")
    return ce * (coef / 2)


@contrastive_loss
def clip_loss(x: Tensor, y: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, layout: Layout) -> Tensor:
    """CLIP loss of this rank's ``(b, d)`` features; see the module docstring for the DDP convention.

    ``impl``: ``dense`` materialises the logits, ``tiled`` works in ``tile_size``-square tiles, ``auto``
    tiles when a logit block (``b x B`` for ``gather``, ``b x b_max`` for ``ring``) is larger than one
    tile. ``dist_impl`` (W > 1): ``ring`` (memory independent of W) or ``gather`` (all-gather
    reference). ``logit_bias`` does not change a softmax.
    """
    b, sizes, coef = x.shape[0], layout.sizes, layout.coef
    if layout.world == 1:
        if layout.tiled(b, b):
            loss = tiled_lse(x, y, logit_scale, layout.tile_size, True, 0, coef / 2)
        else:
            loss = clip_loss_dense(x, y, x, y, logit_scale)
    elif layout.dist_impl == "ring":
        # dense inside: one tile covers any block (b x b_max at most)
        tile = layout.tile_size if layout.tiled(b, max(sizes)) else max(sizes)
        loss = _clip_ring(x, y, logit_scale, Ring(sizes, layout.rank, layout.group), tile, coef)
    else:
        all_x, all_y = (all_gather_with_grad(t, sizes, layout.rank, layout.group) for t in (x, y))
        if layout.tiled(b, sum(sizes)):
            half, tile = coef / 2, layout.tile_size
            loss = tiled_lse(x, all_y, logit_scale, tile, False, layout.offset, half)
            loss = loss + tiled_lse(y, all_x, logit_scale, tile, False, layout.offset, half)
        else:
            loss = clip_loss_dense(x, y, all_x, all_y, logit_scale, layout.offset, coef)
    if logit_bias is not None:
        # Softmax is shift-invariant, so the bias has zero gradient; keep it in the graph so that DDP
        # does not report an unused parameter.
        loss = loss + (0.0 * logit_bias).to(loss.dtype)
    return loss


@torch.compiler.disable
def _clip_ring(x: Tensor, y: Tensor, scale: Tensor, ring: Ring, tile: int, coef: float) -> Tensor:
    # eager under torch.compile: point-to-point exchanges and tile loops do not belong in a graph
    return _ClipRing.apply(x, y, scale, ring, tile, coef)


class _ClipRing(torch.autograd.Function):
    """``coef / 2 * (sum_{i local} lse_{j all} S_ij + sum_{j local} lse_{i all} S_ij - 2 sum_{i local} S_ii)``
    with ``S = scale * x @ y.T`` over the images ``x`` and texts ``y`` of all ranks of ``ring``."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: FunctionCtx, x: Tensor, y: Tensor, scale: Tensor, ring: Ring, tile: int, coef: float
    ) -> Tensor:
        sd = stat_dtype(x)
        lse_row = torch.full((x.shape[0],), float("-inf"), dtype=sd, device=x.device)

        def visit(owner: int, texts: Sequence[Tensor], lse_col: Sequence[Tensor]) -> None:
            lse_tiles(x, texts[0], scale, tile, lse_row, lse_col[0])

        # Each text block carries the running log-sum-exps of its columns and comes home with them complete.
        (lse_col,) = ring.circulate([y], lambda n: [y.new_full((n,), float("-inf"), dtype=sd)], visit)
        pos = torch.linalg.vecdot(x, y).sum(dtype=sd) * scale  # sum_i S_ii
        ctx.save_for_backward(x, y, scale, lse_row, lse_col)
        ctx.ring, ctx.tile, ctx.coef = ring, tile, coef
        return (coef / 2 * (lse_row.sum() + lse_col.sum() - 2 * pos)).to(x.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, g: Tensor):
        x, y, scale, lse_row, lse_col = ctx.saved_tensors
        ring, tile, sd = ctx.ring, ctx.tile, lse_row.dtype
        alpha = (g * (ctx.coef / 2)).to(sd)  # d (this rank's loss) / d (each of its terms)
        need_scale = ctx.needs_input_grad[2]
        gx = torch.zeros_like(x)  # raw gradients (before the factor scale)
        visited = torch.zeros((), dtype=sd, device=x.device)  # column terms seen here, for d / d scale

        def visit(owner: int, block: Sequence[Tensor], carry: Sequence[Tensor]) -> None:
            nonlocal visited
            texts, lse_texts, w_texts = block
            dots = torch.zeros_like(lse_texts) if need_scale else None
            lse_grad_tiles(x, texts, scale, tile, lse_row, alpha, gx, carry[0], lse_texts, w_texts, dots)
            if dots is not None:
                carry[1].add_(dots)
                visited = visited + dots.sum()

        # Re-run the ring. Each text block travels with its complete column log-sum-exps and with its
        # owner's upstream gradient (the column terms belong to the owner's loss; the gradients are equal
        # on all ranks under DDP, but any will do), and carries home its gradient accumulator and, for the
        # scale, w * sum_i softmax_cols(S)_ij S_ij of its columns.
        block = [y, lse_col, alpha.expand(y.shape[0])]

        def fresh(n: int) -> list[Tensor]:
            return [y.new_zeros((n, y.shape[1]))] + ([y.new_zeros((n,), dtype=sd)] if need_scale else [])

        home = ring.circulate(block, fresh, visit)
        gy = home[0]
        # the positives: -2 S_ii (row and column term of every local pair)
        gx.addcmul_(y, alpha.to(x.dtype), value=-2)
        gy.addcmul_(x, alpha.to(x.dtype), value=-2)
        g_scale = None
        if need_scale:
            # x . gx is d / d scale of all that this rank computed: its row terms and positives, and the
            # column terms of every block it visited. Trade the latter for the column terms of its own
            # texts, gathered on the way home, so that each rank returns the gradient of its own loss.
            own = torch.linalg.vecdot(x, gx).sum(dtype=sd) + (home[1].sum() - visited) / scale
            g_scale = own.to(scale.dtype)
        return gx.mul_(scale), gy.mul_(scale), g_scale, None, None, None


class ClipLoss(ContrastiveLoss):
    """``loss=clip``: the symmetric softmax loss, with CLIP's initial temperature 0.07 and no bias."""

    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    loss_fn = staticmethod(clip_loss)
