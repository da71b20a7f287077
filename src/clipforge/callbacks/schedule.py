"""When to log: Lightning's cadence (every ``trainer.log_every_n_steps`` steps, and when stopping early),
computed from the trainer's public counters and shared by the module and the callbacks (no paper)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.callbacks import Callback


def logging_step(trainer: Any, step_done: bool = False) -> bool:
    """Whether values logged during this training batch reach the logger, so work done only for logging
    runs only when it is recorded. ``step_done``: called after this batch's optimizer step
    (``on_train_batch_end``, or a manual-optimization step), when ``trainer.global_step`` already counts it.
    """
    every = trainer.log_every_n_steps
    if not every:
        return False
    step = trainer.global_step + (0 if step_done else 1)  # 1-based index of this batch's step
    return step % every == 0 or bool(trainer.should_stop)


class StepClock(Callback):
    """Base of the callbacks that act after a training batch and must know where it stands in the run,
    read from the trainer's public ``global_step`` as each training batch starts (Lightning's own counters
    for these, ``_batches_that_stepped`` and ``_should_accumulate``, are private). Subclasses that define
    ``on_train_batch_start`` call ``super()``'s."""

    _step_at_batch_start = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def logger_step(self, trainer: Any, epoch_end: bool = False) -> int:
        """The step Lightning's loggers file the values logged now under (W&B's ``trainer/global_step``):
        during a training batch's hooks and the validation after it, the number of optimizer steps before
        this batch, so one less than ``trainer.global_step`` once the batch's optimizer step is done; in
        ``on_train_epoch_end`` (``epoch_end``) the last batch's. Pictures logged at it sit in the same row
        as the scalars of the same moment; at ``global_step`` they were one step ahead, and W&B's step axis
        went back by one after each of them."""
        return max(trainer.global_step - 1, 0) if epoch_end else self._step_at_batch_start

    def mid_accumulation(self, trainer: Any) -> bool:
        """Call in ``on_train_batch_end``: whether this batch only accumulated gradients
        (``trainer.accumulate_grad_batches > 1``) for an optimizer step a later batch takes, i.e. took no
        step. A checkpoint saved here would count the batch as trained while its gradients, which are not
        saved, are lost: a run resumed from it would take that step on the rest of the window alone."""
        return trainer.global_step == self._step_at_batch_start


OFF_CLOCK = "clipforge_off_clock_s"  # trainer attribute: seconds of off_the_clock work not yet taken


@contextmanager
def off_the_clock(trainer: Any) -> Iterator[None]:
    """Work a callback does between training batches that is not training (pictures, evaluations):
    :class:`~clipforge.callbacks.ThroughputMonitor` leaves its time out of samples/s and MFU."""
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(trainer, OFF_CLOCK, getattr(trainer, OFF_CLOCK, 0.0) + time.perf_counter() - start)


def take_off_clock(trainer: Any) -> float:
    """The seconds of :func:`off_the_clock` work since the last call (zero from here on)."""
    seconds = getattr(trainer, OFF_CLOCK, 0.0)
    setattr(trainer, OFF_CLOCK, 0.0)
    return seconds


class EveryNSteps(StepClock):
    """Base of the callbacks that draw every ``every_n_steps`` optimizer steps. With gradient accumulation
    several batches end on one ``global_step``: :meth:`due` is true for the first of them only."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def due(self, trainer: Any) -> bool:
        """Call in ``on_train_batch_end`` (``global_step`` already counts this batch's step): whether this
        step is a multiple of ``every_n_steps`` not yet drawn; it counts as drawn from here on."""
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return False
        self._last_step = step
        return True
