"""``clipforge-consolidate``: a sharded checkpoint directory (``trainer/strategy=fsdp2``, PyTorch FSDP2 with
torch.distributed.checkpoint) as one clipforge checkpoint file, for the tools that read one
(``clipforge-zeroshot``, ``clipforge-convert export``, ``init_from=``); :func:`consolidate_checkpoint` is
also how :func:`clipforge.checkpoint.load_checkpoint` reads such a directory in memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import (
    CONFIG_KEY,
    MODEL_PREFIX,
    build_model,
    checkpoint_dict,
    checkpoint_kind,
    submodule_state,
)
from clipforge.console import console_script


def consolidate_checkpoint(src: str | Path) -> dict[str, Any]:
    """The sharded checkpoint directory ``src`` as one clipforge checkpoint dict (weights, config, step).

    The directory is checked first (:func:`clipforge.fault.sharded.verify_sharded_checkpoint`: nothing in it
    can run code). Only the model's tensors are read, each gathered whole from the shards of every rank.
    Parameters that FSDP2 stored with another shape of the same size (the scalar logit scale and bias,
    kept as ``(1,)`` for sharding) get the shape of the model the config builds; any other mismatch with
    that model is an error naming the keys.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from clipforge.fault.sharded import verify_sharded_checkpoint

    src = Path(src).resolve()  # last.ckpt is a link to the newest directory
    meta = verify_sharded_checkpoint(src)["meta"]
    cfg = meta.get(CONFIG_KEY)
    if not cfg or "model" not in cfg:
        raise ValueError(f"{src} has no clipforge config: was it written by clipforge's trainer?")
    loaded: dict[str, Any] = {}
    # What torch's own dcp_to_torch_save does, restricted to the "state_dict" entries (model weights; the
    # optimizer state is not read): rebuild them from the index, in this one process. dcp.load() itself
    # fills only keys that the given dict already has.
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(str(src)),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    weights = submodule_state(loaded, MODEL_PREFIX) if "state_dict" in loaded else {}
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(cfg["model"], cfg.get("loss")).state_dict().items()}
    missing = sorted(MODEL_PREFIX + k for k in set(expected) - set(weights))
    unexpected = sorted(MODEL_PREFIX + k for k in set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{src} does not match its config's model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state = {}
    for key, tensor in weights.items():
        shape = expected[key]
        if tensor.shape != shape:
            if tensor.numel() != shape.numel():
                raise ValueError(
                    f"{src}: model.{key} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}"
                )
            tensor = tensor.reshape(shape)
        state[key] = tensor
    return checkpoint_dict(
        state,
        cfg,
        global_step=int(meta.get("global_step", 0)),
        epoch=int(meta.get("epoch", 0)),
        consolidated_from=str(src),
    )


def save_consolidated(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write :func:`consolidate_checkpoint` of ``src`` to the file ``dst`` (atomically); returns it."""
    from clipforge.fault.atomic_io import atomic_torch_save

    src, dst = Path(src), Path(dst)
    kind = checkpoint_kind(src)
    if kind != "sharded":
        if kind == "file":
            what = "it is a file (already one checkpoint)"
        elif kind == "missing":
            what = "no such directory"
        else:
            what = "a directory without DCP's .metadata or meta.pt (not written by trainer/strategy=fsdp2)"
        raise ValueError(f"{src} is not a sharded checkpoint directory: {what}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    ckpt = consolidate_checkpoint(src)
    atomic_torch_save(ckpt, dst)
    return ckpt


def consolidate(argv: list[str] | None = None) -> None:
    """``clipforge-consolidate SRC DST``: a sharded checkpoint directory -> one clipforge checkpoint file."""
    parser = argparse.ArgumentParser(
        prog="clipforge-consolidate",
        description="Consolidate a sharded (trainer/strategy=fsdp2) checkpoint directory into one clipforge "
        "checkpoint file for clipforge-zeroshot, scripts/convert.py export and init_from.",
    )
    parser.add_argument("src", help="sharded checkpoint directory, e.g. <run dir>/checkpoints/last.ckpt")
    parser.add_argument("dst", help="the consolidated .ckpt file to write")
    parser.add_argument("--force", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(argv)
    ckpt = save_consolidated(args.src, args.dst, overwrite=args.force)
    n = sum(t.numel() for t in ckpt["state_dict"].values())
    print(f"wrote {args.dst}: {len(ckpt['state_dict'])} tensors, {n:,} values, step {ckpt['global_step']}")


main = console_script("clipforge-consolidate", consolidate)  # the console script

if __name__ == "__main__":
    sys.exit(main())
