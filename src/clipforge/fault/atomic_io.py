"""Crash-safe checkpoint files: write to a temporary file beside the target, fsync, then rename.

No paper; this is the POSIX write-then-rename idiom. ``os.replace`` within one directory is atomic, so
a reader (or a resumed run) sees either the previous complete file or the new complete file, never a
truncated one, whatever moment the writer is killed at. Lightning's own ``TorchCheckpointIO`` writes
through an fsspec transaction whose temporary file lives in the system temp dir, so on most clusters its
final move is a cross-filesystem copy (not atomic) and nothing is fsynced.

Loading is restricted to ``torch.load(weights_only=True)``: a checkpoint that needs arbitrary
unpickling is refused before any of its code can run.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


# Both errors are ValueErrors too: a bad file is a bad input value wherever it is loaded (resume, the
# evaluation and export commands, init_from), so callers can catch one type for either.
class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file would need arbitrary unpickling (``weights_only=False``) to load: refused."""


class CorruptCheckpointError(RuntimeError, ValueError):
    """The file is truncated, not a torch checkpoint, or lacks what resuming needs."""


def checkpoint_dir(trainer: Any, dirpath: str | None = None) -> str:
    """Where an out-of-band checkpoint (preemption, divergence) goes: ``dirpath``, else the main
    checkpoint callback's directory, else ``<default_root_dir>/checkpoints``."""
    if dirpath is not None:
        return dirpath
    ckpt_cb = trainer.checkpoint_callback
    return getattr(ckpt_cb, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")


def fsync_dir(path: str | Path) -> None:
    """Persist a rename: the directory entry, not only the file data, must reach the disk."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOW_DISK_BYTES = (
    64 * 2**20
)  # a failed save with less free than this (or than it wrote) is put down to the disk


class _CountingWriter:
    """File wrapper that reports progress after each write (the fault-injection tests cut a save here)."""

    def __init__(self, f: Any, hook: Callable[[int], None] | None) -> None:
        self.f, self.hook, self.written = f, hook, 0

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.written += n
        if self.hook is not None:
            self.hook(self.written)
        return n

    def flush(self) -> None:
        self.f.flush()


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_torch_save(obj: Any, path: str | Path, write_hook: Callable[[int], None] | None = None) -> None:
    """``torch.save`` to ``path`` such that a crash at any point leaves ``path`` as it was or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)  # same directory, hence same filesystem: rename is atomic
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _CountingWriter(f, write_hook)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        written = writer.written if writer is not None else 0
        free = _free_bytes(path.parent)
        if isinstance(exc, Exception) and free is not None and free < max(written, LOW_DISK_BYTES):
            # torch's zip writer reports a full disk as "unexpected pos ..."; say what it is
            raise OSError(
                errno.ENOSPC,
                f"could not write checkpoint {path}: the disk is (nearly) full, {free / 2**20:.0f} MiB free "
                f"after {written / 2**20:.0f} MiB of it were written ({exc}); the previous file is untouched",
            ) from exc
        raise
    fsync_dir(path.parent)


# What the restricted unpickler raises on bytes that are not a pickle at all (a text file, a file overwritten
# with garbage): torch.load tries the legacy format on anything that is not a zip, and its opcodes then
# index an empty memo or stack (KeyError, IndexError) or read short arguments (struct.error).
_GARBAGE_PICKLE_ERRORS = (KeyError, IndexError, TypeError, struct.error)


def safe_torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with errors that say what went wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # the restricted unpickler also rejects plain garbage
            # torch's text around the detail advises weights_only=False, which cannot mend bad bytes
            detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
            raise CorruptCheckpointError(
                f"{path} is not a readable torch checkpoint (truncated, or not a checkpoint): {detail}"
            ) from e
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors and plain containers, "
            "and loading it would execute arbitrary code (torch.load(weights_only=True) rejected it). "
            "clipforge never writes such files; if you wrote it yourself and trust it, re-save its tensors "
            f"(or export to safetensors) first. Details: {e}"
        ) from e
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) serialization cannot be memory-mapped
            return safe_torch_load(path, map_location, mmap=False)
        raise CorruptCheckpointError(f"{path} is not a readable torch checkpoint (truncated?): {e}") from e
    except (EOFError, OSError, ValueError, *_GARBAGE_PICKLE_ERRORS) as e:
        what = str(e) if str(e) and not isinstance(e, _GARBAGE_PICKLE_ERRORS) else f"{type(e).__name__} {e}"
        if path.stat().st_size == 0:
            what = "the file is empty"
        raise CorruptCheckpointError(f"{path} is not a readable torch checkpoint (truncated?): {what}") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic local saves, ``weights_only`` loads.

    ``write_hook(bytes_written)`` is called during every save; it exists for fault-injection tests.
    Remote paths (``s3://`` ...) fall back to Lightning's own save.
    """

    def __init__(self) -> None:
        super().__init__()
        self.write_hook: Callable[[int], None] | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path, self.write_hook)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            log.warning("loading %s with weights_only=False: its pickled code will run", path)
            return super().load_checkpoint(path, map_location, weights_only=False)
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return safe_torch_load(path, map_location=map_location)
