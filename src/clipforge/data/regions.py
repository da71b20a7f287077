"""The regions stage (opt-in, ``data.stream.regions=true``): box targets for the decoder tasks of LocCa
(Wan et al., 2024, "LocCa: Visual Pretraining with Location-aware Captioners"), referring expression ->
box and box -> grounded caption, as SigLIP 2 trains them (Tschannen et al., 2025).

Where boxes come from: each sample's json holds either ``box`` ``[x0, y0, x1, y1]`` with its
``referring_expression`` (the synthetic generator, :mod:`clipforge.data.synthetic`), or ``boxes``
``[[x0, y0, x1, y1], ...]`` with optional ``phrases`` (img2dataset JSON, which ``clipforge-shards`` keeps),
coordinates normalised by the image's width and height. One box per sample is picked with a uniform of
the sample's own crop draws, so the choice is as deterministic and resumable as the crop.

What the model needs is the box in the image it sees: the box is moved into the frame of the sample's
random-resized-crop box (:mod:`clipforge.data.transforms`), clipped to [0, 1], and becomes a row of NaN
when nothing of it is left in the crop, or when the sample has no (valid) box. Training batches then
carry a last element ``{"boxes": (B, 4) float32, "region_tokens": (B, L) long}``, the phrase tokenized
like the captions (:mod:`clipforge.losses.locca` reads it); without this stage batches are unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from clipforge.data.decode import Sample
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import Box

NO_BOX: Box = (math.nan, math.nan, math.nan, math.nan)


def candidates(meta: Any) -> list[tuple[Box, str]]:
    """The ``(box, phrase)`` pairs a sample's json offers (phrase ``""`` where none is given); malformed
    entries are left out."""
    if not isinstance(meta, dict):
        return []
    if isinstance(meta.get("boxes"), list):
        phrases = meta.get("phrases")
        phrases = phrases if isinstance(phrases, list) else []
        pairs = [(b, phrases[i] if i < len(phrases) else "") for i, b in enumerate(meta["boxes"])]
    elif "box" in meta:
        pairs = [(meta["box"], meta.get("referring_expression") or "")]
    else:
        return []
    out = []
    for box, phrase in pairs:
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            continue
        if x0 < x1 and y0 < y1:
            out.append(((x0, y0, x1, y1), str(phrase)))
    return out


def in_crop(box: Box, crop: Box, size: tuple[int, int]) -> Box:
    """``box`` (normalised by the image ``size``) in the frame of ``crop`` (source pixels), clipped to
    [0, 1]; :data:`NO_BOX` when no area of it is left in the crop."""
    width, height = size
    left, top, right, bottom = crop
    cw, ch = right - left, bottom - top
    x0 = min(max((box[0] * width - left) / cw, 0.0), 1.0)
    y0 = min(max((box[1] * height - top) / ch, 0.0), 1.0)
    x1 = min(max((box[2] * width - left) / cw, 0.0), 1.0)
    y1 = min(max((box[3] * height - top) / ch, 0.0), 1.0)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else NO_BOX


def region(sample: Sample) -> tuple[Box, str]:
    """The sample's picked box in its crop's frame and the phrase that refers to it (NaN box, ``""``)."""
    try:
        found = candidates(json.loads(sample.meta)) if sample.meta else []
    except ValueError:  # a json that does not parse gives no box; the caption still trains
        found = []
    if not found:
        return NO_BOX, ""
    box, phrase = found[min(int(sample.pick * len(found)), len(found) - 1)]
    box = in_crop(box, sample.crop, sample.size)
    return (box, phrase) if not math.isnan(box[0]) else (NO_BOX, "")


def locate(samples: Iterable[Sample]) -> Iterator[Sample]:
    """The stage: each sample with its :attr:`~clipforge.data.decode.Sample.region` filled in."""
    for s in samples:
        s.region = region(s)
        yield s


class CollateRegions:
    """Samples that went through :func:`locate` -> ``{"boxes": (B, 4), "region_tokens": (B, L)}``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[Sample]) -> dict[str, torch.Tensor]:
        found = [s.region or (NO_BOX, "") for s in items]
        return {
            "boxes": torch.tensor([box for box, _ in found], dtype=torch.float32),
            "region_tokens": self.tokenizer([phrase for _, phrase in found]),
        }
