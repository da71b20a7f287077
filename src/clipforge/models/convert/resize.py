"""Fit a state dict to a model built for another image size or text context length.

The ViT position table is resampled bicubically on its 2-D grid, as Dosovitskiy et al. (2021, §3.2)
do when fine-tuning at a higher resolution (with timm's and open_clip's antialiased kernel, so that the
result is theirs); a learned text position table is truncated to a shorter context (a longer one cannot
be made up).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from clipforge.models.clip import CLIP
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer, resample_pos_embed


def _towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, CLIP):
        return [("visual.", model.visual), ("text.", model.text)]
    if isinstance(model, VisionTransformer | TextTransformer):
        return [("", model)]
    raise TypeError(f"expected a CLIP, VisionTransformer or TextTransformer, got {type(model).__name__}")


class PositionTableError(ValueError):
    """A position table that cannot be fitted to the model: the checkpoint is of another model, as a
    mismatch of any other weight's shape is (torch's ``load_state_dict`` error), which callers name alike."""


def fit_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose position embeddings have ``model``'s shapes; a
    :class:`PositionTableError` naming the key where one cannot be fitted."""
    out = dict(state_dict)
    for prefix, tower in _towers(model):
        key = prefix + "pos_embed"
        if key not in out or out[key].shape == tower.pos_embed.shape:
            continue
        pos = out[key]
        if isinstance(tower, VisionTransformer):
            try:
                out[key] = resample_pos_embed(pos, tower.grid_size, tower.num_prefix_tokens)
            except ValueError as e:  # another class-token layout: not a square grid
                raise PositionTableError(f"{key}: {e}") from e
        elif pos.shape[1] > tower.context_length:
            out[key] = pos[:, : tower.context_length].contiguous()
        else:
            raise PositionTableError(
                f"{key}: the checkpoint has {pos.shape[1]} text positions, the model wants "
                f"{tower.context_length}; a learned position table cannot be lengthened"
            )
    return out


def load_state_dict_resized(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> Any:
    """``model.load_state_dict`` after fitting position embeddings to ``model``'s image size / context."""
    return model.load_state_dict(fit_state_dict(state_dict, model), strict=strict)
