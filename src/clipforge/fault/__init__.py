"""Fault tolerance for long pretraining runs on preemptible machines: atomic checkpoint files,
``ckpt_path=auto`` resume from the newest valid checkpoint, safe (``weights_only``) loading, sharded
checkpoint checks, naming a lost rank, and secret scrubbing. The callbacks that act during training
(periodic checkpoints, preemption, the non-finite guard, resumable RNG) live in :mod:`clipforge.callbacks`.
See docs/resuming.md for the guarantees.
"""

from clipforge.fault.atomic_io import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    safe_torch_load,
)
from clipforge.fault.resume import (
    AUTO,
    check_steps_left,
    find_latest_checkpoint,
    resolve_ckpt_path,
    verify_checkpoint,
)
from clipforge.fault.secrets import scrub_hydra_files, scrub_secrets

__all__ = [
    "AUTO",
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "check_steps_left",
    "find_latest_checkpoint",
    "resolve_ckpt_path",
    "safe_torch_load",
    "scrub_hydra_files",
    "scrub_secrets",
    "verify_checkpoint",
]
