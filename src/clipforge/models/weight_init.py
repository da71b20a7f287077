"""Weight-initialisation schemes for the two towers, as small free functions.

- ``timm``: truncated normal, std 0.02, for every linear/conv weight, zero biases (the timm ViT recipe,
  Dosovitskiy et al., 2021; Touvron et al., 2021). The default of ``vit_b32`` and ``vit_b16``, where it
  learned more than ``openclip`` at width 768; at the tiny model's width 96 it is a fifth of w^-1/2 and
  learned far less (README, "Learning parity").
- ``jax``: the Flax/big_vision ViT recipe (Zhai et al., 2022), as in timm's ``init_weights_vit_jax``:
  Xavier-uniform linear weights, zero biases except N(0, 1e-6) inside MLPs, LeCun-normal patch embedding.
  The output projection keeps Xavier init: zeroing it, as a classifier head would be, gives all-zero
  embeddings that a contrastive loss cannot normalise. The default of ``siglip_b16``, where it learned more
  than ``openclip`` and ``timm`` on its own towers. As in timm, Xavier sees the fused ``qkv`` matrix as one
  (3w x w) layer; Flax initialises q, k and v as three (w x w) layers, a std sqrt(2) larger. Kept as
  measured: the choice above was made with timm's form.
- ``openclip`` (the towers' constructor default and that of ``tiny``, chosen by the learning benchmark
  on ``tiny``): OpenAI CLIP's text-tower recipe (Radford et al., 2021), used by
  open_clip, applied to both towers: N(0, w^-1/2) for qkv, N(0, (2w)^-1/2) for the MLP input,
  N(0, w^-1/2 (2L)^-1/2) for the residual output projections (attention ``proj``, ``mlp.fc2``) so the
  residual stream keeps its scale with depth, N(0, w^-1/2) for the output projection and the vision
  class/position embeddings.
- ``torch``: what open_clip's *image* tower gets, since OpenAI's CLIP defines no init for it: PyTorch's
  layer defaults (Kaiming-uniform weights, U(+-fan_in^-1/2) biases), the qkv projection Xavier-uniform
  with a zero bias and a zero attention-output bias (``nn.MultiheadAttention``'s own init), N(0, w^-1/2)
  for the class/position embeddings and the output projection. ``vision: torch, text: openclip`` is
  open_clip's model as it starts training.

Every scheme sets LayerNorms to unit gain and zero bias and leaves LayerScale gammas at their init value.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

WeightInit = Literal["timm", "jax", "openclip", "torch"]
SCHEMES = ("timm", "jax", "openclip", "torch")


def init_vit_weights(module: nn.Module) -> None:
    """timm-style init: truncated normal (std 0.02) linear/conv weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def lecun_normal_(weight: torch.Tensor) -> None:
    """Truncated normal with variance 1/fan_in (LeCun et al., 1998), as Flax's ``lecun_normal``."""
    # 0.8796 is the std of a unit normal truncated to [-2, 2]; dividing by it keeps the variance 1/fan_in.
    std = math.sqrt(1.0 / weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def init_jax(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if ".mlp." in f".{name}.":
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            lecun_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def init_openclip(root: nn.Module, width: int, depth: int) -> None:
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
            if leaf in ("qkv", "q", "kv"):
                std = attn_std
            elif leaf == "fc1":
                std = fc_std
            elif leaf == "fc2" or (leaf == "proj" and parent in ("attn", "attn_pool")):
                std = proj_std
            else:  # the tower's output projection
                std = width**-0.5
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            module.reset_parameters()  # open_clip keeps PyTorch's default for the patch embedding
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def init_torch_defaults(root: nn.Module, width: int) -> None:
    for name, module in root.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if isinstance(module, nn.Linear) and leaf in ("qkv", "q", "kv"):
            nn.init.xavier_uniform_(module.weight)  # nn.MultiheadAttention's in-projection
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and leaf == "proj" and parent not in ("attn", "attn_pool"):
            nn.init.normal_(module.weight, std=width**-0.5)  # the tower's output projection
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear | nn.Conv2d | nn.LayerNorm):
            module.reset_parameters()
            if leaf == "proj" and module.bias is not None:  # attention output: zero bias, as MHA
                nn.init.zeros_(module.bias)


def init_tower(root: nn.Module, scheme: str, width: int, depth: int) -> None:
    """Initialise every linear, conv and norm layer of a tower; embeddings are the tower's business."""
    if scheme == "timm":
        root.apply(init_vit_weights)
    elif scheme == "jax":
        init_jax(root)
    elif scheme == "openclip":
        init_openclip(root, width, depth)
    elif scheme == "torch":
        init_torch_defaults(root, width)
    else:
        raise ValueError(f"unknown weight_init {scheme!r}; expected one of {SCHEMES}")
