"""Log the ViT pictures of :mod:`clipforge.viz.attention` (patch grid, position-embedding similarity,
attention per head, attention rollout after Abnar & Zuidema, 2020) to Weights & Biases during training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from clipforge.callbacks.schedule import EveryNSteps, off_the_clock
from clipforge.sharding import skip_when_sharded
from clipforge.viz.attention import figure_to_array, vit_figures


def wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class AttentionMapCallback(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps, log the pictures under ``{key}/<name>``.

    ``image_source``: an image file; ``None`` takes the first image of the current training batch.
    Does nothing without a :class:`~lightning.pytorch.loggers.WandbLogger`, and only on global rank 0.
    The model is read from ``pl_module.model`` (the LightningModule's CLIP) or ``pl_module`` itself.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        image_source: str | Path | None = None,
        layer: int = -1,
        key: str = "viz",
    ) -> None:
        super().__init__(every_n_steps)
        self.image_source, self.layer, self.key = image_source, layer, key

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or not self.due(trainer):
            return
        if skip_when_sharded(self, trainer, "pictures"):  # rank 0 alone would wait in the shards' all-gather
            return
        logger = wandb_logger(trainer)
        if logger is None:
            return
        step = self.logger_step(trainer)  # with this step's scalars
        image = self.image_source if self.image_source is not None else self._first_image(batch)
        model = getattr(pl_module, "model", pl_module)
        with off_the_clock(trainer):
            # the batch was normalised with the run's mean/std: the picture undoes those
            augment = getattr(getattr(trainer, "datamodule", None), "augment", None)
            prep = {"mean": augment.mean, "std": augment.std} if augment is not None else None
            for name, fig in vit_figures(model, image, layer=self.layer, preprocessing=prep).items():
                logger.log_image(key=f"{self.key}/{name}", images=[figure_to_array(fig)], step=step)

    @staticmethod
    def _first_image(batch: Any) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("AttentionMapCallback expects batches (images, tokens) with images (B, 3, H, W)")
        return images[:1].detach()
