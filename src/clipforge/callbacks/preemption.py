"""Preemption: on SIGTERM, SIGUSR1 or a first Ctrl+C (SIGINT), save a checkpoint at the end of the
current step and exit cleanly.

No paper. Schedulers warn before they kill: Kubernetes and most clouds send SIGTERM, SLURM sends the
signal named in ``#SBATCH --signal=USR1@120`` (SIGUSR1 here) some time before the hard kill. The handler
only sets a flag (nothing is safe to do inside a signal handler); the next ``on_train_batch_end`` that
ends an optimizer step (under ``trainer.accumulate_grad_batches`` the last batch of the step) saves
``preempt-step<N>.ckpt`` (and removes those of earlier preemptions) and asks SLURM to requeue the job when
running under SLURM. The run then leaves through Lightning's ``SIGTERMException`` (a ``SystemExit``: exit
status 0), as Lightning itself does on SIGTERM, from the first hook after Lightning has logged the step's
metrics: a validation's start or the epoch's end (the callback also sets ``trainer.should_stop``, so the
loop fetches no further batch first; leaving from ``on_train_batch_end`` itself lost the saved step's row
in every logger). Leaving by the exception, rather than letting ``trainer.should_stop`` end the run,
skips the end-of-training work (validation, final checkpoints, evaluation): it would take time the
scheduler may not give, and a "final" checkpoint written then would mark the epoch as finished, so a
resume would skip the rest of it. A periodic checkpoint due at the saved
step is not written beside the preemption file. A ``ckpt_path=auto`` restart resumes from the preemption
file.

Ctrl+C takes the same path, so stopping a run by hand loses nothing either: the first one prints that the
run will save at the end of the current step and stop; a second one raises ``KeyboardInterrupt`` at once,
as Ctrl+C otherwise does (Lightning then shuts down without saving). A process started with Ctrl+C
ignored (``nohup``, a background job) keeps ignoring it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clipforge.callbacks.schedule import StepClock
from clipforge.fault.atomic_io import checkpoint_dir

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> bool:
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("not requeuing: unexpected SLURM job id %r", job_id)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("SLURM job %s was not requeued: scontrol is not on PATH", job_id)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class PreemptionCheckpoint(StepClock):
    """Checkpoint-and-stop on ``signals``; under SLURM (``SLURM_JOB_ID`` set) also requeue if ``requeue``."""

    def __init__(
        self,
        dirpath: str | None = None,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT"),
        requeue: bool = True,
    ) -> None:
        self.dirpath = dirpath
        self.signals = tuple(signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals)
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.preempted_at: str | None = None  # path of the preemption checkpoint once written
        self.leaving = False  # saved at a step's end: leaving once the step is logged
        self._previous: dict[signal.Signals, Any] = {}
        self._active = False
        self._interrupted = False  # a first Ctrl+C was received: the next one aborts
        self._pid = os.getpid()  # forked data-loader workers inherit the handler; only this process acts
        self._announce = True  # the local rank 0 says what Ctrl+C does, not every rank of the machine

    def _handler(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if not self._active:
            # Left installed after fit ended by an exception (Lightning's teardown re-installs the handlers
            # it found, ours among them): behave as if we had never been there.
            self._pass_on(sig, frame)
            return
        if sig == signal.SIGINT:
            self._ctrl_c(frame)
            return
        self.received = sig
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):  # keep whatever was installed before us (e.g. a launcher's handler)
            previous(signum, frame)

    def _ctrl_c(self, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a data-loader worker: the training process decides, and stops the workers itself
        if self._interrupted:
            self._pass_on(signal.SIGINT, frame)  # the second Ctrl+C: KeyboardInterrupt, at once
            return
        self._interrupted = True
        self.received = self.received or signal.SIGINT
        if self._announce:
            # os.write, not print: a handler that runs while the main code is inside print would make a
            # reentrant call on the same buffered stream, which Python refuses with a RuntimeError.
            os.write(
                2,
                b"\nCtrl+C: saving a checkpoint at the end of the current step, then stopping "
                b"(Ctrl+C again aborts at once, without saving)\n",
            )

    def _pass_on(self, sig: signal.Signals, frame: Any) -> None:
        """Give ``sig`` the behaviour it had before us: reinstall that handler and run it."""
        previous = self._previous.get(sig, signal.SIG_DFL)
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(int(sig), frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), sig)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before Lightning's own SIGTERM handler, which then calls ours in turn. Because SIGUSR1
        # already has a handler, Lightning's SLURM auto-requeue does not install its own (no second save).
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._pid, self._announce = os.getpid(), trainer.local_rank == 0
        self._interrupted = self.leaving = False
        for sig in self.signals:
            previous = _live_handler(signal.getsignal(sig), sig)
            if sig == signal.SIGINT and previous == signal.SIG_IGN:
                continue  # started with Ctrl+C ignored (nohup, a background job): it stays ignored
            self._previous[sig] = previous
            signal.signal(sig, self._handler)
        self._active = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # With several processes, take SIGTERM back from Lightning (it registered its handler after our
        # setup, calling ours from it). Lightning 2.6's SIGTERM handler runs a broadcast collective inside
        # the signal handler, at whatever point the interrupted rank was, on the ranks that got the signal
        # only: under torchrun (which passes SIGTERM to every worker) or a forwarded signal the ranks'
        # collectives fall out of step and the job hangs. Ours only sets a flag; all ranks agree on it at
        # the next batch end (a collective every rank makes). One process: Lightning's handler stays, so a
        # SIGTERM during validation still cuts the validation short (it is acted on after it otherwise).
        # Under trainer.accumulate_grad_batches, Lightning stops after any batch, also one whose step is not
        # taken yet: ours waits for the step's last batch (mid_accumulation), validation only follows one.
        if (
            (trainer.world_size > 1 or trainer.accumulate_grad_batches > 1)
            and signal.SIGTERM in self.signals
            and threading.current_thread() is threading.main_thread()
        ):
            signal.signal(signal.SIGTERM, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.mid_accumulation(trainer):  # every rank alike: the step's last batch saves, with its update
            return
        # A signal may reach only some ranks; any one of them stops all (collective: every rank calls it).
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._checkpoint(trainer)
            self.leaving = True  # every rank alike, at the next of the hooks below
            # and no next batch: the loop would wait for it (minutes from a stalled store) before the
            # next batch's start; stopping, it goes from this step's logging to a validation's start or
            # the epoch's end
            trainer.should_stop = True

    # The first hooks Lightning calls after it has logged a step's metrics: on every rank the same one.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._leave()
        super().on_train_batch_start(trainer, pl_module, *args)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave()  # also where a run that reached max_steps ends, before any final checkpoint

    def _leave(self) -> None:
        if self.leaving:
            raise SIGTERMException()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM during validation: Lightning stops at the next validation batch, before any train batch end.
        if isinstance(exception, SIGTERMException) and self.received is not None:
            self._checkpoint(trainer)
        self._active = False  # fit is over: a later signal gets its previous behaviour back

    def _checkpoint(self, trainer: L.Trainer) -> None:
        if self.preempted_at is not None:
            return
        dirpath = checkpoint_dir(trainer, self.dirpath)
        path = os.path.join(dirpath, f"preempt-step{trainer.global_step:07d}.ckpt")
        trainer.save_checkpoint(path)
        self.preempted_at = path
        # A run requeued again and again would keep one full checkpoint per preemption until the disk is
        # full: the earlier ones hold older states than this one (complete on disk by now), so they go.
        for older in _preemption_checkpoints(dirpath, below=trainer.global_step):
            trainer.strategy.remove_checkpoint(older)
        sig = self.received.name if self.received is not None else "signal"
        log.warning("%s received: saved %s at step %d, exiting", sig, path, trainer.global_step)
        job_id = slurm_job_id()
        # Ctrl+C is a person stopping the run, not a scheduler taking the node: no requeue.
        if self.requeue and job_id and trainer.is_global_zero and self.received != signal.SIGINT:
            requeue_slurm_job(job_id)


def preempting(trainer: L.Trainer) -> bool:
    """Whether a :class:`PreemptionCheckpoint` has saved this step and the run is about to leave."""
    return any(isinstance(cb, PreemptionCheckpoint) and cb.leaving for cb in trainer.callbacks)


@contextmanager
def signal_handlers_kept(
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1),
) -> Iterator[None]:
    """Put back on the way out the handlers ``signals`` had on the way in (main thread only), so that an
    in-process caller (a test, a notebook) gets its own Ctrl+C back however ``fit`` ended: one ended by an
    exception (a preemption's exit among them) never runs the callbacks' ``teardown``, and Lightning
    leaves SIGINT ignored after it has handled a ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: installed outside Python, cannot be put back from here
                signal.signal(sig, handler)


def _live_handler(handler: Any, sig: signal.Signals) -> Any:
    """``handler`` without the handlers of earlier, finished runs in front of it. A fit that ends in an
    exception never calls the callbacks' ``teardown``, and Lightning then puts back the handler it found,
    ours: a later run in the same process (a notebook, an in-process sweep) would chain to that stale
    handler, which re-raises the signal with its default action and kills the run instead of saving."""
    while (
        getattr(handler, "__func__", None) is PreemptionCheckpoint._handler and not handler.__self__._active
    ):
        handler = handler.__self__._previous.get(sig, signal.SIG_DFL)
    return handler


def _preemption_checkpoints(dirpath: str, below: int) -> list[str]:
    """The ``preempt-step<N>.ckpt`` files (or sharded directories) in ``dirpath`` with ``N < below``."""
    found = []
    for name in sorted(os.listdir(dirpath)) if os.path.isdir(dirpath) else []:
        match = re.fullmatch(r"preempt-step(\d+)\.ckpt", name)
        if match and int(match.group(1)) < below:
            found.append(os.path.join(dirpath, name))
    return found
