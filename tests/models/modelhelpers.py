"""Small model builders shared by the model, converter and picture tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipforge.models import TextTransformer, VisionTransformer


def perturb_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Add noise to every parameter, norms included, so no two parameters are interchangeable and a
    wrong key map (e.g. norm1 <-> norm2, which are both (1, 0) at init) changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh random values for every parameter: norm gains N(1, 0.05), everything else N(0, 0.02).
    Fast, and fills modules built without init (timm's ``weight_init="skip"`` leaves some empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + (1.0 if gain else 0.0))
    return module


def small_vit(**overrides: Any) -> VisionTransformer:
    """A small image tower; ``overrides`` are flat settings (``norm_eps=1e-5`` as well as ``depth=3``)."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, output_dim=16)
    kwargs.update(overrides)
    return VisionTransformer.from_settings(**kwargs)


def small_text(**overrides: Any) -> TextTransformer:
    """A small text tower; ``overrides`` are flat settings, as :func:`small_vit`'s."""
    kwargs = dict(vocab_size=100, context_length=12, embed_dim=32, depth=2, num_heads=4, output_dim=16)
    kwargs.update(overrides)
    return TextTransformer.from_settings(**kwargs)


def tokens(batch: int, length: int, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    """Token ids with an end-of-text (the highest id) at a different position in each row."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(1, vocab - 1, (batch, length), generator=gen)
    for i in range(batch):
        end = length // 2 + i % (length // 2)
        t[i, end] = vocab - 1
        t[i, end + 1 :] = 0
    return t
