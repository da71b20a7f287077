"""Image-text retrieval recall@K on held-out pairs, the retrieval protocol of CLIP (Radford et al., 2021,
section 3.1.5 / table 13: Flickr30k and MSCOCO image->text and text->image recall@1/5/10).

Every image is embedded with its caption; ranks embed their shards, the normalised embeddings are
all-gathered (in rank order, so pairs stay aligned) and every rank computes the same recalls.

Captions that are token-for-token identical are one caption: for image i every text equal to
caption i is a correct answer, and for a caption every image carrying that caption is. Without this,
a held-out set with repeated captions (synthetic data, "a photo of a dog") would score a correct
retrieval as a miss. A query's rank is the number of *wrong* candidates scoring strictly higher than
its best correct one; recall@K is the fraction of queries with rank < K.
"""

from __future__ import annotations

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(image_features (N, D), text_features (N, D), tokens (N, L))``; features normalised."""
    dev = resolve_device(device, model)
    img, txt, tok = [], [], []
    seen = 0
    with eval_mode(model):
        for batch in progress_bar(dataloader, show_progress, "retrieval"):
            images, tokens = batch[0], batch[1]
            if max_samples is not None:
                images, tokens = images[: max_samples - seen], tokens[: max_samples - seen]
            with autocast(dev, precision):
                fi = model.encode_image(images.to(dev, non_blocking=True), normalize=False)
                ft = model.encode_text(tokens.to(dev, non_blocking=True), normalize=False)
            img.append(F.normalize(fi.float(), dim=-1))
            txt.append(F.normalize(ft.float(), dim=-1))
            tok.append(tokens.to(dev))
            seen += images.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    if not img:  # an empty shard; all_gather_cat takes the widths from the other ranks
        empty = torch.zeros(0, 1, device=dev)
        return empty, empty.clone(), torch.zeros(0, 1, dtype=torch.long, device=dev)
    return torch.cat(img), torch.cat(txt), torch.cat(tok)


def caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ids, equal for token-identical captions."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def recall_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[int, float]:
    """Fraction of queries whose best correct candidate (same id) has fewer than K wrong ones above it.

    ``queries (Nq, D)``, ``candidates (Nc, D)``; scored by dot product in chunks of ``chunk`` queries
    so memory stays ``chunk * Nc``.
    """
    ks = [check_top_k(k, "retrieval.ks") for k in ks]
    if queries.shape[0] == 0:
        return {k: float("nan") for k in ks}
    hits = torch.zeros(len(ks), dtype=torch.long)
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s : s + chunk] @ candidates.T  # (b, Nc)
        positive = query_ids[s : s + chunk, None] == candidate_ids[None, :]  # (b, Nc)
        best_pos = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
        rank = ((sim > best_pos) & ~positive).sum(dim=1)  # (b,) wrong candidates above the best right one
        for i, k in enumerate(ks):
            hits[i] += int((rank < k).sum())
    return {k: float(h) / queries.shape[0] for k, h in zip(ks, hits.tolist())}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    tokens: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """``i2t_r{k}``, ``t2i_r{k}``, ``mean_recall`` and ``num_samples`` for aligned pairs.

    ``tokens`` (the captions) merge identical captions; ``None`` treats every caption as distinct.
    """
    n = image_features.shape[0]
    ids = caption_ids(tokens) if tokens is not None else torch.arange(n, device=image_features.device)
    # an image's candidates are the distinct captions, each once: a wrong caption that several images
    # carry counted once per copy, so one wrong caption above the right one cost several ranks
    m = int(ids.max()) + 1 if n else 0
    first = torch.full((m,), n, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, ids, torch.arange(n, device=ids.device), reduce="amin")
    i2t = recall_at_k(image_features, text_features[first], ids, torch.arange(m, device=ids.device), ks)
    t2i = recall_at_k(text_features, image_features, ids, ids, ks)
    out: dict[str, Any] = {f"i2t_r{k}": v for k, v in i2t.items()}
    out |= {f"t2i_r{k}": v for k, v in t2i.items()}
    out["mean_recall"] = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    out["num_samples"] = n
    out["num_unique_captions"] = int(ids.unique().numel())
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
    fi, ft, tok = embed_pairs(
        model, dataloader, device=device, show_progress=progress, precision=precision, max_samples=max_samples
    )
    fi = all_gather_cat(fi, enabled=distributed)
    ft = all_gather_cat(ft, enabled=distributed)
    tok = all_gather_cat(tok, enabled=distributed) if dedupe_captions else None
    return retrieval_metrics(fi, ft, tok, ks)
