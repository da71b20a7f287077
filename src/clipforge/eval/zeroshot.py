"""Zero-shot image classification with a contrastive image-text model, as in CLIP (Radford et al., 2021,
"Learning Transferable Visual Models From Natural Language Supervision", section 3.1.4 and the prompt
ensembling of 3.1.4/appendix).

Each class gets one weight vector: every prompt ``template(classname)`` is embedded by the text tower,
the embeddings are L2-normalised, averaged over templates and normalised again (the same recipe as
open_clip's ``build_zero_shot_classifier``). An image is classified by the cosine similarity of its
normalised embedding to those vectors. Evaluation is sharded: each rank scores its own images, and
the confusion matrix (from which every reported metric follows) is summed over ranks.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.distributed import all_gather_cat, all_reduce_sum, world_info
from clipforge.eval.distributed import shard_range
from clipforge.eval.metadata import Template, fill_template
from clipforge.eval.runtime import autocast, eval_mode, progress_bar, resolve_device

log = logging.getLogger(__name__)

IGNORE_LABEL = -1
"""Label of a sample whose image could not be read: it is skipped and counted, never scored."""


def build_zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    progress: bool = False,
    precision: str = "auto",
    distributed: bool = False,
) -> torch.Tensor:
    """Class weight matrix ``(D, C)`` (float32, unit columns) from prompt ensembles.

    ``batch_size`` counts prompts per text-tower forward. With ``distributed=True`` and
    torch.distributed initialised, each rank embeds a contiguous block of classes and the blocks
    are all-gathered, so every rank (all must call) returns the same full matrix.
    """
    if len(classnames) == 0:
        raise ValueError("no class names given")
    if len(templates) == 0:
        raise ValueError("no prompt templates given")
    dev = resolve_device(device, model)
    rank, world = world_info(enabled=distributed)
    my_classes = shard_range(len(classnames), rank, world)
    local, prompt_ids = _embed_classes(
        model, tokenizer, [classnames[i] for i in my_classes], templates, dev, batch_size, progress, precision
    )  # (C_local, D), (C_local, 2)
    _check_cut_prompts(classnames, all_gather_cat(prompt_ids, enabled=distributed).tolist())
    weights = all_gather_cat(local, enabled=distributed)  # (C, D)
    return weights.T.contiguous()


def _check_cut_prompts(classnames: Sequence[str], prompt_ids: list[list[int]]) -> None:
    """``prompt_ids[c]`` = [hash of class c's prompt tokens, whether one of them fills the text context].
    Prompts that fill the context are cut there (CLIP's 77 tokens, fewer in small models): a warning
    names those classes, and two classes whose cut prompts are the same tokens are an error, since their
    weights would be identical and every image of one would be scored as the other (the first of them)."""
    cut = [c for c, (_, filled) in zip(classnames, prompt_ids) if filled]
    if not cut:
        return
    log.warning(
        "prompts of %d class(es) fill the text context and are cut there: %s%s",
        len(cut),
        ", ".join(repr(c[:60]) for c in cut[:3]),
        ", ..." if len(cut) > 3 else "",
    )
    first: dict[int, str] = {}
    for name, (sig, filled) in zip(classnames, prompt_ids):
        other = first.setdefault(sig, name)
        if filled and other != name:
            raise ValueError(
                f"class names {other!r} and {name!r} become the same prompts once cut to the text context: "
                "the classifier could not tell them apart. Shorten the names so they differ early on"
            )


def _embed_classes(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device,
    batch_size: int,
    show_progress: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_t = len(templates)
    # Flatten (class, template) pairs so every forward is a full batch, however few templates there are.
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    owner = torch.arange(len(classnames), device=device).repeat_interleave(num_t)  # (C*T,)
    sums: torch.Tensor | None = None
    # per class: a hash of its prompts' tokens, and whether one fills the context (was cut there)
    ids = [[0, 0] for _ in classnames]
    starts = range(0, len(prompts), batch_size)
    with eval_mode(model):
        for s in progress_bar(starts, show_progress, "class embeddings"):
            tokens = tokenizer(prompts[s : s + batch_size])
            for j, row in enumerate(tokens.tolist(), start=s):
                c = ids[j // num_t]
                c[0], c[1] = hash((c[0], *row)), c[1] or int(row[-1] != 0)
            tokens = tokens.to(device)
            with autocast(device, precision):
                emb = model.encode_text(tokens, normalize=False)
            emb = F.normalize(emb.float(), dim=-1)  # (b, D)
            if sums is None:
                sums = emb.new_zeros(len(classnames), emb.shape[-1])
            sums.index_add_(0, owner[s : s + batch_size], emb)
    prompt_ids = torch.tensor(ids, dtype=torch.long, device=device).view(-1, 2)
    if sums is None:  # this rank owns no class (more ranks than classes); the gather fixes the width
        return torch.zeros(0, 1, device=device), prompt_ids
    return F.normalize(sums / num_t, dim=-1), prompt_ids  # (C, D), (C, 2)


def evaluate_zero_shot(
    model: nn.Module,
    classifier: torch.Tensor,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    distributed: bool = True,
    top_k: Sequence[int] = (1, 5),
    precision: str = "auto",
) -> dict[str, Any]:
    """Score ``(images, labels)`` batches against ``classifier`` ``(D, C)``; anything after the labels
    (the sample keys of a loader built with ``return_keys``) is ignored.

    Returns ``top1``/``top5`` (and any other ``top{k}``) as fractions, ``per_class_accuracy`` (list,
    NaN for a class without samples), ``confusion`` (``(C, C)`` int64, rows = true class),
    ``num_samples``, ``num_skipped`` (samples labelled ``IGNORE_LABEL``) and ``trivial_top_k`` (the ks
    of at least C, whose top-k holds every class: 1.0 by construction, with a warning that says so).
    With torch.distributed initialised, ``dataloader`` must hold this rank's share and every rank must
    call; all get the totals.
    """
    dev = resolve_device(device, model)
    classifier = classifier.to(dev, torch.float32)
    num_classes = classifier.shape[1]
    ks = sorted({check_top_k(k) for k in (*top_k, 1, 5)})
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=dev)
    # counts[i] = number of samples whose label is among the top-ks[i] predictions
    counts = torch.zeros(len(ks) + 1, dtype=torch.long, device=dev)  # last slot: skipped
    with eval_mode(model):
        for batch in progress_bar(dataloader, progress, "zero-shot"):
            images, labels = batch[0], batch[1].to(dev)  # a loader with return_keys adds the keys
            keep = labels != IGNORE_LABEL
            counts[-1] += (~keep).sum()
            if not keep.any():
                continue
            if not keep.all():
                images, labels = images[keep.to(images.device)], labels[keep]
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(
                    f"label {int(labels.max() if labels.max() >= num_classes else labels.min())} is outside "
                    f"the {num_classes} classes of the classifier"
                )
            logits = _image_logits(model, images.to(dev, non_blocking=True), classifier, dev, precision)
            topk = logits.topk(min(ks[-1], num_classes), dim=-1).indices  # (B, kmax)
            hit = topk == labels[:, None]
            for i, k in enumerate(ks):
                counts[i] += hit[:, :k].any(dim=-1).sum()
            confusion.view(-1).index_add_(
                0, labels * num_classes + topk[:, 0], torch.ones_like(labels, dtype=torch.long)
            )
    confusion = all_reduce_sum(confusion, enabled=distributed)
    counts = all_reduce_sum(counts, enabled=distributed)
    return classification_metrics(confusion, counts, ks)


def check_top_k(k: Any, name: str = "top_k") -> int:
    """``k`` of a top-k accuracy, prediction or recall@k (the setting ``name``), an int of at least 1: 0
    would count nothing and -2 slice the wrong columns, each reported as an accuracy; 2.5 is no rank."""
    try:
        value = operator.index(k)
    except TypeError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {k!r}")
    return value


def _image_logits(
    model: nn.Module, images: torch.Tensor, classifier: torch.Tensor, device: torch.device, precision: str
) -> torch.Tensor:
    with autocast(device, precision):
        feats = model.encode_image(images, normalize=False)
    return F.normalize(feats.float(), dim=-1) @ classifier  # (B, C) cosine similarities


def classification_metrics(
    confusion: torch.Tensor, counts: torch.Tensor, ks: Sequence[int]
) -> dict[str, Any]:
    """Metrics from a ``(C, C)`` confusion matrix and ``counts`` = [top-k hits for each k in ``ks``, skipped]."""
    confusion = confusion.cpu()
    n = int(confusion.sum())
    out: dict[str, Any] = {}
    for i, k in enumerate(ks):
        out[f"top{k}"] = float(counts[i]) / n if n else math.nan
    support = confusion.sum(dim=1)
    correct = confusion.diag()
    per_class = [
        float(c) / float(s) if s > 0 else math.nan for c, s in zip(correct.tolist(), support.tolist())
    ]
    valid = [a for a in per_class if not math.isnan(a)]
    out["mean_per_class_accuracy"] = sum(valid) / len(valid) if valid else math.nan
    out["per_class_accuracy"] = per_class
    out["confusion"] = confusion
    out["num_samples"] = n
    out["num_skipped"] = int(counts[-1])
    # top-5 of 3 classes holds every class: it is 1.0 whatever the model does (scikit-learn's
    # top_k_accuracy_score gives 1.0 too, with a warning); say so rather than report it as a measurement
    out["trivial_top_k"] = [k for k in ks if k >= len(support)]
    if out["trivial_top_k"] and n:
        log.warning(
            "top-%s of %d classes holds every class: 100%% by construction, not a measurement",
            "/".join(map(str, out["trivial_top_k"])),
            len(support),
        )
    return out


def logit_scale_and_bias(model: nn.Module) -> tuple[float, float | None]:
    """The model's temperature and SigLIP bias as it trained with them (``CLIP.scale_and_bias``: clamped
    at the model's own ``max_logit_scale``)."""
    if not hasattr(model, "scale_and_bias"):
        raise TypeError(f"{type(model).__name__} has no scale_and_bias(): evaluate a clipforge CLIP")
    scale, bias = model.scale_and_bias()
    return float(scale.detach().float()), (float(bias.detach().float()) if bias is not None else None)


@torch.inference_mode()
def predict(
    model: nn.Module,
    classifier: torch.Tensor,
    images: torch.Tensor,
    classnames: Sequence[str],
    *,
    k: int = 5,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> list[list[tuple[str, float]]]:
    """Top-``k`` ``(classname, probability)`` for each image of a batch ``(B, 3, H, W)``.

    Probabilities are a softmax over classes of ``logit_scale * cosine`` for CLIP; for a model with a
    ``logit_bias`` (SigLIP) they are the independent sigmoids ``sigmoid(scale * cosine + bias)``, the
    probability that each class name matches the image, so they need not sum to one.
    """
    if classifier.shape[1] != len(classnames):
        raise ValueError(
            f"classifier has {classifier.shape[1]} classes but {len(classnames)} names were given"
        )
    k = check_top_k(k)
    dev = resolve_device(device, model)
    with eval_mode(model):
        logits = _image_logits(model, images.to(dev), classifier.to(dev, torch.float32), dev, precision)
    scale, bias = logit_scale_and_bias(model)
    probs = torch.sigmoid(scale * logits + bias) if bias is not None else (scale * logits).softmax(dim=-1)
    p, idx = probs.topk(min(k, len(classnames)), dim=-1)
    return [[(classnames[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]


def zero_shot_eval(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[Template],
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    top_k: Sequence[int] = (1, 5),
    prompt_batch_size: int = 256,
    precision: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Classifier and evaluation in one call, on every rank when distributed (all must call).

    ``dataloader`` is the *whole* held-out set: it is split over ranks here
    (:func:`~clipforge.eval.distributed.shard_dataloader`), as are the class prompts; the result holds
    the totals on every rank. The tokenizer defaults to one of ``model.text.context_length``.
    """
    from clipforge.eval.distributed import shard_dataloader

    if tokenizer is None:
        from clipforge.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(context_length=model.text.context_length)
    run = {"device": device, "progress": progress, "precision": precision, "distributed": True}
    prompts = list(classnames), list(templates)
    classifier = build_zero_shot_classifier(model, tokenizer, *prompts, batch_size=prompt_batch_size, **run)
    return evaluate_zero_shot(model, classifier, shard_dataloader(dataloader), top_k=top_k, **run)
