"""Confusion-matrix pictures for zero-shot classification and linear probes of CLIP (Radford et al., 2021).

Rows are true classes, columns predicted ones, each row normalised to sum to 1 (so rare and frequent
classes read alike); the raw counts are written in the cells when the matrix is small enough to
read. Matplotlib runs headless (Agg) and figures are built without pyplot's global state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image

MAX_LABELLED_CLASSES = 50  # above this, tick labels would overlap: leave them out
MAX_ANNOTATED_CLASSES = 20  # above this, counts in the cells are unreadable


def confusion_matrix_figure(
    confusion: torch.Tensor | Sequence[Sequence[int]],
    classnames: Sequence[str],
    *,
    title: str = "zero-shot confusion matrix",
    normalize: bool = True,
) -> Figure:
    """A figure of the ``(C, C)`` confusion matrix (rows = true class)."""
    counts = torch.as_tensor(confusion, dtype=torch.float64)
    c = counts.shape[0]
    if counts.shape != (c, c):
        raise ValueError(f"confusion must be square, got shape {tuple(counts.shape)}")
    if len(classnames) != c:
        raise ValueError(f"{len(classnames)} class names for a {c}x{c} confusion matrix")
    shown = counts / counts.sum(dim=1, keepdim=True).clamp(min=1) if normalize else counts

    size = min(4 + 0.35 * c, 30)
    fig = Figure(figsize=(size + 1.5, size), dpi=100 if c <= 200 else 50)
    ax = fig.add_subplot()
    im = ax.imshow(
        shown.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest"
    )
    fig.colorbar(
        im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count"
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    acc = float(counts.diag().sum()) / total if total else float("nan")
    ax.set_title(f"{title}\n{total} images, top-1 {100 * acc:.1f}%")
    if c <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(c), labels=list(classnames), rotation=90, fontsize=8)
        ax.set_yticks(range(c), labels=list(classnames), fontsize=8)
    if c <= MAX_ANNOTATED_CLASSES:
        for i in range(c):
            for j in range(c):
                if counts[i, j] > 0:
                    color = "white" if shown[i, j] > 0.5 * float(shown.max()) else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def figure_to_image(fig: Figure) -> Image.Image:
    """Render ``fig`` to an RGB PIL image (what loggers such as W&B accept)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
