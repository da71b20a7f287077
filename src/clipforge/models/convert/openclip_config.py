"""Config translation between our CLIP and open_clip's (Ilharco et al., 2021, OpenCLIP): the open_clip
model config that describes our model (:func:`open_clip_model_cfg`, native towers or the timm-backed
image towers open_clip builds SigLIP with, Zhai et al., 2023), and our model config node for an open_clip
model config (:func:`model_config_from_open_clip`). Key maps and ports: :mod:`~clipforge.models.convert.openclip`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from clipforge.models.clip import CLIP
from clipforge.models.convert.config import CLIP_TARGET, TEXT_TARGET, VISION_TARGET
from clipforge.models.convert.timm_vit import vision_kwargs_from_timm
from clipforge.models.specs import group_settings
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer

# The timm ViTs open_clip's SigLIP configs name, by width: the only timm towers we export to.
_TIMM_SIZES = {768: "base", 1024: "large", 1152: "so400m", 1536: "giantopt"}
# open_clip 3.3's act_kwargs reach nn.GELU in its own ViT and text towers only (_build_vision_tower and
# _build_text_tower); a timm tower gets the activation its registered model has, and no config key passes
# another one to timm.create_model.
_TIMM_ACT_NOTE = (
    " The image tower's act={ours!r} is what has no open_clip counterpart here: open_clip's act_kwargs "
    "(e.g. {{'approximate': 'tanh'}}) reach only its own ViT and text towers, not the timm model it names, "
    "and its own ViT cannot hold this tower (it always adds a class token, its patch conv has no bias, and "
    "its attentional pooler is CoCa's, not a MAP head). The text tower's activation is exported through "
    "act_kwargs; to export this image tower, train it with the activation of the timm model above."
)
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


# ---------------------------------------------------------------- configs: ours -> open_clip


def _act_kwargs(act: str) -> dict[str, str] | None:
    return {"approximate": "tanh"} if act == "gelu_tanh" else None


def _timm_trunk(name: str, pool: str, proj: str | None, embed_dim: int) -> nn.Module:
    """The trunk open_clip's ``TimmModel`` builds (same calls, on the meta device: no weights)."""
    import timm

    with torch.device("meta"):
        if proj in ("linear", "mlp"):
            trunk = timm.create_model(name, pretrained=False)
            trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
            return trunk
        return timm.create_model(name, num_classes=0 if proj == "none" else embed_dim, global_pool=pool)


def _timm_name(visual: VisionTransformer) -> str:
    """The timm model open_clip can build for a tower with no class token or with attention pooling."""
    kw = dict(visual.settings)
    kw["fc_norm"] = kw["global_pool"] == "avg" if kw["fc_norm"] is None else kw["fc_norm"]
    size = _TIMM_SIZES.get(kw["embed_dim"])
    tried, acts = [], set()
    for variant in ("siglip", "siglip_gap"):
        name = f"vit_{size}_patch{kw['patch_size']}_{variant}_{kw['img_size']}"
        if size is None or not _timm_is_model(name):
            continue
        # the trunk open_clip builds for this tower: with a projection it resets a timm model's pooling, so
        # the final norm stays where the named model has it (an avg-pooled siglip keeps it before the pool)
        proj = "linear" if kw["output_dim"] else "none"
        try:
            trunk = _timm_trunk(name, kw["global_pool"], proj, kw["embed_dim"])
        except AssertionError as e:  # timm cannot reset this model to attention pooling; nor can open_clip
            tried.append(f"{name}: {e}")
            continue
        theirs = vision_kwargs_from_timm(trunk)
        diff = {
            k: (kw[k], v) for k, v in theirs.items() if k not in ("output_dim", "proj_bias", "init_values")
        }
        diff = {k: pair for k, pair in diff.items() if pair[0] != pair[1]}
        if bool(kw["init_values"]) != bool(theirs["init_values"]):
            diff["init_values"] = (kw["init_values"], theirs["init_values"])
        if not diff:
            return name
        tried.append(f"{name} differs in (ours, timm's) {diff}")
        acts.add(theirs["act"])
    raise ValueError(
        "open_clip's own ViT needs a class token and token/avg pooling; for other towers it builds a timm "
        f"model by name, and none matches this one. {'; '.join(tried) or 'No timm SigLIP ViT has this size.'}"
        + (_TIMM_ACT_NOTE.format(ours=kw["act"]) if acts and kw["act"] not in acts else "")
    )


def _timm_is_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _vision_cfg(visual: VisionTransformer) -> dict[str, Any]:
    kw = visual.settings
    if not (kw["class_token"] and kw["global_pool"] in ("token", "avg")):
        cfg = {
            "image_size": kw["img_size"],
            "timm_model_name": _timm_name(visual),
            "timm_model_pretrained": False,
            "timm_pool": kw["global_pool"],
            "timm_proj": "linear" if kw["output_dim"] else "none",
            "timm_proj_bias": bool(kw["proj_bias"]),
        }
        if kw["patch_dropout"]:
            cfg["patch_dropout"] = kw["patch_dropout"]
        return cfg
    problems = {
        "patch_bias=True (open_clip's patch conv has no bias)": kw["patch_bias"],
        "proj_bias=True (open_clip's image projection has no bias)": kw["proj_bias"] and kw["output_dim"],
        "qkv_bias=False": not kw["qkv_bias"],
        "in_chans != 3": kw["in_chans"] != 3,
    }
    if any(problems.values()):
        raise ValueError(
            f"open_clip cannot express this image tower: {[k for k, v in problems.items() if v]}"
        )
    cfg = {
        "image_size": kw["img_size"],
        "patch_size": kw["patch_size"],
        "width": kw["embed_dim"],
        "layers": kw["depth"],
        "head_width": kw["embed_dim"] // kw["num_heads"],
        "mlp_ratio": kw["mlp_ratio"],
        "ls_init_value": kw["init_values"],
        "patch_dropout": kw["patch_dropout"],
        "no_ln_pre": not kw["pre_norm"],
        "pool_type": "tok" if kw["global_pool"] == "token" else "avg",
        "final_ln_after_pool": bool(kw["global_pool"] == "avg" if kw["fc_norm"] is None else kw["fc_norm"]),
        "norm_kwargs": {"eps": kw["norm_eps"]},
    }
    if _act_kwargs(kw["act"]):
        cfg["act_kwargs"] = _act_kwargs(kw["act"])
    return cfg


def _text_cfg(text: TextTransformer) -> dict[str, Any]:
    kw = text.settings
    if not kw["qkv_bias"]:
        raise ValueError(
            "open_clip's text attention always has qkv biases: qkv_bias=False cannot be exported"
        )
    cfg = {
        "context_length": kw["context_length"],
        "vocab_size": kw["vocab_size"],
        "width": kw["embed_dim"],
        "heads": kw["num_heads"],
        "layers": kw["depth"],
        "mlp_ratio": kw["mlp_ratio"],
        "ls_init_value": kw["init_values"],
        "no_causal_mask": not kw["causal"],
        "pool_type": "argmax" if kw["pool_type"] == "eot" else "last",
        "proj_type": "linear" if kw["output_dim"] else "none",
        "proj_bias": bool(kw["proj_bias"]),
        "norm_kwargs": {"eps": kw["norm_eps"]},
    }
    if _act_kwargs(kw["act"]):
        cfg["act_kwargs"] = _act_kwargs(kw["act"])
    return cfg


def open_clip_model_cfg(model: CLIP) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg`` ...) of ``model``."""
    vision_cfg, text_cfg = _vision_cfg(model.visual), _text_cfg(model.text)
    timm_tower = "timm_model_name" in vision_cfg
    acts = {model.text.settings["act"]} | (set() if timm_tower else {model.visual.settings["act"]})
    # open_clip's quick_gelu switch covers both of its own towers at once.
    if "quick_gelu" in acts and acts != {"quick_gelu"}:
        raise ValueError("open_clip uses QuickGELU in both towers or in neither; the towers here differ")
    cfg: dict[str, Any] = {
        "embed_dim": model.embed_dim,
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if timm_tower:
        cfg["custom_text"] = True  # as open_clip's own SigLIP configs
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach())
    return cfg


# ---------------------------------------------------------------- configs: open_clip -> ours


def _act(act_kwargs: dict | None, quick_gelu: bool) -> str:
    if quick_gelu:
        return "quick_gelu"
    if not act_kwargs:
        return "gelu"
    if act_kwargs == {"approximate": "tanh"}:
        return "gelu_tanh"
    raise ValueError(f"unsupported open_clip act_kwargs {act_kwargs}")


def _check_plain_blocks(cfg: dict[str, Any], tower: str) -> None:
    custom = [k for k in _CUSTOM_BLOCK if cfg.get(k)]
    if custom or cfg.get("block_type") not in (None, "default"):
        raise ValueError(
            f"open_clip {tower} tower uses custom blocks {custom or cfg['block_type']}: unsupported"
        )


def _square(v: Any, what: str) -> int:
    if isinstance(v, list | tuple):
        if len(set(v)) != 1:
            raise ValueError(f"only square {what} are supported, got {v}")
        return int(v[0])
    return int(v)


def _vision_node(v: dict[str, Any], embed_dim: int, quick_gelu: bool) -> dict[str, Any]:
    if v.get("timm_model_name"):
        pool, proj = v.get("timm_pool", "avg"), v.get("timm_proj", "linear")
        if pool not in ("token", "avg", "map") or proj not in ("none", "linear", "", None):
            raise ValueError(f"unsupported open_clip timm tower: timm_pool={pool!r}, timm_proj={proj!r}")
        node = vision_kwargs_from_timm(_timm_trunk(v["timm_model_name"], pool, proj, embed_dim))
        if proj == "none":
            node.update(output_dim=None, proj_bias=False)
        elif proj == "linear":
            node.update(output_dim=embed_dim, proj_bias=bool(v.get("timm_proj_bias", False)))
        node["patch_dropout"] = v.get("patch_dropout", 0.0)
        node["weight_init"] = "timm"  # a timm trunk inside open_clip starts from timm's own init
        return {"_target_": VISION_TARGET, **node}
    if isinstance(v.get("layers", 12), list | tuple):
        raise ValueError("open_clip ResNet image towers are not supported")
    if v.get("attentional_pool") or v.get("output_tokens"):
        raise ValueError("open_clip attentional pooler (CoCa) image towers are not supported")
    if v.get("pool_type", "tok") not in ("tok", "avg"):
        raise ValueError(f"unsupported open_clip pool_type {v['pool_type']!r}")
    _check_plain_blocks(v, "image")
    if v.get("pos_embed_type", "learnable") != "learnable":
        warnings.warn("fixed sin-cos position embeddings become learnable ones here", stacklevel=3)
    width = v.get("width", 768)
    pool = "token" if v.get("pool_type", "tok") == "tok" else "avg"
    ln_after_pool = bool(v.get("final_ln_after_pool", False))
    return {
        "_target_": VISION_TARGET,
        "img_size": _square(v.get("image_size", 224), "images"),
        "patch_size": _square(v.get("patch_size", 16), "patches"),
        "embed_dim": width,
        "depth": v.get("layers", 12),
        "num_heads": width // v.get("head_width", 64),
        "mlp_ratio": v.get("mlp_ratio", 4.0),
        "qkv_bias": True,
        "class_token": True,
        "global_pool": pool,
        "fc_norm": None if ln_after_pool == (pool == "avg") else ln_after_pool,  # None: the pool's default
        "pre_norm": not v.get("no_ln_pre", False),
        "norm_eps": (v.get("norm_kwargs") or {}).get("eps", 1e-5),
        "act": _act(v.get("act_kwargs"), quick_gelu),
        "patch_bias": False,
        "output_dim": embed_dim,
        "proj_bias": False,
        "init_values": v.get("ls_init_value"),
        "patch_dropout": v.get("patch_dropout", 0.0),
        "weight_init": "openclip",  # retraining an imported model starts from open_clip's own init
    }


def _text_node(t: dict[str, Any], embed_dim: int, quick_gelu: bool) -> dict[str, Any]:
    if t.get("hf_model_name"):
        raise ValueError("open_clip Hugging Face text towers are not supported")
    if t.get("hf_tokenizer_name"):
        # the weights port, but every clipforge tool (training, zero-shot prompts) tokenizes with CLIP BPE:
        # with another vocabulary its ids are other tokens, or out of the table
        warnings.warn(
            f"this open_clip model reads the tokens of {t['hf_tokenizer_name']!r} (text_cfg.hf_tokenizer_name), "
            f"a {t.get('vocab_size', 49408)}-token vocabulary; clipforge tokenizes text with CLIP BPE (49408 "
            "ids) only, so its text tower cannot be trained or prompted here as it was trained",
            stacklevel=3,
        )
    if t.get("embed_cls"):
        raise ValueError("open_clip text towers with an appended CLS token (CoCa) are not supported")
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "last"):
        raise ValueError(f"unsupported open_clip text pool_type {pool!r} (supported: 'argmax', 'last')")
    if t.get("proj_type", "linear") not in ("linear", "none"):
        raise ValueError(f"unsupported open_clip text proj_type {t['proj_type']!r}")
    _check_plain_blocks(t, "text")
    return {
        "_target_": TEXT_TARGET,
        "vocab_size": t.get("vocab_size", 49408),
        "context_length": t.get("context_length", 77),
        "embed_dim": t.get("width", 512),
        "depth": t.get("layers", 12),
        "num_heads": t.get("heads", 8),
        "mlp_ratio": t.get("mlp_ratio", 4.0),
        "qkv_bias": True,
        "output_dim": None if t.get("proj_type", "linear") == "none" else embed_dim,
        "proj_bias": bool(t.get("proj_bias", False)),
        "causal": not t.get("no_causal_mask", False),
        "pool_type": "eot" if pool == "argmax" else "last",
        "norm_eps": (t.get("norm_kwargs") or {}).get("eps", 1e-5),
        "act": _act(t.get("act_kwargs"), quick_gelu),
        "init_values": t.get("ls_init_value"),
        "weight_init": "openclip",
    }


def model_config_from_open_clip(model_cfg: dict[str, Any], img_size: int | None = None) -> dict[str, Any]:
    """Our model config node for an open_clip model config (optionally at another image size)."""
    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa models (multimodal_cfg) are not supported")
    embed_dim, quick = model_cfg["embed_dim"], bool(model_cfg.get("quick_gelu", False))
    vision = _vision_node(dict(model_cfg["vision_cfg"]), embed_dim, quick)
    if img_size is not None:
        vision["img_size"] = img_size
    text = _text_node(dict(model_cfg["text_cfg"]), embed_dim, quick)
    return {
        "_target_": CLIP_TARGET,
        "vision": group_settings(VisionTransformer.groups, vision),
        "text": group_settings(TextTransformer.groups, text),
        "init_logit_scale": model_cfg.get("init_logit_scale"),
        "init_logit_bias": model_cfg.get("init_logit_bias"),
    }
