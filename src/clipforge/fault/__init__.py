"""Fault tolerance for long pretraining runs on preemptible machines.

Atomic checkpoint files, ``ckpt_path=auto`` resume from the newest valid checkpoint, step/time-based
checkpoints, resumable RNG, preemption handling (SIGTERM/SIGUSR1, SLURM requeue), a non-finite-step
guard, safe (``weights_only``) loading and secret scrubbing. See docs/resuming.md for the guarantees.
"""

from clipforge.fault.atomic_io import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    safe_torch_load,
)
from clipforge.fault.guards import NonFiniteError, NonFiniteGuard
from clipforge.fault.inject import FaultInjector
from clipforge.fault.periodic import PeriodicCheckpoint
from clipforge.fault.preemption import PreemptionCheckpoint
from clipforge.fault.resume import AUTO, find_latest_checkpoint, resolve_ckpt_path, verify_checkpoint
from clipforge.fault.rng import ResumableRng
from clipforge.fault.secrets import scrub_hydra_files, scrub_secrets

__all__ = [
    "AUTO",
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "FaultInjector",
    "NonFiniteError",
    "NonFiniteGuard",
    "PeriodicCheckpoint",
    "PreemptionCheckpoint",
    "ResumableRng",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "find_latest_checkpoint",
    "resolve_ckpt_path",
    "safe_torch_load",
    "scrub_hydra_files",
    "scrub_secrets",
    "verify_checkpoint",
]
