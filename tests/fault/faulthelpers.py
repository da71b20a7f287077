"""Shared pieces of the fault-injection tests: a tiny run, fault overrides, state comparison."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from runconf import QUIET, towers

# A ~1.6 M-parameter model with patch dropout and drop path on, so the resumed run must also reproduce the
# random masks; 64 training samples in batches of 16: 4 steps per epoch, validation at each epoch end.
TINY = (
    *towers(32, 1, 2),
    "model.vision.patch_dropout=0.25",
    "model.vision.block.drop_path_rate=0.1",
)
RUN = (
    *TINY,
    "logger=none",
    "final_eval=false",
    *QUIET,
    "trainer.max_steps=10",
    "scheduler.warmup_steps=2",
    "data.source.num_train=64",
    "data.source.num_heldout=32",
    "data.batch_size=16",
    "data.source.samples_per_shard=32",
    "data.num_workers=0",
    "callbacks.periodic_checkpoint.every_n_train_steps=3",
)


def fault(action: str, at_step: int, count: int = 1) -> tuple[str, ...]:
    return (
        "+callbacks.fault._target_=faultinject.FaultInjector",
        f"+callbacks.fault.action={action}",
        f"+callbacks.fault.at_step={at_step}",
        f"+callbacks.fault.count={count}",
    )


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def final_state(run_dir: Path) -> dict[str, Any]:
    return load(run_dir / "checkpoints" / "last.ckpt")


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bitwise: weights, optimizer moments and steps, LR schedule, step counter."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert sa["state"].keys() == sb["state"].keys()
        for i in sa["state"]:
            for name, t in sa["state"][i].items():
                assert torch.equal(t, sb["state"][i][name]), f"optimizer state {i}/{name} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def run_forked(fn, timeout: float = 600.0) -> int:
    """Run ``fn()`` in a forked child (no re-import: seconds, not a minute, on a loaded machine) and
    return its wait status. The child never returns into pytest."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"forked training did not finish in {timeout} s")
        time.sleep(0.2)


class StepRecorder(Callback):
    """Copies of the weights after every step: {global_step: {name: tensor}}."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.weights[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
        }
