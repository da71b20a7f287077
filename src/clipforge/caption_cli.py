"""``clipforge-caption``: greedy decoding with the LocCa decoder (Wan et al., 2024) that SigLIP 2
(Tschannen et al., 2025) trains beside the sigmoid loss (``objectives=locca``). Three tasks, one per call:
caption an image, turn a referring expression into a box, or caption the region inside a box.

``main`` is the Hydra wrapper over conf/caption.yaml; :func:`run_caption` the plain function it calls (and
tests call); :func:`decode` works on tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from clipforge.checkpoint import load_captioner
from clipforge.conf import CONF_DIR
from clipforge.data.tokenizer import Tokenizer
from clipforge.eval.datasets import eval_transform, load_images
from clipforge.eval.runtime import resolve_device
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
        if box is None or len(box) != 4:
            raise ValueError("task=grounded needs box=[x0,y0,x1,y1] (normalised)")
        prompt = decoder.prompt("grounded", box=torch.tensor([float(c) for c in box]))
    else:
        prompt = decoder.prompt("caption")
    # text only: no padding id, no SOT (decoder sequences never contain them), no task or location tokens
    allowed = decoder.text_mask(exclude=(0, tokenizer.sot_token_id))
    budget = max_new_tokens or decoder.max_len
    seq = decoder.generate(
        image_tokens, _repeat(prompt, B, images), budget, allowed=allowed, stop_token=decoder.eot_token_id
    )
    return [tokenizer.decode(row) for row in seq[:, len(prompt) :]]


def _repeat(prompt: list[int], batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([prompt] * batch, dtype=torch.long, device=like.device)


def run_caption(cfg: DictConfig) -> dict[str, Any]:
    """Decode every ``cfg.image``; prints ``<path>: <answer>`` and returns ``{path: answer}``."""
    model, decoder, _ = load_captioner(cfg.checkpoint, use_ema=bool(cfg.get("use_ema")))
    device = resolve_device(cfg.get("device", "auto"), model)
    model, decoder = model.to(device), decoder.to(device)
    paths = [cfg.image] if isinstance(cfg.image, str) else [str(p) for p in cfg.image]
    images = load_images(paths, eval_transform(model.visual.img_size))
    box = list(cfg.box) if cfg.get("box") is not None else None
    answers = decode(
        model, decoder, images.to(device), cfg.get("task", "caption"), cfg.get("ref"), box,
        cfg.get("max_new_tokens"),
    )  # fmt: skip
    for p, a in zip(paths, answers):
        print(f"{p}: {a}")
    return dict(zip(paths, answers))


@hydra.main(config_path=str(CONF_DIR), config_name="caption", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_caption(cfg)


if __name__ == "__main__":
    main()
