"""Procedural captioned images for compositional zero-shot tests of CLIP (Radford et al., 2021).

Each image shows one shape of one colour, size and position on a noisy dark background, and its caption
names some of those attributes in one of several templates. Some attribute combinations are held out:
training never shows them and the held-out split contains only them. Zero-shot classification of the shape
of held-out images with text prompts ("a photo of a circle.") then measures generalisation to unseen
combinations, in the spirit of the compositional splits of CLEVR-CoGenT (Johnson et al., 2017). Two
hold-out schemes (``holdout=``):

* ``"tuples"`` (default): one in eight full (shape, colour, size, position) tuples is held out, chosen so
  that every *pair* of attribute values still occurs in training. Nothing in the image predicts the shape
  but the shape itself, so a tiny CLIP learns the task within a few hundred CPU steps.
* ``"pairs"``: two colours per shape never occur with it in training (shape ``i`` loses colours ``i`` and
  ``i + 4``). Much harder: colour then *predicts* shape in training, a small model takes that shortcut, and
  held-out accuracy starts below chance; use it to study compositional generalisation, not as a smoke test.

Each sample's metadata also carries the shape's bounding box (normalised ``[x0, y0, x1, y1]``) and a
referring expression naming it ("the small red circle"), targets for LocCa-style localisation tasks
(Wan et al., 2024).

Every sample is a pure function of ``(seed, split, index)``: generation needs no state, so any process
can produce any sample, and the same seed always gives the same bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.27}  # shape radius as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) of the centre as fractions of the image side
    "top left": (0.32, 0.32),
    "top right": (0.68, 0.32),
    "bottom left": (0.32, 0.68),
    "bottom right": (0.68, 0.68),
    "center": (0.5, 0.5),
}
SPLITS: dict[str, int] = {"train": 0, "val": 1, "heldout": 2}

# Captions use the same words as the zero-shot prompts, so "a photo of a circle." is in-vocabulary.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {size} {color} {shape} in the {position}.",
    "a {color} {shape}.",
    "a photo of a {shape}.",
    "a {size} {shape} on a dark background.",
    "a picture of a {color} {shape} in the {position}.",
    "the {shape} is {color}.",
    "a {size} {color} {shape}.",
)
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "a {}.")


HOLDOUTS = ("tuples", "pairs")
Combo = tuple[str, str, str, str]  # (shape, colour, size, position)


def check_holdout(holdout: str) -> str:
    """``holdout`` if it names a held-out scheme (:data:`HOLDOUTS`), else a ValueError naming them."""
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
    return holdout


def heldout_pairs() -> frozenset[tuple[str, str]]:
    """``holdout="pairs"``: the (shape, colour) pairs that never appear in training, two colours per shape."""
    names = list(COLORS)
    return frozenset(
        (shape, names[(i + k) % len(names)]) for i, shape in enumerate(SHAPES) for k in (0, len(names) // 2)
    )


def _all_combos() -> list[Combo]:
    return [(s, c, z, p) for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS]


def heldout_combos(holdout: str = "tuples") -> frozenset[Combo]:
    """The (shape, colour, size, position) tuples that never appear in training.

    ``"tuples"``: those whose attribute indices sum to 0 mod 8. For any two fixed attributes the other two
    range over at least 10 combinations, of which at most 2 hit one residue, so every pair of attribute
    values keeps at least 8 training tuples.
    """
    if check_holdout(holdout) == "pairs":
        held = heldout_pairs()
        return frozenset(t for t in _all_combos() if (t[0], t[1]) in held)
    idx = [{v: i for i, v in enumerate(values)} for values in (SHAPES, COLORS, SIZES, POSITIONS)]
    return frozenset(t for t in _all_combos() if sum(m[v] for m, v in zip(idx, t)) % 8 == 0)


def zeroshot_task() -> tuple[list[str], list[str]]:
    """Zero-shot classification over the held-out split: classify the shape. Labels index ``SHAPES``."""
    return list(SHAPES), list(ZEROSHOT_TEMPLATES)


@dataclass(frozen=True)
class SyntheticSample:
    key: str
    image: Image.Image
    caption: str
    meta: dict
    # (H, W) fraction of each pixel the shape covers: the dense-probe target (clipforge.eval.dense);
    # not written to shards
    coverage: np.ndarray | None = field(default=None, repr=False, compare=False)


@functools.cache
def _allowed(split: str, holdout: str) -> list[Combo]:
    held = heldout_combos(holdout)
    return sorted(held) if split == "heldout" else [t for t in _all_combos() if t not in held]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with radius ``r`` on centred coordinates ``u`` (right), ``v`` (down)."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82 * r
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "triangle":  # apex up, base at v = 0.7 r
        return (v <= 0.7 * r) & (np.abs(u) <= (v + r) * 0.62)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the image side


def draw(
    shape: str,
    color: str,
    size: str,
    position: str,
    image_size: int,
    rng: np.random.Generator,
    supersample: int = 4,
) -> tuple[Image.Image, Box, np.ndarray]:
    """Draw one anti-aliased shape on a noisy dark background (``rng`` adds small jitter everywhere); return
    the image, the shape's bounding box and its (H, W) pixel coverage. The box is the tightest one
    around the covered sub-pixels of the supersampled mask, normalised by the image side (so every drawn
    pixel, anti-aliased edges included, lies inside it). Same draws from ``rng`` in the same order as
    before boxes existed: same pixels."""
    s = image_size * supersample
    cx, cy = POSITIONS[position]
    cx += rng.uniform(-0.04, 0.04)
    cy += rng.uniform(-0.04, 0.04)
    r = SIZES[size] * rng.uniform(0.9, 1.1) * s
    coords = (np.arange(s, dtype=np.float32) + 0.5) - 0.0
    u = coords[None, :] - cx * s  # (1, S)
    v = coords[:, None] - cy * s  # (S, 1)
    mask = _shape_mask(shape, u, v, r)  # (S, S) bool
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    box = (cols[0] / s, rows[0] / s, (cols[-1] + 1) / s, (rows[-1] + 1) / s)
    cover = mask.astype(np.float32).reshape(image_size, supersample, image_size, supersample)
    alpha = cover.mean(axis=(1, 3))  # (H, W)
    rgb = np.clip(np.array(COLORS[color], np.float32) + rng.normal(0, 12, 3), 0, 255)
    bg_level = rng.uniform(10, 70, 3).astype(np.float32)
    bg = bg_level + rng.normal(0, 8, (image_size, image_size, 3)).astype(np.float32)
    img = bg * (1 - alpha[..., None]) + rgb * alpha[..., None]
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    return image, tuple(round(float(b), 6) for b in box), alpha


def referring_expression(shape: str, color: str, size: str) -> str:
    """The phrase that names the one shape of an image, for referring-expression tasks (LocCa's
    "referring expression -> box", Wan et al., 2024): colour and shape, plus its size."""
    return f"the {size} {color} {shape}"


def make_sample(
    index: int, split: str = "train", image_size: int = 32, seed: int = 0, holdout: str = "tuples"
) -> SyntheticSample:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    combos = _allowed(split, holdout)
    shape, color, size, position = combos[int(rng.integers(len(combos)))]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(shape=shape, color=color, size=size, position=position)
    image, box, coverage = draw(shape, color, size, position, image_size, rng)
    meta = {
        "shape": shape,
        "color": color,
        "size": size,
        "position": position,
        "label": SHAPES.index(shape),
        "split": split,
        "index": index,
        # Localisation targets (LocCa-style decoder tasks): normalised [x0, y0, x1, y1] of the shape and a
        # phrase naming it. Added after the keys above, which stay as they were (as do the pixels).
        "box": list(box),
        "referring_expression": referring_expression(shape, color, size),
    }
    return SyntheticSample(key=f"{index:09d}", image=image, caption=caption, meta=meta, coverage=coverage)


def generate(
    split: str, num_samples: int, image_size: int = 32, seed: int = 0, holdout: str = "tuples"
) -> Iterator[SyntheticSample]:
    """Yield samples ``0 .. num_samples - 1`` of ``split`` in order."""
    for i in range(num_samples):
        yield make_sample(i, split, image_size, seed, holdout)
