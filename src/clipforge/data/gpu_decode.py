"""JPEG decoding on the accelerator for CLIP pretraining (Radford et al., 2021) data loading.

With ``decode_device="cuda"`` the DataLoader workers only read the tar, parse each JPEG header (for the
image size) and draw the crop box, and tokenize; the encoded bytes travel to the main process, where
:class:`JpegDecoder` decodes the whole batch with nvJPEG (``torchvision.io.decode_jpeg(..., device=)``),
crops, resizes with antialiasing and normalises on the device. Images that are not JPEG, and JPEGs whose
EXIF orientation is not 1 (nvJPEG ignores the tag; torchvision's ``apply_exif_orientation`` works on the
CPU only), were already decoded upright on the CPU by the worker and are only copied.

The same code runs with ``device="cpu"`` (torchvision's libjpeg-turbo decoder), which is what the
tests exercise on machines without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from clipforge.data.transforms import CLIP_MEAN, CLIP_STD
from clipforge.distributed import require_cuda

log = logging.getLogger(__name__)


@dataclass
class EncodedBatch:
    """A batch whose images are still encoded: ``data[i]`` is a 1-D uint8 tensor of JPEG bytes, or a
    ``(3, size, size)`` uint8 image the worker already decoded (non-JPEG input). ``boxes[i]`` is the crop
    box ``(left, top, right, bottom)`` in source pixels (unused for pre-decoded images)."""

    data: list[torch.Tensor]
    boxes: torch.Tensor  # (B, 4) float64

    def __len__(self) -> int:
        return len(self.data)


def check_decode_device(device: torch.device | str) -> None:
    """Fail, naming ``data.augment.decode_device``, when the deferred JPEGs would be decoded on ``device``
    but it is not a CUDA GPU this machine has: torchvision's ``decode_jpeg`` would fail image by image and
    every batch be reported as undecodable, or the batches silently decode on the CPU of the main process."""
    device = torch.device(device)
    if device.type == "cuda":
        require_cuda(
            "data.augment.decode_device=cuda",
            "set data.augment.decode_device=cpu (the DataLoader workers decode)",
            index=device.index,
        )
    if device.type != "cuda":
        raise ValueError(
            f"data.augment.decode_device=cuda decodes the training JPEGs on the training device, but this "
            f"run trains on {device.type}: set data.augment.decode_device=cpu (the DataLoader workers decode)"
        )


class JpegDecoder:
    """``EncodedBatch`` -> (normalised float32 ``(B, 3, size, size)`` on ``device``, ``source`` rows).

    An image that fails to decode is replaced by another image of the batch, so the batch keeps its
    size (every rank must all-gather equal shapes); ``source[i]`` is the row image ``i`` came from, and
    the caller must take the texts the same way (``tokens[source]``) to keep the pairs matched.
    """

    def __init__(
        self,
        image_size: int,
        interpolation: str = "bicubic",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"GPU decoding resizes with 'bicubic' or 'bilinear', not {interpolation!r}")
        self.image_size, self.mode = image_size, interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.corrupt = 0  # images that failed to decode here (their header had parsed in the worker)

    def _decode(self, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        if not datas:  # every image came decoded (not JPEG, or EXIF-oriented): decode_jpeg rejects []
            return []
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the batch call: decode one by one to find it
            out: list[torch.Tensor | None] = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out

    def __call__(self, batch: EncodedBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device.type == "cuda":
            check_decode_device(device)
        s = self.image_size
        jpeg_idx = [i for i, d in enumerate(batch.data) if d.ndim == 1]
        decoded = dict(zip(jpeg_idx, self._decode([batch.data[i] for i in jpeg_idx], device)))
        out = torch.empty(len(batch), 3, s, s, device=device)
        good: list[int] = []
        for i, data in enumerate(batch.data):
            if data.ndim == 3:  # decoded by the worker: (3, S, S)
                out[i] = data.to(device, non_blocking=True)
                good.append(i)
                continue
            img = decoded[i]
            if img is None:
                continue
            left, top, right, bottom = (round(float(v)) for v in batch.boxes[i])
            crop = img[:, top:bottom, left:right].unsqueeze(0).float()  # (1, 3, h, w)
            out[i] = F.interpolate(crop, size=(s, s), mode=self.mode, antialias=True, align_corners=False)[0]
            good.append(i)
        source = torch.arange(len(batch))
        bad = [i for i in range(len(batch)) if i not in set(good)]
        if bad:
            if not good:
                raise RuntimeError(f"none of the {len(batch)} images of a batch could be decoded on {device}")
            self.corrupt += len(bad)
            log.warning("%d images failed to decode on %s; replaced by others of the batch", len(bad), device)
            for j, i in enumerate(bad):
                source[i] = good[j % len(good)]
                out[i] = out[source[i]]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255
        return out.clamp_(0, 255).sub_(mean).div_(std), source
