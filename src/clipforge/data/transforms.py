"""Image transforms of CLIP (Radford et al., 2021): random resized crop for training, resize + centre
crop for evaluation, normalisation with a per-channel mean and std (CLIP's by default; ``data.augment.mean``
and ``std``, which a checkpoint's evaluation reads back from its run).

The results match torchvision's ``RandomResizedCrop`` and open_clip's eval ``Resize``/``CenterCrop``
(bicubic, antialiased; same crop boxes, same rounding), but the work is arranged for throughput:

* every image is turned upright by its EXIF orientation tag (:func:`to_rgb`), as viewers show it and as
  captions describe it: a phone photo tagged "rotate 90" is otherwise learned and evaluated sideways.
  Crop boxes are drawn in the upright frame (:func:`upright_size`);
* JPEGs are decoded by libjpeg-turbo through ``torchvision.io.decode_jpeg``, straight into a uint8
  tensor; the crop box is drawn from the header before decoding, so an image much larger than the
  crop needs decodes at 1/2, 1/4 or 1/8 scale in the DCT domain instead (:meth:`PIL.Image.Image.draft`,
  kept at least twice the output size so a real filter still does the last step);
* crop + resize run on the uint8 image in channels-last layout, where PyTorch has a vectorised
  antialiased bilinear/bicubic kernel (about 3x faster than PIL's, same output within one grey level);
* images stay ``uint8`` until :func:`normalize_into` writes a whole batch of float32, channel-planar
  output in one pass per image, into a buffer that can live in shared memory (no copy when a DataLoader
  worker hands the batch to the main process), instead of ``ToTensor`` + ``Normalize`` per sample.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
Triple = tuple[float, float, float]
CLIP_MEAN: Triple = tuple(OPENAI_DATASET_MEAN)  # OpenAI's CLIP; open_clip's default too
CLIP_STD: Triple = tuple(OPENAI_DATASET_STD)


def check_mean_std(mean: Sequence[float], std: Sequence[float], where: str) -> tuple[Triple, Triple]:
    """``mean`` and ``std`` as plain 3-tuples of pixel values in [0, 1] (``where.mean``/``where.std`` named
    when they are not: 3 numbers each, a mean in [0, 1], a std in (0, 1]). Values on the 0-255 scale, the
    usual slip, are caught by the bound."""
    out = []
    for name, values, ok in (
        ("mean", mean, lambda v: 0.0 <= v <= 1.0),
        ("std", std, lambda v: 0.0 < v <= 1.0),
    ):
        try:
            triple = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            triple = ()
        if len(triple) != 3 or not all(ok(v) for v in triple):
            raise ValueError(
                f"{where}.{name} must be 3 numbers (R, G, B) in {'[0, 1]' if name == 'mean' else '(0, 1]'}, "
                f"on the scale of pixels in [0, 1], got {values!r}"
            )
        out.append(triple)
    return out[0], out[1]


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


CROP_DRAWS = 40  # uniforms per random crop: 4 for each of torchvision's 10 attempts


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator | np.ndarray,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """Integer crop box of torchvision's ``RandomResizedCrop.get_params`` (same distribution).

    ``rng`` is a generator or ``CROP_DRAWS`` uniforms in [0, 1): a fixed number per crop, so a stream of
    crops can be fast-forwarded (``bit_generator.advance``) without drawing them.
    """
    u = rng.random(CROP_DRAWS) if isinstance(rng, np.random.Generator) else rng
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(CROP_DRAWS // 4):
        a, r, y, x = u[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(y * (height - h + 1))
            left = int(x * (width - w + 1))
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


def _resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the shorter side becomes ``size`` (longer side truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> Box:
    """Source box of torchvision's ``Resize(size)`` (shorter side) + ``CenterCrop(size)``."""
    new_w, new_h = _resized_shape(width, height, size)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = stored upright, 2..8 = mirror and/or rotate to show it
_QUARTER_TURNS = (5, 6, 7, 8)  # the orientations that swap width and height
_ORIENTATIONS = frozenset(range(1, 9))


def exif_orientation(img: Image.Image) -> int:
    """``img``'s EXIF orientation, 1..8 (1 when it has none). A malformed EXIF block or a value outside
    1..8 counts as 1: the pixels are shown as stored, which is what viewers do with such a tag."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # untrusted metadata: PIL raises many kinds (struct.error, ValueError, ...) on bad EXIF
        return 1
    # Looked up as ImageOps.exif_transpose (which turns the pixels) looks it up, so the two always agree: a
    # string "6" is no orientation there (int() would make it one here: a box in the wrong frame), a
    # rational 6/1 is 6.
    return int(value) if value in _ORIENTATIONS else 1


# The functions below take the ``orientation`` a caller already read (:func:`exif_orientation`), so a decode
# parses the EXIF block once, not once per step; ``None`` reads it here.


def upright_size(img: Image.Image, orientation: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of ``img`` once its EXIF orientation is applied (:func:`to_rgb`); only the
    header is needed for a JPEG, so crop boxes can be drawn before decoding."""
    width, height = img.size
    orientation = exif_orientation(img) if orientation is None else orientation
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def upright(img: Image.Image, orientation: int | None = None) -> Image.Image:
    """``img`` with its EXIF orientation applied and the tag removed (``img`` itself when it has none)."""
    orientation = exif_orientation(img) if orientation is None else orientation
    return ImageOps.exif_transpose(img) if orientation != 1 else img


def to_rgb(img: Image.Image, orientation: int | None = None) -> Image.Image:
    """``img`` upright (:func:`upright`) as 8-bit RGB: the one place training, evaluation and the shard
    writer turn an opened image into pixels. PIL's ``convert("RGB")`` clips 16-bit greyscale (mode ``I;16``: 16-bit PNG
    and TIFF) at 255, which turns almost every such image white; its high byte is kept instead, which is
    what PIL itself does for 16-bit colour."""
    img = upright(img, orientation)
    return img if img.mode == "RGB" else grey_to_8bit(img).convert("RGB")


def grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale (``I;16*``, ``I``, ``F``) as 8-bit ``L`` by :func:`to_rgb`'s rule,
    any other mode as it is: PIL's ``convert`` would clip them at 255 (white) or 0 (black)."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):  # 32-bit integer or float greyscale (TIFF, 16-bit PGM)
        return Image.fromarray(_grey_to_uint8(np.asarray(img), img.mode == "F"))
    return img


def _grey_to_uint8(a: np.ndarray, is_float: bool) -> np.ndarray:
    """32-bit greyscale to 8 bits by the range its values say: floats in [0, 1] scaled by 255, integers in
    [0, 255] kept and in [0, 65535] (16-bit data in a 32-bit container) their high byte; any other range
    (HDR, signed, scientific data) stretched from its minimum to its maximum. NaN and inf become 0."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if is_float and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif not is_float and lo >= 0 and hi <= 255:
        pass
    elif not is_float and lo >= 0 and hi <= 65535:
        a = np.floor(a / 256.0)
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 ``(3, h, w)`` -> uint8 ``(3, *size)``, through PyTorch's channels-last uint8 kernels."""
    x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")[0]
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)[0]


class ImageTransform:
    """Encoded image bytes (or a PIL image) -> uint8 ``(3, size, size)``: random resized crop (train)
    or resize + centre crop (eval). ``rng`` (a generator, or ``CROP_DRAWS`` uniforms) drives the crop.
    ``draft``: decode a large JPEG at reduced scale in the DCT domain; ``None``: in training only."""

    def __init__(
        self,
        image_size: int,
        train: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        draft: bool | None = None,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.image_size = image_size
        self.train = train
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        self.draft = train if draft is None else draft

    def box(self, width: int, height: int, rng: np.random.Generator | np.ndarray | None) -> Box:
        if self.train:
            return random_resized_crop_box(
                width, height, np.random.default_rng() if rng is None else rng, self.scale, self.ratio
            )
        return center_crop_box(width, height, self.image_size)

    def _load(
        self, img: Image.Image, data: bytes | None, box: Box, size: tuple[int, int], orientation: int
    ) -> tuple[torch.Tensor, float, float]:
        """Decode upright to uint8 ``(3, H', W')``; returns it and the scale from source pixels (upright
        ``size``, the frame of ``box``) to decoded pixels."""
        if img.format == "JPEG":
            reduce = min(box[2] - box[0], box[3] - box[1]) / self.image_size / 2.0
            if self.draft and reduce >= 2:  # the same factor on both sides: the stored frame will do
                img.draft("RGB", (math.ceil(img.size[0] / reduce), math.ceil(img.size[1] / reduce)))
            elif data is not None and orientation == 1:
                # an oriented JPEG goes through to_rgb: torchvision's own EXIF reader disagrees with PIL's
                # on some tags (a big-endian LONG, a rational), and the box is in PIL's upright frame
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(buf, mode=ImageReadMode.RGB), 1.0, 1.0
        rgb = to_rgb(img, orientation)
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (3, H', W') view of the (H', W', 3) pixels
        return x, rgb.size[0] / size[0], rgb.size[1] / size[1]

    def __call__(
        self, data: bytes | Image.Image, rng: np.random.Generator | np.ndarray | None = None
    ) -> torch.Tensor:
        if isinstance(data, Image.Image):
            orientation = exif_orientation(data)
            return self.apply(data, None, self.box(*upright_size(data, orientation), rng), orientation)
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            orientation = exif_orientation(img)
            return self.apply(img, data, self.box(*upright_size(img, orientation), rng), orientation)

    def apply(
        self, img: Image.Image, data: bytes | None, box: Box, orientation: int | None = None
    ) -> torch.Tensor:
        """The transform with its crop ``box`` already drawn (:meth:`box`): ``img`` as opened (only its
        header parsed) and its encoded ``data`` if any; ``box`` is in the upright frame (:func:`upright_size`),
        ``orientation`` the image's :func:`exif_orientation` when the caller has read it."""
        orientation = exif_orientation(img) if orientation is None else orientation
        width, height = upright_size(img, orientation)  # before _load: a JPEG draft changes img.size
        x, sx, sy = self._load(img, data, box, (width, height), orientation)
        s = self.image_size
        if self.train:  # crop, then resize the crop (torchvision's resized_crop)
            left, top, right, bottom = (
                round(box[0] * sx),
                round(box[1] * sy),
                round(box[2] * sx),
                round(box[3] * sy),
            )
            return _resize(x[:, top:bottom, left:right], (s, s), self.interpolation)
        # eval: resize the shorter side to s, then crop the centre (open_clip's Resize + CenterCrop)
        new_w, new_h = _resized_shape(width, height, s)
        top, left = round((new_h - s) / 2.0), round((new_w - s) / 2.0)
        return _resize(x, (new_h, new_w), self.interpolation)[:, top : top + s, left : left + s]


def normalize_into(
    images: list[torch.Tensor],
    out: torch.Tensor | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Stack uint8 ``(3, H, W)`` images into a float32 ``(B, 3, H, W)`` batch normalised by ``mean`` and
    ``std`` (per channel, for pixels in [0, 1]; CLIP's by default).

    Per image: one uint8->float copy into its slot, then a scalar affine map per channel (contiguous,
    so it vectorises).
    """
    if not images:
        raise ValueError("normalize_into needs at least one image")
    _, h, w = images[0].shape
    if out is None:
        out = torch.empty(len(images), 3, h, w, dtype=torch.float32)
    mean255 = [255.0 * m for m in mean]
    inv_std255 = [1.0 / (255.0 * s) for s in std]
    for i, img in enumerate(images):
        slot = out[i]  # (3, H, W)
        slot.copy_(img)
        for c in range(3):
            slot[c].sub_(mean255[c]).mul_(inv_std255[c])
    return out


def to_tensor(
    img: Image.Image,
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    **kwargs,
) -> torch.Tensor:
    """One PIL image -> normalised ``(3, size, size)`` tensor (convenience for eval scripts)."""
    return normalize_into([ImageTransform(image_size, train=train, **kwargs)(img)], mean=mean, std=std)[0]
