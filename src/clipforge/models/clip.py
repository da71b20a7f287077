"""The two-tower contrastive image-text model of CLIP (Radford et al., 2021) and SigLIP
(Zhai et al., 2023): an image tower and a text tower projecting into one space, a learnable
temperature (``logit_scale``, kept in log space) and, for SigLIP, a learnable ``logit_bias``.

Initial values follow the papers: CLIP t = log(1/0.07); SigLIP t' = log(10), b = -10. The scale is
clamped at 100 (log 100), as CLIP does to keep training stable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.specs import check_setting_types
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


def capped_log_scale(log_scale: torch.Tensor, max_logit_scale: float) -> torch.Tensor:
    """The log-scale :meth:`CLIP.scale_and_bias` exponentiates: ``log_scale`` where it is at most
    ``log(max_logit_scale)``, else that bound. What an export stores for a model that does not cap its
    scale (open_clip): the stored parameter can lie above the bound (an EMA copy, a step-0 model)."""
    log_max = math.log(max_logit_scale)
    return torch.where(log_scale > log_max, log_max, log_scale)


def cap_covering(log_scale: torch.Tensor, max_logit_scale: float = MAX_LOGIT_SCALE) -> float:
    """The cap, at least ``max_logit_scale``, under which :func:`capped_log_scale` leaves ``log_scale`` as
    it is: what a model imported from open_clip, whose forward does not cap, needs to give its logits
    (SigLIP ported from big_vision carries a scale of about 117). Rounding of ``log`` is allowed for."""
    cap = max(max_logit_scale, math.exp(float(log_scale)))
    while bool((capped_log_scale(log_scale, cap) < log_scale).any()):
        cap = math.nextafter(cap, math.inf)
    return cap


class CLIP(nn.Module):
    def __init__(
        self,
        vision: VisionTransformer,
        text: TextTransformer,
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
        max_logit_scale: float = MAX_LOGIT_SCALE,
    ) -> None:
        super().__init__()
        check_setting_types(
            CLIP,
            {
                "init_logit_scale": init_logit_scale,
                "init_logit_bias": init_logit_bias,
                "max_logit_scale": max_logit_scale,
            },
        )
        if vision.output_dim != text.output_dim:
            raise ValueError(
                f"model.vision.output_dim={vision.output_dim} and model.text.output_dim={text.output_dim} differ: "
                "the image and text towers must project to the same size"
            )
        if not max_logit_scale > 0:  # its log caps the scale: 0 or less failed at the first step, math.log's
            raise ValueError(
                f"model.max_logit_scale must be > 0 (a cap on exp(logit_scale)), got {max_logit_scale}"
            )
        self.visual = vision
        self.text = text
        self.embed_dim = vision.output_dim
        self.max_logit_scale = max_logit_scale
        scale = CLIP_INIT_LOGIT_SCALE if init_logit_scale is None else init_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        )

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, normalize: bool = True
    ) -> dict[str, torch.Tensor | None]:
        """Both towers' features (unit-normalised unless ``normalize=False``), the exponentiated and clamped
        logit scale and the bias, in one call (FSDP2 gathers the root's weights around this call)."""
        scale, bias = self.scale_and_bias()
        return {
            "image_features": self.encode_image(images, normalize=normalize),
            "text_features": self.encode_text(tokens, normalize=normalize),
            "logit_scale": scale,
            "logit_bias": bias,
        }

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logit scale as the losses and evaluation use it (``exp`` of the stored log-scale, clamped
        at ``max_logit_scale``) and the SigLIP bias (None for CLIP); the one place that computes them.

        The cap acts on the log-scale and passes the gradient at the bound, where ``clamp_logit_scale``
        parks the parameter after every step: ``exp(log_scale).clamp(max=100)`` had no gradient there
        (``exp`` of the float32 ``log(100)`` is 100.0000076, and ``torch.clamp`` passes none even at
        equality), so a scale that once reached the maximum could never come down again. Above the bound
        (before the next ``clamp_logit_scale``) the scale is capped and gets no gradient."""
        return capped_log_scale(self.logit_scale, self.max_logit_scale).exp(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the log-scale in [0, log(max_logit_scale)]; call after each optimizer step."""
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def no_weight_decay(self) -> set[str]:
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        names.add("logit_scale")
        if self.logit_bias is not None:
            names.add("logit_bias")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
