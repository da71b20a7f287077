"""The checks ``clipforge-train`` makes of its composed config before anything is built or written (no
paper): each names the key at fault and what to set instead, where the same mistake otherwise failed later
(after the model was built or the shards were written) inside Lightning, torch or the tokenizer, naming no
key or the wrong one. :func:`clipforge.train.train` calls them first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf

from clipforge.checkpoint import IMPORTED_CHECKPOINT, is_checkpoint
from clipforge.data.config import check_at_least
from clipforge.distributed import require_cuda
from clipforge.fault import AUTO


def lightning_precisions() -> tuple[Any, ...]:
    """The values Lightning's ``Trainer(precision=...)`` takes (its own list, so a new Lightning's are known);
    empty where this Lightning keeps the list elsewhere."""
    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:
        return ()

    def flat(tp: Any) -> tuple[Any, ...]:
        args = get_args(tp)
        return tuple(v for a in args for v in flat(a)) if args else (tp,)

    return flat(_PRECISION_INPUT)


def check_precision(precision: Any) -> None:
    """A misspelt ``trainer.precision`` failed at the Trainer, after the model was built, in a Hydra error that
    named only ``trainer``: name the key and the choices before anything is built."""
    known = lightning_precisions()
    if precision is None or not known or precision in known:  # Lightning's own test
        return
    choices = ", ".join(repr(v) for v in known if isinstance(v, str))
    raise ValueError(f"trainer.precision={precision!r} is not one of Lightning's precisions: {choices}")


def check_trainer(cfg: DictConfig) -> None:
    """Fail before anything is built, naming the key, when the step or epoch budget is not an integer
    (``trainer.max_steps=abc`` or ``2.5`` failed deep inside Lightning, naming only ``trainer``; -1 is
    Lightning's "no limit"), when the data's token length exceeds the text tower's, or when a decoder is
    configured that no objective trains."""
    trainer = cfg.get("trainer") or {}
    check_at_least(-1, "trainer", max_steps=trainer.get("max_steps"), max_epochs=trainer.get("max_epochs"))
    if trainer.get("max_steps") == 0:  # failed in the schedule, inside fit, after the shards were written
        raise ValueError(
            "trainer.max_steps=0 trains no step: give the number of steps, or -1 (trainer.max_epochs)"
        )
    # Lightning's seed_everything failed on seed=abc with int()'s bare message; 1.5 it cut to 1, and numpy
    # then refused it after the shards were written
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise ValueError(f"seed must be an integer in [0, {2**32 - 1}], got {seed!r}")
    check_precision(trainer.get("precision"))
    # the crops are the model's input: another size failed at the first step ("expected 32x32 images")
    crop, img = (
        OmegaConf.select(cfg, "data.augment.image_size"),
        OmegaConf.select(cfg, "model.vision.img_size"),
    )
    check_at_least(1, "model.vision", img_size=img)  # before data.augment.image_size, which follows it
    if isinstance(crop, int) and isinstance(img, int) and crop != img:
        raise ValueError(
            f"data.augment.image_size={crop} differs from model.vision.img_size={img}, the image tower's input: "
            "leave data.augment.image_size at its default (the model's), or set model.vision.img_size"
        )
    # captions tokenized longer than the text tower's position table failed at the first step, after the
    # shards were written, with "got 100 tokens but context_length is 20", naming neither key
    tokens, table = (
        OmegaConf.select(cfg, "data.context_length"),
        OmegaConf.select(cfg, "model.text.context_length"),
    )
    if isinstance(tokens, int) and isinstance(table, int) and tokens > table:
        raise ValueError(
            f"data.context_length={tokens} is longer than the text tower's position table "
            f"(model.text.context_length={table}): lower it, or leave it at its default, the model's"
        )
    # captions are tokenized with open_clip's CLIP BPE: a smaller embedding table (an open_clip SigLIP import,
    # SentencePiece's 32,000 ids) failed at the first step with torch's "index out of range in self"
    vocab = OmegaConf.select(cfg, "model.text.vocab_size")
    if isinstance(vocab, int):
        from clipforge.data.tokenizer import Tokenizer

        if vocab < (needed := Tokenizer(2).vocab_size):
            raise ValueError(
                f"model.text.vocab_size={vocab} is smaller than the {needed} token ids of clipforge's tokenizer "
                "(CLIP BPE), which tokenizes the captions: a model of another tokenizer (open_clip's SigLIP "
                f"models use SentencePiece) cannot train on them; set model.text.vocab_size={needed}"
            )
    objectives = cfg.get("objectives") or {}
    # a preset's settings for an objective another objectives= choice left out: a node that builds nothing
    untargeted = [f"objectives.{k}" for k, node in objectives.items() if "_target_" not in (node or {})]
    if untargeted:
        raise ValueError(
            f"{', '.join(untargeted)}: settings without an objective (an experiment preset sets them for its own "
            "objectives= choice): include them in objectives=[...], or leave the preset's choice as it is"
        )
    # the decoder group only configures the decoder an objective trains: alone it built nothing, silently
    decoder = cfg.get("decoder") or {}
    if "_target_" in decoder and not any("decoder" in (node or {}) for node in objectives.values()):
        raise ValueError(
            "decoder=locca configures the decoder that objectives=locca (or siglip2) trains, and no objective "
            f"trains it here (objectives: {sorted(objectives) or None}): add objectives=locca, or leave "
            "decoder out"
        )
    # Evaluation (the zero-shot callback, clipforge-zeroshot, an open_clip export) tokenizes prompts to
    # model.text.context_length. A causal tower read at the EOT token gives the same features at any padded
    # length; a bidirectional one, or one read at the last position, gives others at another length, so it
    # would be scored on inputs it never trained on, silently.
    text = OmegaConf.select(cfg, "model.text") or {}
    fixed = text.get("causal", True) is not False and text.get("pool_type", "eot") == "eot"
    if isinstance(tokens, int) and isinstance(table, int) and tokens < table and not fixed:
        raise ValueError(
            f"data.context_length={tokens} is shorter than model.text.context_length={table}, but this text "
            f"tower (causal={text.get('causal')}, pool_type={text.get('pool_type')!r}) gives other features at "
            f"another padded length, and evaluation tokenizes to model.text.context_length: set "
            f"model.text.context_length={tokens} instead (data.context_length follows it)"
        )


def check_accelerator(trainer: DictConfig) -> None:
    """A GPU asked for where torch sees none failed at the Trainer, after the model was built, with
    Lightning's "No supported gpu backend found!" in a Hydra error naming only ``trainer``. Checked after the
    config's own consistency (an experiment preset for GPUs composed on a laptop names its mistakes first)."""
    accelerator = trainer.get("accelerator")
    if accelerator in ("gpu", "cuda"):
        require_cuda(
            f"trainer.accelerator={accelerator}",
            "train on the CPU with trainer=cpu (the default), or run where a GPU is visible",
        )


def check_paths(cfg: DictConfig) -> None:
    """Fail before anything is built when a named file is missing."""
    if cfg.get("init_from_ema") and not cfg.get("init_from"):
        raise ValueError("init_from_ema=true takes the EMA weights of init_from=, which is not set")
    if cfg.get("init_from") and not is_checkpoint(cfg.init_from):
        raise FileNotFoundError(
            f"init_from={cfg.init_from!r}: no such checkpoint file, sharded checkpoint directory or "
            f"clipforge-convert import folder (with {IMPORTED_CHECKPOINT})"
        )
    if cfg.get("ckpt_path") and cfg.ckpt_path != AUTO and not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file or sharded directory")
