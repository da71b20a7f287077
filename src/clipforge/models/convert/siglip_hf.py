"""Our SigLIP-style image tower <-> Hugging Face ``transformers.SiglipVisionModel``
(Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training"; the attention-pooling head is the
MAP head of Zhai et al., 2022).

SigLIP's image tower is a ViT without class token or pre-norm, with biased patch embedding, tanh-GELU,
LayerNorm eps 1e-6 and a multihead-attention-pooling head, and no output projection. Hugging Face keeps
q, k and v as separate linears (we fuse them into ``qkv``), the pooling head's q/k/v in one
``nn.MultiheadAttention.in_proj_weight`` (we split q from kv) and the position table as an ``nn.Embedding``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipforge.models.convert.keymap import (
    KeyMap,
    build_key_map,
    build_with_weights,
    convert_state_dict,
    fused,
    squeezed,
    unfused,
)
from clipforge.models.vision import VisionTransformer

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_LEAVES = [
    ("norm1", "layer_norm1"),
    ("attn.proj", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("mlp", "mlp"),
]
_TABLE = [
    ("patch_embed", "embeddings.patch_embedding"),
    ("norm", "post_layernorm"),
    ("attn_pool.latent", "head.probe"),
    ("attn_pool.proj", "head.attention.out_proj"),
    ("attn_pool.norm", "head.layernorm"),
    ("attn_pool.mlp", "head.mlp"),
]


def _check(visual: VisionTransformer) -> None:
    kw = visual.settings
    problems = {
        "class_token=True": kw["class_token"],
        "global_pool != 'map'": kw["global_pool"] != "map",
        "pre_norm=True": kw["pre_norm"],
        "output_dim set (SigLIP's image tower has no projection)": kw["output_dim"],
        "patch_bias=False": not kw["patch_bias"],
        "qkv_bias=False": not kw["qkv_bias"],
        "init_values (layer scale)": kw["init_values"],
        "fc_norm": kw["fc_norm"],
    }
    if any(problems.values()):
        raise ValueError(f"not a SigLIP image tower: {[k for k, v in problems.items() if v]}")


def siglip_key_map(visual: VisionTransformer) -> KeyMap:
    """Our tower <-> ``SiglipVisionModel`` state dict (without the ``vision_model.`` prefix)."""
    _check(visual)
    keys = list(visual.state_dict())
    dim = visual.embed_dim
    special = {"pos_embed": squeezed("pos_embed", "embeddings.position_embedding.weight", 1)}
    for key in keys:
        if key.startswith("transformer.blocks.") and ".attn.qkv." in key:
            i, kind = key.split(".")[2], key.rsplit(".", 1)[1]
            layer = f"encoder.layers.{i}.self_attn"
            special[key] = fused(key, [f"{layer}.{p}_proj.{kind}" for p in ("q", "k", "v")])
    for kind in ("weight", "bias"):
        pool = unfused(
            [f"attn_pool.q.{kind}", f"attn_pool.kv.{kind}"], f"head.attention.in_proj_{kind}", [dim, 2 * dim]
        )
        special[f"attn_pool.q.{kind}"] = special[f"attn_pool.kv.{kind}"] = pool
    return build_key_map(keys, special, _TABLE, ("transformer.blocks", "encoder.layers", _LEAVES))


def siglip_vision_config(visual: VisionTransformer) -> Any:
    """A ``transformers.SiglipVisionConfig`` with ``visual``'s architecture."""
    from transformers import SiglipVisionConfig

    _check(visual)
    kw = visual.settings
    acts = {v: k for k, v in _ACTS.items()}
    return SiglipVisionConfig(
        hidden_size=kw["embed_dim"],
        intermediate_size=int(kw["embed_dim"] * kw["mlp_ratio"]),
        num_hidden_layers=kw["depth"],
        num_attention_heads=kw["num_heads"],
        num_channels=kw["in_chans"],
        image_size=kw["img_size"],
        patch_size=kw["patch_size"],
        hidden_act=acts[kw["act"]],
        layer_norm_eps=kw["norm_eps"],
        vision_use_head=True,
    )


def vision_kwargs_from_siglip(config: Any) -> dict[str, Any]:
    """Our ``VisionTransformer`` arguments for a ``SiglipVisionConfig``."""
    if not getattr(config, "vision_use_head", True):
        raise ValueError("SigLIP vision models without the pooling head are not supported")
    if config.hidden_act not in _ACTS:
        raise ValueError(f"unsupported SigLIP activation {config.hidden_act!r}")
    return {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "class_token": False,
        "global_pool": "map",
        "norm_eps": config.layer_norm_eps,
        "act": _ACTS[config.hidden_act],
        "patch_bias": True,
        "output_dim": None,
    }


def _hf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Older transformers releases prefix the tower's keys with "vision_model."; drop it either way.
    return {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


def from_hf_siglip(model: nn.Module) -> VisionTransformer:
    """Our tower with the architecture and weights of a ``SiglipVisionModel``."""
    kwargs = vision_kwargs_from_siglip(model.config)
    with torch.device("meta"):
        key_map = siglip_key_map(VisionTransformer.from_settings(**kwargs))
    state = convert_state_dict(_hf_state(model), key_map, to="ours", ignore=("embeddings.position_ids",))
    return build_with_weights(lambda: VisionTransformer.from_settings(**kwargs), state)


def to_hf_siglip(visual: VisionTransformer) -> nn.Module:
    """A ``SiglipVisionModel`` holding ``visual``'s weights."""
    from transformers import SiglipVisionModel

    model = SiglipVisionModel(siglip_vision_config(visual))
    state = convert_state_dict(visual.state_dict(), siglip_key_map(visual), to="theirs")
    expected = model.state_dict()
    if not any(k in expected for k in state):  # older releases: keys live under vision_model.
        state = {f"vision_model.{k}": v for k, v in state.items()}
    model.load_state_dict(state, strict=not any(k.endswith("position_ids") for k in expected))
    return model
