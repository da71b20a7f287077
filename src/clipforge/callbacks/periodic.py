"""Step- and time-based checkpoints beside the epoch/validation ones, keeping the newest few.

No paper. Lightning's ``ModelCheckpoint`` takes ``every_n_train_steps`` or ``train_time_interval`` but not
both; a preemptible run wants both (a bound on lost steps and on lost wall time), so this subclass
sets the time trigger after construction and keeps the ``keep_last`` newest files by monitoring the
step counter. ``last.ckpt`` is an atomically replaced symlink to the newest file.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint

from clipforge.callbacks.preemption import preempting
from clipforge.callbacks.schedule import StepClock
from clipforge.fault.atomic_io import TMP_SUFFIX, fsync_dir

log = logging.getLogger(__name__)


class PeriodicCheckpoint(StepClock, ModelCheckpoint):
    """Save every ``every_n_train_steps`` optimizer steps and/or every ``every_n_minutes`` of training.

    Files are ``<dirpath>/<filename>.ckpt`` (``periodic-step0001000.ckpt``); the ``keep_last`` newest are
    kept, plus ``last.ckpt`` -> newest. A save also happens when training ends, so the final state is
    always on disk. Another ``ModelCheckpoint`` with ``save_last`` in the same directory hands ``last.ckpt``
    over to this one (its ``save_last`` is switched off at setup).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = 1000,
        every_n_minutes: float | None = None,
        keep_last: int = 2,
        filename: str = "periodic-step{step:07d}",
        save_last: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not every_n_train_steps and not every_n_minutes:
            raise ValueError("PeriodicCheckpoint needs every_n_train_steps and/or every_n_minutes")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",  # always present: Lightning adds it to the monitor candidates
            mode="max",
            save_top_k=keep_last,
            every_n_train_steps=every_n_train_steps or 0,
            save_last="link" if save_last else False,
            auto_insert_metric_name=False,
            # A checkpoint at a step that already has one (a resumed run redoing steps after a fallback
            # past a corrupt file) overwrites it rather than adding a "-v1" twin.
            enable_version_counter=False,
        )
        if every_n_minutes:
            # ModelCheckpoint's on_train_batch_end already checks both triggers; only its constructor
            # insists on one. The elapsed-time decision is taken on rank 0 and broadcast.
            self._train_time_interval = timedelta(minutes=every_n_minutes)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.save_last:
            return
        for cb in trainer.checkpoint_callbacks:
            if (
                cb is not self
                and cb.save_last
                and os.path.realpath(cb.dirpath or "") == os.path.realpath(self.dirpath)
            ):
                # Two owners of last.ckpt would make Lightning write "last-v1.ckpt" beside it; this callback
                # saves more often, so it keeps last.ckpt pointing at the newest state.
                log.info("%s: last.ckpt in %s is kept by PeriodicCheckpoint", type(cb).__name__, self.dirpath)
                cb.save_last = False

    @property
    def state_key(self) -> str:
        # The files it rotates, not its cadence: a resume with another every_n_train_steps or every_n_minutes
        # restores the rotation (a key naming the cadence restored nothing, and the earlier files stayed).
        return self._generate_state_key(kind="periodic", filename=self.filename)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        if self.mid_accumulation(trainer):
            return  # the time trigger fired mid-window too: saved at the step's last batch instead
        if preempting(trainer):
            return  # this step is saved, as preempt-step<N>.ckpt, and the run leaves before the next one
        if pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        else:
            self._save_if_due(trainer)
        # The step that reaches max_steps is saved here, mid-epoch as a periodic save is: by on_train_end
        # Lightning has closed the epoch that max_steps cut short, and a longer run resumed from that file
        # (a larger max_steps) would start the next epoch, skipping the rest of this one's data.
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.sanity_checking:
            self._save_final(trainer)

    def _save_if_due(self, trainer: L.Trainer) -> None:
        """Both triggers under manual optimization (``module.accum_freq > 1``). Lightning's ModelCheckpoint
        has a branch of its own there that ignores ``train_time_interval`` (``every_n_minutes`` saved nothing
        until the end) and warns about a test-only convention; each batch ends a whole optimizer step here
        (feature caching accumulates inside one batch), so the automatic branch's rules apply as they are."""
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        now = time.monotonic()
        if self._train_time_interval is not None:
            last = self._last_time_checked
            late = last is not None and now - last >= self._train_time_interval.total_seconds()
            late = trainer.strategy.broadcast(late)  # rank 0's clock decides, on every rank: no hang
            if late:
                self._last_time_checked = now
            due = due or late
        if due and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_final(trainer)

    def _save_final(self, trainer: L.Trainer) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        """Lightning's rule without its one exception: the file this run resumed from goes too once
        ``keep_last`` newer ones exist. It is one of this rotation's (only files under ``dirpath`` are
        tracked), and keeping it for good left one more full checkpoint behind at every restart of a
        preemptible run (``ckpt_path=auto`` after each lost node or requeue)."""
        if previous == current:
            return False
        dirpath = Path(self.dirpath or "").absolute()
        return not _is_local_file_protocol(previous) or dirpath in Path(previous).absolute().parents

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Lightning removes the file that falls out of the ``keep_last`` newest right after a save and relinks
        ``last.ckpt`` only later: with ``keep_last=1`` that file is the one ``last.ckpt`` points to, so a kill
        between the two left ``last.ckpt`` dangling. The link moves to the file just saved first."""
        link, saved = self.last_model_path, self._last_checkpoint_saved
        if (
            trainer.is_global_zero  # the link is rank 0's; no collective here, unlike _link_checkpoint
            and self.save_last == "link"
            and link
            and saved
            and os.path.islink(link)
            and os.path.realpath(link) == os.path.realpath(filepath) != os.path.realpath(saved)
        ):
            _point_link(saved, link)
        super()._remove_checkpoint(trainer, filepath)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """Point ``linkpath`` at ``filepath`` by renaming a fresh link over it: never a moment without one."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            _point_link(filepath, linkpath)
        trainer.strategy.barrier()


def _point_link(filepath: str, linkpath: str) -> None:
    """Rename a fresh symlink to ``filepath`` (a copy where there are no symlinks) over ``linkpath``."""
    tmp = Path(linkpath + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
    except OSError:  # no symlinks (some Windows setups, some network filesystems): copy
        shutil.copyfile(filepath, tmp)
    os.replace(tmp, linkpath)
    fsync_dir(os.path.dirname(linkpath))
