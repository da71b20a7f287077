"""Contrastive losses: the softmax loss of CLIP (Radford et al., 2021) and the sigmoid loss of SigLIP
(Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training").

Each loss takes ``(image_features, text_features, logit_scale, logit_bias)`` with the exponentiated
scale, reads rank and world size from ``torch.distributed`` at call time, and is exact under DDP: rank
``r`` returns its share of the full-batch loss times ``W``, so the mean over ranks is the full-batch loss
and DDP's gradient averaging yields the full-batch gradient. Large batches use tiled kernels whose memory
is ``O(B d + tile^2)``; across ranks both losses use a ring whose saved memory does not depend on ``W``
(for CLIP with an online log-sum-exp, after Inf-CL: Wang et al., 2024, "Breaking the Memory Barrier:
Near Infinite Batch Size Scaling for Contrastive Loss").

The auxiliary objectives of SigLIP 2 (Tschannen et al., 2025) live beside them, one module each, with the
same DDP convention: :mod:`~clipforge.losses.locca` (decoder), :mod:`~clipforge.losses.silc`
(local-to-global self-distillation), :mod:`~clipforge.losses.tips` (masked prediction), sharing
:mod:`~clipforge.losses.dino` and the interface of :mod:`~clipforge.losses.objective`.
"""

from clipforge.losses.clip import ClipLoss, clip_loss, clip_loss_dense
from clipforge.losses.siglip import SigLipLoss, siglip_loss, siglip_loss_dense
from clipforge.losses.stats import logit_stats

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "clip_loss",
    "clip_loss_dense",
    "logit_stats",
    "siglip_loss",
    "siglip_loss_dense",
]
