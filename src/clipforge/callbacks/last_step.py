"""Validate the weights a run ends with when ``trainer.max_steps`` stops it mid-epoch (no paper).

Lightning validates at epoch ends (or every ``trainer.val_check_interval``), and reaching ``max_steps``
between two of them ended the run without a validation: the summary's held-out loss, the logged curve and
the best-by-``val/loss`` checkpoint all stopped at older weights, or had none in a run shorter than an
epoch. At the step that reaches ``max_steps`` this callback sets ``trainer.should_stop``, which Lightning
honours as it does early stopping: it validates first (``trainer.check_val_every_n_epoch`` still applies).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ValidateLastStep(Callback):
    """Ask Lightning to stop, and so to validate, at the optimizer step that reaches ``trainer.max_steps``."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps: mid-accumulation batches stay below max_steps
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
