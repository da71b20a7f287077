"""The LightningModule that pretrains a two-tower model with a contrastive loss: CLIP's softmax loss
(Radford et al., 2021) or SigLIP's pairwise sigmoid loss (Zhai et al., 2023).

It receives everything built (model, loss, optimizer and scheduler partials) and owns only the step:
forward both towers, compute the loss, log, clamp the temperature after each optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from clipforge.models.clip import CLIP
from clipforge.optim import build_optimizer

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        model: CLIP,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # The resolved Hydra config travels inside every checkpoint so it can be rebuilt later
        # (clipforge.checkpoint.load_model); modules themselves are never pickled.
        self.config = config or {}
        self._last_batch_time: float | None = None

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.model(images, tokens)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, tokens = batch[0], batch[1]
        out = self.model(images, tokens)
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        return loss, out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, out = self._loss(batch)
        bs = batch[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", out["logit_scale"], batch_size=bs)
        if out["logit_bias"] is not None:
            self.log("train/logit_bias", out["logit_bias"], batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        now = time.perf_counter()
        if self._last_batch_time is not None:
            # Wall time between consecutive steps: data loading included, as a user feels it.
            sps = bs * self.trainer.world_size / (now - self._last_batch_time)
            self.log("train/samples_per_s", sps, prog_bar=True, batch_size=bs)
        self._last_batch_time = now
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_batch_time = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("val/loss", loss, batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_logit_scale()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optimizer_factory)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clipforge_config"] = self.config
