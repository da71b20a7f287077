"""The ``nn.Module`` face shared by the CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) losses:
the Hydra config (``conf/loss/*.yaml``) instantiates a subclass with ``impl``, ``dist_impl`` and
``tile_size``, and the model reads its initial logit scale and bias from the class."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from clipforge.losses.distributed import check_dist_impl
from clipforge.losses.tiled import check_impl


class ContrastiveLoss(nn.Module):
    """Calls ``loss_fn(image_features, text_features, logit_scale, logit_bias, impl=..., dist_impl=...,
    tile_size=...)``; subclasses set ``loss_fn`` and the initial scale and bias."""

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
    ) -> Tensor:
        return type(self).loss_fn(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            impl=self.impl,
            dist_impl=self.dist_impl,
            tile_size=self.tile_size,
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, dist_impl={self.dist_impl!r}, tile_size={self.tile_size}"
