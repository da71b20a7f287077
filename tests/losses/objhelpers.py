"""Small models, independent reference losses and fixed randomness for the SigLIP 2 objective tests."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from clipforge.losses.dino import DinoHead
from clipforge.losses.locca import LocCaLoss
from clipforge.losses.objective import ObjectiveBatch, Teacher
from clipforge.losses.silc import SilcLoss
from clipforge.losses.tips import TipsLoss
from clipforge.models import CLIP, TextTransformer, VisionTransformer
from clipforge.models.decoder import TextDecoder

VOCAB, CTX, IMG, WIDTH = 60, 10, 16, 16


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    vision = VisionTransformer(
        img_size=IMG, patch_size=4, embed_dim=WIDTH, depth=1, num_heads=2, output_dim=8
    )
    text = TextTransformer(
        vocab_size=VOCAB, context_length=CTX, embed_dim=WIDTH, depth=1, num_heads=2, output_dim=8
    )
    return CLIP(vision, text).double()


def head(seed: int = 1) -> DinoHead:
    torch.manual_seed(seed)
    return DinoHead(WIDTH, out_dim=12, hidden_dim=20, bottleneck_dim=6).double()


def silc() -> SilcLoss:
    return SilcLoss(head(), start_frac=0.0, num_local=2, local_scale=(0.2, 0.5), local_grid=2).double()


def tips() -> TipsLoss:
    torch.manual_seed(2)
    return TipsLoss(head(3), embed_dim=WIDTH, start_frac=0.0, mask_ratio=0.5).double()


def locca(task_probs=(1.0, 1.0, 1.0), parallel_prob: float = 0.0) -> LocCaLoss:
    torch.manual_seed(4)
    dec = TextDecoder(
        VOCAB,
        CTX,
        image_dim=WIDTH,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_box_bins=8,
        parallel_prob=parallel_prob,
    )
    return LocCaLoss(dec.double(), task_probs=task_probs)


def captions(batch: int, seed: int = 0) -> Tensor:
    """Tokenizer-like rows: SOT (VOCAB - 2), words, EOT (VOCAB - 1), zero padding."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(batch, CTX, dtype=torch.long)
    for i in range(batch):
        n = 2 + i % 5
        t[i, 0] = VOCAB - 2
        t[i, 1 : 1 + n] = torch.randint(1, VOCAB - 2, (n,), generator=g)
        t[i, 1 + n] = VOCAB - 1
    return t


def teacher_of(model: CLIP, objective: torch.nn.Module) -> Teacher:
    """A teacher that differs from the student (a real EMA lags behind it)."""
    t_model, t_obj = copy.deepcopy(model), copy.deepcopy(objective)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in [*t_model.parameters(), *t_obj.parameters()]:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return Teacher(t_model.eval(), t_obj.eval())


def objective_batch(
    model: CLIP, images: Tensor, tokens: Tensor, extras: dict | None = None
) -> ObjectiveBatch:
    return ObjectiveBatch(images, tokens, model.visual.forward_features(images), extras or {})


def ref_dino(student: Tensor, teacher: Tensor, centre: Tensor, ts: float = 0.1, tt: float = 0.04) -> Tensor:
    """Mean over rows of -sum_k q_k log p_k, written out: q = exp((t - c) / tt) / Z, log p = s / ts - lse."""
    q = torch.exp((teacher - centre) / tt)
    q = q / q.sum(dim=-1, keepdim=True)
    logp = student / ts - torch.logsumexp(student / ts, dim=-1, keepdim=True)
    return -(q * logp).sum(dim=-1).mean()


def ref_token_ce(logits: Tensor, targets: Tensor, is_target: Tensor) -> Tensor:
    """Mean over target tokens of -log softmax(logits)[target], by explicit gather."""
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, S)
    return -(picked * is_target).sum() / is_target.sum()
