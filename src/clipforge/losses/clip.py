"""Symmetric softmax contrastive loss of CLIP (Radford et al., 2021, "Learning Transferable Visual Models
From Natural Language Supervision").

With logits ``S = scale * x @ y.T`` over a batch of ``B`` pairs, the loss is the mean of the image-to-text
and text-to-image cross-entropies with the matching pair as the target:

    L = 1/(2B) * sum_i [lse_j S_ij + lse_j S_ji - 2 S_ii]

``impl="tiled"`` computes the log-sum-exps with the online softmax (Milakov & Gimelshein, 2018; as in
FlashAttention, Dao et al., 2022) in ``tiles.TiledLSE``, so memory is ``O(B d + tile^2)``.

Under data parallelism each rank scores its local rows against all-gathered features (``b x B`` logits per
direction) and the differentiable gather sums the gradients of all ranks. Loss-value convention (the same
as open_clip's ``local_loss=True, gather_with_grad=True`` when all ranks have ``b`` rows): rank ``r``
returns ``W / B * 1/2 * sum_{i on r} [...]``, its share of the full-batch loss times ``W``. The mean over
ranks (what is logged after a ``sync_dist`` mean) is the full-batch loss, and DDP's gradient averaging
gives exactly the full-batch gradient. Uneven last batches are handled by gathering the sizes first.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.losses.distributed import all_gather_with_grad, gather_sizes, world_info
from clipforge.losses.tiled import check_impl, tiled_lse, use_tiled


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


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    impl: str = "auto",
    tile_size: int = 8192,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """CLIP loss of this rank's ``(b, d)`` features; see the module docstring for the DDP convention.

    ``impl``: ``dense`` materialises the logits, ``tiled`` works in ``tile_size``-square tiles, ``auto``
    tiles when a logit block (``b x B``) is larger than one tile. ``logit_bias`` does not change a softmax.
    """
    check_impl(impl, tile_size)
    rank, world = world_info(group)
    b = image_features.shape[0]
    if world == 1:
        coef, tiled = 1.0 / b, use_tiled(impl, b, b, tile_size)
        if tiled:
            loss = tiled_lse(image_features, text_features, logit_scale, tile_size, True, 0, coef / 2)
        else:
            loss = clip_loss_dense(image_features, text_features, image_features, text_features, logit_scale)
    else:
        sizes = gather_sizes(b, image_features.device, group)
        offset, coef = sum(sizes[:rank]), world / sum(sizes)
        all_images = all_gather_with_grad(image_features, sizes, rank, group)
        all_texts = all_gather_with_grad(text_features, sizes, rank, group)
        if use_tiled(impl, b, sum(sizes), tile_size):
            half = coef / 2
            loss = tiled_lse(image_features, all_texts, logit_scale, tile_size, False, offset, half)
            loss = loss + tiled_lse(text_features, all_images, logit_scale, tile_size, False, offset, half)
        else:
            loss = clip_loss_dense(
                image_features, text_features, all_images, all_texts, logit_scale, offset, coef
            )
    if logit_bias is not None:
        # Softmax is shift-invariant, so the bias has zero gradient; keep it in the graph so that DDP
        # does not report an unused parameter.
        loss = loss + (0.0 * logit_bias).to(loss.dtype)
    return loss


class ClipLoss(nn.Module):
    """``loss=clip``: the symmetric softmax loss, with CLIP's initial temperature 0.07 and no bias."""

    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None

    def __init__(self, impl: str = "auto", tile_size: int = 8192) -> None:
        super().__init__()
        check_impl(impl, tile_size)
        self.impl, self.tile_size = impl, tile_size

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        return clip_loss(
            image_features, text_features, logit_scale, logit_bias, impl=self.impl, tile_size=self.tile_size
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, tile_size={self.tile_size}"
