"""Rebuild a trained model from a clipforge Lightning checkpoint (which carries its resolved config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from clipforge.models.clip import CLIP


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


def model_state_dict(ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights (without the ``model.`` prefix) from a clipforge checkpoint dict."""
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} has no state_dict: was it written by clipforge (train or convert import)?")
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def init_from(model: CLIP, path: str | Path) -> CLIP:
    """Initialise ``model`` from a clipforge checkpoint's weights (training state is not restored).

    Position embeddings are resampled when the image size or text context differs, so a model can be
    fine-tuned at another resolution; any other shape or key mismatch is an error naming the keys.
    """
    from clipforge.models.convert import load_state_dict_resized

    load_state_dict_resized(model, model_state_dict(load_checkpoint(path), path))
    return model


def load_model(path: str | Path) -> tuple[CLIP, dict[str, Any]]:
    """(model in eval mode, resolved config dict) from a clipforge ``.ckpt``."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("clipforge_config")
    if not cfg or "model" not in cfg:
        raise ValueError(f"{path} has no clipforge config: was it written by clipforge's trainer?")
    model = build_model(cfg["model"], cfg.get("loss"))
    model.load_state_dict(model_state_dict(ckpt, path))
    return model.eval(), cfg
