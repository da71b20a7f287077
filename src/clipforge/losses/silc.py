"""Local-to-global self-distillation of SILC (Naeem et al., 2023, "SILC: Improving Vision Language
Pretraining with Self-Distillation"), one of the two distillation objectives of SigLIP 2 (Tschannen et al.,
2025, Sec. 2.3): the student image tower sees small local crops of an image, the EMA teacher sees the
whole (global) view, and the student learns to predict the teacher's DINO distribution of the global view
from each local crop (:func:`clipforge.losses.dino.dino_loss`, with centring and temperatures).

The global view is the batch image the contrastive loss trains on; the local crops are cut from it on the
device (random area fraction ``local_scale`` and aspect ratio in [3/4, 4/3], as torchvision's
``RandomResizedCrop`` draws them, resampled bilinearly), so no change to the data pipeline is needed and
the draws come from torch's generator, which the trainer seeds per step (a resumed run cuts the same
crops). A crop is ``local_grid`` patches on a side (6 for DINO's 96-pixel crops of a /16 model) and takes
a resampled position grid. SigLIP 2 uses 8 local views; so does the default here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.losses.dino import CentredDistillation, DinoHead, DistillSpec
from clipforge.losses.objective import ObjectiveBatch, Teacher
from clipforge.models.clip import CLIP


def sample_crop_boxes(
    batch: int,
    views: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | None = None,
) -> Tensor:
    """(batch, views, 4) random boxes ``[x0, y0, x1, y1]`` in [0, 1] image coordinates: area fraction
    uniform in ``scale``, log aspect ratio uniform in ``ratio``, position uniform where the box fits (a box
    wider or taller than the image is shrunk to fit, keeping its aspect ratio)."""
    u = torch.rand(batch, views, 4, device=device)  # area, ratio, x, y
    area = scale[0] + u[..., 0] * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + u[..., 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    w, h = torch.sqrt(area * torch.exp(log_r)), torch.sqrt(area / torch.exp(log_r))
    shrink = torch.clamp(torch.maximum(w, h), min=1.0)  # a side above 1 would leave the image
    w, h = w / shrink, h / shrink
    x0, y0 = u[..., 2] * (1 - w), u[..., 3] * (1 - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Bilinear crops: images (B, C, H, W), boxes (B, V, 4) in [0, 1] -> (B * V, C, size, size), crops of
    one image consecutive. Output pixel ``j`` samples the box at ``x0 + (j + 0.5) / size * (x1 - x0)``
    (continuous coordinates, ``align_corners=False``)."""
    B, V = boxes.shape[:2]
    x0, y0, x1, y1 = boxes.reshape(B * V, 4).to(images.dtype).unbind(-1)
    theta = torch.zeros(B * V, 2, 3, dtype=images.dtype, device=images.device)
    # affine_grid maps output [-1, 1] to input [-1, 1]: scale by the box size, shift to its centre
    theta[:, 0, 0], theta[:, 0, 2] = x1 - x0, x0 + x1 - 1
    theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, y0 + y1 - 1
    grid = F.affine_grid(theta, [B * V, images.shape[1], size, size], align_corners=False)
    src = images.repeat_interleave(V, dim=0)  # (B * V, C, H, W)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


class SilcLoss(CentredDistillation):
    """``objectives=silc``: student on ``num_local`` local crops, EMA teacher on the global view."""

    def __init__(
        self,
        head: DinoHead,
        num_local: int = 8,
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_grid: int = 6,
        weight: float = 1.0,
        start_frac: float = 0.8,
        distill: DistillSpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(head, weight, start_frac, distill)
        if num_local < 1:
            raise ValueError(f"num_local must be >= 1, got {num_local}")
        if not 0.0 < local_scale[0] <= local_scale[1] <= 1.0:
            raise ValueError(f"local_scale must satisfy 0 < min <= max <= 1, got {local_scale}")
        self.num_local = num_local
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))
        if local_grid < 1:
            raise ValueError(f"local_grid must be >= 1, got {local_grid}")
        self.local_grid = local_grid

    def check_model(self, model: CLIP) -> None:
        super().check_model(model)
        # multi-crop's local views are smaller than the global one (DINO: 96 px against 224): a crop resampled
        # to the image's own patch grid or a finer one is a zoomed-in global view, and costs as much or more
        visual = model.visual
        grid = visual.grid_size
        if self.local_grid >= grid:
            raise ValueError(
                f"local_grid={self.local_grid} is not smaller than the model's patch grid of {grid} "
                f"(model.vision.img_size {visual.img_size} // model.vision.patch_size {visual.patch_size}): "
                f"its local crops would be resampled to as many patches as the global view or more "
                f"(multi-crop's local views are smaller); set local_grid below {grid}"
            )

    def sample_boxes(self, batch: int, device: torch.device) -> Tensor:
        """(batch, num_local, 4) crop boxes; one place for the randomness (tests replace it)."""
        return sample_crop_boxes(batch, self.num_local, self.local_scale, device=device)

    def forward(self, batch: ObjectiveBatch, student: CLIP, teacher: Teacher | None) -> Tensor:
        if teacher is None:
            raise ValueError("SILC distils from the EMA teacher: configure ema (objectives=silc adds it)")
        images = batch.images
        B = images.shape[0]
        visual = student.visual
        size = self.local_grid * visual.patch_size
        crops = crop_resize(images, self.sample_boxes(B, images.device), size)  # (B * V, 3, size, size)
        local = visual.forward_head(visual.forward_features(crops, interpolate_pos=True), pre_logits=True)
        student_scores = self.head(local)  # (B * V, K)
        with torch.no_grad():
            tvis = teacher.model.visual
            global_feat = tvis.forward_head(batch.teacher_tokens(teacher.model), pre_logits=True)  # (B, D)
            teacher_scores = teacher.objective.head(global_feat)  # (B, K)
        return self.distil(
            student_scores,
            teacher_scores.repeat_interleave(self.num_local, dim=0),  # each crop's target: its image's
            centre_from=teacher_scores,  # one row per image, not per crop
        )

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, start_frac={self.start_frac}, num_local={self.num_local}, "
            f"local_scale={self.local_scale}, local_grid={self.local_grid}"
        )
