"""Model FLOPs and the peak they are measured against, for MFU as defined in PaLM (Chowdhery et al., 2022,
appendix B): model FLOPs per sample (forward and backward, counted by ``torch.utils.flop_counter`` rather
than by a formula) times samples per second per device, over the device's peak. Used by the throughput
callback during training and by the step benchmark.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipforge.checkpoint import build_model

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a CUDA device
# name's words: the first row whose words all appear in the name counts (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device | str) -> float | None:
    """The dense bf16 peak of a CUDA device (a ``torch.device`` or a device name such as ``"NVIDIA A100-SXM4-
    80GB"``) from :data:`PEAK_BF16_TFLOPS`; ``None`` on the CPU or a device not in the table, where an MFU
    would be against a made-up number."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = torch.cuda.get_device_name(device)
    words = set(re.split(r"[\s\-_]+", device.upper()))
    return next((tf for name, tf in PEAK_BF16_TFLOPS if set(name.upper().split()) <= words), None)


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
