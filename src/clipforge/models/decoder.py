"""Transformer text decoder that reads an image: the location-aware captioner of LocCa (Wan et al., 2024,
"LocCa: Visual Pretraining with Location-aware Captioners"), which SigLIP 2 (Tschannen et al., 2025)
trains beside the sigmoid loss. A decoder block is the one of Vaswani et al. (2017), pre-norm: causal
self-attention over the text so far, cross-attention to the image tower's un-pooled patch tokens
(``VisionTransformer.forward_features``), then an MLP. Trained with teacher forcing; decoded greedily.

Parallel prediction (opt-in, ``parallel_prob``): CapPa's (Tschannen et al., 2023, "Image Captioners Are
Scalable Vision Learners Too"). With probability ``parallel_prob`` per sample, every decoder input from the
first answer token on (answer and padding) is replaced by one learned mask token and that sample's
self-attention is bidirectional, so all its answer tokens are predicted at once from the image (and the
prompt); the loss is the same token cross-entropy. As big_vision's CapPa decoder
(``models/proj/cappa/cappa.py``: a per-example draw, in training only; ``masking_ratio=1.0`` masks every
input position, padding included, so the masks tell a sample no more about its answer's length than the
batch's longest), except that LocCa's task prompt stays visible (CapPa has none; without it a sample could
not tell which task to answer) and the sequence keeps its teacher-forcing layout: the input at position j
predicts token j + 1, the first answer token from the last prompt token. Decoding (``generate``) is always
autoregressive and causal.

Three tasks share one sequence interface; the first token names the task:

    caption            [CAP]  w_1 ... w_n  EOT                   loss on w and EOT
    referring -> box   [REF]  r_1 ... r_m  x0 y0 x1 y1  EOT       loss on the box and EOT (r is the prompt)
    box -> grounded    [GCAP] x0 y0 x1 y1  r_1 ... r_m  EOT       loss on r and EOT (the box is the prompt)

``w`` and ``r`` are the text tower's BPE ids (the data pipeline's tokens, without their SOT), so the
decoder's vocabulary is the BPE vocabulary followed by the three task tokens and ``num_box_bins`` location
tokens.

Boxes as text tokens. A normalised coordinate ``c`` in [0, 1] becomes bin ``min(floor(c * n), n - 1)``,
token ``loc_offset + bin``; a decoded bin maps back to its centre ``(bin + 0.5) / n``, so the round trip
is off by at most ``1 / (2 n)``. Dedicated location tokens rather than digits spelled through BPE: a box
is always exactly four tokens in the order x0 y0 x1 y1, greedy box decoding can be restricted to location
tokens, and "0.25" has no tokenisation ambiguity; Pix2Seq (Chen et al., 2022) and PaliGemma (1024
``<locNNNN>`` tokens) quantise the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.models.layers import Attention, HeadAttention, Mlp
from clipforge.models.specs import BlockSpec, as_spec
from clipforge.models.weight_init import init_vit_weights

TASKS: tuple[str, ...] = ("caption", "ref", "grounded")
BOX_TOKENS = 4  # x0 y0 x1 y1


def quantize_box(boxes: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(..., 4) normalised coordinates -> (..., 4) bins in [0, num_bins)."""
    return (boxes.clamp(0.0, 1.0) * num_bins).floor().long().clamp(max=num_bins - 1)


def dequantize_box(bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(..., 4) bins -> (..., 4) normalised coordinates at the bin centres."""
    return (bins.float() + 0.5) / num_bins


def bpe_words(tokens: torch.Tensor) -> list[list[int]]:
    """(B, L) tokenizer output ``[SOT] w ... [EOT] 0 ...`` -> per row the ids ``w`` (SOT, EOT and padding
    dropped). EOT is the highest id of the row (as the text tower's readout assumes); an all-zero row
    (no text) gives ``[]``."""
    ends = tokens.argmax(dim=-1).tolist()
    return [row[1:end] for row, end in zip(tokens.tolist(), ends)]


class CrossAttention(HeadAttention):
    """Multi-head attention of text queries over image tokens, with the fused-SDPA and explicit-softmax
    paths of :class:`~clipforge.models.layers.HeadAttention` (``keep_attn`` keeps the maps for pictures)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True) -> None:
        super().__init__(dim, num_heads, fused)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        T = context.shape[1]
        q = self.q(x).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        kv = self.kv(context).reshape(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, H, T, Dh)
        x = self.attend(q, k, v)  # (B, H, L, Dh); the math path keeps (B, H, L, T) maps
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class DecoderBlock(nn.Module):
    """x + self_attn(norm(x)) (causal, or as ``attn_mask`` says), x + cross_attn(norm(x), image),
    x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, spec: BlockSpec) -> None:
        super().__init__()
        if spec.init_values or spec.drop_path_rate:
            raise ValueError(
                "decoder blocks have no LayerScale or stochastic depth: leave init_values and drop_path_rate unset"
            )
        self.norm1 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=spec.qkv_bias, fused=spec.fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=spec.qkv_bias, fused=spec.fused_attn)
        self.norm3 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio), act=spec.act)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm1(x)
        x = x + (self.attn(h, is_causal=True) if attn_mask is None else self.attn(h, attn_mask=attn_mask))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class TextDecoder(nn.Module):
    """LocCa's decoder. ``vocab_size``/``context_length`` are the text tower's (its BPE ids and caption
    length); ``image_dim`` the width of the image tower's tokens; ``block``: the settings its blocks share
    (:class:`BlockSpec`, a spec or its mapping; LayerNorm eps 1e-5 by default; no LayerScale or stochastic
    depth); ``parallel_prob``: the share of training samples predicted in parallel (CapPa, see the module
    docstring); above 0 the decoder owns a learned ``mask_token``, at 0 it has no such parameter."""

    groups: ClassVar[dict[str, type]] = {"block": BlockSpec}

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        image_dim: int = 768,
        embed_dim: int = 512,
        depth: int = 6,
        num_heads: int = 8,
        num_box_bins: int = 1024,
        block: BlockSpec | Mapping[str, Any] | None = None,
        parallel_prob: float = 0.0,
    ) -> None:
        super().__init__()
        block = as_spec(BlockSpec, block, norm_eps=1e-5)
        if num_box_bins < 2:
            raise ValueError(f"num_box_bins must be >= 2, got {num_box_bins}")
        if isinstance(parallel_prob, bool) or not 0.0 <= float(parallel_prob) <= 1.0:
            raise ValueError(f"decoder.parallel_prob must be a probability in [0, 1], got {parallel_prob!r}")
        self.parallel_prob = float(parallel_prob)
        self.text_vocab_size = vocab_size
        self.image_dim = image_dim
        self.context_length = context_length
        self.num_box_bins = num_box_bins
        self.task_token = {task: vocab_size + i for i, task in enumerate(TASKS)}
        self.loc_offset = vocab_size + len(TASKS)
        self.vocab_size = self.loc_offset + num_box_bins
        # the longest sequence: a task token, a caption of context_length - 1 ids (its SOT dropped) and a box
        self.max_len = context_length + BOX_TOKENS + 1
        self.token_embedding = nn.Embedding(self.vocab_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.max_len, embed_dim))
        # the image tokens come from any readout (an avg-pool tower leaves them un-normalised): norm, project
        self.image_norm = nn.LayerNorm(image_dim, eps=block.norm_eps)
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.blocks = nn.ModuleList([DecoderBlock(embed_dim, num_heads, block) for _ in range(depth)])
        self.grad_checkpointing = False  # recompute each block in the backward pass (set_grad_checkpointing)
        self.norm = nn.LayerNorm(embed_dim, eps=block.norm_eps)
        self.head = nn.Linear(embed_dim, self.vocab_size, bias=False)
        self.apply(init_vit_weights)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        # only when used: a default decoder's state_dict (and its checkpoints) keep their keys
        self.mask_token: nn.Parameter | None = None
        if self.parallel_prob > 0:
            self.mask_token = nn.Parameter(torch.empty(embed_dim).normal_(std=0.02))  # as a token embedding

    def no_weight_decay(self) -> set[str]:
        return {"token_embedding.weight", "pos_embed"} | (
            {"mask_token"} if self.mask_token is not None else set()
        )

    @property
    def eot_token_id(self) -> int:
        """End of text: the highest BPE id, as the text tower's EOT readout assumes."""
        return self.text_vocab_size - 1

    # -- task sequences ----------------------------------------------------------------------------------
    def prompt(
        self, task: str, region: list[int] | None = None, box: torch.Tensor | None = None
    ) -> list[int]:
        """The prompt part of a task sequence: ``[CAP]``, ``[REF] r``, or ``[GCAP] x0 y0 x1 y1``
        (``region``: BPE ids without SOT/EOT; ``box``: (4,) normalised coordinates)."""
        if task == "caption":
            return [self.task_token[task]]
        if task == "ref":
            if region is None:
                raise ValueError("the referring task needs a region text")
            return [self.task_token[task], *region]
        if task == "grounded":
            if box is None:
                raise ValueError("the grounded-caption task needs a box")
            return [self.task_token[task], *self.box_to_tokens(box).tolist()]
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    def sequences(
        self,
        tasks: list[str],
        captions: list[list[int]],
        regions: list[list[int] | None],
        boxes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing sequences for a batch: ``(tokens, is_target)``, both (B, S) on the CPU, padded
        with 0 / False. ``captions``/``regions``: BPE ids without SOT and EOT; ``boxes``: (B, 4). Train on
        ``decoder(tokens[:, :-1])`` against ``tokens[:, 1:]`` where ``is_target[:, 1:]``."""
        eot = self.eot_token_id
        rows: list[tuple[list[int], list[int]]] = []  # (prompt, target)
        for i, task in enumerate(tasks):
            if task == "caption":
                target = [*captions[i], eot]
                prompt = self.prompt(task)
            elif task == "ref":
                prompt = self.prompt(task, region=regions[i])
                target = [*self.box_to_tokens(boxes[i]).tolist(), eot]
            else:
                prompt = self.prompt(task, box=boxes[i])
                target = [*regions[i], eot]
            rows.append((prompt, target))
        S = min(max(len(p) + len(t) for p, t in rows), self.max_len)
        tokens = torch.zeros(len(rows), S, dtype=torch.long)
        is_target = torch.zeros(len(rows), S, dtype=torch.bool)
        for i, (prompt, target) in enumerate(rows):
            seq = (prompt + target)[:S]  # a region at the context limit loses its last tokens
            tokens[i, : len(seq)] = torch.tensor(seq)
            is_target[i, len(prompt) : len(seq)] = True
        return tokens, is_target

    def parallel_inputs(self, is_target: torch.Tensor, parallel: torch.Tensor) -> torch.Tensor:
        """The input positions to mask for parallel prediction: (B, S) ``is_target`` of :meth:`sequences`,
        (B,) bool ``parallel`` (the samples predicted in parallel) -> (B, S - 1) bool over the inputs
        ``tokens[:, :-1]``: in a parallel row every position from its first answer token on (answer and
        padding); the prompt stays visible."""
        prompt = is_target.cumsum(dim=1) == 0  # before the first answer token
        return parallel[:, None] & ~prompt[:, :-1]

    # -- boxes as tokens -------------------------------------------------------------------------------
    def box_to_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """(..., 4) normalised [x0, y0, x1, y1] -> (..., 4) location token ids."""
        return quantize_box(boxes, self.num_box_bins) + self.loc_offset

    def tokens_to_box(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., 4) location token ids -> (..., 4) normalised coordinates (bin centres)."""
        return dequantize_box(tokens - self.loc_offset, self.num_box_bins)

    # -- forward -----------------------------------------------------------------------------------------
    def forward_features(
        self, tokens: torch.Tensor, image_tokens: torch.Tensor, masked: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) decoder token ids, (B, T, image_dim) image tokens -> (B, L, embed_dim) after the final norm.
        ``masked`` (B, L) bool (:meth:`parallel_inputs`): those inputs become the mask token and a row with
        any masked input attends bidirectionally (parallel prediction); None: causal everywhere."""
        n = tokens.shape[1]
        if n > self.max_len:
            raise ValueError(f"got {n} decoder tokens but the decoder holds at most {self.max_len}")
        context = self.image_proj(self.image_norm(image_tokens))  # (B, T, embed_dim)
        x = self.token_embedding(tokens)  # (B, n, embed_dim)
        attn_mask = None
        if masked is not None:
            if self.mask_token is None:
                raise ValueError("masked decoder inputs need a mask token: set decoder.parallel_prob > 0")
            if masked.shape != tokens.shape:
                raise ValueError(f"masked has shape {tuple(masked.shape)}, the tokens {tuple(tokens.shape)}")
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            attn_mask = (causal | masked.any(dim=1)[:, None, None])[:, None]  # (B, 1, n, n), True: attend
        x = x + self.pos_embed[:, :n]
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = (
                checkpoint(blk, x, context, attn_mask, use_reentrant=False)
                if recompute
                else blk(x, context, attn_mask)
            )
        return self.norm(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input in training and recompute the block in the backward pass, as the
        towers do (``clipforge-train grad_checkpointing=true``)."""
        self.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) decoder token ids, (B, T, image_dim) image tokens -> (B, L, vocab_size) next-token logits.
        Training scores only the target positions: ``head(forward_features(...)[is_target])`` (the vocabulary
        is large and most positions are prompt or padding)."""
        return self.head(self.forward_features(tokens, image_tokens))

    @torch.no_grad()
    def generate(
        self,
        image_tokens: torch.Tensor,
        prompt: torch.Tensor,
        max_new_tokens: int,
        allowed: torch.Tensor | None = None,
        stop_token: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding: (B, P) prompt -> (B, P + n) with n <= ``max_new_tokens`` new tokens, each the
        argmax over ``allowed`` (a (vocab_size,) bool mask; None = all). A row that emitted ``stop_token``
        is padded with 0 from then on; decoding ends when every row has stopped. No key/value cache: every
        step re-runs the prefix (the sequences here are a few dozen tokens)."""
        seq = prompt
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(min(max_new_tokens, self.max_len - prompt.shape[1])):
            logits = self(seq, image_tokens)[:, -1]  # (B, V)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            nxt = logits.argmax(dim=-1).masked_fill(done, 0)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if stop_token is not None:
                done |= nxt == stop_token
                if bool(done.all()):
                    break
        return seq

    def text_mask(self, exclude: tuple[int, ...] = ()) -> torch.Tensor:
        """(vocab_size,) bool: the BPE ids, without ``exclude`` (e.g. SOT and the padding id 0)."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.head.weight.device)
        mask[: self.text_vocab_size] = True
        mask[list(exclude)] = False
        return mask

    def box_mask(self) -> torch.Tensor:
        """(vocab_size,) bool: the location tokens only."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.head.weight.device)
        mask[self.loc_offset :] = True
        return mask
