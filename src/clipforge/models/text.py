"""Transformer text tower of CLIP (Radford et al., 2021), with the last-token readout used by
SigLIP-style text encoders (Zhai et al., 2023).

Token and learned position embeddings feed causal pre-norm blocks (flash-eligible: ``is_causal`` and no
float mask). The sentence vector is read at the end-of-text token (``eot``: the highest token id, as
in CLIP's BPE vocabulary) or at the last position (``last``), then projected into the shared space.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from clipforge.models.layers import Block, Tower, Transformer
from clipforge.models.specs import BlockSpec, as_spec
from clipforge.models.weight_init import WeightInit, init_tower


class TextTransformer(Tower):
    """The text tower. ``block``: the settings every block shares (:class:`BlockSpec`, LayerNorm eps 1e-5 by
    default, as CLIP), a spec or its mapping."""

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        output_dim: int | None = 512,
        proj_bias: bool = False,
        causal: bool = True,
        pool_type: Literal["eot", "last"] = "eot",
        block: BlockSpec | Mapping[str, Any] | None = None,
        weight_init: WeightInit = "openclip",
    ) -> None:
        block = as_spec(BlockSpec, block, norm_eps=1e-5)
        super().__init__(locals())
        if pool_type not in ("eot", "last"):
            raise ValueError(f"pool_type must be 'eot' or 'last', got {pool_type!r}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.embed_dim = embed_dim
        self.causal = causal
        self.pool_type = pool_type
        self.weight_init = weight_init
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, embed_dim))
        self.transformer = Transformer(
            depth, lambda i: Block(embed_dim, num_heads, block, block.drop_path(i, depth))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=block.norm_eps)
        self.make_proj(embed_dim, output_dim, proj_bias)
        self.init_weights()

    def init_weights(self, scheme: WeightInit | None = None) -> None:
        """Re-initialise all weights with ``scheme`` (default: the constructor's ``weight_init``)."""
        init_tower(self, scheme or self.weight_init, self.embed_dim, len(self.blocks))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "token_embedding.weight"}

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, embed_dim) after the final norm."""
        L = tokens.shape[1]
        if self.context_length < L:
            raise ValueError(f"got {L} tokens but context_length is {self.context_length}")
        x = self.token_embedding(tokens) + self.pos_embed[:, :L]
        x = self.transformer(x, is_causal=self.causal)
        return self.norm(x)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "last":
            return x[:, -1]
        # The EOT token has the highest id in CLIP's vocabulary: argmax finds it in each row.
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.forward_features(tokens), tokens))
