"""Procedural captioned images for compositional zero-shot tests of CLIP (Radford et al., 2021).

Each image shows one shape of one colour, size and position on a noisy dark background, and its caption
names some of those attributes in one of several templates. A fixed set of (shape, colour) pairs is
held out: training never shows them, and the held-out split contains only them. Classifying the shape of
held-out images with text prompts ("a photo of a circle.") therefore measures whether the model composes
"shape" and "colour" rather than memorising pairs, in the spirit of the compositional splits of
CLEVR-CoGenT (Johnson et al., 2017).

Every sample is a pure function of ``(seed, split, index)``: generation needs no state, so any process
can produce any sample, and the same seed always gives the same bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

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


def heldout_pairs() -> frozenset[tuple[str, str]]:
    """The (shape, colour) pairs that never appear in training: two colours per shape.

    Shape ``i`` loses colours ``i`` and ``i + 4`` (mod 8), so every shape and every colour is still seen in
    training, just never in these combinations.
    """
    names = list(COLORS)
    return frozenset(
        (shape, names[(i + k) % len(names)]) for i, shape in enumerate(SHAPES) for k in (0, len(names) // 2)
    )


def zeroshot_task() -> tuple[list[str], list[str]]:
    """Zero-shot classification over the held-out split: classify the shape. Labels index ``SHAPES``."""
    return list(SHAPES), list(ZEROSHOT_TEMPLATES)


@dataclass(frozen=True)
class SyntheticSample:
    key: str
    image: Image.Image
    caption: str
    meta: dict


@functools.cache
def _allowed_pairs(split: str) -> list[tuple[str, str]]:
    held = heldout_pairs()
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    return sorted(held) if split == "heldout" else [p for p in pairs if p not in held]


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


def render(
    shape: str,
    color: str,
    size: str,
    position: str,
    image_size: int,
    rng: np.random.Generator,
    supersample: int = 4,
) -> Image.Image:
    """Draw one anti-aliased shape on a noisy dark background; ``rng`` adds small jitter everywhere."""
    s = image_size * supersample
    cx, cy = POSITIONS[position]
    cx += rng.uniform(-0.04, 0.04)
    cy += rng.uniform(-0.04, 0.04)
    r = SIZES[size] * rng.uniform(0.9, 1.1) * s
    coords = (np.arange(s, dtype=np.float32) + 0.5) - 0.0
    u = coords[None, :] - cx * s  # (1, S)
    v = coords[:, None] - cy * s  # (S, 1)
    mask = _shape_mask(shape, u, v, r).astype(np.float32)  # (S, S)
    alpha = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))  # (H, W)
    rgb = np.clip(np.array(COLORS[color], np.float32) + rng.normal(0, 12, 3), 0, 255)
    bg_level = rng.uniform(10, 70, 3).astype(np.float32)
    bg = bg_level + rng.normal(0, 8, (image_size, image_size, 3)).astype(np.float32)
    img = bg * (1 - alpha[..., None]) + rgb * alpha[..., None]
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def make_sample(index: int, split: str = "train", image_size: int = 32, seed: int = 0) -> SyntheticSample:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    pairs = _allowed_pairs(split)
    shape, color = pairs[int(rng.integers(len(pairs)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(shape=shape, color=color, size=size, position=position)
    image = render(shape, color, size, position, image_size, rng)
    meta = {
        "shape": shape,
        "color": color,
        "size": size,
        "position": position,
        "label": SHAPES.index(shape),
        "split": split,
        "index": index,
    }
    return SyntheticSample(key=f"{index:09d}", image=image, caption=caption, meta=meta)


def generate(split: str, num_samples: int, image_size: int = 32, seed: int = 0) -> Iterator[SyntheticSample]:
    """Yield samples ``0 .. num_samples - 1`` of ``split`` in order."""
    for i in range(num_samples):
        yield make_sample(i, split, image_size, seed)
