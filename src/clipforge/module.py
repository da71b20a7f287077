"""The LightningModule that pretrains a two-tower model with a contrastive loss: CLIP's softmax loss
(Radford et al., 2021) or SigLIP's pairwise sigmoid loss (Zhai et al., 2023).

It receives everything built (model, loss, optimizer and scheduler partials) and owns only the step:
embed both towers, compute the loss, log, clamp the temperature after each optimizer step. With
``accum_freq > 1`` each batch is split into that many micro-batches and the step uses feature-cache
accumulation (GradCache, Gao et al., 2021; :mod:`clipforge.accumulate`): the loss and its gradient are
those of the whole batch, negatives included, at the activation memory of one micro-batch. That needs
several backward passes per step, so it runs under Lightning's manual optimization.

Optional, all off by default (then the step below is exactly the contrastive one): an EMA of the weights
(``ema``, :mod:`clipforge.ema`) updated after every optimizer step, and the auxiliary objectives of SigLIP 2
(Tschannen et al., 2025; ``objectives``, :mod:`clipforge.losses.objective`): LocCa's decoder loss and the
SILC / TIPS distillation losses against the EMA teacher, each added with its weight once its start fraction
of training is reached.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from clipforge.accumulate import CachedStep, carry_step_progress, feature_cache_backward
from clipforge.callbacks.schedule import logging_step
from clipforge.checkpoint import CONFIG_KEY, LOGGER_VERSION_KEY, WANDB_RUN_KEY
from clipforge.distributed import all_reduce_sum, is_padding, world_info
from clipforge.ema import ModelEMA, build_ema
from clipforge.loggers import csv_version, wandb_run_id
from clipforge.losses import logit_stats
from clipforge.losses.base import check_takes_local
from clipforge.losses.objective import Objective, ObjectiveBatch, Teacher
from clipforge.models.clip import CLIP
from clipforge.optim import apply_settings, decayed_names, group_settings, split_by_decay

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
EMAFactory = Callable[[dict[str, nn.Module]], ModelEMA]

log = logging.getLogger(__name__)


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        model: CLIP,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        config: dict[str, Any] | None = None,
        accum_freq: int = 1,
        grad_clip_norm: float | None = 1.0,
        objectives: Mapping[str, Objective] | None = None,
        ema: EMAFactory | None = None,
        decay_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if accum_freq < 1:
            raise ValueError(f"module.accum_freq must be >= 1, got {accum_freq}")
        if grad_clip_norm is not None and grad_clip_norm < 0:
            # torch would scale the gradients by a negative factor: ascent, silently
            raise ValueError(
                f"module.grad_clip_norm must be >= 0 (0 or null: no clipping), got {grad_clip_norm}"
            )
        if objectives and accum_freq > 1:
            raise ValueError(
                "the SigLIP 2 objectives need accum_freq=1 (feature caching covers the contrastive loss only)"
            )
        teacherless = [name for name, o in (objectives or {}).items() if o.needs_teacher and ema is None]
        if teacherless:
            raise ValueError(
                f"objectives {teacherless} distil from the EMA teacher: configure ema (ema=default)"
            )
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # The resolved Hydra config travels inside every checkpoint so it can be rebuilt later
        # (clipforge.checkpoint.load_model); modules themselves are never pickled.
        self.config = config or {}
        self.accum_freq = accum_freq
        # Clipping lives here, not in Trainer(gradient_clip_val), because Lightning refuses the trainer's
        # clipping under manual optimization; one setting then serves both modes.
        self.grad_clip_norm = grad_clip_norm
        self.automatic_optimization = accum_freq == 1
        # Which parameters take weight decay, decided by name on the unwrapped model: under FSDP
        # (use_orig_params) they are flat 1-D shards by the time configure_optimizers runs.
        # Present only when configured, so a default run's state_dict and checkpoints keep their keys.
        for name, objective in (objectives or {}).items():
            try:
                objective.check_model(model)
            except ValueError as e:
                raise ValueError(f"objectives.{name}: {e}") from None
        self.objectives = nn.ModuleDict(dict(objectives)) if objectives else None
        self._decay_names = decayed_names(model, self.objectives, decay_embeddings)
        self.ema = build_ema(ema, self._ema_sources(), objectives)
        self._inactive: list[str] = []  # objectives not yet started at this step
        self._total_steps: int | None = None
        self._configured: list[dict[str, Any]] | None = None  # the optimizer's group settings as built
        self._val_sums: Tensor | None = None  # [sum of loss x pairs, pairs] of this rank's validation

    def forward(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor | None]:
        return self.model(images, tokens)

    # -- the pieces of CLIP.forward, kept apart so the raw feature norms can be logged -------------------
    def embed(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised image and text embeddings, each (B, D)."""
        return self.model.encode_image(images), self.model.encode_text(tokens)

    def logit_scale_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The exponentiated, clamped scale and the bias, as ``CLIP.forward`` returns them."""
        return self.model.scale_and_bias()

    def embed_all(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``embed`` and ``logit_scale_and_bias`` in one call of the model's forward (the same operations in
        the same order): under FSDP2 the root's weights (embeddings, projections, scale) exist only inside
        that call. Scale and bias come back 0-dim even where FSDP2 stores them as ``(1,)``."""
        out = self.model(images, tokens, normalize=False)
        bias = out["logit_bias"]
        return (
            out["image_features"],
            out["text_features"],
            out["logit_scale"].reshape(()),
            bias.reshape(()) if bias is not None else None,
        )

    def contrastive_loss(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        local: bool = False,
    ) -> Tensor:
        """The loss over the global batch, or with ``local`` over this rank's batch alone."""
        img, txt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        return self.loss(img, txt, logit_scale, logit_bias, **({"local": True} if local else {}))

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        images, tokens = batch[0], batch[1]
        lr = self.optimizers().param_groups[0]["lr"]  # this step's, read before a manual scheduler step
        if self.objectives is not None:
            return self._step_with_objectives(batch, lr)
        if self.automatic_optimization:
            img, txt, scale, bias = self.embed_all(images, tokens)
            loss = self.contrastive_loss(img, txt, scale, bias)
            step = CachedStep(loss.detach(), img.detach(), txt.detach(), scale.detach(), _detach(bias))
        else:
            step = self._feature_cache_step(images, tokens)
            loss = step.loss
        return {"loss": loss, **self._log_train(step, lr, batch_size=images.shape[0])}

    def _step_with_objectives(self, batch: tuple, lr: float) -> dict[str, Any]:
        """The contrastive loss plus every started objective, each times its weight. The image tower runs
        once on the batch: its un-pooled tokens feed the decoder, its pooled readout the contrastive loss."""
        images, tokens = batch[0], batch[1]
        B = images.shape[0]
        visual = self.model.visual
        image_tokens = visual.forward_features(images)  # (B, T, D)
        img, txt = visual.forward_head(image_tokens), self.model.encode_text(tokens)
        scale, bias = self.logit_scale_and_bias()
        contrastive = self.contrastive_loss(img, txt, scale, bias)
        self.log("train/contrastive_loss", contrastive.detach(), batch_size=B, sync_dist=True)
        inputs = ObjectiveBatch(images, tokens, image_tokens, extras=_batch_extras(batch))
        loss, step, total = contrastive, self.trainer.global_step, self.total_steps()
        self._inactive = []
        for name, objective in self.objectives.items():
            if not objective.active(step, total):
                # Every parameter still joins DDP's gradient reduction (with zeros); on_before_optimizer_step
                # then drops these gradients, so AdamW neither decays nor moves the objective before it starts.
                self._inactive.append(name)
                loss = loss + 0.0 * sum(p.sum() for p in objective.parameters())
                continue
            teacher = (
                Teacher(self.ema["model"], self.ema["objectives"][name]) if objective.needs_teacher else None
            )
            value = objective(inputs, self.model, teacher)
            self.log(f"train/{name}_loss", value.detach(), batch_size=B, sync_dist=True)
            loss = loss + objective.weight * value
        cached = CachedStep(loss.detach(), img.detach(), txt.detach(), scale.detach(), _detach(bias))
        out = {"loss": loss, "contrastive_loss": contrastive.detach()}  # the summary's mean keeps it apart
        return out | self._log_train(cached, lr, batch_size=B)

    def _ema_sources(self) -> dict[str, nn.Module]:
        """What the EMA averages: the two-tower model and, when configured, the objectives (their heads are
        the teacher's heads)."""
        sources: dict[str, nn.Module] = {"model": self.model}
        if self.objectives is not None:
            sources["objectives"] = self.objectives
        return sources

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (what ``start_frac``s are fractions of)."""
        if self._total_steps is None:
            self._total_steps = int(self.trainer.estimated_stepping_batches)
        return self._total_steps

    def _after_optimizer_step(self) -> None:
        self.model.clamp_logit_scale()
        if self.ema is not None:
            self.ema.update(self._ema_sources(), self.total_steps())

    def _feature_cache_step(self, images: Tensor, tokens: Tensor) -> CachedStep:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        # Every micro-batch but the last backpropagates without DDP's all-reduce; the last one reduces the
        # accumulated gradients once. Single-device strategies have no such context.
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        step = feature_cache_backward(
            self.embed,
            self.logit_scale_and_bias,
            self.contrastive_loss,
            images,
            tokens,
            self.accum_freq,
            backward=self.manual_backward,
            no_sync=no_sync,
        )
        opt.step()  # clipping happens in on_before_optimizer_step, after any mixed-precision unscaling
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self._after_optimizer_step()
        return step

    def _log_train(self, step: CachedStep, lr: float, batch_size: int) -> dict[str, Tensor | None]:
        """Log the step (tensors only: no host sync here) and return the normalised features for callbacks."""
        log = {"batch_size": batch_size}
        # Under DDP a rank's loss is its share of the full-batch loss times W (clipforge.losses): the mean
        # over ranks is the batch's loss, where rank 0's value alone is not (one small all-reduce per step).
        self.log("train/loss", step.loss, prog_bar=True, sync_dist=True, **log)
        self.log("train/logit_scale", step.logit_scale, **log)
        if step.logit_bias is not None:
            self.log("train/logit_bias", step.logit_bias, **log)
        self.log("train/lr", lr, **log)
        img = F.normalize(step.image_features.float(), dim=-1)
        txt = F.normalize(step.text_features.float(), dim=-1)
        if logging_step(self.trainer, step_done=not self.automatic_optimization):
            # On this rank's local batch; the B x B logit statistics cost one small matmul per log step.
            stats = logit_stats(img, txt, step.logit_scale.float(), _float(step.logit_bias))
            self.log_dict({f"train/{k}": v for k, v in stats.items()}, **log)
            self.log("train/image_feature_norm", step.image_features.float().norm(dim=-1).mean(), **log)
            self.log("train/text_feature_norm", step.text_features.float().norm(dim=-1).mean(), **log)
        return {
            "image_features": img,
            "text_features": txt,
            "logit_scale": step.logit_scale,
            "logit_bias": step.logit_bias,
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name in self._inactive:  # not started: no update, no weight decay, no AdamW moments
            for p in self.objectives[name].parameters():
                p.grad = None
        # Under automatic optimization Lightning clips next, through configure_gradient_clipping.
        if not self.automatic_optimization and self.grad_clip_norm:
            self._clip(optimizer, self.grad_clip_norm, "norm")

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val is None:  # no Trainer(gradient_clip_val): the module's own setting
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip_norm, "norm"
        self._clip(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _clip(self, optimizer: torch.optim.Optimizer, value: float | None, algorithm: str | None) -> None:
        """Lightning's clipping, also for an optimizer that unscales inside its step (fused AdamW, the
        default) under mixed precision: Lightning refuses it there, so every ``bf16-mixed`` run failed at
        its first step. Without a grad scaler (bf16) the gradients are already true; with one (fp16) they
        are unscaled here first, and ``GradScaler.step`` then knows they are."""
        plugin = self.trainer.precision_plugin
        if (
            value
            and isinstance(plugin, MixedPrecision)
            and getattr(optimizer, "_step_supports_amp_scaling", 0)
        ):
            if plugin.scaler is not None:
                plugin.scaler.unscale_(optimizer)
            Precision.clip_gradients(plugin, optimizer, value, GradClipAlgorithmType(algorithm or "norm"))
        else:
            self.clip_gradients(optimizer, value, algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._after_optimizer_step()

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``trainer/strategy=fsdp2``): FSDP2, ``fully_shard``
        per transformer block then the root, over all ranks (:mod:`clipforge.sharding`). Under DDP, FSDP1
        and one device: nothing, the model stays as it was built."""
        from clipforge.sharding import apply_fsdp2, is_fsdp2, is_model_parallel, world_mesh

        if self._trainer is None or not is_model_parallel(self.trainer.strategy) or is_fsdp2(self.model):
            return
        if not self.automatic_optimization:
            raise ValueError(self._accum_refusal(type(self.trainer.strategy).__name__))
        apply_fsdp2(self.model, world_mesh(self.trainer.strategy.root_device.type))

    def on_fit_start(self) -> None:
        strategy = type(self.trainer.strategy).__name__
        sharded = "FSDP" in strategy or "ModelParallel" in strategy
        if not self.automatic_optimization and sharded:
            raise ValueError(self._accum_refusal(strategy))
        if (self.ema is not None or self.objectives is not None) and sharded:
            # the EMA copy and the teacher would need the same sharding as the model: not implemented here
            raise ValueError(f"ema and the SigLIP 2 objectives need DDP or one device, not {strategy}")

    def _accum_refusal(self, strategy: str) -> str:
        # FSDP reshards after each backward; accumulating over several of them is not implemented here.
        return f"accum_freq={self.accum_freq} needs DDP or one device, not {strategy}"

    # -- evaluation -------------------------------------------------------------------------------------
    # Under DDP each rank validates its own block of the held-out batches (WebDataModule.val_dataloader):
    # every batch is scored alone, as one process scores it, and val/loss is the sum of loss x pairs over
    # all ranks' batches divided by the sum of pairs (a mean of per-rank means would weigh unequal shares
    # wrongly), so it does not depend on the number of ranks.
    def on_validation_epoch_start(self) -> None:
        self._val_sums = None
        if world_info()[1] > 1:  # before any batch: a custom loss without `local` is named, not a TypeError
            check_takes_local(self.loss)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        embeds = self.embed_all(batch[0], batch[1])  # on padding steps too: a forward may be a collective
        if is_padding(batch):
            return None
        loss = self.contrastive_loss(*embeds, local=world_info()[1] > 1)
        n = loss.new_tensor(batch[0].shape[0], dtype=self._sum_dtype)  # no host sync per step
        pairs = torch.stack([loss.detach().to(n.dtype) * n, n])
        self._val_sums = pairs if self._val_sums is None else self._val_sums + pairs
        return loss

    @property
    def _sum_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64

    def on_validation_epoch_end(self) -> None:
        local = self._val_sums if self._val_sums is not None else torch.zeros(2, dtype=self._sum_dtype)
        total, pairs = all_reduce_sum(local.to(self.device)).tolist()
        if pairs > 0:
            self.log("val/loss", total / pairs, batch_size=int(pairs), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        # The factory is a partial (Hydra _partial_: true) whose weight_decay we route to the decay group.
        weight_decay = dict(getattr(self.optimizer_factory, "keywords", {})).get("weight_decay", 0.0)
        named = list(self.model.named_parameters())
        if self.objectives is not None:
            named += list(self.objectives.named_parameters(prefix="objectives"))
        optimizer = self.optimizer_factory(split_by_decay(named, self._decay_names, weight_decay))
        if self.scheduler_factory is None:
            self._configured = group_settings(optimizer)
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        self._configured = group_settings(optimizer)  # with the scheduler's initial_lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resume loads the checkpoint's optimizer settings (lr, weight decay, betas) over the configured
        # ones; the config wins, as it does for max_steps, so "lower the learning rate and resume" works.
        if self._configured is None:
            return
        changed = apply_settings(self.trainer.optimizers[0], self.lr_schedulers(), self._configured)
        if changed and self.trainer.is_global_zero:
            log.warning(
                "resuming with optimizer settings other than the checkpoint's: %s", "; ".join(changed)
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        carry_step_progress(checkpoint, self.automatic_optimization)  # accum_freq changed across 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config  # clipforge.checkpoint's layout: the config travels along
        checkpoint[WANDB_RUN_KEY] = wandb_run_id(self.logger)  # a resume continues this W&B run
        checkpoint[LOGGER_VERSION_KEY] = csv_version(self.logger)  # and this CSV file


def _batch_extras(batch: tuple) -> dict[str, Any]:
    """Extra targets the data module may add to a batch as a mapping after (images, tokens) (e.g. boxes
    for the decoder tasks, see clipforge.losses.locca); empty when there is none."""
    return next((dict(x) for x in batch[2:] if isinstance(x, Mapping)), {})


def _detach(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None else None


def _float(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None else None
