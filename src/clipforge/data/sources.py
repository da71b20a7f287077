"""Sources of image-text pairs for the shard writer (WebDataset layout of img2dataset, Beaumont 2021).

* :func:`folder_records`: an image folder plus a captions file (CSV, TSV, JSONL, or a JSON object)
  mapping file name to caption;
* :func:`img2dataset_records`: a folder of img2dataset output, either its ``webdataset`` tar shards or
  its ``files`` layout (``00000/000000001.jpg`` beside ``.txt`` and ``.json``);
* :func:`synthetic_records`: the procedural generator of :mod:`clipforge.data.synthetic`.

Each yields :class:`~clipforge.data.writer.Record`; problems (an image listed but missing, bytes that are
no image, a sample without caption) are logged and skipped, and counted in the ``skipped`` dict passed in.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from clipforge.data import synthetic
from clipforge.data.decode import IMAGE_ERRORS
from clipforge.data.shards import IMAGE_EXTS, ShardResult, dotted_key_hint, read_shard, split_name
from clipforge.data.writer import Record

log = logging.getLogger(__name__)

# open_clip's CSV dataset names its columns filepath and title
FILE_KEYS = ("file", "filename", "file_name", "filepath", "image", "image_path", "path", "img", "key")
CAPTION_KEYS = ("caption", "text", "txt", "title", "description")


def files_under(root: str | Path, hidden: bool = True) -> list[Path]:
    """Every file below ``root``, sorted, following symlinked folders as torchvision's ``ImageFolder`` does;
    ``hidden=False`` leaves out names starting with ``.`` and everything under such folders. A folder
    reached a second time (a symlink loop, or two links to one folder) is walked once; the links skipped
    are named in a warning instead of walking forever."""
    visited, skipped, files = {os.path.realpath(root)}, [], []
    for top, dirs, names in os.walk(root, followlinks=True):
        walk = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(top, d))
            if not hidden and d.startswith("."):
                continue
            if real in visited:
                skipped.append(os.path.join(top, d))
                continue
            visited.add(real)
            walk.append(d)
        dirs[:] = walk  # os.walk descends into these only
        files += [Path(top, n) for n in names if hidden or not n.startswith(".")]
    if skipped:
        log.warning(
            "%s: %d symlinked folder(s) lead to a folder already walked (a loop?), not walked again: %s",
            root,
            len(skipped),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    return sorted(files)


def _pick(keys: list[str], wanted: tuple[str, ...], what: str, path: Path) -> str:
    lowered = {k.lower(): k for k in keys}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    raise ValueError(f"{path}: no {what} column; expected one of {wanted}, found {keys}")


def _texts(value: object) -> list[str]:
    """The captions of one entry: a list holds several (one sample each), null none."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value or "")]


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """``(file name, caption)`` pairs, one per row, from a CSV/TSV (with a header, or two columns without),
    JSONL or JSON file (a list of rows, or an object file name -> caption). An image may have several
    captions (rows, or a list), each a sample of its own, as in COCO's five per image."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # spreadsheets save CSV with a byte-order mark
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return [(str(k), t) for k, v in data.items() for t in _texts(v)]
        rows = data
    elif suffix == ".jsonl":
        # lines end at "\n" only: str.splitlines also splits at U+2028 and others, which JSON strings hold raw
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    else:
        delimiter = "\t" if suffix in (".tsv", ".tab") else ","
        # csv splits the lines itself: a quoted caption may hold line breaks
        table = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
        if not table:
            return []
        header = [h.strip() for h in table[0]]
        has_header = any(h.lower() in FILE_KEYS for h in header)
        if not has_header:
            if len(header) != 2:
                raise ValueError(f"{path}: without a header row the file needs exactly two columns")
            return [(row[0], row[1]) for row in table if len(row) >= 2]
        rows = [dict(zip(header, row)) for row in table[1:] if row]
    if not rows:
        return []
    file_key = _pick(list(rows[0]), FILE_KEYS, "file name", path)
    caption_key = _pick(list(rows[0]), CAPTION_KEYS, "caption", path)
    return [(str(r[file_key]), t) for r in rows for t in _texts(r.get(caption_key))]


def folder_records(
    image_dir: str | Path, captions: str | Path, skipped: Counter | None = None
) -> Iterator[Record]:
    """Records for every entry of the captions file whose image exists under ``image_dir`` (an image with
    several captions gives one record each)."""
    image_dir = Path(image_dir)
    skipped = skipped if skipped is not None else Counter()
    # by file name (several captions of one file keep their order): the keys follow the names
    for i, (name, caption) in enumerate(sorted(read_captions(captions), key=lambda row: row[0])):
        path = image_dir / name
        if not path.is_file():
            skipped["missing_image"] += 1
            log.warning("skipping %s: listed in %s but not found", path, captions)
            continue
        if not caption.strip():
            skipped["missing_caption"] += 1
            log.warning("skipping %s: empty caption", path)
            continue
        image = path.read_bytes()
        if not readable_image(image):
            skipped["corrupt_image"] += 1
            log.warning("skipping %s: not a readable image", path)
            continue
        meta = {"source_file": name}
        yield Record(key=f"{i:09d}", image=image, caption=caption.strip(), meta=meta)


def readable_image(data: bytes) -> bool:
    """Whether PIL recognises ``data`` as an image and its structure checks out (``verify``: no full
    decode, so a truncated JPEG body still passes; training counts those as ``corrupt_image``)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except IMAGE_ERRORS:
        return False
    return True


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive ``(name, data)`` pairs by key (WebDataset's split, :func:`split_name`)."""
    key, sample = None, {}
    for name, data in members:
        k, ext = split_name(name)
        if k != key and sample:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = data
    if sample:
        yield key, sample


def _tar_samples(path: Path, skipped: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one tar through the loader's reader (:func:`read_shard`): a shard that breaks off
    keeps every complete sample before the break, and its failure is counted (and logged, naming it)."""
    result = ShardResult()
    for raw in read_shard(str(path), result):
        yield raw.key, raw.members
    if result.failure is not None:
        skipped[result.failure] += 1


# What img2dataset writes beside each shard folder of its files layout: no samples
_I2D_SHARD_FILES = ("*_stats.json", "*.parquet", "*.feather")


def _file_members(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in (p for p in files_under(root) if p.is_file()):
        if not any(path.match(pattern) for pattern in _I2D_SHARD_FILES):
            yield str(path.relative_to(root)), path.read_bytes()


def img2dataset_records(root: str | Path, skipped: Counter | None = None) -> Iterator[Record]:
    """Records from img2dataset output: its tar shards if there are any, else its ``files`` layout."""
    root = Path(root)
    skipped = skipped if skipped is not None else Counter()
    tars = [p for p in files_under(root) if p.suffix == ".tar"]
    streams = (_tar_samples(t, skipped) for t in tars) if tars else (_group(_file_members(root)),)
    for samples in streams:
        try:
            for key, sample in samples:
                image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if image_ext is None:
                    hint = dotted_key_hint(key, sample)
                    if "txt" in sample or "json" in sample or hint:
                        skipped["missing_image"] += 1
                    if hint:
                        log.warning("skipping %s: %s", key, hint)
                    continue
                caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                except ValueError:
                    log.warning("%s: its json does not parse; keeping the sample without it", key)
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
                caption = caption or str(meta.get("caption") or "").strip()
                if not caption:
                    skipped["missing_caption"] += 1
                    log.warning("skipping %s: no caption", key)
                    continue
                if not readable_image(sample[image_ext]):
                    skipped["corrupt_image"] += 1
                    log.warning("skipping %s: not a readable image", key)
                    continue
                yield Record(key=key.rsplit("/", 1)[-1], image=sample[image_ext], caption=caption, meta=meta)
        except OSError as e:  # a file of the files layout that cannot be read
            skipped["unreadable_shard"] += 1
            log.warning("stopped reading %s: %s", root, e)


def synthetic_records(
    split: str, num_samples: int, image_size: int = 32, seed: int = 0, holdout: str = "tuples"
) -> Iterator[Record]:
    """Records of the synthetic generator; the json carries the attributes and the zero-shot ``label``."""
    for s in synthetic.generate(split, num_samples, image_size, seed, holdout):
        yield Record(key=s.key, image=s.image, caption=s.caption, meta=s.meta)
