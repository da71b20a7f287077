"""The DINO self-distillation loss (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision
Transformers"), as SILC (Naeem et al., 2023) and TIPS (Maninis et al., 2024) use it inside SigLIP 2
(Tschannen et al., 2025): a projection head maps features to ``K`` prototype scores; the teacher's
scores are centred and sharpened, the student's softened, and the student is trained by cross-entropy
to predict the teacher's distribution:

    p_t = softmax((t - c) / tau_t)      p_s = softmax(s / tau_s)      l = - sum_k p_t,k log p_s,k

Centring subtracts ``c``, a running mean of the teacher's scores, which keeps one prototype from taking
over; sharpening (``tau_t < tau_s``) keeps the teacher from going uniform; together they prevent collapse.
After each step ``c <- m c + (1 - m) mean(t)`` with the mean over the *global* batch (all-reduced), so
every rank holds the same centre and it equals the one-process centre of the full batch.

The head follows DINO: an MLP (GELU) to a bottleneck, L2 normalisation, then cosine scores against
``K`` prototypes whose vectors are normalised (DINO's weight-normalised last layer with its gain fixed
at 1, written as a normalisation in the forward pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.losses.objective import Objective, check_matches, global_count, global_sum, world_mean_coef
from clipforge.models.clip import CLIP
from clipforge.models.specs import as_spec


class DinoHead(nn.Module):
    """``in_dim`` -> MLP (``num_layers`` linear layers, GELU between) -> ``bottleneck_dim`` -> L2 norm ->
    cosine similarity with ``out_dim`` prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_dim = in_dim
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, out_dim) scores in [-1, 1]."""
        z = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck)
        return z @ F.normalize(self.prototypes, dim=-1).T


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    centre: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """This rank's share (``W / N * sum``) of the mean over ``N`` global rows of
    ``CE(softmax((teacher - centre) / teacher_temp), softmax(student / student_temp))``.

    ``student`` (n, K) scores with gradient, ``teacher`` (n, K) (no gradient flows into it), ``centre`` (K,).
    Computed in float32 or wider.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    targets = F.softmax((teacher.detach().to(dtype) - centre.to(dtype)) / teacher_temp, dim=-1)
    log_probs = F.log_softmax(student.to(dtype) / student_temp, dim=-1)
    total = -(targets * log_probs).sum()
    count = global_count(student.shape[0], student.device, group)
    return total * world_mean_coef(count, group).to(dtype)


@torch.no_grad()
def updated_centre(
    centre: Tensor, teacher: Tensor, momentum: float, group: dist.ProcessGroup | None = None
) -> Tensor:
    """``momentum * centre + (1 - momentum) * mean(teacher)``, the mean over the global batch's rows;
    ``centre`` unchanged when that mean is not finite."""
    count = global_count(teacher.shape[0], teacher.device, group)
    mean = global_sum(teacher, group) / count.clamp(min=1)
    moved = (centre * momentum + mean.to(centre.dtype) * (1 - momentum)).to(centre.dtype)
    # A running buffer outlives its step: one NaN batch (a step the non-finite guard skips) would otherwise
    # make every later loss NaN. The mean is global, so every rank keeps or moves its centre alike; no sync.
    return torch.where(torch.isfinite(mean).all(), moved, centre)


def centred_distillation(
    student: Tensor,
    teacher: Tensor,
    centre: Tensor,
    student_temp: float,
    teacher_temp: float,
    momentum: float,
    centre_from: Tensor | None = None,
) -> Tensor:
    """:func:`dino_loss` of ``student`` against ``teacher``, then the centre buffer moves (in place) towards
    the global batch mean of ``centre_from`` (default: ``teacher``), as SILC and TIPS both train."""
    loss = dino_loss(student, teacher, centre, student_temp, teacher_temp)
    centre.copy_(updated_centre(centre, teacher if centre_from is None else centre_from, momentum))
    return loss


@dataclass(frozen=True)
class DistillSpec:
    """How a student is distilled from the teacher: DINO's temperatures (``teacher_temp < student_temp``
    sharpens the teacher) and the momentum of the teacher-score centre (Caron et al., 2021)."""

    student_temp: float = 0.1
    teacher_temp: float = 0.04
    centre_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.student_temp <= 0 or self.teacher_temp <= 0:
            raise ValueError(f"temperatures must be > 0, got {self.student_temp} and {self.teacher_temp}")
        if not 0.0 <= self.centre_momentum < 1.0:
            raise ValueError(f"centre_momentum must be in [0, 1), got {self.centre_momentum}")


class CentredDistillation(Objective):
    """An objective that distils the EMA teacher's head scores into the student's by
    :func:`centred_distillation` (SILC and TIPS): its head, a :class:`DistillSpec` (or its mapping, a YAML
    node) and a centre buffer of its own."""

    needs_teacher = True

    def __init__(
        self,
        head: DinoHead,
        weight: float,
        start_frac: float,
        distill: DistillSpec | Mapping[str, Any] | None,
    ) -> None:
        super().__init__(weight, start_frac)
        self.head = head
        self.distill = as_spec(DistillSpec, distill)
        self.register_buffer("centre", torch.zeros(head.prototypes.shape[0]))

    def check_model(self, model: CLIP) -> None:
        # the head reads the image tower's tokens
        check_matches("head.in_dim", self.head.in_dim, "model.vision.embed_dim", model.visual.embed_dim)

    def distil(self, student: Tensor, teacher: Tensor, centre_from: Tensor | None = None) -> Tensor:
        """:func:`centred_distillation` with this objective's temperatures, centre and momentum."""
        d = self.distill
        temps = (d.student_temp, d.teacher_temp)
        return centred_distillation(student, teacher, self.centre, *temps, d.centre_momentum, centre_from)
