"""Our :class:`~clipforge.models.vision.VisionTransformer` <-> timm's ``VisionTransformer``
(Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"; Wightman, pytorch-image-models).

Our attribute names follow timm's, so the map is mostly the identity: the patch embedding sits one level
deeper in timm (``patch_embed.proj``), the blocks are not wrapped in a ``transformer`` module, and our
output projection ``proj`` is timm's classifier ``head``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from clipforge.models.convert.keymap import KeyMap, build_key_map, build_with_weights, convert_state_dict
from clipforge.models.vision import VisionTransformer

_TOP = [
    ("patch_embed", "patch_embed.proj"),
    ("transformer.blocks", "blocks"),
    ("proj", "head"),
    *((k, k) for k in ("cls_token", "pos_embed", "norm_pre", "norm", "fc_norm", "attn_pool")),
]


def timm_key_map(visual: VisionTransformer, with_head: bool = True) -> KeyMap:
    """Key map for ``visual``; ``with_head=False`` leaves our ``proj`` out (callers map it themselves)."""
    kw = visual.settings
    if kw["patch_bias"] == kw["pre_norm"]:
        raise ValueError(
            "timm's patch embedding has a bias exactly when pre_norm is off; set patch_bias = not pre_norm"
        )
    if with_head and kw["output_dim"] and not kw["proj_bias"]:
        raise ValueError("timm's classifier head has a bias: set proj_bias=True to convert the projection")
    keys = [k for k in visual.state_dict() if with_head or not k.startswith("proj.")]
    return build_key_map(keys, {}, _TOP)


def timm_kwargs(visual: VisionTransformer) -> dict[str, Any]:
    """Constructor arguments of a timm ``VisionTransformer`` with the same architecture as ``visual``."""
    kw = visual.settings
    return {
        "img_size": kw["img_size"],
        "patch_size": kw["patch_size"],
        "in_chans": kw["in_chans"],
        "num_classes": kw["output_dim"] or 0,
        "global_pool": kw["global_pool"],
        "embed_dim": kw["embed_dim"],
        "depth": kw["depth"],
        "num_heads": kw["num_heads"],
        "mlp_ratio": kw["mlp_ratio"],
        "qkv_bias": kw["qkv_bias"],
        "init_values": kw["init_values"],
        "class_token": kw["class_token"],
        "pre_norm": kw["pre_norm"],
        "fc_norm": kw["fc_norm"],
        "drop_path_rate": kw["drop_path_rate"],
        "patch_drop_rate": kw["patch_dropout"],
        "norm_layer": partial(nn.LayerNorm, eps=kw["norm_eps"]),
        "act_layer": kw["act"],
    }


def to_timm(visual: VisionTransformer) -> nn.Module:
    """A timm ``VisionTransformer`` holding ``visual``'s weights."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = TimmViT(**timm_kwargs(visual), weight_init="skip")
    model.load_state_dict(convert_state_dict(visual.state_dict(), timm_key_map(visual), to="theirs"))
    return model


def act_name(act: nn.Module) -> str:
    """Our activation name for a GELU-family module from torch, timm or open_clip."""
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELUTanh" or getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name == "GELU":
        return "gelu"
    raise ValueError(f"no clipforge activation matches {name}")


def vision_kwargs_from_timm(model: nn.Module) -> dict[str, Any]:
    """Our ``VisionTransformer`` arguments for a timm ViT; raises on features we do not implement."""
    unsupported = {
        "register tokens": getattr(model, "num_reg_tokens", 0),
        "no_embed_class": getattr(model, "no_embed_class", False),
        "dynamic_img_size": getattr(model, "dynamic_img_size", False),
        "patch-embed norm": not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity),
        "qk norm": not isinstance(getattr(model.blocks[0].attn, "q_norm", nn.Identity()), nn.Identity),
        "non-standard block": type(model.blocks[0]).__name__ != "Block",
        "attention proj without bias": model.blocks[0].attn.proj.bias is None,
        # ours pools the patch tokens only: timm's pool_include_prefix also averages (or attends over) the
        # class token, and the port computed another function without a word
        "pool_include_prefix": getattr(model, "pool_include_prefix", False)
        and model.num_prefix_tokens > 0
        and model.global_pool != "token",
        "no final norm (final_norm=False, fc_norm=False)": not any(
            isinstance(getattr(model, n, None), nn.LayerNorm) for n in ("norm", "fc_norm")
        ),
    }
    if any(unsupported.values()):
        raise ValueError(f"timm model uses {[k for k, v in unsupported.items() if v]}, which clipforge lacks")
    if model.global_pool not in ("token", "avg", "map"):
        raise ValueError(f"unsupported timm global_pool {model.global_pool!r}")
    pe = model.patch_embed
    if pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
        raise ValueError("only square images and patches are supported")
    blk = model.blocks[0]
    norm = model.norm if isinstance(model.norm, nn.LayerNorm) else model.fc_norm
    head = model.head if isinstance(model.head, nn.Linear) else None
    return {
        "img_size": pe.img_size[0],
        "patch_size": pe.patch_size[0],
        "in_chans": pe.proj.in_channels,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": blk.attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "class_token": model.cls_token is not None,
        "global_pool": model.global_pool,
        "fc_norm": isinstance(model.fc_norm, nn.LayerNorm),
        "pre_norm": isinstance(model.norm_pre, nn.LayerNorm),
        "norm_eps": norm.eps,
        "act": act_name(blk.mlp.act),
        "patch_bias": pe.proj.bias is not None,
        "output_dim": head.out_features if head is not None else None,
        "proj_bias": head is not None,
        # LayerScale gammas are weights: any value marks them present, the checkpoint sets them.
        "init_values": 1e-5 if not isinstance(blk.ls1, nn.Identity) else None,
    }


def from_timm(model: nn.Module) -> VisionTransformer:
    """Our ``VisionTransformer`` with the architecture and weights of a timm ViT."""
    kwargs = vision_kwargs_from_timm(model)
    with torch.device("meta"):
        key_map = timm_key_map(VisionTransformer.from_settings(**kwargs))
    state = convert_state_dict(model.state_dict(), key_map, to="ours")
    return build_with_weights(lambda: VisionTransformer.from_settings(**kwargs), state)
