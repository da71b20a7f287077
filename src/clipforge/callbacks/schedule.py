"""When to log: Lightning's cadence (every ``trainer.log_every_n_steps`` steps, and when stopping early),
computed from the trainer's public counters and shared by the module and the callbacks (no paper)."""

from __future__ import annotations

from typing import Any


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
