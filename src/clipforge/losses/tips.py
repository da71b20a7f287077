"""Masked prediction of the teacher's patch features, as in TIPS (Maninis et al., 2024, "TIPS: Text-Image
Pretraining with Spatial Awareness", after iBOT, Zhou et al., 2022), the second distillation objective of
SigLIP 2 (Tschannen et al., 2025, Sec. 2.3): the student sees the global view with a fraction
``mask_ratio`` of its patch embeddings replaced by a learned mask token (50% in SigLIP 2) and learns to
predict, at the masked positions, the EMA teacher's features of the unmasked view. SigLIP 2 defines the loss
"identically to the first term [the local-to-global loss] but applied to per-patch features": a DINO head on
every patch token and the centred, sharpened cross-entropy of :func:`clipforge.losses.dino.dino_loss`, here
with a centre of its own. The teacher's head runs on the masked patches only (the loss needs no other), and
the centre follows the mean of those: a random half of all patches, an unbiased estimate of the all-patch
mean that iBOT centres on, at half the cost of the head. Both student and teacher see the
same view, up to the masking. The mask is drawn from torch's per-step seeded generator, ``round(ratio * N)``
patches per image, so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from clipforge.losses.dino import CentredDistillation, DinoHead, DistillSpec
from clipforge.losses.objective import ObjectiveBatch, Teacher, check_matches
from clipforge.models.clip import CLIP


def random_patch_mask(
    batch: int, num_patches: int, ratio: float, device: torch.device | None = None
) -> Tensor:
    """(batch, num_patches) bool with exactly ``max(1, round(ratio * num_patches))`` True per row."""
    k = max(1, round(ratio * num_patches))
    order = torch.rand(batch, num_patches, device=device).argsort(dim=1)  # a random permutation per row
    return torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(1, order[:, :k], True)


class TipsLoss(CentredDistillation):
    """``objectives=tips``: masked student patches predict the EMA teacher's patch distribution."""

    def __init__(
        self,
        head: DinoHead,
        embed_dim: int,
        mask_ratio: float = 0.5,
        weight: float = 0.25,
        start_frac: float = 0.8,
        distill: DistillSpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(head, weight, start_frac, distill)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.empty(embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def check_model(self, model: CLIP) -> None:
        super().check_model(model)
        check_matches("embed_dim", self.mask_token.numel(), "model.vision.embed_dim", model.visual.embed_dim)

    def sample_mask(self, batch: int, num_patches: int, device: torch.device) -> Tensor:
        """(batch, num_patches) bool patch mask; one place for the randomness (tests replace it)."""
        return random_patch_mask(batch, num_patches, self.mask_ratio, device)

    def forward(self, batch: ObjectiveBatch, student: CLIP, teacher: Teacher | None) -> Tensor:
        if teacher is None:
            raise ValueError("TIPS distils from the EMA teacher: configure ema (objectives=tips adds it)")
        visual = student.visual
        images, prefix = batch.images, visual.num_prefix_tokens
        mask = self.sample_mask(images.shape[0], visual.num_patches, images.device)  # (B, N)
        tokens = visual.encode(visual.embed(images, mask, self.mask_token), masked=True)[
            :, prefix:
        ]  # (B, N, D)
        student_scores = self.head(tokens[mask])  # (M, K), M masked patches in row-major order
        with torch.no_grad():
            target_tokens = batch.teacher_tokens(teacher.model)[:, prefix:]  # (B, N, D)
            teacher_scores = teacher.objective.head(
                target_tokens[mask]
            )  # (M, K), the same rows as the student's
        return self.distil(student_scores, teacher_scores)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, start_frac={self.start_frac}, mask_ratio={self.mask_ratio}"
