"""Optimizer parameter groups and the learning-rate schedule used in CLIP pretraining
(Radford et al., 2021: AdamW with decoupled weight decay, Loshchilov & Hutter, 2019; linear warmup then
cosine decay, Loshchilov & Hutter, 2017).

Weight decay applies to matrices only: biases, norm gains, embeddings, position embeddings, the CLS
token and the logit scale/bias are excluded (``p.ndim < 2`` or named by ``model.no_weight_decay()``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """``[decay group, no-decay group]``. ``decay_embeddings`` decays the embedding tables too (token and
    position embeddings: the names ``no_weight_decay`` lists whose squeezed shape has 2 dims), as
    open_clip's rule does (every matrix but norms, biases and the logit scale); CLS tokens, attention-pool
    latents, norms, biases and the logit scale/bias are never decayed."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        table = decay_embeddings and p.squeeze().ndim >= 2
        (no_decay if p.ndim < 2 or (name in skip and not table) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps (trainer.max_steps) must be positive, got {total_steps}")
    check_warmup(warmup_steps)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    del total_steps  # same signature as warmup_cosine so configs swap freely
    check_warmup(warmup_steps)
    return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def check_warmup(warmup_steps: int) -> None:
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")


def check_start_frac(start_frac: float, owner: str) -> None:
    """``start_frac``, the fraction of training after which ``owner`` starts, must be in [0, 1]."""
    if not 0.0 <= start_frac <= 1.0:
        raise ValueError(f"{owner} start_frac must be in [0, 1], got {start_frac}")


def has_started(step: int, start_frac: float, total_steps: int | None) -> bool:
    """Whether ``step`` (optimizer steps done) has reached ``start_frac`` of ``total_steps``; with no known
    total, from the start."""
    return not total_steps or step >= start_frac * total_steps
