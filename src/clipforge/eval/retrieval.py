"""Image-text retrieval recall@K on held-out pairs, the retrieval protocol of CLIP (Radford et al., 2021,
section 3.1.5 / table 13: Flickr30k and MSCOCO image->text and text->image recall@1/5/10).

Every image is embedded with its caption; ranks embed their shards, the normalised embeddings are
all-gathered (in rank order, so pairs stay aligned) and every rank computes the same recalls.

Captions that are token-for-token identical are one caption: for image i every text equal to
caption i is a correct answer, and for a caption every image carrying that caption is. Without this,
a held-out set with repeated captions (synthetic data, "a photo of a dog") would score a correct
retrieval as a miss. Images that are pixel-for-pixel identical are one image likewise: COCO's five
captions per image come as five pairs repeating the image, and as in CLIP's protocol each image is
one image->text query, answered correctly by any of its captions, and one text->image candidate.
Without this, the image's other four captions counted as wrong answers and every wrong image as five.
A query's rank is the number of *wrong* candidates scoring strictly higher than its best correct one;
recall@K is the fraction of queries with rank < K: image->text over the distinct images, text->image
over all pairs' captions (COCO's 5,000 and 25,000 queries).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.distributed import all_gather_cat
from clipforge.eval.runtime import autocast, eval_mode, progress_bar, resolve_device
from clipforge.eval.zeroshot import check_top_k


@torch.inference_mode()
def embed_pairs(
    model: nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    show_progress: bool = False,
    precision: str = "auto",
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(image_features (N, D), text_features (N, D), tokens (N, L), image_hashes (N, 2))``;
    features normalised, hashes equal for pixel-identical images (:func:`image_hashes`)."""
    dev = resolve_device(device, model)
    img, txt, tok, pix = [], [], [], []
    seen = 0
    with eval_mode(model):
        for batch in progress_bar(dataloader, show_progress, "retrieval"):
            images, tokens = batch[0], batch[1]
            if max_samples is not None:
                images, tokens = images[: max_samples - seen], tokens[: max_samples - seen]
            images = images.to(dev, non_blocking=True)
            with autocast(dev, precision):
                fi = model.encode_image(images, normalize=False)
                ft = model.encode_text(tokens.to(dev, non_blocking=True), normalize=False)
            img.append(F.normalize(fi.float(), dim=-1))
            txt.append(F.normalize(ft.float(), dim=-1))
            tok.append(tokens.to(dev))
            pix.append(image_hashes(images))
            seen += images.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    if not img:  # an empty shard; all_gather_cat takes the widths from the other ranks
        empty = torch.zeros(0, 1, device=dev)
        no_ids = torch.zeros(0, 1, dtype=torch.long, device=dev)
        return empty, empty.clone(), no_ids, torch.zeros(0, 2, dtype=torch.long, device=dev)
    return torch.cat(img), torch.cat(txt), torch.cat(tok), torch.cat(pix)


_HASH_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}
# int64 products held at once by image_hashes: a few rows of the batch at a time, so a fingerprint costs
# about this much memory whatever the batch (a whole-batch int64 copy was 8x a uint8 batch on the device)
_HASH_CHUNK_BYTES = 32 * 2**20


def image_hashes(images: torch.Tensor, chunk_bytes: int = _HASH_CHUNK_BYTES) -> torch.Tensor:
    """``(B, 2)`` int64 fingerprints of the images' exact pixel values: two random linear hashes of the
    pixels' bit patterns in wrapping 64-bit integer arithmetic, exact in any summation order, so equal on
    every device and rank for equal images (the weights come from a fixed seed).

    Hashed a few images at a time (``chunk_bytes`` of int64 products), reading the pixels in place: no
    int64 or contiguous copy of the whole batch is made."""
    if images.dim() < 2:
        raise ValueError(f"image_hashes takes a batch of images (B, ...), got shape {tuple(images.shape)}")
    x = images.detach()
    if x.is_floating_point():  # the bit patterns, read in place (a same-size view allows any strides)
        x = x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])
    pixels = math.prod(x.shape[1:])
    key = (pixels, str(x.device))
    if key not in _HASH_WEIGHTS:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-(2**62), 2**62, (2, pixels), generator=g, dtype=torch.long) * 2 + 1
        _HASH_WEIGHTS[key] = w.to(x.device)  # odd weights: no factor of 2 lost to the wrap-around
    w = _HASH_WEIGHTS[key].view(2, 1, *x.shape[1:])  # broadcast over the images' own strides
    out = torch.empty(x.shape[0], 2, dtype=torch.long, device=x.device)
    dims = tuple(range(1, x.dim()))
    step = max(1, chunk_bytes // (8 * max(pixels, 1)))
    # one int64 buffer of `step` images: x * w would cast a copy of the rows to int64 first, then multiply
    buf = torch.empty(min(step, x.shape[0]), *x.shape[1:], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], step):
        part = buf[: x.shape[0] - s]
        for j in range(2):  # copy_ sign-extends (zero-extends uint8) like .long(), from any strides
            out[s : s + step, j] = part.copy_(x[s : s + step]).mul_(w[j]).sum(dim=dims)
    return out


def row_ids(rows: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ids ``0..``, equal for equal rows (token-identical captions, equal image hashes)."""
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def recall_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positives: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    weights: torch.Tensor | None = None,
) -> dict[int, float]:
    """Fraction of queries whose best correct candidate has fewer than K wrong ones above it.

    ``queries (Nq, D)``, ``candidates (Nc, D)``; ``positives (P, 2)`` the correct ``(query, candidate)``
    index pairs (every query needs one); ``weights (Nq,)`` integer counts of each query (``None``: 1).
    Scored by dot product in chunks of ``chunk`` queries so memory stays ``chunk * Nc``.
    """
    ks = [check_top_k(k, "retrieval.ks") for k in ks]
    if queries.shape[0] == 0:
        return {k: float("nan") for k in ks}
    if weights is None:
        weights = torch.ones(queries.shape[0], dtype=torch.long, device=queries.device)
    order = positives[:, 0].argsort()
    pq, pc = positives[order, 0], positives[order, 1]
    hits = torch.zeros(len(ks), dtype=torch.long)
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s : s + chunk] @ candidates.T  # (b, Nc)
        lo, hi = torch.searchsorted(pq, torch.tensor([s, s + sim.shape[0]], device=pq.device)).tolist()
        positive = torch.zeros_like(sim, dtype=torch.bool)
        positive[pq[lo:hi] - s, pc[lo:hi]] = True
        if not positive.any(dim=1).all():
            raise ValueError("every retrieval query needs a correct candidate")
        best_pos = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
        rank = ((sim > best_pos) & ~positive).sum(dim=1)  # (b,) wrong candidates above the best right one
        for i, k in enumerate(ks):
            hits[i] += int(weights[s : s + chunk][rank < k].sum())
    return {k: float(h) / int(weights.sum()) for k, h in zip(ks, hits.tolist())}


def _first_of_each(ids: torch.Tensor) -> torch.Tensor:
    """Index of the first sample of each id ``0..max(ids)``."""
    n = ids.shape[0]
    first = torch.full((int(ids.max()) + 1 if n else 0,), n, dtype=torch.long, device=ids.device)
    return first.scatter_reduce_(0, ids, torch.arange(n, device=ids.device), reduce="amin")


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    tokens: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    image_keys: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``i2t_r{k}``, ``t2i_r{k}``, ``mean_recall`` and ``num_samples`` for aligned pairs.

    ``tokens`` (the captions) merge identical captions, ``image_keys`` (``(N, ...)``, e.g.
    :func:`image_hashes`) identical images; ``None`` treats every caption (image) as distinct.
    """
    n = image_features.shape[0]
    arange = torch.arange(n, device=image_features.device)
    cap = row_ids(tokens) if tokens is not None else arange
    img = row_ids(image_keys) if image_keys is not None else arange
    # each candidate once: a wrong caption (image) that several pairs carry counted once per copy, so one
    # wrong candidate above the right one cost several ranks
    first_cap, first_img = _first_of_each(cap), _first_of_each(img)
    pairs = torch.stack([img, cap], dim=1).unique(dim=0)  # (distinct image, distinct caption) pairs
    i2t = recall_at_k(image_features[first_img], text_features[first_cap], pairs, ks)
    # a distinct caption stands for each of its pairs' captions: one query each, all scored alike
    per_caption = torch.bincount(cap, minlength=len(first_cap))
    t2i = recall_at_k(
        text_features[first_cap], image_features[first_img], pairs.flip(1), ks, weights=per_caption
    )
    out: dict[str, Any] = {f"i2t_r{k}": v for k, v in i2t.items()}
    out |= {f"t2i_r{k}": v for k, v in t2i.items()}
    out["mean_recall"] = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    out["num_samples"] = n
    out["num_unique_captions"] = len(first_cap)
    out["num_unique_images"] = len(first_img)
    return out


def evaluate_retrieval(
    model: nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    distributed: bool = True,
    ks: Sequence[int] = (1, 5, 10),
    dedupe_captions: bool = True,
    precision: str = "auto",
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Recall@K over ``(images, tokens)`` pairs (extra batch items are ignored).

    With torch.distributed initialised every rank passes its own shard and must call; embeddings of
    all ranks are gathered so all ranks return the metrics over the whole set. ``max_samples`` caps
    the pairs each rank embeds (the score matrix grows with the square of the set size).
    """
    fi, ft, tok, pix = embed_pairs(
        model, dataloader, device=device, show_progress=progress, precision=precision, max_samples=max_samples
    )
    fi = all_gather_cat(fi, enabled=distributed)
    ft = all_gather_cat(ft, enabled=distributed)
    tok = all_gather_cat(tok, enabled=distributed) if dedupe_captions else None
    return retrieval_metrics(fi, ft, tok, ks, image_keys=all_gather_cat(pix, enabled=distributed))
