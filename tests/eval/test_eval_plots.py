from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipforge.eval.plots import confusion_matrix_figure, figure_to_image, save_figure


def test_confusion_figure_and_png(tmp_path):
    conf = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    fig = confusion_matrix_figure(conf, ["cat", "dog", "bird"])
    ax = fig.axes[0]
    assert "6 images, top-1 66.7%" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]
    shown = ax.images[0].get_array()
    assert shown[0].tolist() == [0.5, 0.5, 0.0]  # rows normalised by true-class count
    assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "1", "1", "2"]  # counts in non-empty cells
    path = save_figure(fig, tmp_path / "sub" / "cm.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert figure_to_image(fig).mode == "RGB"


def test_large_confusion_keeps_index_ticks_not_names():
    fig = confusion_matrix_figure(torch.eye(60, dtype=torch.long), [f"class{i}" for i in range(60)])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) < 20 and not any(t.startswith("class") for t in labels)
    assert len(fig.axes[0].texts) == 0  # no per-cell counts either


def test_shape_checks():
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        confusion_matrix_figure(torch.eye(3), ["a", "b"])
