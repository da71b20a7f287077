"""The faces shared by the CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) losses: one public
signature for both loss functions (:func:`contrastive_loss` checks the settings and works out the batch
layout across ranks once, then hands a :class:`Layout` to the loss body), and the ``nn.Module`` that the
Hydra config (``conf/loss/*.yaml``) instantiates with ``impl``, ``dist_impl`` and ``tile_size``; the model
reads its initial logit scale and bias from the class."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clipforge.distributed import world_info
from clipforge.losses.distributed import check_dist_impl, gather_sizes
from clipforge.losses.tiled import autocast_off, check_impl, use_tiled


@dataclass(frozen=True)
class Layout:
    """How one loss call is laid out: the requested implementations, this rank and the local batch size of
    every rank (``[b]`` on one process)."""

    impl: str
    dist_impl: str
    tile_size: int
    rank: int
    sizes: list[int]
    group: dist.ProcessGroup | None = None

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offset(self) -> int:
        """Index of this rank's first pair in the global batch."""
        return sum(self.sizes[: self.rank])

    @property
    def coef(self) -> float:
        """``W / B``: this rank's loss is its share of the full-batch loss times ``W`` (see the loss modules)."""
        return self.world / sum(self.sizes)

    def tiled(self, rows: int, cols: int) -> bool:
        return use_tiled(self.impl, rows, cols, self.tile_size)


def check_pairs(image_features: Tensor, text_features: Tensor) -> None:
    """Both ``(b, d)`` with the same ``b`` and ``d``: row ``i`` of each is one pair. Unequal rows would
    otherwise be scored silently (the tiled CLIP and dense SigLIP losses take the extra rows as negatives
    without a positive) or, across ranks, give every rank a different layout."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image and text features must both be (batch, dim) with the same shape, one pair per row; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def as_scalar(value: Tensor | float, name: str, like: Tensor) -> Tensor:
    """``logit_scale`` or ``logit_bias`` as a 0-dim tensor, so that every implementation returns a 0-dim
    loss and gradients of the caller's shape: a one-element tensor (``(1,)``, as FSDP2 and transformers'
    SigLIP store them) is reshaped, differentiably; a number becomes a tensor beside ``like``."""
    if not isinstance(value, Tensor):
        return torch.tensor(
            float(value), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device
        )
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one number, got shape {tuple(value.shape)}")
    return value.reshape(())


LossBody = Callable[[Tensor, Tensor, Tensor, "Tensor | None", Layout], Tensor]


def contrastive_loss(body: LossBody) -> Callable[..., Tensor]:
    """The public loss function around ``body(x, y, logit_scale, logit_bias, layout)``, with the signature
    ``(image_features, text_features, logit_scale, logit_bias=None, *, impl="auto", dist_impl="ring",
    tile_size=8192, group=None, local=False)`` and ``body``'s name and docstring. ``local=True``: the loss
    of this rank's batch alone, as one process computes it, with no collective (validation, where every
    rank scores its own batches)."""

    def loss(
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        impl: str = "auto",
        dist_impl: str = "ring",
        tile_size: int = 8192,
        group: dist.ProcessGroup | None = None,
        local: bool = False,
    ) -> Tensor:
        check_impl(impl, tile_size)
        check_dist_impl(dist_impl)
        check_pairs(image_features, text_features)
        logit_scale = as_scalar(logit_scale, "logit_scale", image_features)
        if logit_bias is not None:
            logit_bias = as_scalar(logit_bias, "logit_bias", image_features)
        rank, world = world_info(group, enabled=not local)
        b = image_features.shape[0]
        sizes = gather_sizes(b, image_features.device, group) if world > 1 else [b]
        layout = Layout(impl, dist_impl, tile_size, rank, sizes, group)
        # Every implementation computes in the features' dtype (float32 under bf16-mixed, F.normalize's), as
        # the tiled and ring kernels must (tiled.without_autocast): otherwise the dense path alone would
        # take bf16 logits under autocast and return a bf16 SigLIP loss, so the loss a run computes and logs
        # would change with the batch size (impl=auto) and between trainer=gpu and trainer=ddp.
        with autocast_off(image_features):
            return body(image_features, text_features, logit_scale, logit_bias, layout)

    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(loss, attr, getattr(body, attr))
    return loss


def check_takes_local(loss: Callable[..., Tensor]) -> None:
    """Raise a ``TypeError`` naming what to add when ``loss`` cannot be called with ``local=True`` (a user's
    own loss module written before validation was split over ranks); one whose signature cannot be read
    passes, and the call itself will say."""
    try:
        # a module's own __call__ takes (*args, **kwargs): its forward says what it accepts
        params = inspect.signature(loss.forward if isinstance(loss, nn.Module) else loss).parameters
    except (TypeError, ValueError):
        return
    if "local" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    name = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", repr(loss))
    raise TypeError(
        f"the loss {name} takes no `local` argument: under DDP each rank validates only its own batches "
        "and calls the loss with local=True, meaning this rank's batch alone with no collective (the ranks "
        "may take different numbers of real batches). Add `local: bool = False` to its forward and skip "
        "any all-gather when it is true, or subclass clipforge.losses.base.ContrastiveLoss"
    )


class ContrastiveLoss(nn.Module):
    """Calls ``loss_fn(image_features, text_features, logit_scale, logit_bias, impl=..., dist_impl=...,
    tile_size=..., local=...)``; subclasses set ``loss_fn`` and the initial scale and bias."""

    loss_fn: ClassVar[Callable[..., Tensor]]
    init_logit_scale: float
    init_logit_bias: float | None

    def __init__(self, impl: str = "auto", dist_impl: str = "ring", tile_size: int = 8192) -> None:
        super().__init__()
        check_impl(impl, tile_size)
        check_dist_impl(dist_impl)
        self.impl, self.dist_impl, self.tile_size = impl, dist_impl, tile_size

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        local: bool = False,
    ) -> Tensor:
        settings = {"impl": self.impl, "dist_impl": self.dist_impl, "tile_size": self.tile_size}
        return type(self).loss_fn(
            image_features, text_features, logit_scale, logit_bias, local=local, **settings
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, dist_impl={self.dist_impl!r}, tile_size={self.tile_size}"
