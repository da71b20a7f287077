"""Counters of samples the data pipeline dropped (corrupt images, missing captions ...), summed over ranks.

No paper. A large web-scale run silently loses data to decoding errors; logging the counters as
``data/skipped_<cause>`` next to the loss makes a broken shard or transform visible.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clipforge.callbacks.schedule import logging_step
from clipforge.distributed import all_reduce_sum


def total_skip_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum this rank's ``{cause: count}`` over all ranks (a collective when distributed)."""
    causes = sorted(counts)
    summed = all_reduce_sum(torch.tensor([int(counts[c]) for c in causes], dtype=torch.int64))
    return dict(zip(causes, (int(n) for n in summed.tolist())))


class DataSkipMonitor(Callback):
    """At each logging step, logs ``data/skipped_<cause>`` from ``trainer.datamodule.skip_counts()`` when
    the data module has that method (cumulative counts, summed over ranks)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        skip_counts = getattr(trainer.datamodule, "skip_counts", None)
        if skip_counts is None or not logging_step(trainer, step_done=True):
            return
        for cause, n in sorted(total_skip_counts(skip_counts()).items()):
            pl_module.log(f"data/skipped_{cause}", float(n))
