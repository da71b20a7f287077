"""What the evaluated model and the checkpoint's stored config say about how ``clipforge-zeroshot`` must
evaluate it (CLIP's zero-shot protocol, Radford et al., 2021): the input size, whether clipforge's tokenizer
fits its text tower, and for the synthetic held-out set the size and held-out scheme its training data had.
Each is checked against what the command is given, so the two cannot disagree silently."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig
from torch import nn

log = logging.getLogger(__name__)


def model_image_size(model: nn.Module, given: int | None = None) -> int:
    """The model's input size. ``given`` (``image_size=``) serves a model that does not say its own, and
    must agree with one that does: its position table has one size, and a disagreement failed only at the
    first batch, asking for a resampling the evaluation cannot do."""
    visual = getattr(model, "visual", None)
    size = getattr(visual, "img_size", None) or getattr(visual, "image_size", None)
    if isinstance(size, Sequence):
        size = size[0]
    if not size:
        if given:
            return int(given)
        raise ValueError("cannot tell the model's input size; set image_size=")
    if given and int(given) != int(size):
        raise ValueError(
            f"image_size={given}, but the model takes {size}x{size} images (its position embedding has that "
            "grid); leave image_size unset (null) to evaluate at the model's size"
        )
    return int(size)


def check_vocabulary(model: nn.Module, tokenizer_size: int, label: str = "the model") -> None:
    """The prompts are tokenized with clipforge's tokenizer (open_clip's CLIP BPE, ``tokenizer_size`` ids):
    a text tower with a smaller vocabulary was trained with another tokenizer (open_clip's SigLIP models
    take SentencePiece's 32,000 ids), and failed at the first prompt with torch's "index out of range in
    self", naming neither; that is a ValueError naming both sizes. A larger one is warned about: it may
    only be padded, or it may read these ids as other tokens (a multilingual SigLIP), scoring nonsense."""
    vocab = getattr(getattr(model, "text", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab == tokenizer_size:
        return
    what = f"{label}: its text tower embeds {vocab} token ids, clipforge's tokenizer (CLIP BPE) writes "
    what += str(tokenizer_size)
    if vocab < tokenizer_size:
        raise ValueError(
            f"{what}: the model was trained with another tokenizer (open_clip's SigLIP models use "
            "SentencePiece), which clipforge does not have, so it cannot be given prompts here"
        )
    log.warning(
        "%s: unless its vocabulary is CLIP's padded, the model was trained with another tokenizer and "
        "its scores here are those of other tokens",
        what,
    )


def _from_training(
    cfg: DictConfig, stored: dict[str, Any], key: str, source_key: str, differs: str
) -> tuple[bool, Any]:
    """For the synthetic held-out set, ``eval.dataset.<key>`` null takes the checkpoint's training setting
    (``data.source.<source_key>`` of ``stored``, the config the checkpoint stores, as :func:`load_eval_model`
    read it): returns ``(True, that setting or None)``. A value given is kept, with a warning naming both
    when it differs (``differs`` says what that does to the scores): ``(False, None)``, as for other sets."""
    node = cfg.eval.dataset
    if not str(node.get("_target_", "")).endswith("SyntheticHeldoutDataset"):
        return False, None
    trained = ((stored.get("data") or {}).get("source") or {}).get(source_key)
    given = node.get(key)
    if given is None:
        return True, trained
    if trained is not None and str(given) != str(trained):
        log.warning(
            "eval.dataset.%s=%s, but checkpoint %s was trained with data.source.%s=%s: %s (%s=null takes "
            "the checkpoint's)",
            key,
            given,
            cfg.checkpoint,
            source_key,
            trained,
            differs,
            key,
        )
    return False, None


def render_size(cfg: DictConfig, image_size: int, stored: dict[str, Any]) -> int | None:
    """The size the synthetic held-out set is drawn at when ``eval.dataset.render_size`` is null: that of the
    checkpoint's training data, else the model's input size; ``None`` (keep the node's value) for other
    data sets and for a size given (see :func:`_from_training`)."""
    takes, trained = _from_training(
        cfg, stored, "render_size", "image_size", "the held-out images are drawn at another scale"
    )
    return int(trained or image_size) if takes else None


def synthetic_holdout(cfg: DictConfig, stored: dict[str, Any]) -> str | None:
    """The held-out scheme of the synthetic set when ``eval.dataset.holdout`` is null: that of the
    checkpoint's training data (under ``pairs`` training, 45 of the 60 combinations of the default
    ``tuples`` held-out split were trained on, and were scored as unseen); ``None`` (the node's value, or
    the set's default) otherwise (see :func:`_from_training`)."""
    takes, trained = _from_training(
        cfg, stored, "holdout", "holdout", "combinations it trained on may be scored as held out"
    )
    return trained if takes else None


def record_dataset(results: dict[str, Any], dataset: Any) -> None:
    """The size the synthetic set was drawn at and its held-out scheme, in the results' dataset record (its
    node may say null)."""
    if isinstance(getattr(dataset, "render_size", None), int):
        results["dataset"]["render_size"] = dataset.render_size
    if isinstance(getattr(dataset, "holdout", None), str):
        results["dataset"]["holdout"] = dataset.holdout
