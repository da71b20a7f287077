"""The run's experiment logger: built from ``conf/logger`` with W&B offline by default (its mode passed to
each run's ``wandb.init``, never through the environment), and closed when the run ends, however it ends,
so that a later ``train()`` in the same process starts its own run. No paper.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the module imports this file for wandb_run_id and stays free of Hydra
    from omegaconf import DictConfig


def instantiate_logger(cfg: DictConfig | None, resume_run: str | None = None) -> Any:
    """The logger of ``cfg`` (a ``conf/logger`` node), or ``False`` (Lightning's "no logger") without one.

    ``resume_run``: the W&B run id stored in the checkpoint this run resumes from; the run logs into it
    (``resume="allow"``) unless ``logger.id`` or an exported ``WANDB_RUN_ID`` names a run. Without it every
    resume (``ckpt_path=auto`` after a crash) started a new W&B run, the curves split across runs.
    """
    from hydra.utils import instantiate

    if not cfg or "_target_" not in cfg:
        return False
    if cfg._target_.endswith("WandbLogger"):
        Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
        options = wandb_run_options(cfg)
        if resume_run and not cfg.get("id") and "WANDB_RUN_ID" not in os.environ:
            options |= {"id": resume_run, "resume": "allow"}
        logger = instantiate(cfg, **options, _convert_="all")
        # Lightning passes anonymous=None to every wandb.init, and wandb warns about the key whatever its
        # value ("has no effect"), before the silent setting applies: the no-op key goes, the warning with it.
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
        return logger
    return instantiate(cfg)


def wandb_run_options(cfg: DictConfig) -> dict[str, Any]:
    """This run's W&B ``mode`` (and ``settings``), for its ``wandb.init`` through the WandbLogger's keywords.

    Never through os.environ: wandb reads its variables once per process, and a WANDB_MODE set for one
    train() (here, or as "dryrun" by Lightning's ``offline=True``) held for every later run in the
    process. A WANDB_MODE / WANDB_SILENT the user exported still wins; else ``logger.offline`` (default
    true: the run writes local files and never opens a network connection or prompt) and silent.
    Lightning gets ``offline=False``, its ``offline`` only setting that variable; its one check, no
    model upload from an offline run, is made here.
    """
    offline = bool(cfg.get("offline", True))
    if offline and cfg.get("log_model"):
        raise ValueError(
            f"logger.log_model={cfg.log_model} needs logger.offline=false: an offline W&B run uploads no "
            "checkpoints (WANDB_MODE=offline with logger.offline=false keeps them as local artifacts)"
        )
    options: dict[str, Any] = {
        "offline": False,
        "mode": os.environ.get("WANDB_MODE") or ("offline" if offline else "online"),
    }
    if "WANDB_SILENT" not in os.environ:
        options["settings"] = {**(cfg.get("settings") or {}), "silent": True}
    return options


def finish_logger(logger: Any, metrics: dict[str, float], step: int) -> None:
    """Send the final metrics and close the run, so a later train() in this process starts a new one."""
    if not logger:
        return
    final = {k: v for k, v in metrics.items() if k.startswith("final/")}
    if final:
        logger.log_metrics(final, step=step)
    logger.finalize("success")
    finish_wandb(logger, exit_code=0)


def finish_wandb(logger: Any, exit_code: int) -> None:
    """End the W&B run of a ``WandbLogger`` (other loggers keep no process-wide run)."""
    if type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def wandb_run_id(logger: Any) -> str | None:
    """The id of a ``WandbLogger``'s run (stored in checkpoints for a resume), ``None`` for other loggers."""
    if type(logger).__name__ != "WandbLogger":
        return None
    return logger.version


def wandb_offline(logger: Any) -> bool:
    # the run itself knows best (its mode came from wandb_run_options); else the user's WANDB_MODE
    offline = getattr(getattr(logger, "experiment", None), "offline", None)
    if offline is None:
        return os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    return bool(offline)
