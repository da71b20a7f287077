"""Rebuild a trained model from a clipforge Lightning checkpoint (which carries its resolved config), and
consolidate a sharded (FSDP2, ``torch.distributed.checkpoint``) checkpoint directory into one such file.

Consolidation, from the command line (``clipforge-consolidate`` = ``python -m clipforge.consolidate``)::

    clipforge-consolidate outputs/my-run/checkpoints/last.ckpt my-run.ckpt

reads the shards of every rank in one process (no process group, no GPU) and writes
``{"state_dict": {"model.<name>": tensor}, "clipforge_config": ..., "global_step", "epoch"}``, the layout
``load_model`` (``clipforge-zeroshot checkpoint=...``, ``scripts/convert.py export``, ``init_from=``)
reads. Optimizer state is left out: resume training from the sharded directory itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from clipforge.models.clip import CLIP
from clipforge.models.decoder import TextDecoder
from clipforge.models.specs import SettingError

log = logging.getLogger(__name__)

# Hydra and OmegaConf are imported where configs are built, not at import: the LightningModule imports this
# module for the checkpoint layout, and importing the module should not pull in Hydra.


def build_model(model_cfg: Any, loss_cfg: Any | None = None) -> CLIP:
    """Build the model config (a ``conf/model`` node, DictConfig or dict); a null ``init_logit_scale`` /
    ``init_logit_bias`` takes the loss's paper values. Built by
    :func:`clipforge.models.convert.instantiate_model`, the one builder of models from configs."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from clipforge.models.convert.config import instantiate_model

    node = (
        OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    )
    if loss_cfg is not None:
        loss_cls = get_class(loss_cfg["_target_"])
        if node.get("init_logit_scale") is None:
            node["init_logit_scale"] = loss_cls.init_logit_scale
        if node.get("init_logit_bias") is None:
            node["init_logit_bias"] = loss_cls.init_logit_bias
    try:
        return instantiate_model(node)
    except SettingError as e:  # a setting of the wrong type, named in full: model.vision.depth
        raise InstantiationException(f"the model config does not build: {e.under('model')}") from e
    except TypeError as e:  # a misspelt or unknown key: fail like every other config node does
        raise InstantiationException(f"the model config does not build: {e}") from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict without executing arbitrary pickled code (``weights_only=True``, through the
    one safe loader :func:`clipforge.fault.atomic_io.safe_torch_load`); a sharded checkpoint directory is
    consolidated in memory (:func:`clipforge.consolidate.consolidate_checkpoint`); the folder ``clipforge-convert import`` writes
    stands for the checkpoint in it (:data:`IMPORTED_CHECKPOINT`)."""
    from clipforge.fault.atomic_io import safe_torch_load

    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "sharded":
        from clipforge.consolidate import consolidate_checkpoint

        return consolidate_checkpoint(path)
    return safe_torch_load(_checkpoint_file(path, kind))


CheckpointKind = Literal["sharded", "imported", "file", "folder", "missing"]


def checkpoint_kind(path: str | Path) -> CheckpointKind:
    """What ``path`` is, decided here for every reader of checkpoints: a sharded (DCP) checkpoint directory,
    a ``clipforge-convert import`` folder (holding :data:`IMPORTED_CHECKPOINT`), a file, a folder that is
    neither, or nothing."""
    from clipforge.fault.sharded import is_sharded_checkpoint

    path = Path(path)
    if is_sharded_checkpoint(path):
        return "sharded"
    if path.is_dir():
        return "imported" if (path / IMPORTED_CHECKPOINT).is_file() else "folder"
    return "file" if path.is_file() else "missing"


def _checkpoint_file(path: Path, kind: CheckpointKind) -> Path:
    """The one file that holds the (not sharded) checkpoint at ``path`` of ``kind``; a folder that holds
    none is a ``FileNotFoundError`` saying what it lacks (a missing path is named by the loader)."""
    if kind == "imported":
        return path / IMPORTED_CHECKPOINT
    if kind == "folder":
        ckpts = sorted(p.name for p in path.glob("*.ckpt") if p.is_file())
        if (path / "open_clip_config.json").is_file():
            hint = (
                ": it is an open_clip folder, read as open_clip weights (clipforge-zeroshot "
                "open_clip_checkpoint=, clipforge-visualize --open-clip, clipforge-convert import)"
            )
        elif ckpts:  # a run's checkpoints/ folder: which one is the user's choice, never a guess
            shown = ", ".join(ckpts[:6]) + (f" and {len(ckpts) - 6} more" if len(ckpts) > 6 else "")
            hint = f" from it: {shown}"
        else:
            hint = ""
        raise FileNotFoundError(
            f"{path} is a folder, not a checkpoint: neither a sharded checkpoint (no .metadata or meta.pt) nor "
            f"a clipforge-convert import folder (no {IMPORTED_CHECKPOINT}); pass a .ckpt file{hint}"
        )
    return path


# The layout of a clipforge checkpoint, written by training (Lightning), `clipforge-convert import` and
# `clipforge-consolidate`: ``{"state_dict": {"<module attribute>.<name>": tensor}, CONFIG_KEY: resolved
# config, ...}``, where ContrastiveModule keeps the two-tower model under ``model.`` and the EMA of the
# whole module (clipforge.ema.ModelEMA, ``ema=default``) under ``ema.shadow.``.
CONFIG_KEY = "clipforge_config"
WANDB_RUN_KEY = "clipforge_wandb_run_id"  # the W&B run that wrote the checkpoint: a resume logs into it
LOGGER_VERSION_KEY = "clipforge_logger_version"  # its CSV logger's version directory: a resume appends there
IMPORTED_CHECKPOINT = "model.ckpt"  # the checkpoint in the folder `clipforge-convert import --out` writes
TOKENIZER_KEY = "open_clip_tokenizer"  # an import's tokenizer other than CLIP BPE (hf_tokenizer_name)
MODEL_PREFIX = "model."
EMA_PREFIX = "ema.shadow."


def checkpoint_dict(
    model_state: dict[str, torch.Tensor], config: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """A clipforge checkpoint dict of the model's weights (keys as ``CLIP.state_dict()`` names them)."""
    state = {f"{MODEL_PREFIX}{k}": v.contiguous() for k, v in model_state.items()}
    return {"state_dict": state, CONFIG_KEY: config, **extra}


def submodule_state(ckpt: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint's ``state_dict`` under ``prefix``, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def model_state_dict(
    ckpt: dict[str, Any], path: str | Path, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """The model's weights (without the ``model.`` prefix) from a clipforge checkpoint dict; with ``use_ema``
    the EMA of them. Anything else in the checkpoint (decoder, distillation heads) is left out."""
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} has no state_dict: was it written by clipforge (train or convert import)?")
    state = submodule_state(ckpt, (EMA_PREFIX if use_ema else "") + MODEL_PREFIX)
    if use_ema and not state:
        raise ValueError(f"{path} has no EMA weights: they are kept when training with ema=default")
    return state


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is something :func:`load_checkpoint` reads: a file, a sharded checkpoint directory or
    a ``clipforge-convert import`` folder."""
    return checkpoint_kind(path) in ("sharded", "imported", "file")


def checkpoint_config(path: str | Path) -> dict[str, Any] | None:
    """The resolved config stored in a clipforge checkpoint (a file, a sharded folder or an import folder),
    read without loading its tensors into memory; ``None`` when it stores none."""
    return checkpoint_entry(path, CONFIG_KEY)


def checkpoint_entry(path: str | Path, key: str) -> Any:
    """The top-level entry ``key`` of a checkpoint (as :func:`checkpoint_config`), ``None`` without one."""
    from clipforge.fault.atomic_io import safe_torch_load
    from clipforge.fault.sharded import verify_sharded_checkpoint

    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "sharded":
        return verify_sharded_checkpoint(path)["meta"].get(key)
    return safe_torch_load(_checkpoint_file(path, kind), mmap=True).get(key)


# Model settings a fine-tune from another run's weights may change on purpose: they leave what the loaded
# weights compute as it was (image size and context: the position tables are resampled; the attention
# kernel; regularisers; the init the loaded weights replace).
FINE_TUNE_CHOICES = frozenset(
    {"img_size", "context_length", "fused_attn", "drop_path_rate", "patch_dropout", "weight_init"}
    | {"init_logit_scale", "init_logit_bias"}
)


NO_SETTING = "(none)"  # what config_differences shows for a setting one config lacks


def config_differences(
    stored: Any, current: Any, prefix: str, both_sides: bool = False, skip: frozenset[str] = frozenset()
) -> list[str]:
    """``"prefix.key: checkpoint X, config Y"`` for every setting that differs between two config nodes
    (nested mappings compared key by key; a setting one side lacks shows as ``(none)``, or with
    ``both_sides`` is passed over: an older checkpoint's config may lack a setting added since). Keys
    named in ``skip`` are not compared, at any depth."""
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        out = []
        keys = set(stored) & set(current) if both_sides else set(stored) | set(current)
        for key in sorted(keys - skip, key=str):
            out += config_differences(
                stored.get(key, NO_SETTING), current.get(key, NO_SETTING), f"{prefix}.{key}", both_sides, skip
            )
        return out
    return [] if stored == current else [f"{prefix}: checkpoint {stored!r}, config {current!r}"]


def model_differences(
    path: str | Path, model_cfg: Any, loss_cfg: Any | None = None, function_only: bool = False
) -> list[str]:
    """How the model config ``model_cfg`` differs from the one checkpoint ``path`` was trained with (an
    empty list when the checkpoint stores no config); with ``loss_cfg``, also the loss class, which decides
    whether the model has a SigLIP ``logit_bias`` (see :func:`build_model`). ``function_only``: only the
    settings that change what weights loaded from ``path`` compute (activation, LayerNorm eps, pooling,
    masking, the logit cap), leaving out :data:`FINE_TUNE_CHOICES` and settings the checkpoint's config
    does not record."""
    from omegaconf import DictConfig, OmegaConf

    stored_cfg = checkpoint_config(path) or {}
    stored = stored_cfg.get("model")
    if stored is None:
        return []
    current = (
        OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg
    )
    skip = FINE_TUNE_CHOICES if function_only else frozenset()
    changed = config_differences(stored, current, "model", both_sides=function_only, skip=skip)
    stored_loss = (stored_cfg.get("loss") or {}).get("_target_")
    if loss_cfg is not None and stored_loss is not None:
        changed += config_differences(stored_loss, loss_cfg.get("_target_"), "loss._target_")
    return changed


def module_differences(path: str | Path, config: Mapping[str, Any]) -> list[str]:
    """Beyond the model and its loss (:func:`model_differences`), the settings of the resolved train
    ``config`` that decide which weights a training checkpoint holds, where checkpoint ``path`` was trained
    with others: the EMA and the SigLIP 2 objectives (their decoder, heads and centres)."""
    stored = checkpoint_config(path) or {}
    out = []
    if bool(stored.get("ema")) != bool(config.get("ema")):
        out.append(f"ema: checkpoint {_on(stored.get('ema'))}, config {_on(config.get('ema'))}")
    was, now = sorted(stored.get("objectives") or {}), sorted(config.get("objectives") or {})
    if was != now:
        out.append(f"objectives: checkpoint {was or 'none'}, config {now or 'none'}")
    return out


def schedule_differences(path: str | Path, config: Mapping[str, Any]) -> list[str]:
    """The LR schedule's settings (``trainer.max_steps``, ``scheduler.*``) that differ from checkpoint
    ``path``'s: a resume recomputes the schedule from the config, so its learning rate jumps there."""
    stored = checkpoint_config(path) or {}
    if not stored:
        return []
    steps = (stored.get("trainer") or {}).get("max_steps"), (config.get("trainer") or {}).get("max_steps")
    out = config_differences(steps[0], steps[1], "trainer.max_steps")
    return out + config_differences(stored.get("scheduler") or {}, config.get("scheduler") or {}, "scheduler")


def part_starts(config: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """``name -> (first step, how its start_frac reads)`` of each part of a resolved train ``config`` that
    starts at a fraction of ``trainer.max_steps``: ``objectives.*`` and the EMA, whose ``start_frac: null`` is
    the start of the first objective that distils from it (:func:`clipforge.ema.teacher_start`), else 0."""
    from clipforge.ema import teacher_start
    from clipforge.optim import first_step

    total = (config.get("trainer") or {}).get("max_steps")
    if not isinstance(total, int) or total < 0:
        return {}
    out, teachers = {}, {}
    for key, node in (config.get("objectives") or {}).items():
        frac = (node or {}).get("start_frac")
        if isinstance(frac, (int, float)):
            out[f"objectives.{key}"] = (first_step(frac, total), f"start_frac={frac}")
            if _distils_from_ema(node.get("_target_")):
                teachers[f"objectives.{key}"] = frac
    ema = config.get("ema")
    if isinstance(ema, Mapping):
        frac = ema.get("start_frac")
        if frac is None:
            frac, by = teacher_start(teachers)
            said = f"start_frac=null: {by}'s start, {frac}" if by else "start_frac=null: 0"
        else:
            said = f"start_frac={frac}"
        out["ema"] = (first_step(frac, total), said)
    return out


def _distils_from_ema(target: Any) -> bool:
    """Whether the objective class a config's ``_target_`` names distils from the EMA (``needs_teacher``)."""
    from hydra.utils import get_class

    try:
        return bool(getattr(get_class(target), "needs_teacher", False)) if isinstance(target, str) else False
    except (ImportError, ValueError):  # a class since renamed: it cannot be told, so it sets no start
        return False


def start_differences(path: str | Path, config: Mapping[str, Any]) -> list[str]:
    """The parts that start at a fraction of ``trainer.max_steps`` (:func:`part_starts`) whose first step
    differs between checkpoint ``path``'s run and a resume with ``config``: another ``max_steps``, another
    ``start_frac``, or another default. One that had started is off again (the EMA copies the weights) until
    its new start."""
    stored = part_starts(checkpoint_config(path) or {})
    out = []
    for name, (after, now) in part_starts(config).items():
        if name not in stored or stored[name][0] == after:
            continue
        before, was = stored[name]
        if was == now:
            out.append(f"{name} ({now}): step {before} in the checkpoint's run, {after} in this one")
        else:
            out.append(f"{name}: step {before} in the checkpoint's run ({was}), {after} in this one ({now})")
    return out


def _on(setting: Any) -> str:
    return "on" if setting else "off"


def init_from(model: CLIP, path: str | Path, use_ema: bool = False) -> CLIP:
    """Initialise ``model`` from a clipforge checkpoint's weights (training state is not restored); with
    ``use_ema`` from its EMA weights. What else the checkpoint holds (the EMA weights not taken, a decoder,
    distillation heads) is named in a log line: those parts start fresh.

    Position embeddings are resampled when the image size or text context differs, so a model can be
    fine-tuned at another resolution; any other shape or key mismatch is an error naming the keys.
    """
    from clipforge.models.convert import load_state_dict_resized

    ckpt = load_checkpoint(path)
    _warn_tokenizer(ckpt, path)
    load_state_dict_resized(model, model_state_dict(ckpt, path, use_ema))
    ema_left = not use_ema and bool(submodule_state(ckpt, EMA_PREFIX + MODEL_PREFIX))
    others = sorted({k.split(".")[0] for k in ckpt["state_dict"] if not k.startswith((MODEL_PREFIX, "ema."))})
    left = ["its EMA weights (init_from_ema=true takes them)"] if ema_left else []
    left += [f"its {name} (starts fresh)" for name in others]
    log.info(
        "init_from=%s: the model's %sweights%s",
        path,
        "EMA " if use_ema else "",
        "; not taken: " + ", ".join(left) if left else "",
    )
    return model


def load_model(path: str | Path, use_ema: bool = False) -> tuple[CLIP, dict[str, Any]]:
    """(model in eval mode, resolved config dict) from a clipforge ``.ckpt``; ``use_ema``: its EMA weights."""
    return _model_from(load_checkpoint(path), path, use_ema)


def _model_from(ckpt: dict[str, Any], path: str | Path, use_ema: bool) -> tuple[CLIP, dict[str, Any]]:
    cfg = ckpt.get(CONFIG_KEY)
    if not cfg or "model" not in cfg:
        raise ValueError(
            f"{path} has no clipforge config: was it written by clipforge's trainer? (open_clip weights load "
            "with open_clip_checkpoint=, or become a clipforge checkpoint with clipforge-convert import)"
        )
    model = build_model(cfg["model"], cfg.get("loss"))
    model.load_state_dict(model_state_dict(ckpt, path, use_ema))
    _warn_tokenizer(ckpt, path)
    return model.eval(), cfg


def _warn_tokenizer(ckpt: dict[str, Any], path: str | Path) -> None:
    """Name the tokenizer of an import that is not CLIP BPE: clipforge feeds the text tower CLIP BPE ids,
    other tokens (or out of its table) for that model, so its text embeddings and zero-shot scores are not
    the model's."""
    if name := (ckpt.get(CONFIG_KEY) or {}).get(TOKENIZER_KEY):
        log.warning(
            "%s was imported from an open_clip model that reads the tokens of %r, and clipforge tokenizes "
            "text with CLIP BPE: its text tower gets other token ids than it was trained on, so text "
            "embeddings, zero-shot and retrieval scores are not the model's",
            path,
            name,
        )


def load_captioner(path: str | Path, use_ema: bool = False) -> tuple[CLIP, TextDecoder, dict[str, Any]]:
    """(model, LocCa decoder, config) from a checkpoint trained with ``objectives=locca``, both in eval
    mode; ``use_ema``: the EMA weights of both."""
    ckpt = load_checkpoint(path)
    model, cfg = _model_from(ckpt, path, use_ema)
    node = ((cfg.get("objectives") or {}).get("locca") or {}).get("decoder")
    if node is None:
        raise ValueError(f"{path} has no LocCa decoder: it is trained with objectives=locca (or siglip2)")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from clipforge.models.specs import group_settings

    # decoder nodes written before its block settings became a group are flat: group them
    decoder = instantiate(OmegaConf.create(group_settings(TextDecoder.groups, node)))
    decoder.load_state_dict(
        submodule_state(ckpt, (EMA_PREFIX if use_ema else "") + "objectives.locca.decoder.")
    )
    return model, decoder.eval(), cfg
