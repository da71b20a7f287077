"""Logit statistics for logging the contrastive losses of CLIP (Radford et al., 2021) and SigLIP (Zhai et
al., 2023): how far the positive (matching) pairs sit from the negatives, and the working range of the
learned scale and bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clipforge.losses.tiled import tiles


@torch.no_grad()
def logit_stats(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    tile_size: int = 4096,
) -> dict[str, Tensor]:
    """Mean/min/max of the positive (diagonal) and negative (off-diagonal) logits of the local ``b x b``
    block, ``scale * x @ y.T + bias``, as 0-dim tensors (no ``.item()``, so no host sync).

    Keys: ``logit_pos_{mean,min,max}`` and ``logit_neg_{mean,min,max}`` (NaN when ``b == 1``). Rows are
    processed ``tile_size`` at a time so a large local batch does not materialise ``b x b`` logits.
    """
    x, y = image_features, text_features
    b = x.shape[0]
    bias = logit_bias if logit_bias is not None else logit_scale.new_zeros(())
    pos = (x * y).sum(dim=1) * logit_scale + bias  # (b,)
    stats = {"logit_pos_mean": pos.mean(), "logit_pos_min": pos.min(), "logit_pos_max": pos.max()}
    if b < 2:
        nan = pos.new_full((), float("nan"))
        return stats | {"logit_neg_mean": nan, "logit_neg_min": nan, "logit_neg_max": nan}
    total, lo, hi = pos.new_zeros(()), pos.new_full((), float("inf")), pos.new_full((), float("-inf"))
    for i0, i1 in tiles(b, tile_size):
        logits = (x[i0:i1] * logit_scale) @ y.T + bias  # (ti, b)
        diag = logits[:, i0:i1].diagonal()  # the positives of these rows
        total = total + logits.sum() - diag.sum()
        diag.fill_(float("inf"))
        lo = torch.minimum(lo, logits.min())
        diag.fill_(float("-inf"))
        hi = torch.maximum(hi, logits.max())
    neg_mean = total / (b * (b - 1))
    return stats | {"logit_neg_mean": neg_mean, "logit_neg_min": lo, "logit_neg_max": hi}
