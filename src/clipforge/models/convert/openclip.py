"""Our CLIP <-> open_clip (Ilharco et al., 2021, OpenCLIP; Cherti et al., 2023), the reference
implementation of CLIP (Radford et al., 2021): key maps for open_clip's native towers and for its
timm-backed image towers (how open_clip builds SigLIP, Zhai et al., 2023), and in-memory ports both ways.
Config translation both ways: :mod:`~clipforge.models.convert.openclip_config`; folders and checkpoint
files: :mod:`~clipforge.models.convert.openclip_io`.

open_clip keeps the fused ``in_proj_weight`` of ``nn.MultiheadAttention`` (same q/k/v order as our
``qkv``), stores the class token and position table without a batch dim, and uses bare ``(in, out)``
projection matrices applied as ``x @ W``, where we use ``nn.Linear`` weights ``(out, in)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipforge.models.clip import CLIP, cap_covering, capped_log_scale
from clipforge.models.convert.config import instantiate_model
from clipforge.models.convert.keymap import (
    KeyMap,
    Rule,
    Tensors,
    build_key_map,
    build_with_weights,
    convert_state_dict,
    prefixed,
    rename,
    squeezed,
    transposed,
)
from clipforge.models.convert.openclip_config import model_config_from_open_clip, open_clip_model_cfg
from clipforge.models.convert.resize import fit_state_dict
from clipforge.models.convert.timm_vit import timm_key_map
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer

_LEAVES = [
    ("norm1", "ln_1"),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj", "attn.out_proj"),
    ("ls1", "ls_1"),
    ("ls2", "ls_2"),
    ("norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]
_BLOCKS = ("transformer.blocks", "transformer.resblocks", _LEAVES)
# Checkpoint entries that are not parameters (OpenAI's JIT archives carry the first three).
_NOT_PARAMS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


# ---------------------------------------------------------------- key maps


def _eye_rule(dim: int) -> Rule:
    """Our tower without projection <-> open_clip's mandatory ``proj``, which must then be the identity."""

    def to_ours(t: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not torch.equal(t[0], torch.eye(dim, dtype=t[0].dtype)):
            raise ValueError("open_clip's visual.proj is not the identity but our tower has no projection")
        return ()

    return Rule((), ("proj",), lambda _: (torch.eye(dim),), to_ours)


def vision_key_map(visual: VisionTransformer, vision_cfg: dict[str, Any]) -> KeyMap:
    """Our image tower <-> open_clip's ``visual`` (keys relative to the towers)."""
    keys = list(visual.state_dict())
    if vision_cfg.get("timm_model_name"):
        rules = prefixed(timm_key_map(visual, with_head=False), "", "trunk.")
        proj = vision_cfg.get("timm_proj", "linear")
        target = {"linear": "head.proj", "": "trunk.head", None: "trunk.head"}.get(proj)
        head = [k for k in keys if k.startswith("proj.")]
        if head and target is None:
            raise ValueError(f"our tower has a projection but timm_proj={proj!r}")
        return rules + [rename(k, target + k[len("proj") :]) for k in head]
    special = {
        "cls_token": squeezed("cls_token", "class_embedding", 2),
        "pos_embed": squeezed("pos_embed", "positional_embedding", 1),
        "proj.weight": transposed("proj.weight", "proj"),
    }
    table = [("patch_embed", "conv1"), ("norm_pre", "ln_pre"), ("norm", "ln_post"), ("fc_norm", "ln_post")]
    rules = build_key_map(keys, special, table, _BLOCKS)
    if "proj.weight" not in keys:
        rules.append(_eye_rule(visual.embed_dim))
    return rules


def text_key_map(text: TextTransformer) -> KeyMap:
    """Our text tower <-> open_clip's ``TextTransformer`` (keys relative to the tower)."""
    special = {"pos_embed": squeezed("pos_embed", "positional_embedding", 1)}
    if not text.settings["proj_bias"]:
        special["proj.weight"] = transposed("proj.weight", "text_projection")
    table = [("token_embedding", "token_embedding"), ("norm", "ln_final"), ("proj", "text_projection")]
    return build_key_map(text.state_dict(), special, table, _BLOCKS)


def _scalar_rule(name: str, to_theirs: Callable[[Tensors], Tensors] | None = None) -> Rule:
    # open_clip may store the scale as shape (1,) (nonscalar_logit_scale); ours is a 0-d parameter.
    return Rule((name,), (name,), to_theirs or (lambda t: t), lambda t: (t[0].reshape(()),))


def open_clip_key_map(model: CLIP, model_cfg: dict[str, Any], custom_text: bool | None = None) -> KeyMap:
    """Our CLIP <-> open_clip ``CLIP`` (text tower at the top level) or ``CustomTextCLIP`` (under ``text.``)."""
    custom = bool(model_cfg.get("custom_text", False)) if custom_text is None else custom_text
    rules = prefixed(vision_key_map(model.visual, model_cfg["vision_cfg"]), "visual.", "visual.")
    rules += prefixed(text_key_map(model.text), "text.", "text." if custom else "")
    # open_clip's forward does not cap the scale as ours does: it gets the capped value ours uses
    cap = model.max_logit_scale
    rules.append(_scalar_rule("logit_scale", lambda t: (capped_log_scale(t[0], cap),)))
    if model.logit_bias is not None:
        rules.append(_scalar_rule("logit_bias"))
    return rules


# ---------------------------------------------------------------- models and files


def to_open_clip(model: CLIP) -> nn.Module:
    """An open_clip ``CLIP``/``CustomTextCLIP`` holding ``model``'s weights."""
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CustomTextCLIP

    cfg = open_clip_model_cfg(model)
    state = convert_state_dict(model.state_dict(), open_clip_key_map(model, cfg), to="theirs")
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else OpenCLIP
    reference = cls(**cfg)
    reference.load_state_dict(state)
    return reference


def from_open_clip(reference: nn.Module, model_cfg: dict[str, Any]) -> CLIP:
    """Our CLIP with the architecture (``model_cfg``) and weights of an open_clip model."""
    return from_open_clip_state(dict(reference.state_dict()), model_cfg, img_size=None)


def from_open_clip_state(
    state: dict[str, torch.Tensor], model_cfg: dict[str, Any], img_size: int | None
) -> CLIP:
    """Our CLIP from an open_clip state dict (either text layout) and model config, at ``img_size``."""
    model_cfg = dict(model_cfg)
    if "logit_bias" in state and model_cfg.get("init_logit_bias") is None:
        model_cfg["init_logit_bias"] = 0.0  # the value comes from the checkpoint
    node = model_config_from_open_clip(model_cfg, img_size=img_size)
    if "logit_scale" in state:
        # open_clip's forward does not cap the scale: ours must not either, or the logits differ. The cap
        # goes into the config, so a checkpoint of the imported model rebuilds with it.
        node["max_logit_scale"] = cap_covering(state["logit_scale"].detach().float().cpu())
    skeleton = instantiate_model(node, device="meta")
    custom = any(k.startswith("text.") for k in state)
    ours = convert_state_dict(
        state, open_clip_key_map(skeleton, model_cfg, custom), to="ours", ignore=_NOT_PARAMS
    )
    return build_with_weights(lambda: instantiate_model(node), fit_state_dict(ours, skeleton))
