"""Shard manifests: samples per shard, the number the WebDataset loader (Breuel et al., 2020) needs
for exact epochs.

``manifest.json`` sits beside the shards::

    {"version": 1, "shards": {"00000.tar": 1000, ...}, "num_samples": 12345, "params": {...}}

``sizes.json`` (the same mapping, without the rest) is written too, because open_clip's training code
reads that file for its epoch length. Shards are looked up by base name, so a manifest also serves
``pipe:`` URLs whose command ends in the shard's name (``pipe:aws s3 cp s3://b/00007.tar -``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from clipforge.data.shards import SHARD_SUFFIXES, DataError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
SHARD_GLOBS = tuple(f"*{suffix}" for suffix in SHARD_SUFFIXES)
_TAR_NAME = re.compile(r"([^\s/\\]+\.(?:tar(?:\.gz)?|tgz))\b")


def shard_name(url: str) -> str:
    """The shard's base name: ``/a/b/00001.tar`` and ``pipe:curl -s http://x/00001.tar`` give ``00001.tar``
    (``.tar.gz`` and ``.tgz`` names likewise)."""
    if url.startswith("pipe:"):
        found = _TAR_NAME.findall(url)
        return found[-1] if found else url
    return os.path.basename(url)


def write_manifest(out_dir: str | Path, shards: dict[str, int], params: dict | None = None) -> Path:
    """Write ``manifest.json`` and ``sizes.json`` atomically (write to a temporary name, then rename)."""
    out_dir = Path(out_dir)
    body = {
        "version": 1,
        "shards": dict(shards),
        "num_samples": int(sum(shards.values())),
        "params": params or {},
    }
    for name, payload in ((MANIFEST_NAME, body), (SIZES_NAME, dict(shards))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        os.replace(tmp, out_dir / name)
    return out_dir / MANIFEST_NAME


def read_manifest(path: str | Path) -> dict:
    """Read a ``manifest.json`` (or an open_clip-style ``sizes.json``) into the manifest layout; one that
    does not parse or whose counts are not sample counts is an error naming the file."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if "shards" not in data:  # sizes.json: a bare {name: count} mapping
            data = {"version": 1, "shards": data, "params": {}}
        shards = data["shards"]
        if not isinstance(shards, dict):
            raise ValueError(f"its shards are a JSON {type(shards).__name__}, not an object")
        data["shards"] = {str(k): int(v) for k, v in shards.items()}
    except ValueError as e:  # json's errors included
        raise DataError(
            f"{path} is not a manifest ({e}); rewrite it: clipforge-shards manifest DIR"
        ) from None
    bad = {k: v for k, v in data["shards"].items() if v < 0}
    if bad:
        raise DataError(f"{path} gives negative sample counts: {bad}")
    data["num_samples"] = sum(data["shards"].values())
    return data


def find_manifest(urls: list[str], manifest: str | None = None) -> dict[str, int] | None:
    """Samples per shard for ``urls`` (keyed by url), or None when some shard has no known count.

    A local shard is looked up in ``manifest.json``/``sizes.json`` beside it first (so two sources that
    both have a ``00000.tar`` do not mix up their counts), then in the explicit ``manifest`` file, which
    is how ``pipe:`` URLs get their counts. An explicit ``manifest`` that does not exist is an error; shards
    that no manifest counts while others are counted are named in a warning.
    """
    if manifest is not None and not Path(manifest).is_file():
        raise DataError(f"the manifest {manifest} does not exist")
    cache: dict[Path, dict[str, int]] = {}

    def table(path: Path) -> dict[str, int]:
        if path not in cache:
            cache[path] = read_manifest(path)["shards"] if path.is_file() else {}
        return cache[path]

    counts, missing = {}, []
    for url in urls:
        name = shard_name(url)
        tables = []
        if not url.startswith("pipe:"):
            parent = Path(url).parent
            tables += [table(parent / MANIFEST_NAME), table(parent / SIZES_NAME)]
        if manifest is not None:
            tables.append(table(Path(manifest)))
        found = next((t[name] for t in tables if name in t), None)
        if found is None:
            missing.append(url)
        else:
            counts[url] = found
    if missing and counts:  # a manifest was found, but it lacks these (shards added after it was written?)
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        places = ["in manifest.json and sizes.json beside each local shard"] * any(
            not u.startswith("pipe:") for u in urls
        ) + [f"in {manifest}"] * (manifest is not None)
        log.warning(
            "%d of %d shards are in no manifest, so samples per shard are unknown (looked %s): %s",
            len(missing),
            len(urls),
            " and ".join(places),
            shown,
        )
    return None if missing else counts
