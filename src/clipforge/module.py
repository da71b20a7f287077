"""The LightningModule that pretrains a two-tower model with a contrastive loss: CLIP's softmax loss
(Radford et al., 2021) or SigLIP's pairwise sigmoid loss (Zhai et al., 2023).

It receives everything built (model, loss, optimizer and scheduler partials) and owns only the step:
embed both towers, compute the loss, log, clamp the temperature after each optimizer step. With
``accum_freq > 1`` each batch is split into that many micro-batches and the step uses feature-cache
accumulation (GradCache, Gao et al., 2021; :mod:`clipforge.accumulate`): the loss and its gradient are
those of the whole batch, negatives included, at the activation memory of one micro-batch. That needs
several backward passes per step, so it runs under Lightning's manual optimization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.accumulate import CachedStep, feature_cache_backward
from clipforge.callbacks.schedule import logging_step
from clipforge.losses import logit_stats
from clipforge.models.clip import CLIP
from clipforge.optim import param_groups

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


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
    ) -> None:
        super().__init__()
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
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
        decay = {id(p) for p in param_groups(model, 1.0)[0]["params"]}
        self._decay_names = {name for name, p in model.named_parameters() if id(p) in decay}

    def forward(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor | None]:
        return self.model(images, tokens)

    # -- the pieces of CLIP.forward, kept apart so the raw feature norms can be logged -------------------
    def embed(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised image and text embeddings, each (B, D)."""
        return self.model.encode_image(images), self.model.encode_text(tokens)

    def logit_scale_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The exponentiated, clamped scale and the bias, as ``CLIP.forward`` returns them."""
        return self.model.logit_scale.exp().clamp(max=self.model.max_logit_scale), self.model.logit_bias

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
        self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor | None
    ) -> Tensor:
        return self.loss(
            F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1), logit_scale, logit_bias
        )

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        images, tokens = batch[0], batch[1]
        lr = self.optimizers().param_groups[0]["lr"]  # this step's, read before a manual scheduler step
        if self.automatic_optimization:
            img, txt, scale, bias = self.embed_all(images, tokens)
            loss = self.contrastive_loss(img, txt, scale, bias)
            step = CachedStep(loss.detach(), img.detach(), txt.detach(), scale.detach(), _detach(bias))
        else:
            step = self._feature_cache_step(images, tokens)
            loss = step.loss
        return {"loss": loss, **self._log_train(step, lr, batch_size=images.shape[0])}

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
        self.model.clamp_logit_scale()
        return step

    def _log_train(self, step: CachedStep, lr: float, batch_size: int) -> dict[str, Tensor | None]:
        """Log the step (tensors only: no host sync here) and return the normalised features for callbacks."""
        log = {"batch_size": batch_size}
        self.log("train/loss", step.loss, prog_bar=True, **log)
        self.log("train/logit_scale", step.logit_scale, **log)
        if step.logit_bias is not None:
            self.log("train/logit_bias", step.logit_bias, **log)
        self.log("train/lr", lr, **log)
        img = F.normalize(step.image_features.float(), dim=-1)
        txt = F.normalize(step.text_features.float(), dim=-1)
        if logging_step(self.trainer):
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
        # Under automatic optimization Lightning clips next, through configure_gradient_clipping.
        if not self.automatic_optimization and self.grad_clip_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm"
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val is None:  # no Trainer(gradient_clip_val): the module's own setting
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_logit_scale()

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
        if not self.automatic_optimization and ("FSDP" in strategy or "ModelParallel" in strategy):
            raise ValueError(self._accum_refusal(strategy))

    def _accum_refusal(self, strategy: str) -> str:
        # FSDP reshards after each backward; accumulating over several of them is not implemented here.
        return f"accum_freq={self.accum_freq} needs DDP or one device, not {strategy}"

    # -- evaluation -------------------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.contrastive_loss(*self.embed_all(batch[0], batch[1]))
        self.log("val/loss", loss, batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # The factory is a partial (Hydra _partial_: true) whose weight_decay we route to the decay group.
        weight_decay = dict(getattr(self.optimizer_factory, "keywords", {})).get("weight_decay", 0.0)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if _unwrapped_name(name) in self._decay_names else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clipforge_config"] = self.config


def _detach(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None else None


def _float(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None else None


def _unwrapped_name(name: str) -> str:
    """A parameter's name without the FSDP / activation-checkpointing wrapper segments."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
