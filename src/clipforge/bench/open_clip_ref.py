"""The open_clip side of the step benchmark (:mod:`clipforge.bench.step`): open_clip's model and loss of
the same shape as a clipforge model config, so both libraries time the same step on the same batch.
open_clip is imported only when a benchmark asks for it."""

from __future__ import annotations

from typing import Any

import torch

OPEN_CLIP_NAMES = {"vit_b16": "ViT-B-16", "vit_b32": "ViT-B-32", "vit_l14": "ViT-L-14", "vit_h14": "ViT-H-14"}


def open_clip_from_cfg(model_cfg: Any, init_logit_bias: float | None) -> torch.nn.Module:
    """open_clip's CLIP of the same shape as a clipforge model config (the ViT-B/L/H names use open_clip's own)."""
    import open_clip

    v, t = model_cfg.vision, model_cfg.text
    vision_cfg = {
        "image_size": v.img_size,
        "patch_size": v.patch_size,
        "width": v.embed_dim,
        "layers": v.depth,
        "head_width": v.embed_dim // v.num_heads,
        "mlp_ratio": v.block.mlp_ratio,
    }
    text_cfg = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.embed_dim,
        "heads": t.num_heads,
        "layers": t.depth,
        "mlp_ratio": t.block.mlp_ratio,
    }
    return open_clip.model.CLIP(
        embed_dim=v.output_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, init_logit_bias=init_logit_bias
    )


def open_clip_model(
    model_name: str, model_cfg: Any, loss_cls: Any, overrides: list[str] | None
) -> torch.nn.Module:
    """open_clip's model for ``conf/model/<model_name>`` (``model_cfg``: its composed node) with the initial
    logit scale and bias of clipforge's ``loss_cls``; it returns a dict, as clipforge's model does."""
    import open_clip

    if model_name in OPEN_CLIP_NAMES and not overrides:
        model = open_clip.create_model(
            OPEN_CLIP_NAMES[model_name], output_dict=True, init_logit_bias=loss_cls.init_logit_bias
        )
    else:
        model = open_clip_from_cfg(model_cfg, loss_cls.init_logit_bias)
        model.output_dict = True
    if loss_cls.init_logit_bias is not None:
        with torch.no_grad():
            model.logit_scale.fill_(loss_cls.init_logit_scale)
    return model


def open_clip_loss(kind: str) -> torch.nn.Module:
    """open_clip's ``siglip`` or ``clip`` loss, called as clipforge's losses are (a bias the CLIP loss ignores)."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "siglip":
        return SigLipLoss()
    inner = ClipLoss()

    class _Wrapped(torch.nn.Module):  # same call signature as clipforge's losses
        def forward(
            self, fi: torch.Tensor, ft: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            return inner(fi, ft, scale)

    return _Wrapped()
