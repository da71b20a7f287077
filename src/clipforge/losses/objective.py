"""What the auxiliary objectives of SigLIP 2 (Tschannen et al., 2025) share: each is a small ``nn.Module``
with its own parameters (decoder, heads, mask token), its own loss ``weight`` and a ``start_frac`` of
training before which it is off. They are added to the contrastive loss by the LightningModule, which
hands each one the batch, the trained model (the student) and, to those that ask for it, the EMA teacher.

Loss-value convention under data parallelism, as for the contrastive losses (:mod:`clipforge.losses`):
rank ``r`` returns ``W / N * sum_{items on r} l``, where ``N`` counts the items (samples, views, tokens or
masked patches) of the *global* batch, so the mean over ranks is the full-batch mean and DDP's gradient
averaging gives the full-batch gradient, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clipforge.distributed import world_info
from clipforge.ema import as_teacher
from clipforge.models.clip import CLIP
from clipforge.optim import check_start_frac, has_started


@dataclass
class Teacher:
    """The EMA teacher: the averaged two-tower model and the averaged copy of the asking objective."""

    model: CLIP
    objective: nn.Module


@dataclass
class ObjectiveBatch:
    """One training batch as the objectives see it.

    ``images`` (B, 3, H, W) is the view the contrastive loss trained on; ``tokens`` (B, L) its captions;
    ``image_tokens`` (B, T, D) the student's un-pooled tokens from that same forward pass (shared, not
    recomputed); ``extras`` what else the data provides (box targets, see :mod:`clipforge.losses.locca`).
    """

    images: Tensor
    tokens: Tensor
    image_tokens: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    _teacher_tokens: Tensor | None = None

    def teacher_tokens(self, teacher: CLIP) -> Tensor:
        """The teacher's un-pooled tokens of ``images`` (B, T, D), computed once per step and shared by
        every objective that distils from it."""
        if self._teacher_tokens is None:
            with as_teacher(teacher):  # eval mode: the teacher sees every patch, without drop path
                self._teacher_tokens = teacher.visual.forward_features(self.images)
        return self._teacher_tokens


class Objective(nn.Module):
    """Base of the SigLIP 2 objectives: ``weight`` multiplies the loss; the objective runs once
    ``global_step >= start_frac * total_steps``. ``needs_teacher``: the objective distils from the EMA."""

    needs_teacher: bool = False

    def __init__(self, weight: float = 1.0, start_frac: float = 0.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"an objective's weight must be >= 0, got {weight}")
        check_start_frac(start_frac, f"objective {type(self).__name__}")
        self.weight = weight
        self.start_frac = start_frac

    def active(self, step: int, total_steps: int | None) -> bool:
        return has_started(step, self.start_frac, total_steps)

    def check_model(self, model: CLIP) -> None:
        """Raise ``ValueError`` when this objective was built for another model (a width, vocabulary or
        context that differs from ``model``'s). The module checks when it is built, so a mismatch fails at
        once rather than as a shape error at the step the objective starts (80% into a SILC run)."""

    def forward(self, batch: ObjectiveBatch, student: CLIP, teacher: Teacher | None) -> Tensor:
        raise NotImplementedError


def check_matches(what: str, got: int, setting: str, expected: int) -> None:
    """``what`` (``got``) must equal the model's ``setting`` (``expected``), or a ``ValueError`` says so."""
    if got != expected:
        raise ValueError(f"{what} is {got} but {setting} is {expected}: they must match")


def global_count(n: int | Tensor, device: torch.device, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of ``n`` over the ranks of ``group`` (a float scalar on ``device``; no gradient)."""
    total = torch.as_tensor(n, dtype=torch.float64, device=device).detach().clone()
    if world_info(group)[1] > 1:
        dist.all_reduce(total, group=group)
    return total


def global_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``x.sum(0)`` over the rows of every rank, in float32 or wider (no gradient)."""
    total = x.detach().sum(dim=0, dtype=torch.promote_types(x.dtype, torch.float32))
    if world_info(group)[1] > 1:
        dist.all_reduce(total, group=group)
    return total


def world_mean_coef(count: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``W / N``: the factor that turns this rank's sum into its share of the global mean (see above)."""
    return world_info(group)[1] / count.clamp(min=1)
