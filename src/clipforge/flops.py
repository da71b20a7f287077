"""Model FLOPs and the peak they are measured against, for MFU as defined in PaLM (Chowdhery et al., 2022,
appendix B): model FLOPs per sample (forward and backward, counted by ``torch.utils.flop_counter`` rather
than by a formula) times samples per second per device, over the device's peak. Used by the throughput
callback during training and by the step benchmark.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipforge.checkpoint import build_model

# Dense bf16 tensor-core peak of an H100 SXM; set ``peak_flops`` for other devices (A100: 312e12).
H100_BF16_PEAK_FLOPS = 989e12


def model_flops_per_sample(model_cfg: Any, loss_cfg: Any | None = None, train: bool = True) -> int:
    """FLOPs of one forward and backward pass of both towers for one image-text pair.

    The model is rebuilt from its config on the meta device, so counting allocates nothing and leaves the
    real model, its gradients and any parallel wrapper alone. In train mode patch dropout shortens the
    image sequence exactly as it does in training. The loss (``O(B d)`` per sample) is left out.
    """
    with torch.device("meta"):
        model = build_model(model_cfg, loss_cfg)
    model.train(train)
    size = model.visual.img_size
    images = torch.zeros(1, 3, size, size, device="meta")
    tokens = torch.zeros(1, model.text.context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    return counter.get_total_flops()
