"""What the image tower knows *where*: the localisation measures of SigLIP 2 (Tschannen et al., 2025) on the
synthetic set, whose generator knows every shape's pixels and box.

* **Dense probe** (the frozen-feature segmentation probes of SigLIP 2, Sec. 4, and TIPS, Maninis et al.,
  2024): a linear classifier on the frozen patch tokens predicts, for every patch, which shape covers it
  (at least half of the patch's pixels), or background; scored by mean intersection-over-union over the
  classes on held-out images.
* **Referring-box accuracy** (LocCa, Wan et al., 2024): the decoder reads the referring expression of the
  image's shape and greedily writes a box; correct when its IoU with the true box is at least 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.eval.captioning import decode


def patch_targets(coverage: np.ndarray, label: int, patch_size: int, threshold: float = 0.5) -> np.ndarray:
    """(g * g,) class per patch, row-major: ``label + 1`` where the shape covers at least ``threshold`` of
    the patch, 0 (background) elsewhere. ``coverage``: (H, W) covered fraction of each pixel."""
    h, w = coverage.shape
    g_h, g_w = h // patch_size, w // patch_size
    per_patch = coverage[: g_h * patch_size, : g_w * patch_size].reshape(g_h, patch_size, g_w, patch_size)
    covered = per_patch.mean(axis=(1, 3)) >= threshold  # (g_h, g_w)
    return np.where(covered, label + 1, 0).reshape(-1)


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B, N, D) un-pooled patch tokens of the image tower after its final norm (prefix tokens dropped)."""
    visual = model.visual
    out = []
    for start in range(0, images.shape[0], batch_size):
        tokens = visual.forward_features(images[start : start + batch_size])  # (b, T, D)
        out.append(tokens[:, visual.num_prefix_tokens :].float())
    return torch.cat(out)


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4, steps: int = 200
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic), on standardised features."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes).double()
    xd, yd = x.double(), y
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(xd), yd) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Mean IoU over the classes present in ``target`` or ``pred``, and the IoU of each class (NaN: absent)."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = int((p | t).sum())
        ious.append(float((p & t).sum()) / union if union else float("nan"))
    present = [v for v in ious if not np.isnan(v)]
    return (sum(present) / len(present) if present else float("nan")), ious


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both by the train split's mean and std, in place: the probe's features are its own, and a
    standardised copy sat beside them (the raw features of both splits) through the whole fit."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return train.sub_(mean).div_(std), test.sub_(mean).div_(std)


def dense_probe(
    model: nn.Module,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    num_classes: int,
) -> dict[str, Any]:
    """Fit the per-patch linear probe on ``train`` = (images (B, 3, H, W), patch targets (B, N)) and score
    ``test``: ``{"miou", "per_class_iou", "patch_accuracy"}``."""
    model = model.eval()
    # (B * N, D) each: patch_features' own tensors, no copy is kept
    x_tr, x_te = _standardise(*(patch_features(model, images).flatten(0, 1) for images, _ in (train, test)))
    y_tr, y_te = (torch.as_tensor(np.asarray(t)).reshape(-1).long() for _, t in (train, test))
    head = fit_linear(x_tr, y_tr, num_classes)
    with torch.no_grad():
        pred = head(x_te.double()).argmax(dim=-1)
    miou, per_class = mean_iou(pred, y_te, num_classes)
    return {"miou": miou, "per_class_iou": per_class, "patch_accuracy": float((pred == y_te).float().mean())}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def referring_box_accuracy(
    model: nn.Module,
    decoder: nn.Module,
    images: torch.Tensor,
    expressions: Sequence[str],
    boxes: Sequence[Sequence[float]],
    threshold: float = 0.5,
    batch_size: int = 256,
) -> dict[str, float]:
    """Greedy box for each image from its referring expression; ``{"accuracy": IoU >= threshold share,
    "mean_iou"}``. Images that share an expression are decoded together (one prompt per batch),
    ``batch_size`` at a time."""
    ious = [0.0] * len(expressions)
    for ref in sorted(set(expressions)):
        same = [i for i, e in enumerate(expressions) if e == ref]
        for idx in (same[s : s + batch_size] for s in range(0, len(same), batch_size)):
            predicted = decode(model.eval(), decoder.eval(), images[idx], task="box", ref=ref)
            for i, pred in zip(idx, predicted):
                ious[i] = box_iou(pred, boxes[i])
    return {
        "accuracy": sum(v >= threshold for v in ious) / len(ious),
        "mean_iou": sum(ious) / len(ious),
    }
