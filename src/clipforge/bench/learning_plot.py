"""The learning benchmark's table as a picture: held-out zero-shot top-1 (CLIP's protocol, Radford et al.,
2021) of open_clip's trainer and clipforge, CLIP and SigLIP losses, one panel a data set. A bar is the mean
over seeds, a dot one seed, the dashed line chance. Matplotlib runs headless (Agg), without pyplot's state.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from clipforge.bench.learning import RunResult

COLOURS = {"open_clip": "#8c8c8c", "clipforge": "#1f77b4"}  # variants take the colours after these


def learning_figure(results: Sequence[RunResult], chance: Mapping[str, float] | None = None) -> Figure:
    """One panel per data set (sorted), a group of bars per loss, a bar per trainer or variant."""
    names = sorted({_name(r) for r in results}, key=lambda n: (n not in COLOURS, n != "open_clip", n))
    losses = sorted({r.loss for r in results})
    datasets = sorted({r.data for r in results})
    palette = ["#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#17becf"]
    colours = {
        **COLOURS,
        **{n: palette[i % len(palette)] for i, n in enumerate(n for n in names if n not in COLOURS)},
    }
    fig = Figure(figsize=(1.5 + 1.6 * len(losses) * len(names) ** 0.5 * len(datasets), 4.2), dpi=110)
    width = 0.8 / len(names)
    for i, data in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        for j, name in enumerate(names):
            for k, loss in enumerate(losses):
                top1 = [100 * r.top1 for r in results if (r.data, _name(r), r.loss) == (data, name, loss)]
                if not top1:
                    continue
                x = k - 0.4 + width * (j + 0.5)
                ax.bar(
                    x, statistics.mean(top1), width * 0.9, color=colours[name], label=name if k == 0 else None
                )
                ax.scatter([x] * len(top1), top1, s=12, color="black", zorder=3)
        if chance and data in chance:
            ax.axhline(100 * chance[data], color="black", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xticks(range(len(losses)), [loss.upper() if loss == "clip" else "SigLIP" for loss in losses])
        ax.set_ylim(0, 100)
        ax.set_ylabel("held-out zero-shot top-1 (%)")
        ax.set_title(data)
        ax.grid(axis="y", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles, strict=True))  # one entry a name, though several losses drew it
        ax.legend(seen.values(), seen.keys(), fontsize=8, loc="upper right")
    fig.suptitle("learning parity: bar = mean over seeds, dot = one seed")
    fig.tight_layout()
    return fig


def _name(r: RunResult) -> str:
    return r.trainer + (f" ({r.variant})" if r.variant else "")
