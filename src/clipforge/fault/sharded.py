"""Sharded (``torch.distributed.checkpoint``) checkpoints: recognise them and check them before they load.

No paper. Under ``trainer/strategy=fsdp2`` Lightning's ``ModelParallelStrategy`` saves a checkpoint as a
directory: one ``__<rank>_0.distcp`` file of tensor shards per rank, DCP's ``.metadata`` index, and
``meta.pt`` with everything else (loops, step, schedulers, callback and data-module states, the clipforge
config), written by rank 0 after every rank's shards. A save cut short has no ``meta.pt`` (or a truncated
one), so it is never taken for a complete checkpoint.

DCP itself is not ``weights_only``: it reads ``.metadata`` with plain ``pickle.load`` and every non-tensor
item (optimizer hyper-parameters) with ``torch.load(weights_only=False)``. :func:`verify_sharded_checkpoint`
therefore checks, before anything else opens the directory, that ``.metadata`` holds only DCP's own index
classes (a restricted unpickler), that every non-tensor item loads with ``weights_only=True``, that every
shard file is as long as the index says (a truncated shard fails here, not mid-resume), and that
``meta.pt`` loads safely and carries the trainer state a resume needs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from clipforge.fault.atomic_io import CorruptCheckpointError, UnsafeCheckpointError, safe_torch_load

META_NAME = "meta.pt"  # Lightning's name for the non-tensor part (lightning.fabric.utilities.load)
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index of every tensor and byte item
RESUME_META_KEYS = ("loops", "global_step")  # weights and optimizer states live in the shards

_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory that looks like a DCP checkpoint (its ``.metadata`` or ``meta.pt`` is there)."""
    path = Path(path)
    return path.is_dir() and ((path / DCP_INDEX).exists() or (path / META_NAME).exists())


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: its metadata classes, torch sizes, dtypes and layouts."""

    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module in _DCP_MODULES or (module, name) in _ALLOWED:
            obj = super().find_class(module, name)
            if module in _DCP_MODULES and getattr(obj, "__module__", None) != module:
                obj = None  # something merely imported there (e.g. a builtin re-exported), not DCP's own
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            obj = getattr(torch, name)
        if obj is None:
            raise UnsafeCheckpointError(f"{module}.{name}")
        return obj


def load_dcp_index(path: str | Path) -> Any:
    """DCP's ``Metadata`` of the checkpoint directory ``path``, read without running arbitrary code."""
    index = Path(path) / DCP_INDEX
    if not index.is_file():
        raise CorruptCheckpointError(f"{path} has no {DCP_INDEX}: a sharded save that did not finish?")
    try:
        with open(index, "rb") as f:
            return _IndexUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its {DCP_INDEX} refers to {e}, which is not part of a DCP index, and "
            "loading it would execute arbitrary code. clipforge never writes such files."
        ) from e
    except (EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
        raise CorruptCheckpointError(f"{index} is not a readable DCP index (truncated?): {e}") from e


def verify_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check the sharded checkpoint ``path`` as described in the module docstring; returns
    ``{global_step, epoch, meta}`` (``meta``: the ``meta.pt`` dict). Raises FileNotFoundError,
    UnsafeCheckpointError or CorruptCheckpointError naming the directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"sharded checkpoint not found: {path}")
    if not (path / META_NAME).is_file():
        raise CorruptCheckpointError(f"{path} has no {META_NAME}: a sharded save that did not finish")
    meta = safe_torch_load(path / META_NAME)
    index = load_dcp_index(path)
    sizes: dict[str, int] = {}
    for key, info in index.storage_data.items():
        shard = path / info.relative_path
        if Path(info.relative_path).is_absolute() or ".." in Path(info.relative_path).parts:
            raise UnsafeCheckpointError(
                f"{path}: {key.fqn} points outside the checkpoint ({info.relative_path})"
            )
        if shard.name not in sizes:
            sizes[shard.name] = shard.stat().st_size if shard.is_file() else -1
        if sizes[shard.name] < info.offset + info.length:
            raise CorruptCheckpointError(f"{path}: shard file {shard.name} is missing or truncated")
        if type(index.state_dict_metadata.get(key.fqn)).__name__ == "BytesStorageMetadata":
            if getattr(info, "transform_descriptors", None):
                raise UnsafeCheckpointError(
                    f"{path}: {key.fqn} is stored transformed; clipforge cannot check it"
                )
            with open(shard, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(
                    f"refusing to load {path}: item {key.fqn} needs arbitrary unpickling ({e})"
                ) from e
    missing = [k for k in RESUME_META_KEYS if k not in meta] if isinstance(meta, dict) else ["everything"]
    if missing:
        raise CorruptCheckpointError(f"{path}/{META_NAME} cannot resume training (missing {missing})")
    if not any(k.startswith("state_dict.") for k in index.state_dict_metadata):
        raise CorruptCheckpointError(f"{path} holds no model weights (no state_dict.* item)")
    return {"global_step": int(meta["global_step"]), "epoch": int(meta.get("epoch", 0)), "meta": meta}
