"""A test-only callback that the launch tests add from the command line (``+callbacks.probe._target_=
launchprobe.LaunchProbe``, with this folder on PYTHONPATH): it makes what each rank did observable
without touching the product.

- With ``data.stream.return_keys=true`` every batch carries its sample keys (``<shard url>/<key>``); each rank
  appends one JSON line per training batch to ``<out_dir>/rank<R>.jsonl``: global step after the batch,
  epoch, batch index and keys.
- Every checkpoint file a process writes through clipforge's ``AtomicCheckpointIO`` is appended to
  ``<out_dir>/saves-rank<R>.jsonl`` by the process that wrote it (the strategy calls the IO on the writing
  rank only), so the test sees who wrote what.
- ``block_rank``/``block_at``: that rank stops at the start of the step after ``block_at`` completed
  steps and waits there, after writing ``<out_dir>/blocked-rank<R>.json`` with its pid and process group,
  so a test can kill (or stop) exactly that node at a known point while the others wait in a collective.
- ``pause_at``: every rank waits at the start of the step after ``pause_at`` completed steps, after writing
  ``<out_dir>/paused-rank<R>.json``, until ``<out_dir>/go`` exists (a test sends a signal meanwhile).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class LaunchProbe(Callback):
    def __init__(
        self,
        out_dir: str,
        block_rank: int | None = None,
        block_at: int | None = None,
        pause_at: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.block_rank, self.block_at, self.pause_at = block_rank, block_at, pause_at

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        save, rank = io.save_checkpoint, trainer.global_rank

        def recording_save(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            self._append(
                f"saves-rank{rank}.jsonl", {"path": str(path), "step": checkpoint.get("global_step")}
            )
            save(checkpoint, path, storage_options)

        io.save_checkpoint = recording_save

    def _append(self, name: str, line: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / name, "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.block_rank and trainer.global_step == self.block_at:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            marker = {
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "pgid": os.getpgid(0),
                "step": trainer.global_step,
            }
            tmp = self.out_dir / f".blocked-rank{trainer.global_rank}.json"
            tmp.write_text(json.dumps(marker))
            tmp.rename(self.out_dir / f"blocked-rank{trainer.global_rank}.json")
            time.sleep(3600)  # until the test kills or stops this node
        if trainer.global_step == self.pause_at:
            self._append(f"paused-rank{trainer.global_rank}.json", {"pid": os.getpid()})
            while not (self.out_dir / "go").exists():
                time.sleep(0.1)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        keys = list(batch[2]) if len(batch) > 2 else []
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx, "keys": keys}
        self._append(f"rank{trainer.global_rank}.jsonl", line)
