"""Greedy decoding with the LocCa decoder (Wan et al., 2024) that SigLIP 2 (Tschannen et al., 2025) trains
beside the sigmoid loss (``objectives=locca``): caption an image, turn a referring expression into a box, or
caption the region inside a box. ``clipforge-caption`` (clipforge.caption_cli) is its command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clipforge.data.tokenizer import Tokenizer
from clipforge.models.clip import CLIP
from clipforge.models.decoder import BOX_TOKENS, TextDecoder, bpe_words

TASKS = ("caption", "box", "grounded")


@torch.no_grad()
def decode(
    model: CLIP,
    decoder: TextDecoder,
    images: torch.Tensor,
    task: str = "caption",
    ref: str | None = None,
    box: Sequence[float] | None = None,
    max_new_tokens: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[Any]:
    """Greedy answers for (B, 3, H, W) ``images``: a caption string each (``caption``, ``grounded``) or
    a box ``[x0, y0, x1, y1]`` each (``box``, always four location tokens)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if max_new_tokens is not None and max_new_tokens < 1:  # 0 or less decoded nothing, silently
        raise ValueError(
            f"max_new_tokens must be positive (null: all the decoder holds), got {max_new_tokens}"
        )
    # a ref or box the task does not read was dropped without a word: the answer of another question
    if ref is not None and task != "box":
        raise ValueError(f"ref= is read by task=box only, not task={task}: add task=box, or leave ref out")
    if box is not None and task != "grounded":
        raise ValueError(
            f"box= is read by task=grounded only, not task={task}: add task=grounded, or leave box out"
        )
    if task == "grounded":
        x0, y0, x1, y1 = box if box is not None and len(box) == 4 else (0, 0, 0, 0)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):  # clamped, the region was empty or the frame
            raise ValueError(
                f"task=grounded needs box=[x0,y0,x1,y1] with 0 <= x0 < x1 <= 1, y too; got {box}"
            )
    tokenizer = tokenizer or Tokenizer(decoder.context_length)
    image_tokens = model.visual.forward_features(images)  # (B, T, D)
    B = images.shape[0]
    if task == "box":
        if not ref:
            raise ValueError("task=box needs the referring expression: ref='the red circle'")
        prompt = decoder.prompt("ref", region=bpe_words(tokenizer(ref))[0])
        seq = decoder.generate(
            image_tokens, _repeat(prompt, B, images), BOX_TOKENS, allowed=decoder.box_mask()
        )
        return [[round(c, 4) for c in row] for row in decoder.tokens_to_box(seq[:, -BOX_TOKENS:]).tolist()]
    if task == "grounded":
        prompt = decoder.prompt("grounded", box=torch.tensor([float(c) for c in box]))
    else:
        prompt = decoder.prompt("caption")
    # text only: no padding id, no SOT (decoder sequences never contain them), no task or location tokens
    allowed = decoder.text_mask(exclude=(0, tokenizer.sot_token_id))
    budget = decoder.max_len if max_new_tokens is None else max_new_tokens
    seq = decoder.generate(
        image_tokens, _repeat(prompt, B, images), budget, allowed=allowed, stop_token=decoder.eot_token_id
    )
    return [tokenizer.decode(row) for row in seq[:, len(prompt) :]]


def _repeat(prompt: list[int], batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([prompt] * batch, dtype=torch.long, device=like.device)
