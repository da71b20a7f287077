"""Model configs as plain dicts in the Hydra node format of ``conf/model/*.yaml`` (one node = one
constructor, ``_target_`` + keyword arguments), built without Hydra so ``models/`` stays Hydra-free.

The two-tower layout is CLIP's (Radford et al., 2021); see :mod:`clipforge.models.clip`.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from typing import Any

import torch

from clipforge.models.clip import CLIP
from clipforge.models.specs import SettingError
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer

CLIP_TARGET = "clipforge.models.CLIP"
VISION_TARGET = "clipforge.models.VisionTransformer"
TEXT_TARGET = "clipforge.models.TextTransformer"


def model_config(model: CLIP) -> dict[str, Any]:
    """The config node that rebuilds ``model``'s architecture (weights are not part of it)."""
    return {
        "_target_": CLIP_TARGET,
        "vision": {"_target_": VISION_TARGET, **model.visual.init_kwargs},
        "text": {"_target_": TEXT_TARGET, **model.text.init_kwargs},
        "init_logit_scale": float(model.logit_scale.detach()) if not model.logit_scale.is_meta else None,
        "init_logit_bias": None if model.logit_bias is None else _scalar(model.logit_bias),
        "max_logit_scale": model.max_logit_scale,
    }


def _scalar(p: torch.Tensor) -> float:
    return 0.0 if p.is_meta else float(p.detach())


def _kwargs(node: dict[str, Any], cls: type) -> dict[str, Any]:
    """The node's keyword arguments, after checking that its ``_target_`` (any import path) names ``cls``."""
    target = node.get("_target_")
    if target is not None:
        module, _, name = str(target).rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError):
            found = None
        if found is not cls:
            raise ValueError(f"expected _target_ {cls.__module__}.{cls.__name__}, got {target!r}")
    return {k: v for k, v in node.items() if k != "_target_"}


def instantiate_model(config: dict[str, Any], device: torch.device | str | None = None) -> CLIP:
    """Build a CLIP from a config node (``device="meta"`` builds the structure without allocating).
    The one builder of models from configs: ``clipforge.checkpoint.build_model`` fills the loss's
    initial scale and bias and calls it."""
    cfg = _kwargs(dict(config), CLIP)
    text_node = dict(cfg.pop("text"))
    if "width" in text_node and "embed_dim" not in text_node:
        # checkpoints written before the text tower took the vision tower's name for its width
        text_node["embed_dim"] = text_node.pop("width")
    towers = {"vision": (VisionTransformer, dict(cfg.pop("vision"))), "text": (TextTransformer, text_node)}
    built = {}
    with torch.device(device) if device is not None else nullcontext():
        for name, (cls, node) in towers.items():
            try:
                # from_settings: nodes written before the block settings became groups are flat, and still build
                built[name] = cls.from_settings(**_kwargs(node, cls))
            except SettingError as e:
                raise e.under(name) from e  # named as in the config: vision.depth
            except ValueError as e:  # a tower's own check names its key, not the tower: say which
                raise ValueError(f"model.{name}: {e}") from e
        return CLIP(built["vision"], built["text"], **cfg)
