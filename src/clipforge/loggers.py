"""The run's experiment logger: built from ``conf/logger`` with W&B offline by default (its mode passed to
each run's ``wandb.init``, never through the environment), and closed when the run ends, however it ends,
so that a later ``train()`` in the same process starts its own run. No paper.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:  # the module imports this file for wandb_run_id and stays free of Hydra
    from omegaconf import DictConfig

log = logging.getLogger(__name__)
# built as clipforge's CSVLogger, which appends on a resume (Lightning's would delete the resumed metrics.csv)
CSV_TARGETS = (
    f"{__name__}.CSVLogger",
    "lightning.pytorch.loggers.CSVLogger",
    "pytorch_lightning.loggers.CSVLogger",
)


def instantiate_logger(
    cfg: DictConfig | None, resume_from: str | Path | None = None, run_dir: str | Path | None = None
) -> Any:
    """The logger of ``cfg`` (a ``conf/logger`` node), or ``False`` (Lightning's "no logger") without one.

    ``resume_from``: the checkpoint this run resumes from, ``run_dir`` this run's output directory. W&B logs
    into the run whose id the checkpoint stores (``resume="allow"``) unless ``logger.id`` or an exported
    ``WANDB_RUN_ID`` names a run. Without it every resume (``ckpt_path=auto`` after a crash) started a new
    W&B run, the curves split across runs. The CSV logger appends to the checkpoint's version directory
    (:func:`csv_logger`).
    """
    from hydra.utils import instantiate

    from clipforge.checkpoint import WANDB_RUN_KEY, checkpoint_entry

    if not cfg or "_target_" not in cfg:
        return False
    if cfg._target_ in CSV_TARGETS:
        return csv_logger(cfg, resume_from, run_dir)
    if cfg._target_.endswith("WandbLogger"):
        resume_run = checkpoint_entry(resume_from, WANDB_RUN_KEY) if resume_from is not None else None
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


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger, but a version directory that has a ``metrics.csv`` (a resumed run's) is
    appended to: Lightning's writer deleted the file, and the earlier rows with it. The file's header
    columns are kept; a metric the file lacks makes Lightning rewrite it with the wider header, earlier
    rows included."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's removes metrics.csv: read its header instead
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


def csv_version(logger: Any) -> str | None:
    """The version directory's name (``version_3``) of a CSV logger (stored in checkpoints for a resume),
    ``None`` for other loggers."""
    return os.path.basename(logger.log_dir) if isinstance(logger, LightningCSVLogger) else None


def csv_logger(cfg: DictConfig, resume_from: str | Path | None, run_dir: str | Path | None) -> CSVLogger:
    """The CSV logger of ``cfg``: on a resume from a checkpoint of ``run_dir``, appending to the version
    directory it names (so one ``metrics.csv`` holds the whole run); else Lightning's next free version,
    and a line saying where this run's metrics go."""
    from hydra.utils import instantiate

    from clipforge.checkpoint import CONFIG_KEY, LOGGER_VERSION_KEY, checkpoint_entry

    options: dict[str, Any] = {"_target_": f"{__name__}.CSVLogger"}  # Lightning's class would delete the file
    why = ""
    if resume_from is not None:
        stored = checkpoint_entry(resume_from, LOGGER_VERSION_KEY)
        own = run_dir is not None and Path(resume_from).resolve().is_relative_to(Path(run_dir).resolve())
        root = Path(cfg.save_dir) / (cfg.get("name") or "")
        if stored is None:
            why = f"{resume_from} {_no_csv_version(checkpoint_entry(resume_from, CONFIG_KEY))}"
        elif not own:
            why = f"{resume_from} is not under this run's directory {run_dir}"
        elif not (root / stored).is_dir():
            why = f"{resume_from} logged to {root / stored}, which is gone"
        else:  # Lightning's own form where it is one (an int): the progress bar shows v_num=0, not "on_0"
            number = stored.removeprefix("version_")
            options["version"] = int(number) if number.isdigit() and stored != number else stored
    logger = instantiate(cfg, **options)
    if why or "version" in options:
        _say_where(logger, why)
    return logger


def _no_csv_version(config: Any) -> str:
    """Why a checkpoint names no CSV version directory: its run logged elsewhere, or it predates the key."""
    logger = config.get("logger") if isinstance(config, dict) else None
    target = str(logger.get("_target_", "")) if isinstance(logger, dict) else ""
    if isinstance(config, dict) and not target:
        return "logged to no CSV file (logger: none)"
    if target and not target.endswith("CSVLogger"):
        return (
            "logged to W&B, not to a CSV file" if "Wandb" in target else f"logged with {target}, not to CSV"
        )
    return "does not name its CSV version directory (a checkpoint from before it did)"


@rank_zero_only  # the other ranks write no CSV (and need not work out its next version)
def _say_where(logger: CSVLogger, why: str) -> None:
    metrics = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
    if why:
        log.info("%s: this run's metrics go to %s", why, metrics)
    else:
        log.info("resumed run: continuing %s", metrics)


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
    """Send the end-of-run figures (``final/*``: the final evaluation; ``summary/*``: the training loss of the
    last batches, see clipforge.summary) and close the run, so a later train() in this process starts a new
    one."""
    if not logger:
        return
    final = {k: v for k, v in metrics.items() if k.startswith(("final/", "summary/"))}
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
