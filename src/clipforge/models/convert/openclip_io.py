"""open_clip model folders and checkpoint files (OpenCLIP, Ilharco et al., 2021; CLIP, Radford et al., 2021):
export our CLIP as a folder ``open_clip.create_model`` loads, import a checkpoint file a user has.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from clipforge.models.clip import CLIP
from clipforge.models.convert.keymap import convert_state_dict
from clipforge.models.convert.openclip import from_open_clip_state, open_clip_key_map
from clipforge.models.convert.openclip_config import open_clip_model_cfg


def export_open_clip(
    model: CLIP, out_dir: str | Path, name: str = "clipforge", preprocessing: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``model`` as an open_clip model folder; returns the paths written. ``preprocessing``: the
    ``interpolation``, ``mean`` and ``std`` its run trained with (``clipforge.data.config.
    stored_preprocessing``), written as the folder's ``preprocess_cfg``; None: CLIP's mean/std, bicubic.

    - ``open_clip_config.json`` + ``open_clip_model.safetensors``: ``open_clip.create_model("local-dir:DIR")``;
    - ``{name}.json`` (the bare model config): ``open_clip.add_model_config(path)`` then
      ``open_clip.create_model(name, pretrained=".../open_clip_model.safetensors")``.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    if "siglip" in name.lower():
        # open_clip.get_tokenizer(name) picks SigLIP's SentencePiece tokenizer for any model name holding
        # "siglip" (and downloads its vocabulary): other token ids than the CLIP BPE this model was trained on
        raise ValueError(
            f"name={name!r}: open_clip.get_tokenizer gives a model whose name contains 'siglip' SigLIP's "
            "SentencePiece tokenizer, but this model reads the CLIP BPE tokens it was trained on; choose a name "
            "without 'siglip' (the local-dir: route reads no name)"
        )
    cfg = open_clip_model_cfg(model)
    state = convert_state_dict(model.state_dict(), open_clip_key_map(model, cfg), to="theirs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": out / "open_clip_config.json",
        "model_config": out / f"{name}.json",
        "weights": out / "open_clip_model.safetensors",
    }
    prep = preprocessing or {}
    preprocess = {  # what clipforge's data pipeline did: the run's mean/std and resize
        "size": model.visual.img_size,
        "mean": [float(v) for v in prep.get("mean") or OPENAI_DATASET_MEAN],
        "std": [float(v) for v in prep.get("std") or OPENAI_DATASET_STD],
        "interpolation": prep.get("interpolation") or "bicubic",
        "resize_mode": "shortest",
    }
    # Each file is written aside and all are swapped in once written: a failure while writing (a crash, a
    # full disk) over an earlier export leaves that export whole, never a new config beside old weights.
    aside = {k: p.with_name(f".{p.name}.partial") for k, p in paths.items()}
    try:
        aside["config"].write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
        aside["model_config"].write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(aside["weights"]))
        for p in aside.values():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        for p in aside.values():
            p.unlink(missing_ok=True)
        raise
    for k in ("weights", "model_config", "config"):
        os.replace(aside[k], paths[k])
    return paths


def _weights_in(folder: Path) -> Path:
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    if not found:
        raise FileNotFoundError(f"no weights file (.safetensors/.bin/.pt/.pth) in {folder}")
    return found[0]


def unknown_model_name(name: str) -> str:
    """Why open_clip has no config for the model ``name``, with the nearest of the names it has (case aside)."""
    from open_clip import list_models

    names = {n.lower(): n for n in list_models()}
    near = [names[n] for n in difflib.get_close_matches(name.lower(), names, n=5)]
    hint = f": did you mean {', '.join(near)}?" if near else "; open_clip.list_models() lists those it has"
    return f"open_clip has no model config named {name!r}{hint}"


def load_open_clip_checkpoint(
    path: str | Path, model_name: str | None = None, *, img_size: int | None = None
) -> CLIP:
    """Our CLIP (eval mode) from an open_clip checkpoint: a weights file or a folder with one.

    The architecture comes from ``model_name`` (an open_clip built-in such as ``"ViT-B-32"`` or
    ``"local-dir:PATH"``), else from an ``open_clip_config.json`` beside the weights, else it is
    inferred from the weight shapes (native open_clip ViTs only; GELU; the heads of open_clip's configs of
    those shapes where they agree, else 64-dim heads). OpenAI's
    original weights used QuickGELU: name them ``"ViT-B-32-quickgelu"`` etc. ``img_size`` rebuilds the
    image tower at another resolution with its position table resampled.
    """
    from open_clip.factory import load_state_dict

    weights, model_cfg = _weights_and_config(path, model_name)
    state = load_state_dict(str(weights), device="cpu", weights_only=True)
    if model_cfg is None:
        model_cfg = infer_open_clip_cfg(state)
    try:
        return from_open_clip_state(state, model_cfg, img_size).eval()
    except KeyError as e:  # the key map's "state dict lacks [...]": weights of another architecture
        if model_name is None:
            raise
        raise ValueError(
            f"{weights} does not fit open_clip's {model_name!r} architecture ({e.args[0]}): name the model these "
            "weights were trained as, or leave the name out to read it from an open_clip_config.json beside them"
        ) from e


def _weights_and_config_file(path: str | Path) -> tuple[Path, Path]:
    """The weights file at ``path`` (a file, or the one in a folder) and the ``open_clip_config.json`` path
    beside it (which may not exist)."""
    path = Path(path)
    weights = _weights_in(path) if path.is_dir() else path
    return weights, weights.parent / "open_clip_config.json"


def _weights_and_config(path: str | Path, model_name: str | None) -> tuple[Path, dict[str, Any] | None]:
    """The weights file at ``path`` and the open_clip model config of ``model_name``, else of the
    ``open_clip_config.json`` beside them (``None``: neither, the shapes tell)."""
    from open_clip.factory import get_model_config

    weights, config_file = _weights_and_config_file(path)
    if model_name is not None:
        model_cfg = get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(unknown_model_name(model_name))
        return weights, model_cfg
    if config_file.is_file():
        model_cfg = json.loads(config_file.read_text())
        return weights, model_cfg.get("model_cfg", model_cfg)
    return weights, None


def open_clip_tokenizer(path: str | Path, model_name: str | None = None) -> str | None:
    """The tokenizer other than CLIP BPE that the open_clip model at ``path`` reads its text with
    (``text_cfg.hf_tokenizer_name``: SigLIP's SentencePiece ...), ``None`` for CLIP BPE or when unknown."""
    model_cfg = _weights_and_config(path, model_name)[1] or {}
    return (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")


def open_clip_preprocessing(
    path: str | Path, model_name: str | None = None, pretrained: str | None = None
) -> dict[str, Any] | None:
    """The image preprocessing open_clip's weights at ``path`` were trained with, as clipforge's
    ``data.augment`` keys (``interpolation``, ``mean``, ``std``): the ``preprocess_cfg`` of an
    ``open_clip_config.json`` beside them, else open_clip's table of pretrained weights for ``model_name``
    and tag ``pretrained`` (no download), else None, with a warning (a bare weights file: nothing says, and
    CLIP's mean/std will be used). A resize mode other than open_clip's ``shortest`` (resize the short side,
    crop the centre, as clipforge does) is warned of."""
    from open_clip import get_pretrained_cfg

    config_file = _weights_and_config_file(path)[1]
    found: dict[str, Any] = {}
    source = ""
    if config_file.is_file():
        found, source = json.loads(config_file.read_text()).get("preprocess_cfg") or {}, str(config_file)
    if not found and pretrained is not None:
        if model_name is None:
            raise ValueError(
                f"a pretrained tag ({pretrained!r}) needs the open_clip model name it belongs to"
            )
        found = get_pretrained_cfg(model_name, pretrained)
        if not found:
            raise ValueError(
                f"open_clip lists no pretrained weights {model_name!r} / {pretrained!r}: "
                "open_clip.list_pretrained() gives the (model, tag) pairs it knows"
            )
        source = f"open_clip's pretrained table ({model_name}, {pretrained})"
    if not found:
        warnings.warn(
            f"{path}: nothing records the image normalisation these weights were trained with (no "
            "open_clip_config.json with a preprocess_cfg beside them, no pretrained tag): evaluating with CLIP's "
            "mean/std and bicubic resizing. Weights trained with others score lower without a word (open_clip's "
            "ViT-L-14 laion2b_s32b_b82k uses mean = std = 0.5): name their tag (--pretrained-tag, "
            "open_clip_pretrained=)",
            stacklevel=2,
        )
        return None
    mode = found.get("resize_mode", "shortest")
    if mode != "shortest":
        warnings.warn(
            f"{source}: these weights were evaluated with resize_mode={mode!r}; clipforge resizes the short "
            "side and crops the centre ('shortest'), so scores can differ from open_clip's",
            stacklevel=2,
        )
    interpolation = found.get("interpolation", "bicubic")
    out = {"interpolation": interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"}
    out.update({k: [float(v) for v in found[k]] for k in ("mean", "std") if found.get(k) is not None})
    return out


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


# the settings of an open_clip config that show in its weights' shapes, with open_clip's defaults
VISION_SHAPE = {"width": 768, "layers": 12, "patch_size": 16}
TEXT_SHAPE = {"width": 512, "layers": 12, "vocab_size": 49408, "context_length": 77}


def infer_open_clip_cfg(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An open_clip model config read off the weight shapes of a native open_clip ViT checkpoint."""
    if any(k.startswith("model.visual.") for k in state):  # clipforge.checkpoint's layout
        raise ValueError(
            "this is a clipforge checkpoint (its weights are model.visual.*, model.text.*), not an open_clip "
            "one: load it as checkpoint=<file> (clipforge-zeroshot) or --checkpoint (clipforge-visualize)"
        )
    if "visual.conv1.weight" not in state or "visual.positional_embedding" not in state:
        raise ValueError(
            "cannot infer the architecture of this checkpoint (not a native open_clip ViT): pass model_name"
        )
    tp = "text." if "text.token_embedding.weight" in state else ""
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    block = r"transformer\.resblocks\.(\d+)\.ln_1\.weight"
    vision_cfg = {
        "image_size": patch * grid,
        "patch_size": patch,
        "width": width,
        "layers": _count(state, r"visual\." + block),
        "head_width": 64,
        "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        "no_ln_pre": "visual.ln_pre.weight" not in state,
    }
    if "visual.transformer.resblocks.0.ls_1.gamma" in state:
        vision_cfg["ls_init_value"] = 1e-5  # any value marks layer scale present; the checkpoint sets it
    text_width = state[f"{tp}ln_final.weight"].shape[0]
    text_cfg = {
        "context_length": state[f"{tp}positional_embedding"].shape[0],
        "vocab_size": state[f"{tp}token_embedding.weight"].shape[0],
        "width": text_width,
        "heads": text_width // 64,
        "layers": _count(state, re.escape(tp) + block),
        "mlp_ratio": state[f"{tp}transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    }
    if f"{tp}transformer.resblocks.0.ls_1.gamma" in state:
        text_cfg["ls_init_value"] = 1e-5
    if f"{tp}text_projection.weight" in state:
        text_cfg["proj_bias"] = True
    elif f"{tp}text_projection" not in state:
        text_cfg["proj_type"] = "none"
    cfg = {"embed_dim": state["visual.proj"].shape[1], "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if tp:
        cfg["custom_text"] = True
    heads = _heads_of_configs_shaped_like(cfg)
    if len(set(heads.values())) == 1:
        vision_cfg["head_width"], text_cfg["heads"] = next(iter(heads.values()))
        names = ", ".join(sorted(heads))
        whose = "its" if len(heads) == 1 else "their"
        how = (
            f"the weights have the shapes of open_clip's {names}: {whose} heads "
            f"(image {vision_cfg['head_width']}-dim, {text_cfg['heads']} text heads)"
        )
    else:
        how = "assuming 64-dim heads" + (
            f" (the weights have the shapes of open_clip's {', '.join(sorted(heads))}, which have other heads)"
            if heads
            else ""
        )
    warnings.warn(
        f"inferring the open_clip architecture from weight shapes: {how}, GELU, a causal text tower pooled at "
        "the EOT token and LayerNorm eps 1e-5; pass model_name to be exact",
        stacklevel=3,
    )
    return cfg


def _heads_of_configs_shaped_like(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{name: (image head width, text heads)}`` of open_clip's registered configs (native towers) whose
    weights have ``cfg``'s shapes. Head counts leave no trace in the weights; the other settings that do not
    either (activation, eps) are not read from these configs: several of them differ only there."""
    import open_clip
    from open_clip.factory import get_model_config

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    found = {}
    for name in open_clip.list_models():
        other = get_model_config(name) or {}
        ov, ot = other.get("vision_cfg", {}), other.get("text_cfg", {})
        if "timm_model_name" in ov or "hf_model_name" in ot or other.get("embed_dim") != cfg["embed_dim"]:
            continue
        same_vision = all(ov.get(k, d) == v[k] for k, d in VISION_SHAPE.items())
        same_text = all(ot.get(k, d) == t[k] for k, d in TEXT_SHAPE.items())
        # the MLP's hidden width, int(width * mlp_ratio) as open_clip builds it (ViT-g-14's ratio is 4.3637)
        same_mlp = all(
            int(c["width"] * float(o.get("mlp_ratio", 4.0))) == round(c["width"] * float(c["mlp_ratio"]))
            for o, c in ((ov, v), (ot, t))
        )
        if same_vision and same_text and same_mlp:
            found[name] = (int(ov.get("head_width", 64)), int(ot.get("heads", 8)))
    return found
