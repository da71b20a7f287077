"""Divergence guard: skip optimizer steps whose gradients are not finite, stop after K in a row.

Skipping a bad update instead of applying it follows the loss-spike handling of large-scale runs
(PaLM, Chowdhery et al., 2022, sec. 5.1, which restarts before a spike and skips the batches), done
here without a restart: the weights and optimizer moments stay those of the last good step, the
batch is consumed and the step counter advances. After ``max_consecutive`` bad steps in a row the run
saves a checkpoint (whose weights are from before the divergence, since no bad step was applied) and
raises :class:`NonFiniteError`.

With a ``GradScaler`` (``precision=16-mixed``) overflowing gradients are normal while the scaler calibrates
and the scaler already skips those steps, so then only a non-finite *loss* counts as a bad step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clipforge.fault.atomic_io import checkpoint_dir
from clipforge.sharding import local_grads, weights_sharded

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run diverged."""


def grads_are_finite(grads: list[torch.Tensor]) -> bool:
    """One fused norm per tensor, one host sync: a NaN or inf anywhere makes its tensor's norm non-finite."""
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def _grad_scaler(trainer: L.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


class NonFiniteGuard(Callback):
    """Skip and count non-finite steps (``train/nonfinite_steps``); raise after ``max_consecutive``.

    Also re-clamps the logit scale after every batch (idempotent), so it stays in range on code paths that
    bypass ``ContrastiveModule.optimizer_step`` (manual optimization).
    """

    def __init__(
        self, max_consecutive: int = 5, dirpath: str | None = None, clamp_logit_scale: bool = True
    ) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.dirpath = dirpath
        self.clamp_logit_scale = clamp_logit_scale
        self.total = 0
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self._skipped = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._skipped = False

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if _grad_scaler(trainer) is not None:
            return  # the scaler detects overflow and skips the step itself
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Under DDP the gradients are already all-reduced here, so every rank takes the same decision. Under
        # FSDP each rank holds only its shard of each gradient (FSDP2: a DTensor's local part): a NaN in one
        # rank's shard must skip the step on every rank, or the shards of one model would part ways.
        finite = grads_are_finite(local_grads([p.grad for p in params]))
        if weights_sharded(trainer):
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            for p in params:
                p.grad = None  # optimizer.step() leaves parameters without a gradient untouched
            self._skipped = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.clamp_logit_scale and hasattr(getattr(pl_module, "model", None), "clamp_logit_scale"):
            pl_module.model.clamp_logit_scale()
        bad = self._skipped
        if not bad and (_grad_scaler(trainer) is not None or not pl_module.automatic_optimization):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            bad = torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all())
        step = trainer.global_step
        if bad:
            self.total += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self.first_bad_step = step
            if trainer.is_global_zero:
                log.warning(
                    "non-finite loss or gradient at step %d: update skipped (%d in a row, %d in total)",
                    step, self.consecutive, self.total,
                )  # fmt: skip
        else:
            self.consecutive = 0
            self.first_bad_step = None
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False, batch_size=1)
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer, step)

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        dirpath = checkpoint_dir(trainer, self.dirpath)
        path = os.path.join(dirpath, f"nonfinite-step{step:07d}.ckpt")
        trainer.save_checkpoint(path)
        raise NonFiniteError(
            f"training diverged: {self.consecutive} consecutive steps ({self.first_bad_step}..{step}) had a "
            f"non-finite loss or gradient. None of them was applied, so the weights and optimizer state in "
            f"{path} are those from before step {self.first_bad_step}. Lower the learning rate or inspect the "
            f"data of these steps, then resume with ckpt_path={path}."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict["total"])
        self.consecutive = int(state_dict["consecutive"])
        self.first_bad_step = state_dict["first_bad_step"]
        if self.consecutive >= self.max_consecutive:
            # The divergence checkpoint (_stop), resumed as its error says: none of that streak was applied
            # and the run goes on with other settings, so a new streak starts; otherwise its first bad step
            # would stop the run at once, counted together with the previous attempt's.
            self.consecutive, self.first_bad_step = 0, None
