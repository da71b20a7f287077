"""Pairwise sigmoid loss of SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training").

Every image-text pair is an independent binary classification: label ``z = +1`` on the diagonal (the
matching pair) and ``-1`` elsewhere, which is the ``2 * eye(B) - 1`` matrix of big_vision. With logits
``l = scale * x @ y.T + bias``:

    L = 1/B * sum_ij -log sigmoid(z_ij * l_ij) = 1/B * (sum_ij softplus(l_ij) - sum_i l_ii)

(the second form because ``softplus(-l) - softplus(l) = -l``), i.e. a sum over all pairs divided by the
batch size, as in the paper and open_clip.

Under data parallelism the loss is sharded as in Sec. 3.3 of the paper: each rank scores its images
against its own texts, then text blocks go around a bidirectional ring (``distributed.Ring``). The ring
is one ``autograd.Function`` whose backward runs the ring again, recomputing each block and carrying a
gradient accumulator with every text block until it comes home; so a rank saves only its own features for
backward, ``O(b d)``, independent of the world size. ``dist_impl="gather"`` keeps the simple all-gather
version as a reference.

Loss-value convention under DDP (the same as open_clip's when all ranks have ``b`` rows): rank ``r``
returns ``W / B * sum_{i on r} sum_j [...]``, its share of the full-batch loss times ``W``. The mean over
ranks (what is logged after a ``sync_dist`` mean) is the full-batch loss, and DDP's gradient averaging
gives exactly the full-batch gradient for features, scale and bias.
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
from clipforge.losses.tiled import SigmoidTiled, autocast_off, sigmoid_tiles, stat_dtype, without_autocast


def siglip_loss_dense(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    offset: int = 0,
    coef: float | None = None,
) -> Tensor:
    """``coef * sum_ij -log sigmoid(z_ij l_ij)`` for local images against ``text_features`` (all texts),
    the positive of image ``i`` being text ``offset + i``. ``coef`` defaults to ``1 / len(images)``."""
    logits = logit_scale * image_features @ text_features.T  # (b, B)
    if logit_bias is not None:
        logits = logits + logit_bias
    b = image_features.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(b, device=logits.device)
    labels[rows, offset + rows] = 1.0  # the 2 * eye - 1 trick, shifted to our rows
    coef = 1.0 / b if coef is None else coef
    return -F.logsigmoid(labels * logits).sum() * coef


class _SigLipRing(torch.autograd.Function):
    """``coef * (sum_{i local, j all} softplus(l_ij) - sum_{i local} l_ii)`` over the ranks of ``ring``."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        bias: Tensor,
        ring: Ring,
        tile: int,
        coef: float,
    ):
        total = x.new_zeros((), dtype=stat_dtype(x))

        def visit(owner: int, texts: Sequence[Tensor], carry: Sequence[Tensor]) -> None:
            nonlocal total
            total += sigmoid_tiles(x, texts[0], scale, bias, tile)[0]

        ring.circulate([y], lambda n: [], visit)  # all negatives, the positives included; nothing comes back
        pos = torch.linalg.vecdot(x, y).sum(dtype=total.dtype) * scale + bias * x.shape[0]  # sum_i l_ii
        ctx.save_for_backward(x, y, scale, bias)
        ctx.ring, ctx.tile, ctx.coef = ring, tile, coef
        return (coef * (total - pos)).to(x.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, g: Tensor):
        x, y, scale, bias = ctx.saved_tensors
        ring, tile = ctx.ring, ctx.tile
        alpha = (g * ctx.coef).to(x.dtype)
        gx = torch.zeros_like(x)  # raw gradients (before the factor scale)
        gb = x.new_zeros((), dtype=stat_dtype(x))

        def visit(owner: int, texts: Sequence[Tensor], g_texts: Sequence[Tensor]) -> None:
            nonlocal gb
            grads = (gx, g_texts[0])
            gb += sigmoid_tiles(x, texts[0], scale, bias, tile, value=False, grads=grads, alpha=alpha)[1]

        # Re-run the ring. Each text block carries an accumulator of d loss / d text from every rank it
        # passes; it comes home with the contributions of all ranks. Only this rank's images are used
        # here, so its own upstream gradient ``g`` is the right one for every block.
        (gy,) = ring.circulate([y], lambda n: [y.new_zeros((n, y.shape[1]))], visit)
        # the positives: -sum_i l_ii
        gx.addcmul_(y, alpha, value=-1)
        gy.addcmul_(x, alpha, value=-1)
        gb = gb - alpha * x.shape[0]
        g_scale = (
            torch.linalg.vecdot(x, gx).sum(dtype=gb.dtype).to(scale.dtype)
            if ctx.needs_input_grad[2]
            else None
        )
        g_bias = gb.to(bias.dtype) if ctx.needs_input_grad[3] else None
        return gx.mul_(scale), gy.mul_(scale), g_scale, g_bias, None, None, None


@contrastive_loss
def siglip_loss(
    x: Tensor, y: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, layout: Layout
) -> Tensor:
    """SigLIP loss of this rank's ``(b, d)`` features; see the module docstring for the DDP convention.

    ``impl`` (single device): ``dense`` materialises the ``B x B`` logits, ``tiled`` works in
    ``tile_size``-square tiles, ``auto`` tiles when ``B > tile_size``. ``dist_impl`` (W > 1): ``ring``
    (tiled blocks, memory independent of W) or ``gather`` (all-gather reference, ``b x B`` logits).
    """
    b, coef, tile = x.shape[0], layout.coef, layout.tile_size
    if layout.world > 1 and layout.dist_impl == "gather":
        all_text = all_gather_with_grad(y, layout.sizes, layout.rank, layout.group)
        return siglip_loss_dense(x, all_text, logit_scale, logit_bias, layout.offset, coef)
    if layout.world == 1 and not layout.tiled(b, b):
        return siglip_loss_dense(x, y, logit_scale, logit_bias, 0, coef)
    bias = logit_bias if logit_bias is not None else logit_scale.new_zeros(())
    if layout.world == 1:
        return _siglip_tiled(x, y, logit_scale, bias, tile, coef)
    ring = Ring(layout.sizes, layout.rank, layout.group)
    return _siglip_ring(x, y, logit_scale, bias, ring, tile, coef)


@torch.compiler.disable
def _siglip_ring(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, ring: Ring, tile: int, coef: float
) -> Tensor:
    # eager under torch.compile: point-to-point exchanges and tile loops do not belong in a graph
    return _SigLipRing.apply(x, y, scale, bias, ring, tile, coef)


@torch.compiler.disable
def _siglip_tiled(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, tile: int, coef: float) -> Tensor:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale, bias)):
        return SigmoidTiled.apply(x, y, scale, bias, tile, coef)
    # no backward will follow (evaluation): the value alone, without the gradient matmuls, computed as
    # SigmoidTiled computes it (autocast off)
    with autocast_off(x):
        total, _ = sigmoid_tiles(x, y, scale, bias, tile)
        pos = torch.linalg.vecdot(x, y).sum(dtype=total.dtype) * scale + bias * x.shape[0]
        return (coef * (total - pos)).to(x.dtype)


class SigLipLoss(ContrastiveLoss):
    """``loss=siglip``: the sigmoid loss, with the initial scale and bias of the SigLIP paper."""

    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float | None = -10.0
    loss_fn = staticmethod(siglip_loss)
