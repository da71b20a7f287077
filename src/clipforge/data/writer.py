"""Write image-text pairs as WebDataset tar shards (Breuel et al., 2020) in img2dataset's layout.

Each sample is three tar members sharing a key: ``KEY.jpg`` (or ``.png`` / ``.webp``: the encoded image,
kept as it came unless re-encoding is asked for), ``KEY.txt`` (the caption, UTF-8) and ``KEY.json``
(metadata), which is what img2dataset (Beaumont, 2021) writes and what open_clip reads. Shards are named ``00000.tar, 00001.tar, ...``; a new one starts when the current
one reaches ``max_count`` samples or ``max_bytes`` bytes. Each shard is written under a temporary name
and renamed when complete, so an interrupted run never leaves a truncated shard behind under a real name.
On close the writer records samples per shard in ``manifest.json`` (see :mod:`clipforge.data.manifest`).

A folder that already holds shards under these names (an earlier run's) is refused before anything is
written, unless ``overwrite``: a later ``{00000..00099}.tar`` or ``*.tar`` over the folder would otherwise
mix the old shards beyond the new ones' count into training, while the new manifest lists only the new.
``overwrite`` deletes the writer's own files only (``NNNNN.tar``, their ``.NNNNN.tar.tmp`` leftovers,
``manifest.json``, ``sizes.json``); anything else in the folder stays.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from PIL import Image
from tqdm import tqdm

from clipforge.data.decode import IMAGE_ERRORS
from clipforge.data.manifest import MANIFEST_NAME, SIZES_NAME, write_manifest
from clipforge.data.transforms import grey_to_8bit, to_rgb, upright

log = logging.getLogger(__name__)

_TAR_BLOCK = 512


@dataclass
class Record:
    """One sample to write. ``image`` is encoded bytes (any format PIL reads) or a PIL image."""

    key: str
    image: bytes | Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


# Formats kept byte for byte: what img2dataset writes and open_clip's loader reads ("jpg;png;jpeg;webp").
KEPT_FORMATS = ("jpg", "png", "webp")
REENCODE = (None, "jpeg")
# Image modes PNG stores as they are. Other greyscale (32-bit I: TIFF, a 16-bit PGM; float F; big-endian
# I;16B) becomes 8-bit L as the loader reads it (to_rgb), anything else (CMYK, YCbCr) RGB(A).
_PNG_MODES = ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")


def image_format(data: bytes) -> str | None:
    """``jpg``, ``png`` or ``webp`` from the magic bytes of an encoded image, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def encode_image(
    image: bytes | Image.Image, reencode: str | None = None, quality: int = 95
) -> tuple[bytes, str]:
    """Return ``(bytes, extension)`` to store for one image.

    By default nothing is lost: JPEG, PNG and WebP bytes are stored as they are, under their own
    extension; other formats (BMP, TIFF, GIF, ...) and PIL images are encoded as PNG. ``reencode="jpeg"``
    turns everything that is not already JPEG into JPEG at ``quality`` (JPEG bytes still pass through:
    a second JPEG pass would only lose more). Bytes kept keep their EXIF orientation tag (the loader
    applies it); an image encoded here is stored upright, since the new file carries no tag.
    """
    if reencode not in REENCODE:
        raise ValueError(f"reencode must be one of {REENCODE}, got {reencode!r}")
    if isinstance(image, bytes):
        fmt = image_format(image)
        if fmt == "jpg" or (fmt is not None and reencode is None):
            return image, fmt
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            image = im.copy()
    image, buf = upright(image), io.BytesIO()
    if reencode == "jpeg":
        to_rgb(image).save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    if image.mode not in _PNG_MODES:  # PIL's convert("RGB") clips I/F greyscale white or black
        image = grey_to_8bit(image)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


class UnusableImage(ValueError):
    """A record whose image cannot be decoded to be re-encoded (a truncated BMP, GIF or TIFF; anything with
    ``reencode``): the sources' header check (:func:`~clipforge.data.sources.image_problem`) passes it."""


_SHARD = re.compile(r"\d{5,}\.tar")  # the names ShardWriter gives: 00000.tar, 00001.tar, ...
_LEFTOVER = re.compile(r"\.\d{5,}\.tar\.tmp")  # a shard an interrupted run was writing


def claim_out_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Make ``out_dir`` ready for a new set of shards: refuse (``FileExistsError`` naming them) when it
    holds shards of an earlier run, or with ``overwrite`` delete those, their leftovers and the manifests."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    shards = sorted(p for p in out_dir.iterdir() if _SHARD.fullmatch(p.name) and not p.is_dir())
    if not overwrite:
        if shards:
            last = f" ... {shards[-1].name}" if len(shards) > 3 else ""
            raise FileExistsError(
                f"{out_dir} already holds {len(shards)} shard(s) of an earlier run "
                f"({', '.join(p.name for p in shards[:3])}{last}): a pattern or glob over the folder would "
                "mix them with the new ones. Choose an empty folder, or pass --overwrite (overwrite=True) "
                "to delete them and the old manifest.json/sizes.json first (other files stay)"
            )
        return
    leftovers = [p for p in out_dir.iterdir() if _LEFTOVER.fullmatch(p.name)]
    manifests = [out_dir / MANIFEST_NAME, out_dir / SIZES_NAME]
    for path in [*shards, *leftovers, *manifests]:
        path.unlink(missing_ok=True)


def _member_size(nbytes: int) -> int:
    return _TAR_BLOCK + (nbytes + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


class ShardWriter:
    """Stream records into numbered tar shards; use as a context manager or call :meth:`close`. A folder
    that holds shards already is an error unless ``overwrite`` (:func:`claim_out_dir`)."""

    def __init__(
        self,
        out_dir: str | Path,
        max_count: int | None = 10_000,
        max_bytes: int | None = None,
        params: dict | None = None,
        reencode: str | None = None,
        quality: int = 95,
        overwrite: bool = False,
    ) -> None:
        if max_count is None and max_bytes is None:
            raise ValueError("set max_count, max_bytes or both: shards need a size limit")
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if reencode not in REENCODE:
            raise ValueError(f"reencode must be one of {REENCODE}, got {reencode!r}")
        self.out_dir = Path(out_dir)
        claim_out_dir(self.out_dir, overwrite)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.params = params or {}
        self.reencode, self.quality = reencode, quality
        self.counts: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        self._bytes = 0

    def _open_next(self) -> None:
        self._finish_shard()
        self._name = f"{len(self.counts):05d}.tar"
        self._tar = tarfile.open(self.out_dir / f".{self._name}.tmp", "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self.out_dir / f".{self._name}.tmp", self.out_dir / self._name)
        self.counts[self._name] = self._count
        self._tar = None

    def write(self, record: Record) -> None:
        """Add ``record`` to the current shard; :class:`UnusableImage` (nothing written) when its image does
        not decode."""
        try:
            image, ext = encode_image(record.image, self.reencode, self.quality)
        except IMAGE_ERRORS as e:
            name = record.meta.get("source_file", record.key)
            raise UnusableImage(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
        meta = {"key": record.key, "caption": record.caption, **record.meta}
        members = {
            f"{record.key}.{ext}": image,
            f"{record.key}.txt": record.caption.encode("utf-8"),
            f"{record.key}.json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        size = sum(_member_size(len(data)) for data in members.values())
        full = self._tar is not None and (
            (self.max_count is not None and self._count >= self.max_count)
            or (self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes)
        )
        if self._tar is None or full:
            self._open_next()
        assert self._tar is not None
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # deterministic bytes: the same input gives the same shard
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def close(self) -> dict[str, int]:
        """Finish the last shard and write the manifest; returns samples per shard."""
        self._finish_shard()
        write_manifest(self.out_dir, self.counts, self.params)
        return dict(self.counts)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no temporary shard behind on failure
            self._tar.close()
            (self.out_dir / f".{self._name}.tmp").unlink(missing_ok=True)


def write_shards(
    records: Iterable[Record],
    out_dir: str | Path,
    max_count: int | None = 10_000,
    max_bytes: int | None = None,
    params: dict | None = None,
    total: int | None = None,
    desc: str = "writing shards",
    progress: bool = True,
    reencode: str | None = None,
    quality: int = 95,
    overwrite: bool = False,
    skipped: Counter | None = None,
) -> dict[str, int]:
    """Write ``records`` to shards under ``out_dir`` with a progress bar; returns samples per shard.
    Images are stored losslessly unless ``reencode="jpeg"`` (see :func:`encode_image`); shards already in
    ``out_dir`` are an error unless ``overwrite`` deletes them first (:func:`claim_out_dir`). A record whose
    image does not decode is skipped with a warning naming it, and counted as ``corrupt_image`` in
    ``skipped``."""
    writer = ShardWriter(
        out_dir, max_count, max_bytes, params, reencode=reencode, quality=quality, overwrite=overwrite
    )
    with writer:
        for record in tqdm(records, total=total, desc=desc, unit="img", disable=not progress):
            try:
                writer.write(record)
            except UnusableImage as e:  # one bad file must not stop the whole set
                log.warning("skipping %s", e)
                if skipped is not None:
                    skipped["corrupt_image"] += 1
    return writer.counts
