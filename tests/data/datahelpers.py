"""Small shard sets for the data tests: tiny JPEGs, captions that name their sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.config import Augment, Stream
from clipforge.data.datamodule import WebDataModule
from clipforge.data.manifest import write_manifest


def tiny_jpeg(i: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_sizes(
    out: Path, sizes: list[int], size: int = 16, labels: bool = False, start: int = 0
) -> list[str]:
    """Shards ``00000.tar ...`` with ``sizes[i]`` samples each (img2dataset layout), caption ``"sample N"``,
    key ``N`` (9 digits), and a manifest; returns the shard paths."""
    out.mkdir(parents=True, exist_ok=True)
    n = start
    urls = []
    for s, count in enumerate(sizes):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                key = f"{n:09d}"
                add(tar, f"{key}.jpg", tiny_jpeg(n, size))
                add(tar, f"{key}.txt", f"sample {n}".encode())
                meta = {"key": key, "label": n % 3} if labels else {"key": key}
                add(tar, f"{key}.json", json.dumps(meta).encode())
                n += 1
        urls.append(str(path))
    write_manifest(out, {f"{s:05d}.tar": c for s, c in enumerate(sizes)})
    return urls


def pattern(out: Path, n: int) -> str:
    return str(out / f"{{00000..{n - 1:05d}}}.tar")


def sample_ids(keys: list[str]) -> list[int]:
    """``.../00003.tar/000000042`` -> 42."""
    return [int(k.rsplit("/", 1)[-1]) for k in keys]


def data_module(
    urls: str | list[str],
    batch_size: int,
    num_workers: int = 0,
    stream: dict | None = None,
    augment: dict | None = None,
    **kw,
) -> WebDataModule:
    """The data module as the data tests use it: 16-pixel images, 8-token captions and each sample's key in
    its batch; ``stream`` and ``augment`` hold further settings of those groups, ``kw`` the module's."""
    return WebDataModule(
        urls,
        batch_size=batch_size,
        num_workers=num_workers,
        context_length=8,
        stream=Stream(**{"return_keys": True} | (stream or {})),
        augment=Augment(**{"image_size": 16} | (augment or {})),
        **kw,
    )
