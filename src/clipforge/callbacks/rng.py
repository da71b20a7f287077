"""Random-number state that survives a restart, so a resumed run draws the same randomness.

Two mechanisms. (1) Per-step seeding, in the spirit of JAX's ``fold_in`` (as in big_vision): before
every training step the torch generators (CPU and all CUDA devices) are seeded from
``(seed, global_step, batch_idx, rank)``, so the randomness of step ``N`` (patch dropout, drop path) is a function
of ``N`` alone, whatever ran before it: data-loader iterators created at an epoch boundary or a
validation pass consume the global generator and would otherwise shift every later draw of a resumed
run. It also gives each DDP rank its own masks. (2) The python, numpy and torch generator states are
saved in every checkpoint and restored on load, for any other consumer of the global generators.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def step_seed(seed: int, step: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed that depends on all four integers (SeedSequence hashing, no collisions in practice).

    ``batch_idx`` separates the micro-batches of one optimizer step under gradient accumulation.
    """
    words = np.random.SeedSequence([seed, step, batch_idx, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def capture_rng_states() -> dict[str, Any]:
    """Generator states as tensors and plain containers only (``torch.load(weights_only=True)``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(mt), "gauss_next": gauss},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableRng(Callback):
    """Seed torch per batch from ``(seed, global_step, batch_idx, rank)`` and checkpoint all generator states."""

    def __init__(self, seed: int = 0, reseed_every_step: bool = True) -> None:
        self.seed = seed
        self.reseed_every_step = reseed_every_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.reseed_every_step:
            seed = step_seed(self.seed, trainer.global_step, batch_idx, trainer.global_rank)
            torch.manual_seed(seed)  # CPU and every CUDA device

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_states(state_dict)
