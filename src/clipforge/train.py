"""Pretraining entry point: `clipforge-train` composes conf/train.yaml and calls :func:`train`.

``train(cfg)`` reads top to bottom: data -> loss -> model -> module -> callbacks -> loggers -> trainer
-> fit -> held-out zero-shot summary. Tests call it directly with a composed config.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import DictConfig, OmegaConf

from clipforge.callbacks.evaluation import quiet_reduced_metric_warnings
from clipforge.callbacks.last_step import ValidateLastStep
from clipforge.callbacks.preemption import PreemptionCheckpoint, signal_handlers_kept
from clipforge.checkpoint import (
    NO_SETTING,
    build_model,
    checkpoint_config,
    init_from,
    model_differences,
    module_differences,
    schedule_differences,
    start_differences,
)
from clipforge.compilation import compile_in_place, compile_mode
from clipforge.data.config import stored_preprocessing
from clipforge.entry import hydra_entry
from clipforge.fault import AUTO, AtomicCheckpointIO, check_steps_left, resolve_ckpt_path, scrub_secrets
from clipforge.fault.collective import explain_collective_failure
from clipforge.loggers import finish_logger, finish_wandb, instantiate_logger
from clipforge.models.convert.resize import PositionTableError
from clipforge.models.lock import Lock
from clipforge.module import ContrastiveModule
from clipforge.optim import check_optimization
from clipforge.run_checks import check_accelerator, check_paths, check_trainer
from clipforge.summary import RecentTrainLoss, data_skips, final_zero_shot, summarize

log = logging.getLogger(__name__)


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def siglip2_parts(cfg: DictConfig) -> dict[str, Any]:
    """The optional module parts, only those configured: ``objectives`` (``objectives=locca|silc|tips|
    siglip2``, name -> objective) and ``ema`` (``ema=default``, a partial the module completes)."""
    parts: dict[str, Any] = {}
    if cfg.get("objectives"):
        parts["objectives"] = {name: instantiate(node) for name, node in cfg.objectives.items()}
    if cfg.get("ema"):
        parts["ema"] = instantiate(cfg.ema)
    return parts


# Seconds a survivor of a failed collective waits for the other ranks to check in before naming the
# missing ones (clipforge.fault.collective); it adds to trainer.strategy.timeout before the process exits.
LOST_RANK_GRACE_S = 5.0


def strategy_timeout(cfg: DictConfig) -> timedelta | None:
    """``trainer.strategy.timeout`` (the process-group timeout of every collective), if the config has one."""
    node = OmegaConf.select(cfg, "trainer.strategy.timeout")
    if node is None:
        return None
    value = instantiate(node) if isinstance(node, DictConfig) else node
    if not isinstance(value, timedelta):
        raise ValueError(f"trainer.strategy.timeout must build a datetime.timedelta, got {value!r}")
    return value


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    check_paths(cfg)
    check_trainer(cfg)
    check_accelerator(cfg.trainer)
    mode = compile_mode(cfg.get("compile"))  # a bad value fails before any data is written
    check_optimization(
        instantiate(cfg.optimizer),
        instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        int(cfg.trainer.get("max_steps", -1)),
    )
    timeout = strategy_timeout(cfg)
    lock: Lock = instantiate(cfg.lock) if cfg.get("lock") else Lock()
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Logged and stored in every checkpoint: credentials are masked first.
    config = scrub_secrets(OmegaConf.to_container(cfg, resolve=True))
    # auto: the newest checkpoint under the run dir that loads safely; an explicit path is verified.
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    if ckpt_path is not None:
        check_steps_left(ckpt_path, int(cfg.trainer.get("max_steps", -1)))
        check_lock_unchanged(ckpt_path, lock)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    loss = instantiate(cfg.loss)
    # The Trainer before the model: a value Lightning refuses (trainer.devices=0, a misspelt strategy) fails
    # in a second, not after a large model is built. Nothing here draws from the seeded generators.
    callbacks = _instantiate_all(cfg.get("callbacks"))
    # whatever the callbacks config says: the summary's final train loss, and a validation of the last step
    recent_loss = RecentTrainLoss()
    always: list[Any] = [recent_loss]
    extra: dict[str, Any] = {}
    if not getattr(datamodule, "has_validation", True):
        # No held-out pairs (e.g. data=wds without val_urls): no validation loop, and no "best by
        # val/..." checkpoint that could never be chosen; periodic and last checkpoints still happen.
        extra["limit_val_batches"] = 0
        dropped = [cb for cb in callbacks if str(getattr(cb, "monitor", None) or "").startswith("val/")]
        callbacks = [cb for cb in callbacks if cb not in dropped]
        if dropped:
            log.info(
                "no validation set (data.val_urls is null): not keeping a best-by-%s checkpoint",
                ", ".join(sorted({str(cb.monitor) for cb in dropped})),
            )
    else:
        always.append(ValidateLastStep())
    if "enable_checkpointing" not in cfg.trainer:
        # Lightning adds an epoch-end ModelCheckpoint of its own when no callback is one; here the callbacks
        # config alone decides, so callbacks=none writes no checkpoint (a B-size one is gigabytes).
        extra["enable_checkpointing"] = any(isinstance(cb, Checkpoint) for cb in callbacks)
    logger = instantiate_logger(cfg.get("logger"), ckpt_path, out_dir)  # a resume logs where the run did
    trainer = build_trainer(cfg.trainer, callbacks=[*callbacks, *always], logger=logger, **extra)
    model = build_model(cfg.model, cfg.loss)
    if cfg.get("init_from") and ckpt_path is not None:
        # auto after a requeue of a run that began from init_from: the resume is the point. Named explicitly
        # beside init_from, the two disagree about where the weights come from: say which one wins.
        (log.info if cfg.ckpt_path == AUTO else log.warning)(
            "resuming from %s restores the weights, the step, the optimizer and the data position: "
            "init_from=%s is not used",
            ckpt_path,
            cfg.init_from,
        )
    elif cfg.get("init_from"):
        try:
            init_from(model, cfg.init_from, use_ema=bool(cfg.get("init_from_ema", False)))
        except (RuntimeError, PositionTableError) as e:  # torch's "Error(s) in loading state_dict", or a
            # position table fitted before it: say which settings differ
            raise _model_mismatch(
                "init_from", cfg.init_from, model_differences(cfg.init_from, cfg.model, cfg.loss), e
            ) from e
        log.info(
            "weights from %s (init_from); the step, the optimizer, the schedule and the data position "
            "start fresh",
            cfg.init_from,
        )
        check_preprocessing(cfg.init_from, config)
        differ = model_differences(cfg.init_from, cfg.model, cfg.loss, function_only=True)
        if differ:  # the weights load, but into layers that compute otherwise: say so, and how to match
            log.warning(
                "init_from=%s: its weights load, but this config builds a model that computes otherwise than "
                "the one they were trained in: %s. To go on from the checkpoint's own architecture, give its "
                "model settings (for a clipforge-convert import folder: copy its model.yaml to "
                "my_conf/model/NAME.yaml and add --config-dir my_conf model=NAME)",
                cfg.init_from,
                "; ".join(differ),
            )
    locked = lock.apply(model)  # after the weights are in, before the optimizer is built
    if locked:
        log.info("%s", locked)
        if not cfg.get("init_from") and ckpt_path is None:
            log.warning(
                "lock freezes tower weights that nothing loaded (no init_from): they stay at their random "
                "initialisation; LiT locks a pretrained tower"
            )
    # read once from the checkpoint's stored config: warned about here, named again if the weights do not load
    changed = model_differences(ckpt_path, cfg.model, cfg.loss) if ckpt_path is not None else []
    if changed:
        log.warning("resuming %s with model settings other than its own: %s", ckpt_path, "; ".join(changed))
    if ckpt_path is not None:  # the resumed weights go on training on this run's images
        check_preprocessing(ckpt_path, config, key="ckpt_path")
    schedule = schedule_differences(ckpt_path, config) if ckpt_path is not None else []
    if schedule:  # the LR at the resume step is logged by the module (`lr at step N`) when it changes
        log.warning(
            "resuming %s with another LR schedule (%s): the schedule is recomputed from this config and goes on "
            "from the checkpoint's step (the cosine is not stretched from the current learning rate)",
            ckpt_path,
            "; ".join(schedule),
        )
    moved = start_differences(ckpt_path, config) if ckpt_path is not None else []
    if moved:  # a part that had started is off again until its new start
        log.warning(
            "resuming %s starts these parts at other steps than its run did (each starts at a fraction of "
            "trainer.max_steps; one that had started is off again until its new start): %s",
            ckpt_path,
            "; ".join(moved),
        )
    if mode is not None:
        compile_in_place(model, loss, mode)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module: ContrastiveModule = instantiate(cfg.module)(
        model, loss, instantiate(cfg.optimizer), scheduler, config=config, **siglip2_parts(cfg)
    )
    if cfg.get("grad_checkpointing"):  # how the networks run, not what they are: not in the model's node.
        # Every part that can: the towers, the objectives' own networks (LocCa's decoder), the EMA's copies
        # (they run without grad, so recompute nothing). Set before the first forward, when compile=true traces.
        for part in module.modules():
            if hasattr(part, "set_grad_checkpointing"):
                part.set_grad_checkpointing(True)
    if logger:
        logger.log_hyperparams(config)
    quiet_reduced_metric_warnings()  # val/* are reduced over ranks before they are logged

    # On SIGTERM/SIGUSR1 or a first Ctrl+C a callback saves a checkpoint and exits (SystemExit, status 0):
    # clipforge.callbacks.preemption. The caller's signal handlers are back when fit ends, however it ends.
    try:
        with signal_handlers_kept():
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as e:
        # Closed (as failed unless a preemption's clean exit): left open, the next train() in this process
        # (a notebook, an in-process sweep) would log into this run, in its directory (Lightning's
        # WandbLogger reuses an open run). A preemption or Ctrl+C leaves by SystemExit, not an Exception.
        finish_wandb(logger, exit_code=0 if isinstance(e, SystemExit) and not e.code else 1)
        if not isinstance(e, Exception):
            raise
        if (
            ckpt_path is not None
            and isinstance(e, RuntimeError)
            and "Error(s) in loading state_dict" in str(e)
        ):
            raise _model_mismatch(
                "ckpt_path", ckpt_path, changed + module_differences(ckpt_path, config), e
            ) from e
        # A node died or hangs: gloo/NCCL say "connection reset" or "timed out" but not which rank; say it.
        lost = explain_collective_failure(e, timeout, grace=LOST_RANK_GRACE_S)
        if lost is None:
            raise
        log.error("%s", lost)
        raise lost from e

    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    metrics.update(recent_loss.result(trainer))
    if cfg.get("final_eval", True) and not stop_requested(callbacks, trainer):
        ema = module.ema["model"] if module.ema is not None else None
        metrics.update(final_zero_shot(module.model, datamodule, trainer, ema))
    summary = summarize(metrics, trainer, logger, data_skips(datamodule))
    finish_logger(logger, metrics, trainer.global_step)
    if trainer.is_global_zero:
        print(summary, flush=True)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "logger": logger}


def check_preprocessing(path: str | Path, config: dict[str, Any], key: str = "init_from") -> None:
    """Warn where checkpoint ``path``'s weights were trained on images normalised or resized otherwise than
    this run's (``data.augment`` mean, std, interpolation): fine-tuning an import of open_clip's ViT-L-14
    laion2b weights (mean = std = 0.5) on CLIP's mean/std starts from shifted inputs, without a word; a
    resume (``key="ckpt_path"``) that forgets the run's mean/std trains on with CLIP's."""
    was, now = stored_preprocessing(checkpoint_config(path)), stored_preprocessing(config)
    differ = [f"data.augment.{k}: checkpoint {was[k]}, config {now[k]}" for k in was if was[k] != now[k]]
    if differ:
        log.warning(
            "%s=%s: its weights were trained on images prepared otherwise than this run prepares them "
            "(%s); set those keys to the checkpoint's values unless the change is meant",
            key,
            path,
            "; ".join(differ),
        )


def check_lock_unchanged(ckpt_path: str | Path, lock: Lock) -> None:
    """A resume must freeze what its checkpoint's run froze: the checkpoint's optimizer state holds exactly
    that run's trainable parameters (a run from before ``lock`` existed locked nothing)."""
    stored = (checkpoint_config(ckpt_path) or {}).get("lock") or {}
    was = Lock(**{k: v for k, v in stored.items() if k != "_target_"})
    if was != lock:
        now = lock.as_config()
        differ = [
            f"lock.{k}: checkpoint {v!r}, config {now[k]!r}"
            for k, v in was.as_config().items()
            if v != now[k]
        ]
        raise ValueError(
            f"ckpt_path={ckpt_path} was trained with other towers locked ({'; '.join(differ)}); its optimizer "
            "state holds that run's trainable parameters. Resume with its lock settings, or start from its "
            "weights with init_from= and the new ones"
        )


def build_trainer(node: DictConfig, **kwargs: Any) -> L.Trainer:
    """The Trainer of the ``trainer`` node. A value Lightning refuses (``devices=0``, an unknown strategy)
    is a mistake in that node: said in one line naming it, not as Hydra's wrapped repr of Lightning's error.
    Checkpoint files are written atomically (temp file, fsync, rename) and read with weights_only=True."""
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate(node, plugins=[AtomicCheckpointIO()], **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError | TypeError | MisconfigurationException):
            raise ValueError(f"trainer: {e.__cause__}") from e
        raise


def stop_requested(callbacks: list[Any], trainer: L.Trainer) -> bool:
    """Whether a stop signal (a first Ctrl+C, SIGTERM) reached any rank after the last step, during the last
    validation, when no step was left to save and stop at: training is complete and saved, so the final
    evaluation, which can take minutes, is skipped. Every rank calls it (a collective), so all agree."""
    got = next(
        (cb.received for cb in callbacks if isinstance(cb, PreemptionCheckpoint) and cb.received), None
    )
    if not trainer.strategy.reduce_boolean_decision(got is not None, all=False):
        return False
    log.warning(
        "%s received during the last validation: the run is complete and saved; final evaluation skipped",
        got.name if got is not None else "a stop signal (on another rank)",
    )
    return True


def _model_mismatch(key: str, path: str | Path, changed: list[str], error: Exception) -> ValueError:
    """The checkpoint's weights do not fit the configured model: name the settings that differ, those both
    configs state first (one config may spell out settings the other leaves at their defaults)."""
    one_sided = [d for d in changed if repr(NO_SETTING) in d]  # a setting one config lacks
    why = "; ".join(d for d in changed if d not in one_sided)
    if one_sided:
        why += ("; " if why else "") + "set in one config only: " + "; ".join(one_sided)
    why = why or "no setting differs (the checkpoint's keys do not match)"
    return ValueError(
        f"{key}={path}: its weights do not fit the model this config builds ({why}). Use the checkpoint's "
        f"settings{'' if key == 'init_from' else ', or start from its weights with init_from='}. "
        f"torch: {_state_dict_error_summary(error)}"
    )


def _state_dict_error_summary(error: Exception, keys: int = 3) -> str:
    """torch's "Error(s) in loading state_dict" on one line, shortened to the first ``keys`` missing and
    unexpected keys and size mismatches, with their counts (the full list runs to thousands of keys)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    parts, mismatches = [], []
    for line in lines[1:]:
        what, sep, rest = line.partition(": ")
        if sep and rest.startswith('"'):  # Missing / Unexpected key(s) in state_dict: "a", "b", ...
            parts.append(f"{what}: {_first(rest.rstrip('.').split(', '), keys)}")
        else:  # size mismatch for <key>: ..., one line each
            mismatches.append(line)
    if mismatches:
        parts.append(_first(mismatches, keys))
    return " ".join([lines[0] if lines else type(error).__name__, "; ".join(parts)]).strip()


def _first(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


main = hydra_entry("train", train)

if __name__ == "__main__":
    main()
