"""Vision Transformer image tower (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"),
as used by CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023).

Patches are embedded by a strided convolution (kernel = stride = patch size), learned position
embeddings are added, pre-norm blocks follow, and one of three readouts gives the image vector:
the CLS token (``token``), the mean of patch tokens (``avg``), or multihead attention pooling
(``map``, Zhai et al., 2022). A linear projection maps it into the shared image-text space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from clipforge.models.layers import AttentionPool, Block, Tower, Transformer
from clipforge.models.specs import BlockSpec, VisionLayout, as_spec
from clipforge.models.weight_init import WeightInit, init_tower, init_vit_weights

__all__ = ["VisionTransformer", "init_vit_weights", "patch_dropout", "resample_pos_embed"]

GlobalPool = Literal["token", "avg", "map"]


def patch_dropout(x: torch.Tensor, keep: float, num_prefix: int) -> torch.Tensor:
    """FLIP (Li et al., 2023): keep a random ``keep`` fraction of patch tokens per sample.

    Prefix (CLS) tokens are always kept. x: (B, T, D) -> (B, num_prefix + K, D).
    """
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    B, N, D = patches.shape
    k = max(1, round(N * keep))
    idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :k]  # (B, K) random subset
    patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([prefix, patches], dim=1)


class VisionTransformer(Tower):
    """The image tower. ``block``: the settings every block shares (:class:`BlockSpec`, LayerNorm eps 1e-6 by
    default); ``layout``: where norms and biases sit (:class:`VisionLayout`); each a spec or its mapping."""

    groups: ClassVar[dict[str, type]] = {"block": BlockSpec, "layout": VisionLayout}

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        output_dim: int | None = 512,
        proj_bias: bool = False,
        class_token: bool = True,
        global_pool: GlobalPool = "token",
        block: BlockSpec | Mapping[str, Any] | None = None,
        layout: VisionLayout | Mapping[str, Any] | None = None,
        patch_dropout: float = 0.0,
        weight_init: WeightInit = "openclip",
    ) -> None:
        block = as_spec(BlockSpec, block)
        layout = as_spec(VisionLayout, layout)
        super().__init__(locals())
        if img_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide img_size={img_size}")
        if global_pool not in ("token", "avg", "map"):
            raise ValueError(f"global_pool must be 'token', 'avg' or 'map', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_dropout = patch_dropout
        self.weight_init = weight_init
        # timm's convention: average pooling normalises after pooling (fc_norm), the others before.
        use_fc_norm = global_pool == "avg" if layout.fc_norm is None else layout.fc_norm
        eps = block.norm_eps

        self.patch_embed = nn.Conv2d(
            layout.in_chans, embed_dim, patch_size, stride=patch_size, bias=layout.patch_bias
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=eps) if layout.pre_norm else nn.Identity()
        self.transformer = Transformer(
            depth, lambda i: Block(embed_dim, num_heads, block, block.drop_path(i, depth))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps) if not use_fc_norm else nn.Identity()
        self.attn_pool = AttentionPool(embed_dim, num_heads, block) if global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(embed_dim, eps=eps) if use_fc_norm else nn.Identity()
        self.make_proj(embed_dim, output_dim, proj_bias)
        self.init_weights()

    def init_weights(self, scheme: WeightInit | None = None) -> None:
        """Re-initialise all weights with ``scheme`` (default: the constructor's ``weight_init``)."""
        scheme = scheme or self.weight_init
        if scheme in ("openclip", "torch"):  # open_clip draws class and position embeddings with std w^-1/2
            nn.init.normal_(self.pos_embed, std=self.embed_dim**-0.5)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=self.embed_dim**-0.5)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=1e-6)
        init_tower(self, scheme, self.embed_dim, len(self.blocks))
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.embed_dim**-0.5)

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        if self.attn_pool is not None:
            names.add("attn_pool.latent")
        return names

    def embed(
        self,
        images: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        interpolate_pos: bool = False,
    ) -> torch.Tensor:
        """Patch + position embedding: (B, C, H, W) -> (B, prefix + N, D).

        ``patch_mask`` (B, N) bool and ``mask_token`` (D,): the masked patch embeddings are replaced by the
        token before positions are added (masked image modelling as in BEiT, iBOT and TIPS).
        ``interpolate_pos``: a square image of another size (a multiple of the patch size) takes the position
        embedding resampled to its grid, as DINO (Caron et al., 2021) does for its small local crops.
        """
        grid = self.grid_size
        if images.shape[-2:] != (self.img_size, self.img_size):
            h, w = images.shape[-2:]
            if not interpolate_pos or h != w or h % self.patch_size:
                raise ValueError(
                    f"expected {self.img_size}x{self.img_size} images, got {tuple(images.shape[-2:])}; "
                    "resample the position embedding to change the image size"
                )
            grid = h // self.patch_size
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if patch_mask is not None:
            if mask_token is None:
                raise ValueError("patch_mask needs a mask_token")
            x = torch.where(patch_mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        pos = self.pos_embed
        if grid != self.grid_size:
            pos = resample_pos_embed(pos, grid, self.num_prefix_tokens)
        return x + pos.to(x.dtype)

    def forward_features(self, images: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> token features (B, T, D) after the final norm; ``interpolate_pos`` as in
        :meth:`embed`."""
        return self.encode(self.embed(images, interpolate_pos=interpolate_pos))

    def encode(self, x: torch.Tensor, masked: bool = False) -> torch.Tensor:
        """Embedded tokens (B, T, D) from :meth:`embed` -> token features after the final norm. Patch dropout
        applies in training unless the tokens are ``masked`` (a ``patch_mask`` keeps every token in place)."""
        if self.training and self.patch_dropout > 0 and not masked:
            x = patch_dropout(x, 1.0 - self.patch_dropout, self.num_prefix_tokens)
        x = self.norm_pre(x)
        x = self.transformer(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D)."""
        if self.global_pool == "map":  # the query attends over patch tokens only, as in timm
            return self.attn_pool(x[:, self.num_prefix_tokens :])
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.proj(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Bicubic-interpolate a (1, prefix + g*g, D) position embedding to a new square grid, with
    ``antialias=True`` as timm's ``resample_abs_pos_embed`` and open_clip's ``resize_pos_embed`` do (in
    PyTorch that is another cubic kernel, a = -0.5 instead of -0.75, also when upsampling), so that a
    checkpoint loaded at another image size gets the table those libraries would give it."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} patch positions, not a square grid")
    if old == new_grid:
        return pos_embed
    D = grid.shape[-1]
    # bicubic in float32 at least (bf16 interpolation is coarse); float64 stays float64
    dtype = torch.promote_types(grid.dtype, torch.float32)
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).to(dtype)  # (1, D, g, g)
    grid = nn.functional.interpolate(
        grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
