"""A picture of the batch's image-text logit matrix ``scale * x @ y.T + bias`` (CLIP, Radford et al.,
2021; SigLIP, Zhai et al., 2023): a bright diagonal on a dark field means matching pairs score above the
negatives. Logged as ``train/similarity`` to loggers that take images (W&B: ``log_image``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from clipforge.callbacks.schedule import EveryNSteps, off_the_clock


def similarity_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    max_samples: int = 32,
) -> torch.Tensor:
    """(n, n) logits of the first ``n = min(B, max_samples)`` normalised pairs, as float32 on the CPU."""
    n = min(len(image_features), max_samples)
    x, y = image_features[:n].float(), text_features[:n].float()
    logits = logit_scale.float() * x @ y.T  # (n, n): row i = image i against every text
    if logit_bias is not None:
        logits = logits + logit_bias.float()
    return logits.cpu()


def render_heatmap(logits: torch.Tensor, title: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB picture of ``logits`` with a colour bar (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=100)
    try:
        im = ax.imshow(logits.numpy(), cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="logit")
        ax.set_xlabel("text")
        ax.set_ylabel("image")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)


class SimilarityHeatmap(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps, draw the logit matrix of the first ``max_samples`` pairs
    of the current batch (global rank 0's), from the features the module's ``training_step`` returns."""

    def __init__(
        self, every_n_steps: int = 500, max_samples: int = 32, key: str = "train/similarity"
    ) -> None:
        super().__init__(every_n_steps)
        self.max_samples, self.key = max_samples, key

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or "image_features" not in outputs or not self.due(trainer):
            return
        step = self.logger_step(trainer)  # the row of this batch's train/loss, whose forward made the logits
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_image")]
        if not loggers:
            return
        with off_the_clock(trainer):
            logits = similarity_logits(
                outputs["image_features"],
                outputs["text_features"],
                outputs["logit_scale"],
                outputs.get("logit_bias"),
                self.max_samples,
            )
            picture = render_heatmap(logits, f"image-text logits, step {step}")
            for lg in loggers:
                lg.log_image(key=self.key, images=[picture], step=step)
