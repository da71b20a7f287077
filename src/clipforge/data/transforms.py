"""Image transforms of CLIP (Radford et al., 2021): random resized crop for training, resize + centre
crop for evaluation, normalisation with the CLIP mean and std.

The geometry matches torchvision's ``RandomResizedCrop`` and open_clip's eval ``Resize``/``CenterCrop``,
but the work is arranged for throughput:

* the crop box is chosen from the JPEG header *before* decoding, so :meth:`PIL.Image.Image.draft` can
  let libjpeg decode at 1/2, 1/4 or 1/8 scale (in the DCT domain) whenever the crop still covers the
  output at that scale;
* crop and resize are one PIL call (``resize(box=...)``), not a crop copy followed by a resize;
* images stay ``uint8`` until :func:`normalize_into` writes a whole batch of float32, channel-planar
  output in one pass per image, into a buffer that can live in shared memory (no copy when a DataLoader
  worker hands the batch to the main process).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
_MEAN255 = [255.0 * m for m in OPENAI_DATASET_MEAN]
_INV_STD255 = [1.0 / (255.0 * s) for s in OPENAI_DATASET_STD]

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """Crop box of torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    # fall back to a centre crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, size: int) -> Box:
    """Source box of torchvision's ``Resize(size)`` (shorter side) + ``CenterCrop(size)``, rounding
    included, so one resampling of this box gives open_clip's eval crop."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


class ImageTransform:
    """Undecoded PIL image -> ``uint8`` array ``(size, size, 3)``: random resized crop or centre crop.

    Call it on the result of ``Image.open`` before anything loads the pixels, so that JPEG draft
    decoding can apply. ``rng`` drives the random crop (ignored for eval).
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        draft: bool = True,
    ) -> None:
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {list(_RESAMPLE)}, got {interpolation!r}")
        self.image_size = image_size
        self.train = train
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.resample = _RESAMPLE[interpolation]
        self.draft = draft

    def box(self, width: int, height: int, rng: np.random.Generator | None) -> Box:
        if self.train:
            return random_resized_crop_box(
                width, height, rng or np.random.default_rng(), self.scale, self.ratio
            )
        return center_crop_box(width, height, self.image_size)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        width, height = img.size
        left, top, right, bottom = self.box(width, height, rng)
        if self.draft and img.format == "JPEG":
            # DCT-domain reduction (1/2, 1/4, 1/8) that keeps the crop at least twice the output size, so
            # a proper resampling filter still does the last step (PIL's reducing_gap=2 rule).
            reduce = min((right - left) / self.image_size, (bottom - top) / self.image_size) / 2.0
            if reduce >= 2:
                img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
                sx, sy = img.size[0] / width, img.size[1] / height
                left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
        if img.mode != "RGB":
            img = img.convert("RGB")
        out = img.resize((self.image_size, self.image_size), self.resample, box=(left, top, right, bottom))
        return np.asarray(out)


def normalize_into(images: list[np.ndarray], out: torch.Tensor | None = None) -> torch.Tensor:
    """Stack ``uint8 (H, W, 3)`` images into a normalised float32 ``(B, 3, H, W)`` batch (CLIP mean/std).

    Per image: one strided uint8->float copy into the channel-planar slot, then a scalar affine map
    per channel (contiguous, so it vectorises); far cheaper than ``ToTensor`` + ``Normalize`` per sample.
    """
    if not images:
        raise ValueError("normalize_into needs at least one image")
    h, w, _ = images[0].shape
    if out is None:
        out = torch.empty(len(images), 3, h, w, dtype=torch.float32)
    with warnings.catch_warnings():  # arrays from PIL are read-only; we only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for i, img in enumerate(images):
            slot = out[i]  # (3, H, W)
            slot.copy_(torch.from_numpy(img).permute(2, 0, 1))
            for c in range(3):
                slot[c].sub_(_MEAN255[c]).mul_(_INV_STD255[c])
    return out


def to_tensor(img: Image.Image, image_size: int, train: bool = False, **kwargs) -> torch.Tensor:
    """One PIL image -> normalised ``(3, size, size)`` tensor (convenience for eval scripts)."""
    arr = ImageTransform(image_size, train=train, **kwargs)(img)
    return normalize_into([np.ascontiguousarray(arr)])[0]
