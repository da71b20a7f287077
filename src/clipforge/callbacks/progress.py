"""The training progress bar: Lightning's TQDM bar, which also labels an epoch a run resumes in the middle of
(no paper).

Lightning calls ``on_train_epoch_start``, where its bar takes the epoch's name and length, only when an epoch
begins: a run resumed mid-epoch (``ckpt_path=auto`` after a preemption) showed ``Training: 7/?`` with a rate
computed as if the skipped batches had been trained in its first second.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that names and sizes the epoch a resumed run starts in the middle of."""

    _sized = False  # the bar shows this epoch's name and length

    def on_train_start(self, *args: Any) -> None:
        super().on_train_start(*args)
        self._sized = False

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._sized = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sized:
            return
        self._sized = True  # resumed mid-epoch: batch_idx batches of this epoch were trained before
        left = self.total_train_batches  # the epoch's batches, or fewer when max_steps comes first
        total = min(trainer.num_training_batches, batch_idx + left)
        bar = self.train_progress_bar
        bar.reset(total=None if math.isinf(total) else int(total))
        bar.initial = bar.n = batch_idx  # the rate and time left count this run's batches only
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.refresh()
