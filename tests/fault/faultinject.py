"""Deterministic fault injection for the resume tests: kill, signal or poison a run at a chosen point.

No paper. Added from the command line only, e.g.
``+callbacks.fault._target_=faultinject.FaultInjector +callbacks.fault.at_step=7
+callbacks.fault.action=sigkill_before_optimizer_step``; a normal run never contains it.

``rank`` (default: every rank) limits the signals sent at a step start to one global rank.

Actions (``at_step`` is the value of ``trainer.global_step`` when the fault fires, i.e. the number of
optimizer steps already completed):

- ``sigkill_batch_end``: SIGKILL once step ``at_step`` completes, before that step's checkpoints
  (Lightning runs checkpoint callbacks after all others).
- ``sigkill_before_optimizer_step``: SIGKILL in the middle of step ``at_step + 1`` (after backward,
  before the update).
- ``sigkill_in_save``: SIGKILL half-way through writing the first checkpoint saved at step ``at_step``
  (needs :class:`~clipforge.fault.AtomicCheckpointIO`).
- ``sigterm`` / ``sigusr1``: send the signal to ourselves at the start of step ``at_step + 1``.
- ``sigint``: Ctrl+C, ``count`` times in a row, at the start of step ``at_step + 1``.
- ``sigterm_validation`` / ``sigint_validation``: send SIGTERM / Ctrl+C during the validation that follows
  step ``at_step``.
- ``nan_batch``: fill the images of the batches of steps ``at_step + 1 .. at_step + count`` with NaN.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clipforge.fault.atomic_io import AtomicCheckpointIO

ACTIONS = (
    "sigkill_batch_end",
    "sigkill_before_optimizer_step",
    "sigkill_in_save",
    "sigterm",
    "sigusr1",
    "sigint",
    "sigterm_validation",
    "sigint_validation",
    "nan_batch",
)


def _kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


class FaultInjector(Callback):
    def __init__(self, at_step: int, action: str, count: int = 1, rank: int | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; expected one of {ACTIONS}")
        self.at_step, self.action, self.count, self.rank = at_step, action, count, rank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.action != "sigkill_in_save":
            return
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO):
            raise TypeError(f"sigkill_in_save needs AtomicCheckpointIO, the trainer uses {type(io).__name__}")

        def hook(written: int) -> None:
            # torch.save writes the pickle, then each tensor record: past 4 KiB we are mid-file.
            if trainer.global_step == self.at_step and written > 4096:
                _kill_self()

        io.write_hook = hook

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.action == "sigterm" and step == self.at_step:
            _kill_self(signal.SIGTERM)
        elif self.action == "sigusr1" and step == self.at_step:
            _kill_self(signal.SIGUSR1)
        elif self.action == "sigint" and step == self.at_step:
            for _ in range(self.count):
                _kill_self(signal.SIGINT)
        elif self.action == "nan_batch" and self.at_step <= step < self.at_step + self.count:
            batch[0].fill_(float("nan"))  # in place: the same tensor reaches training_step

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.global_step == self.at_step and batch_idx == 0:
            if self.action == "sigterm_validation":
                _kill_self(signal.SIGTERM)
            elif self.action == "sigint_validation":
                _kill_self(signal.SIGINT)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.action == "sigkill_before_optimizer_step" and trainer.global_step == self.at_step:
            _kill_self()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.action == "sigkill_batch_end" and trainer.global_step == self.at_step:
            _kill_self()
