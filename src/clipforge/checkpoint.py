"""Rebuild a trained model from a clipforge Lightning checkpoint (which carries its resolved config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from clipforge.models.clip import CLIP
from clipforge.models.decoder import TextDecoder


def build_model(model_cfg: Any, loss_cfg: Any | None = None) -> CLIP:
    """Instantiate the model config; a null ``init_logit_scale/bias`` takes the loss's paper values."""
    model_cfg = OmegaConf.create(model_cfg) if isinstance(model_cfg, dict) else model_cfg
    overrides = {}
    if loss_cfg is not None:
        loss_cls = get_class(loss_cfg["_target_"])
        if model_cfg.get("init_logit_scale") is None:
            overrides["init_logit_scale"] = loss_cls.init_logit_scale
        if model_cfg.get("init_logit_bias") is None:
            overrides["init_logit_bias"] = loss_cls.init_logit_bias
    return instantiate(model_cfg, **overrides)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict without executing arbitrary pickled code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor/primitive checkpoint "
            f"(torch.load(weights_only=True) failed: {e})"
        ) from e


# Where ContrastiveModule keeps the EMA of the two-tower model (clipforge.ema.ModelEMA, `ema=default`).
EMA_PREFIX = "ema.shadow.model."


def model_state_dict(
    ckpt: dict[str, Any], path: str | Path, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """The model's weights (without the ``model.`` prefix) from a clipforge checkpoint dict; with ``use_ema``
    the EMA of them. Anything else in the checkpoint (decoder, distillation heads) is left out."""
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} has no state_dict: was it written by clipforge (train or convert import)?")
    prefix = EMA_PREFIX if use_ema else "model."
    state = {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if use_ema and not state:
        raise ValueError(f"{path} has no EMA weights: they are kept when training with ema=default")
    return state


def init_from(model: CLIP, path: str | Path) -> CLIP:
    """Initialise ``model`` from a clipforge checkpoint's weights (training state is not restored).

    Position embeddings are resampled when the image size or text context differs, so a model can be
    fine-tuned at another resolution; any other shape or key mismatch is an error naming the keys.
    """
    from clipforge.models.convert import load_state_dict_resized

    load_state_dict_resized(model, model_state_dict(load_checkpoint(path), path))
    return model


def load_model(path: str | Path, use_ema: bool = False) -> tuple[CLIP, dict[str, Any]]:
    """(model in eval mode, resolved config dict) from a clipforge ``.ckpt``; ``use_ema``: its EMA weights."""
    return _model_from(load_checkpoint(path), path, use_ema)


def _model_from(ckpt: dict[str, Any], path: str | Path, use_ema: bool) -> tuple[CLIP, dict[str, Any]]:
    cfg = ckpt.get("clipforge_config")
    if not cfg or "model" not in cfg:
        raise ValueError(f"{path} has no clipforge config: was it written by clipforge's trainer?")
    model = build_model(cfg["model"], cfg.get("loss"))
    model.load_state_dict(model_state_dict(ckpt, path, use_ema))
    return model.eval(), cfg


def load_captioner(path: str | Path, use_ema: bool = False) -> tuple[CLIP, TextDecoder, dict[str, Any]]:
    """(model, LocCa decoder, config) from a checkpoint trained with ``objectives=locca``, both in eval
    mode; ``use_ema``: the EMA weights of both."""
    ckpt = load_checkpoint(path)
    model, cfg = _model_from(ckpt, path, use_ema)
    node = ((cfg.get("objectives") or {}).get("locca") or {}).get("decoder")
    if node is None:
        raise ValueError(f"{path} has no LocCa decoder: it is trained with objectives=locca (or siglip2)")
    decoder = instantiate(OmegaConf.create(node))
    prefix = ("ema.shadow." if use_ema else "") + "objectives.locca.decoder."
    decoder.load_state_dict(
        {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    )
    return model, decoder.eval(), cfg
