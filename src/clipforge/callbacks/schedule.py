"""When to log: Lightning's own predicate, shared by the module and the callbacks (no paper)."""

from __future__ import annotations

import lightning as L


def logging_step(trainer: L.Trainer) -> bool:
    """Whether values logged during this training batch reach the logger (every ``log_every_n_steps``, and
    the last step), so work done only for logging runs only when it is recorded. The same in automatic
    and manual optimization (the counter behind it advances once per batch in both)."""
    return trainer._logger_connector.should_update_logs
