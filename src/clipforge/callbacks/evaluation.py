"""Lightning callbacks that run CLIP's (Radford et al., 2021) zero-shot classification and image-text
retrieval while training, on every rank.

Unlike open_clip, which evaluates on rank 0 while the other GPUs wait, every rank takes a block of
the held-out set (and, for zero-shot, a block of the classes when embedding prompts); results are
reduced with collectives, so all ranks must reach the same hooks, which step/epoch triggers ensure.
The class embeddings are computed once per evaluation. Metrics are logged as ``val/zeroshot_top1``,
``val/zeroshot_top5``, ``val/i2t_r1`` ... with ``sync_dist=False`` since they are already global.

Epoch-based runs happen in ``on_train_epoch_end``: to monitor ``val/zeroshot_top1`` in
``ModelCheckpoint`` use ``save_on_train_epoch_end=True`` (checkpointing runs after other callbacks).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from clipforge.callbacks.schedule import StepClock, off_the_clock
from clipforge.eval.distributed import shard_dataloader
from clipforge.eval.metadata import DEFAULT_TEMPLATES, load_templates
from clipforge.eval.retrieval import evaluate_retrieval
from clipforge.eval.zeroshot import check_top_k, zero_shot_eval
from clipforge.sharding import skip_when_sharded

log = logging.getLogger(__name__)

# What clipforge logs at validation, each value already reduced over ranks (the module's val/loss, these
# callbacks' scores): logged with sync_dist=False on purpose, where Lightning advises sync_dist=True.
REDUCED_VAL_METRICS = r"val/(loss|(ema_)?zeroshot_\w+|[it]2[it]_r\d+|retrieval_mean_recall)"


def quiet_reduced_metric_warnings() -> None:
    """Silence Lightning's advice to ``sync_dist`` the validation metrics that are already global (a dozen
    warnings per multi-process run); the same advice about any other metric still shows."""
    warnings.filterwarnings(
        "ignore",
        message=rf"It is recommended to use `self\.log\('{REDUCED_VAL_METRICS}', \.\.\., sync_dist=True\)`",
        category=PossibleUserWarning,
    )


class _PeriodicEval(StepClock):
    """Calls ``evaluate`` every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs."""

    def __init__(self, every_n_steps: int | None, every_n_epochs: int | None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or null, got {every_n_steps}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or null, got {every_n_epochs}")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self._last_step = -1
        self._warned = False
        self._log_step = 0  # logger_step of the evaluation under way
        self._in_batch = False  # the evaluation under way runs in on_train_batch_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches share a global step: evaluate once
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._maybe_evaluate(trainer, pl_module, epoch_end=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if (
            self.every_n_epochs
            and epoch % self.every_n_epochs == 0
            and trainer.global_step != self._last_step
        ):
            self._last_step = trainer.global_step
            self._maybe_evaluate(trainer, pl_module, epoch_end=True)

    def _maybe_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch_end: bool) -> None:
        if skip_when_sharded(self, trainer, "evaluation"):
            return
        self._log_step = self.logger_step(trainer, epoch_end=epoch_end)
        self._in_batch = not epoch_end
        try:
            with off_the_clock(trainer):  # not training time: no dent in train/samples_per_s
                self.evaluate(trainer, pl_module)
        finally:
            self._in_batch = False

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        raise NotImplementedError

    def _log(self, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        values = {name: float(value) for name, value in metrics.items()}
        if not self._in_batch:  # at an epoch's end Lightning sends them with the epoch's metrics
            for name, value in values.items():
                # already reduced over ranks: every rank holds the same value, so no sync
                pl_module.log(name, value, sync_dist=False, batch_size=1)
            return
        # In a training batch, self.log reached the loggers on Lightning's log steps only
        # (trainer.log_every_n_steps), and then again at every later log step of the epoch (a step value
        # stays in Lightning's results until the epoch ends). Sent once here, on this step's row (the
        # loggers write on rank 0), and kept in callback_metrics for checkpoint monitors and train().
        trainer = pl_module.trainer
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        for lg in trainer.loggers:
            lg.log_metrics(values, step=self._log_step)

    def _skip(self, why: str) -> None:
        if not self._warned:
            rank_zero_warn(f"{type(self).__name__}: {why}; skipping this evaluation from now on")
            self._warned = True


def zeroshot_templates(datamodule: Any) -> list[Any]:
    """The prompt templates of a data module's zero-shot set: its own, else
    :data:`~clipforge.eval.metadata.DEFAULT_TEMPLATES`, clipforge-zeroshot's (the one fallback of the
    callback and of ``train``'s final evaluation)."""
    return list(getattr(datamodule, "zeroshot_templates", None) or load_templates(DEFAULT_TEMPLATES))


class ZeroShotCallback(_PeriodicEval):
    """Zero-shot classification of ``trainer.datamodule.zeroshot_dataloader()`` batches ``(images, labels)``.

    Class names and prompt templates come from ``datamodule.zeroshot_classnames`` and
    ``datamodule.zeroshot_templates``; the tokenizer's context length from ``pl_module.model.text``.
    Logs ``val/zeroshot_top{k}`` and ``val/zeroshot_mean_per_class``; with a W&B logger also the
    confusion-matrix picture as ``val/zeroshot_confusion``, and as PNGs under ``save_dir`` if given
    (``zeroshot_confusion_step<N>.png``, N the logger step of the evaluation's scalars, as in its title).
    ``use_ema``: also evaluate the EMA weights (``pl_module.ema``, ``ema=default``), logged as
    ``val/ema_zeroshot_top{k}`` and ``val/ema_zeroshot_mean_per_class``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        top_k: Sequence[int] = (1, 5),
        prompt_batch_size: int = 256,
        log_confusion: bool = True,
        save_dir: str | None = None,
        precision: str = "auto",
        progress: bool = False,
        use_ema: bool = False,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        # checked here, at the start of training, not at the first evaluation hours into it
        self.top_k = tuple(check_top_k(k, "callbacks.zeroshot.top_k") for k in top_k)
        self.use_ema, self.log_confusion, self.save_dir = use_ema, log_confusion, save_dir
        # what zero_shot_eval takes besides the model, prompts, data and device
        self.eval_settings = {"top_k": self.top_k, "prompt_batch_size": prompt_batch_size}
        self.eval_settings |= {"precision": precision, "progress": progress}
        self.last_result: dict[str, Any] | None = None
        self.last_ema_result: dict[str, Any] | None = None  # with use_ema
        self.last_result_step = -1  # trainer.global_step at which last_result was computed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.use_ema and getattr(pl_module, "ema", None) is None:
            raise ValueError(
                "callbacks.zeroshot.use_ema=true, but the module keeps no EMA: train with ema=default"
            )

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        dm = trainer.datamodule
        classnames = getattr(dm, "zeroshot_classnames", None)
        if dm is None or not hasattr(dm, "zeroshot_dataloader") or not classnames:
            self._skip("the datamodule has no zero-shot set (zeroshot_dataloader / zeroshot_classnames)")
            return None
        loader = dm.zeroshot_dataloader()
        if loader is None:
            self._skip("the datamodule's zeroshot_dataloader() returned None")
            return None
        templates = zeroshot_templates(dm)
        res = self._eval(pl_module.model, pl_module, list(classnames), list(templates), loader)
        metrics = {f"val/zeroshot_top{k}": res[f"top{k}"] for k in self.top_k}
        metrics["val/zeroshot_mean_per_class"] = res["mean_per_class_accuracy"]
        res_ema = None
        if self.use_ema:
            res_ema = self._eval(pl_module.ema["model"], pl_module, list(classnames), list(templates), loader)
            metrics |= {f"val/ema_zeroshot_top{k}": res_ema[f"top{k}"] for k in self.top_k}
            metrics["val/ema_zeroshot_mean_per_class"] = res_ema["mean_per_class_accuracy"]
        self._log(pl_module, metrics)
        if res["num_skipped"]:
            self._log(pl_module, {"val/zeroshot_skipped_images": res["num_skipped"]})
        if trainer.is_global_zero and (self.log_confusion or self.save_dir):
            self._confusion_picture(trainer, res, list(classnames))
        self.last_result, self.last_ema_result, self.last_result_step = res, res_ema, trainer.global_step
        return res

    def _eval(
        self, model: Any, pl_module: L.LightningModule, classnames: list, templates: list, loader: Any
    ) -> dict:
        return zero_shot_eval(
            model, classnames, templates, loader, device=pl_module.device, **self.eval_settings
        )

    def _confusion_picture(self, trainer: L.Trainer, res: dict[str, Any], classnames: list[str]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from clipforge.eval.plots import confusion_matrix_figure, figure_to_image, save_figure

        wandb_loggers = (
            [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if self.log_confusion else []
        )
        if not wandb_loggers and not self.save_dir:
            return
        # file, title and W&B row all at the logger step of this evaluation's val/zeroshot_* scalars
        fig = confusion_matrix_figure(res["confusion"], classnames, title=f"zero-shot, step {self._log_step}")
        if self.save_dir:
            save_figure(fig, Path(self.save_dir) / f"zeroshot_confusion_step{self._log_step:08d}.png")
        if wandb_loggers:
            image = figure_to_image(fig)
            for lg in wandb_loggers:
                # in the row of the val/zeroshot_* scalars of this evaluation
                lg.log_image("val/zeroshot_confusion", [image], step=self._log_step)


class RetrievalCallback(_PeriodicEval):
    """Image<->text recall@K on ``trainer.datamodule.val_dataloader()`` pairs ``(images, tokens)``.

    Logs ``val/i2t_r{k}``, ``val/t2i_r{k}`` and ``val/retrieval_mean_recall``. ``max_samples`` caps
    the pairs each rank embeds (the score matrix is N x N over all ranks).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        ks: Sequence[int] = (1, 5, 10),
        max_samples: int | None = 5000,
        dedupe_captions: bool = True,
        precision: str = "auto",
        progress: bool = False,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.ks = tuple(check_top_k(k, "callbacks.retrieval.ks") for k in ks)
        # what evaluate_retrieval takes besides the model, data and device
        self.eval_settings = {"ks": self.ks, "max_samples": max_samples, "dedupe_captions": dedupe_captions}
        self.eval_settings |= {"precision": precision, "progress": progress}
        self.last_result: dict[str, Any] | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        dm = trainer.datamodule
        try:
            loader = dm.val_dataloader() if dm is not None else None
        except (AttributeError, NotImplementedError, MisconfigurationException):
            loader = None  # LightningDataModule's default val_dataloader raises when not implemented
        if isinstance(loader, list | tuple):
            loader = loader[0] if loader else None
        if loader is None:
            self._skip("the datamodule has no val_dataloader of (images, tokens) pairs")
            return None
        res = evaluate_retrieval(
            pl_module.model, shard_dataloader(loader), device=pl_module.device, **self.eval_settings
        )
        metrics = {f"val/i2t_r{k}": res[f"i2t_r{k}"] for k in self.ks}
        metrics |= {f"val/t2i_r{k}": res[f"t2i_r{k}"] for k in self.ks}
        metrics["val/retrieval_mean_recall"] = res["mean_recall"]
        self._log(pl_module, metrics)
        self.last_result = res
        return res
