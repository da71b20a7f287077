"""Choose the checkpoint a run resumes from: an explicit path, or ``auto`` (the newest valid one).

No paper. "Valid" means: ``torch.load(weights_only=True)`` reads it and it carries the trainer state a
resume needs (``state_dict``, ``loops``, ``global_step``). Files are memory-mapped while checked, so
only their pickle metadata is read; a truncated file fails (its zip directory is at the end), but a
bit flip inside tensor data is not detected.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from clipforge.fault.atomic_io import (
    TMP_SUFFIX,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    safe_torch_load,
)
from clipforge.fault.sharded import is_sharded_checkpoint, verify_sharded_checkpoint

log = logging.getLogger(__name__)

AUTO = "auto"
RESUME_KEYS = ("state_dict", "loops", "global_step", "optimizer_states")


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` safely and check it can resume training; returns ``{global_step, epoch}``.

    Raises FileNotFoundError, UnsafeCheckpointError (needs arbitrary unpickling) or
    CorruptCheckpointError (unreadable, or a weights-only export without trainer state). A sharded
    checkpoint (a directory, ``trainer/strategy=fsdp2``) is checked by :func:`verify_sharded_checkpoint`.
    """
    if is_sharded_checkpoint(path):
        meta = verify_sharded_checkpoint(path)
        return {"global_step": meta["global_step"], "epoch": meta["epoch"]}
    ckpt = safe_torch_load(path, mmap=True)
    if not isinstance(ckpt, dict) or (missing := [k for k in RESUME_KEYS if k not in ckpt]):
        what = f"keys {missing} missing" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CorruptCheckpointError(
            f"{path} cannot resume training ({what}): is it a weights-only export? "
            "Load weights with clipforge.checkpoint.load_model instead."
        )
    return {"global_step": int(ckpt["global_step"]), "epoch": int(ckpt.get("epoch", 0))}


def find_latest_checkpoint(search_dir: str | Path) -> Path | None:
    """The valid ``*.ckpt`` under ``search_dir`` with the highest step (ties: the most recently written);
    a sharded checkpoint is a ``*.ckpt`` directory.

    Unreadable or unsafe files are skipped with a warning (an error if no file is left); a partial write
    (``*.ckpt.tmp`` left by a kill during a save) is never a candidate, and is removed
    (:func:`remove_interrupted_save`); nor is a symlink (its target is scanned in its own right).
    """
    root = Path(search_dir)
    if not root.is_dir():
        return None
    for tmp in root.rglob(f"*.ckpt{TMP_SUFFIX}"):
        remove_interrupted_save(tmp)
    ranked: list[tuple[int, float, Path]] = []
    rejected: list[str] = []
    for path in sorted(root.rglob("*.ckpt")):
        if path.is_symlink():  # last.ckpt -> a step file that the scan visits itself
            continue
        try:
            meta = verify_checkpoint(path)
        except (OSError, UnsafeCheckpointError, CorruptCheckpointError) as e:
            warnings.warn(f"auto-resume skips {path}: {e}", stacklevel=2)
            rejected.append(path.name)
            continue
        ranked.append((meta["global_step"], path.stat().st_mtime, path))
    if not ranked:
        if rejected:
            # Starting over silently would throw away the run; a person should look at these files.
            raise CorruptCheckpointError(
                f"ckpt_path=auto: none of the {len(rejected)} checkpoints under {root} can resume training "
                f"({', '.join(rejected)}; reasons in the warnings above). Pass ckpt_path=<file> to pick one, "
                "or ckpt_path=null to start from scratch."
            )
        return None
    step, _, best = max(ranked, key=lambda t: (t[0], t[1]))
    log.info("auto-resume: %s (step %d) is the newest of %d valid checkpoints", best, step, len(ranked))
    return best


# A save writes its temporary file without pause: one untouched this long is no save in progress.
STALE_TMP_S = 60.0


def remove_interrupted_save(tmp: Path) -> None:
    """Delete ``tmp``, the temporary file of a save killed before its rename (never a resume candidate, and
    as large as a checkpoint), once it has not been written to for :data:`STALE_TMP_S`; a fresher one may be
    a save still running (another process using this directory) and is left in place, named."""
    if not tmp.is_file():
        log.info("ignoring %s: not a file (clipforge's saves write files)", tmp)
        return
    try:
        st = tmp.stat()
    except FileNotFoundError:  # every rank scans: another may have removed it first
        return
    idle = time.time() - st.st_mtime
    if idle < STALE_TMP_S:
        log.info("left %s in place: written %.0f s ago, a save may still be writing it", tmp, idle)
        return
    tmp.unlink(missing_ok=True)
    log.info("removed %s (%.1f MB): the file of a save interrupted before its rename", tmp, st.st_size / 1e6)


def resolve_ckpt_path(ckpt_path: str | Path | None, search_dir: str | Path) -> str | None:
    """``None`` -> fresh start; ``"auto"`` -> newest valid checkpoint under ``search_dir`` (or fresh);
    anything else must be an existing, safe, resumable checkpoint (fails at once, naming the file)."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == AUTO:
        found = find_latest_checkpoint(search_dir)
        if found is None:
            log.info("auto-resume: no valid checkpoint under %s, starting from scratch", search_dir)
        return None if found is None else str(found)
    path = Path(ckpt_path)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(
            f"ckpt_path={str(ckpt_path)!r}: no such checkpoint file or sharded checkpoint directory"
        )
    verify_checkpoint(path)
    return str(path)


def check_steps_left(path: str | Path, max_steps: int) -> None:
    """Refuse to resume ``path`` when its step is beyond ``trainer.max_steps`` (Lightning trains nothing and
    says nothing: a lowered max_steps, or the wrong run's checkpoint); at it, say the run is complete."""
    if max_steps < 0:  # -1: no step limit
        return
    step = verify_checkpoint(path)["global_step"]
    if step > max_steps:
        raise ValueError(
            f"ckpt_path: {path} is at step {step}, beyond trainer.max_steps={max_steps}, so resuming would train "
            f"nothing: raise trainer.max_steps above {step} to train on, or start a new run from its weights with "
            "init_from="
        )
    if step == max_steps:
        log.warning(
            "resuming %s, already at trainer.max_steps=%d: the run is complete and no step is left to train "
            "(raise trainer.max_steps to train on)",
            path,
            max_steps,
        )
