"""Transformer building blocks shared by both towers (Vaswani et al., 2017; pre-norm as in ViT,
Dosovitskiy et al., 2021), and the multihead attention-pooling head ("MAP") of Zhai et al., 2022
(Scaling Vision Transformers) used by SigLIP.

Attribute names follow timm (``norm1``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``/``fc2``, ``ls1``) so that
weight converters stay plain key maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.models.specs import BlockSpec, check_setting_types, flat_settings, group_settings


def make_act(name: str) -> nn.Module:
    """``gelu`` (exact erf GELU, CLIP/ViT) or ``gelu_tanh`` (tanh approximation, SigLIP/big_vision)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; expected 'gelu', 'gelu_tanh' or 'quick_gelu'")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's original CLIP checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class HeadAttention(nn.Module):
    """What every attention module here shares: the head split, and the two ways to attend.

    The fused path (``F.scaled_dot_product_attention``) picks flash / memory-efficient kernels; with
    ``is_causal`` and no float mask the flash kernel stays eligible. The math path computes the same
    thing step by step and can keep the attention probabilities (``keep_attn``) for visualisation.
    """

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.keep_attn = False
        self.last_attn: torch.Tensor | None = None  # (B, H, Lq, Lk), set by the math path when keep_attn

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H, Lq, Dh) queries, (B, H, Lk, Dh) keys and values -> (B, H, Lq, Dh). ``attn_mask``: a bool
        mask broadcastable to (B, H, Lq, Lk), True where a query may attend (instead of ``is_causal``)."""
        if attn_mask is not None and is_causal:
            raise ValueError("pass either is_causal or attn_mask, not both")
        if self.fused and not self.keep_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
        if is_causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
            attn = attn.masked_fill(mask, float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf"))
        attn = attn.softmax(dim=-1)
        if self.keep_attn:
            self.last_attn = attn.detach()
        return attn @ v


class Attention(HeadAttention):
    """Multi-head self-attention with a fused-SDPA path and an explicit-softmax math path
    (see :class:`HeadAttention`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True) -> None:
        super().__init__(dim, num_heads, fused)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        x = self.attend(q, k, v, is_causal, attn_mask)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scaling (Touvron et al., 2021, CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop the whole residual branch per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); ``drop_path``: this block's
    stochastic-depth rate (:meth:`BlockSpec.drop_path`)."""

    def __init__(
        self, dim: int, num_heads: int, spec: BlockSpec | None = None, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        spec = spec or BlockSpec()
        self.norm1 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=spec.qkv_bias, fused=spec.fused_attn)
        self.ls1 = LayerScale(dim, spec.init_values) if spec.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio), act=spec.act)
        self.ls2 = LayerScale(dim, spec.init_values) if spec.init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), is_causal=is_causal)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional activation checkpointing per block."""

    def __init__(self, depth: int, make_block: Callable[[int], Block]) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"a tower needs depth >= 1 blocks, got {depth}")
        self.blocks = nn.ModuleList([make_block(i) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, is_causal, use_reentrant=False)
            else:
                x = blk(x, is_causal=is_causal)
        return x


TowerT = TypeVar("TowerT", bound="Tower")


class Tower(nn.Module):
    """What the image and text towers share: their constructor arguments (``init_kwargs``, the config node
    that rebuilds the tower, and ``settings``, the same flat, so converters can describe a tower, e.g. as
    open_clip config), a :class:`Transformer` trunk (``self.transformer``, set by the subclass) and the
    projection into the shared image-text space. ``groups``: the constructor arguments that are settings
    groups (:mod:`clipforge.models.specs`), by name."""

    transformer: Transformer
    groups: ClassVar[dict[str, type]] = {"block": BlockSpec}

    def __init__(self, init_locals: dict[str, Any]) -> None:
        """``init_locals``: the subclass constructor's ``locals()``, taken once its groups are specs and before
        anything else is bound."""
        super().__init__()
        self.init_kwargs = {
            k: asdict(v) if k in self.groups else v
            for k, v in init_locals.items()
            if k not in ("self", "__class__")
        }
        # before any setting is used: 'two' for depth failed deep in torch, naming no key, and the string
        # 'no' for class_token (true, as any non-empty string) silently built a tower with a class token
        check_setting_types(type(self), self.init_kwargs)
        dim, heads = self.init_kwargs.get("embed_dim"), self.init_kwargs.get("num_heads")
        if (
            dim is not None and heads is not None and dim % heads
        ):  # named by the tower's keys, not the layer's
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={heads}")

    @property
    def settings(self) -> dict[str, Any]:
        """Every constructor setting by its own name, the groups' fields beside the rest."""
        return flat_settings(self.groups, self.init_kwargs)

    @classmethod
    def from_settings(cls: type[TowerT], **settings: Any) -> TowerT:
        """The tower for flat settings (``norm_eps`` beside ``embed_dim``, as converters and old checkpoints
        describe towers) or grouped ones."""
        return cls(**group_settings(cls.groups, settings))

    def make_proj(self, embed_dim: int, output_dim: int | None, bias: bool) -> None:
        """``self.proj``: a linear map to ``output_dim``, or the identity (``output_dim`` falsy)."""
        self.output_dim = output_dim or embed_dim
        self.proj = nn.Linear(embed_dim, output_dim, bias=bias) if output_dim else nn.Identity()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


class AttentionPool(HeadAttention):
    """Multihead attention pooling ("MAP"): a learned query attends over the tokens, then a residual
    MLP. Same computation as timm's ``AttentionPoolLatent`` and the SigLIP vision head."""

    def __init__(self, dim: int, num_heads: int, spec: BlockSpec | None = None) -> None:
        spec = spec or BlockSpec()
        super().__init__(dim, num_heads, spec.fused_attn)
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio), act=spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, H, N, Dh)
        out = self.attend(q, k, v)  # (B, H, 1, Dh); the math path keeps (B, H, 1, N) maps
        out = self.proj(out.transpose(1, 2).reshape(B, 1, C))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]
