"""What a training run reports when it ends: the held-out zero-shot evaluation of the final weights (CLIP's
zero-shot protocol, Radford et al., 2021), the training loss of the last batches, what the data skipped, and
the summary ``clipforge-train`` prints (loss, checkpoints, where the logger wrote)."""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clipforge.loggers import wandb_offline

log = logging.getLogger(__name__)

FINAL_LOSS_WINDOW = 50


class RecentTrainLoss(Callback):
    """The training loss of the last ``window`` batches, each weighted by its samples: what the summary
    calls the final train loss. One batch's loss is noisy, and the last batch of an exact epoch may hold a
    handful of samples (a run once ended on a 2-sample batch at loss 0.0000). Losses stay on the device
    until the end (no host sync per step); non-finite ones (steps the divergence guard skipped) are left
    out. Under ``trainer.accumulate_grad_batches`` each batch counts (Lightning hands callbacks its loss
    divided by the accumulation, undone here). With SigLIP 2 objectives the loss is their weighted sum with
    the contrastive loss, whose own mean (the step output's ``contrastive_loss``) is kept beside it."""

    def __init__(self, window: int = FINAL_LOSS_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._recent: deque[tuple[torch.Tensor, int]] = deque(maxlen=window)  # ([loss, contrastive], n)
        self._contrastive_apart = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        out = outputs if isinstance(outputs, dict) else {"loss": outputs}
        loss, contrastive = out.get("loss"), out.get("contrastive_loss")
        if not (torch.is_tensor(loss) and loss.numel() == 1):
            return
        if pl_module.automatic_optimization:  # Lightning's closure divided the loss by the accumulation
            loss = loss * trainer.accumulate_grad_batches
        self._contrastive_apart = contrastive is not None
        both = torch.stack([loss.detach().float().reshape(()), (loss if contrastive is None else contrastive)
                            .detach().float().reshape(())])  # fmt: skip
        self._recent.append((both, int(batch[0].shape[0])))

    def result(self, trainer: L.Trainer) -> dict[str, float]:
        """``summary/train_loss`` (the weighted mean over all ranks), ``summary/train_loss_batches`` and, with
        objectives, ``summary/train_contrastive_loss``; empty when no step ran. Every rank must call it: under
        DDP the sums are reduced across ranks."""
        device = trainer.strategy.root_device
        losses = (
            torch.stack([v for v, _ in self._recent]) if self._recent else torch.zeros(0, 2, device=device)
        )  # (batches, 2)
        sizes = torch.tensor([n for _, n in self._recent], dtype=torch.float32, device=losses.device)
        weights = sizes * torch.isfinite(losses).all(dim=1)
        weighted = torch.where(weights[:, None] > 0, losses, 0.0) * weights[:, None]
        sums = torch.cat([weighted.sum(dim=0), weights.sum()[None], (weights > 0).sum().float()[None]])
        sums = trainer.strategy.reduce(sums, reduce_op="sum")  # on every rank, none returning before it
        if sums[2] == 0:
            return {}
        out = {
            "summary/train_loss": float(sums[0] / sums[2]),
            "summary/train_loss_batches": float(round(float(sums[3]) / trainer.world_size)),
        }
        if self._contrastive_apart:
            out["summary/train_contrastive_loss"] = float(sums[1] / sums[2])
        return out


def final_zero_shot(
    model: torch.nn.Module, datamodule: Any, trainer: L.Trainer, ema_model: torch.nn.Module | None = None
) -> dict[str, float]:
    """Zero-shot top-1/top-5 on the data module's held-out labelled set, through clipforge.eval; with
    ``ema_model`` (the module's EMA, ``ema=default``) its scores too, as ``final/ema_zeroshot_*``.

    Every rank calls it: the held-out set and the class prompts are split over ranks and reduced.
    """
    from clipforge.callbacks.evaluation import ZeroShotCallback, zeroshot_templates
    from clipforge.sharding import SHARDED_HINT, weights_sharded

    classnames = getattr(datamodule, "zeroshot_classnames", None)
    if classnames and weights_sharded(trainer):
        if trainer.is_global_zero:  # once, not once per rank
            log.warning("no final zero-shot evaluation: %s", SHARDED_HINT)
        return {}
    loader = datamodule.zeroshot_dataloader() if classnames else None
    if loader is None:
        return {}
    from clipforge.eval.zeroshot import zero_shot_eval

    # The zero-shot callback usually evaluated these very weights at the last validation: reuse it.
    done = [cb for cb in trainer.callbacks if isinstance(cb, ZeroShotCallback)]
    done = [cb for cb in done if cb.last_result_step == trainer.global_step]

    def scores(weights: torch.nn.Module, kept: str) -> dict[str, Any]:
        res = next((r for cb in done if "top5" in (r := getattr(cb, kept) or {})), None)
        if res is None:
            device = trainer.strategy.root_device
            res = zero_shot_eval(
                weights.to(device).eval(),
                classnames,
                zeroshot_templates(datamodule),  # None (data.zeroshot.templates null) crashed in list() here
                loader,
                device=device,
                progress=trainer.is_global_zero,
            )
        return res

    res = scores(model, "last_result")
    out = {
        "final/zeroshot_top1": float(res["top1"]),
        "final/zeroshot_top5": float(res["top5"]),
        "final/zeroshot_chance": 1.0 / len(classnames),
        "final/zeroshot_samples": float(res["num_samples"]),
    }
    if ema_model is not None:
        res = scores(ema_model, "last_ema_result")
        out |= {"final/ema_zeroshot_top1": float(res["top1"]), "final/ema_zeroshot_top5": float(res["top5"])}
    return out


def data_skips(datamodule: Any) -> dict[str, dict[str, int]]:
    """What the data skipped, by cause, summed over ranks (every rank calls it): ``train`` over the run, and
    each evaluation split (``val``, ``zeroshot``) of a WebDataset module in its last pass."""
    counts = getattr(datamodule, "skip_counts", None)
    if counts is None:
        return {}
    from clipforge.callbacks.data_skips import total_skip_counts

    splits = ["train", "val", "zeroshot"] if hasattr(datamodule, "zeroshot_urls") else ["train"]
    out = {}
    for split in splits:
        summed = total_skip_counts(counts() if split == "train" else counts(split))
        out[split] = {cause: n for cause, n in summed.items() if n}
    return {split: c for split, c in out.items() if c}


def summarize(
    metrics: dict[str, float],
    trainer: L.Trainer,
    logger: Any,
    skipped: dict[str, dict[str, int]] | None = None,
) -> str:
    lines = ["", "=" * 60, "clipforge run summary", "=" * 60, f"steps:             {trainer.global_step}"]
    for split, counts in (skipped or {}).items():  # bad input is never silent: without a logger, here
        label = "data skipped:" if split == "train" else f"{split} skipped:"
        last = "" if split == "train" else " (its last pass)"
        lines.append(f"{label:<19}" + ", ".join(f"{cause}={n}" for cause, n in counts.items()) + last)
    # With SigLIP 2 objectives the train loss is their weighted sum with the contrastive loss, and val/loss the
    # contrastive loss alone: unlabelled, the two lines read as a val loss far below the train loss
    contrastive = metrics.get("summary/train_contrastive_loss")
    parts = "" if contrastive is None else f": contrastive {contrastive:.4f}, plus the weighted objectives"
    objectives = contrastive is not None or "train/contrastive_loss" in metrics
    if "summary/train_loss" in metrics:
        batches = int(metrics["summary/train_loss_batches"])
        mean = f"mean of the last {batches} batches" if batches > 1 else "its last batch"
        lines.append(f"final train loss:  {metrics['summary/train_loss']:.4f} ({mean}{parts})")
    elif "train/loss" in metrics:
        lines.append(f"final train loss:  {metrics['train/loss']:.4f} (its last batch)")
    if "val/loss" in metrics:
        lines.append(f"held-out val loss: {metrics['val/loss']:.4f}{' (contrastive)' if objectives else ''}")
    if "final/zeroshot_top1" in metrics:
        lines.append(
            f"held-out zero-shot top-1: {100 * metrics['final/zeroshot_top1']:.1f}% "
            f"(chance {100 * metrics['final/zeroshot_chance']:.1f}%, "
            f"{int(metrics['final/zeroshot_samples'])} images), top-5: {100 * metrics['final/zeroshot_top5']:.1f}%"
        )
    if "final/ema_zeroshot_top1" in metrics:
        lines.append(
            f"                   EMA weights: top-1 {100 * metrics['final/ema_zeroshot_top1']:.1f}%, "
            f"top-5 {100 * metrics['final/ema_zeroshot_top5']:.1f}%"
        )
    last = next((p for cb in trainer.checkpoint_callbacks if (p := getattr(cb, "last_model_path", ""))), "")
    # "best" only from a callback that ranks by a metric (the periodic one ranks by step)
    best = next(
        (
            p
            for cb in trainer.checkpoint_callbacks
            if getattr(cb, "monitor", None) not in (None, "step")
            and (p := getattr(cb, "best_model_path", ""))
        ),
        "",
    )
    if last:
        lines.append(f"checkpoint (last): {last}")
    if best:
        lines.append(f"checkpoint (best): {best}")
    if logger:
        run_dir = getattr(getattr(logger, "experiment", None), "dir", None) or getattr(
            logger, "log_dir", None
        )
        if not isinstance(
            run_dir, str | os.PathLike
        ):  # off rank 0, Lightning's dummy run: every name a no-op
            run_dir = None
        wandb = type(logger).__name__ == "WandbLogger"
        if wandb and run_dir and Path(run_dir).name == "files":
            run_dir = str(Path(run_dir).parent)  # wandb's run.dir is <run>/files; `wandb sync` takes <run>
        lines.append(f"logger:            {type(logger).__name__} -> {run_dir}")
        if wandb and wandb_offline(logger):
            lines.append(f"                   (offline; upload later with `wandb sync {run_dir}`)")
    lines.append("=" * 60)
    return "\n".join(lines)
