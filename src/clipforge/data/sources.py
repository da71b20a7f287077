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

import codecs
import csv
import io
import json
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from clipforge.data import synthetic
from clipforge.data.decode import IMAGE_ERRORS, read_caption
from clipforge.data.shards import (
    IMAGE_EXTS,
    SHARD_SUFFIXES,
    ShardResult,
    dotted_key_hint,
    read_shard,
    split_name,
)
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


def _find(keys: list[str], wanted: tuple[str, ...]) -> str | None:
    """The first of ``wanted`` among ``keys`` (case-insensitive), as spelt in ``keys``; None if none is."""
    lowered = {str(k).lower(): k for k in keys}
    return next((lowered[name] for name in wanted if name in lowered), None)


def _pick(keys: list[str], wanted: tuple[str, ...], what: str, where: str) -> str:
    found = _find(keys, wanted)
    if found is None:
        raise ValueError(f"{where}: no {what} column; expected one of {wanted}, found {keys}")
    return found


def _texts(value: object, where: str) -> list[str]:
    """The captions of one entry: a list holds several (one sample each), null none (an empty caption,
    counted as missing), a number its digits; anything else (an object) is an error naming ``where``."""
    if isinstance(value, list):
        return [t for v in value for t in _texts(v, where)]
    if value is None:
        return [""]
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return [str(value)]
    raise ValueError(f"{where}: a caption must be text or a list of texts, not {json.dumps(value)[:80]}")


def _read_text(path: Path) -> str:
    """The captions file as text: UTF-8 (a byte-order mark, as spreadsheets write, is dropped) or, by its
    byte-order mark, UTF-16 (Excel's "Unicode text"). Other encodings are an error naming the first bad
    line: guessing Latin-1 or Windows-1252 could turn every accented caption into the wrong letters."""
    raw = path.read_bytes()
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: not {encoding.removesuffix('-sig').upper()} text (byte {raw[e.start]:#04x}); "
            "save the file as UTF-8 (a Latin-1 or Windows-1252 file: iconv -f cp1252 -t utf-8)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads text


def _csv_rows(text: str, delimiter: str, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of each non-blank row; malformed quoting (``"Best" photo``, a quote never closed
    that would swallow the rows after it into one caption) is an error naming the row's first line."""
    # csv splits the lines itself: a quoted caption may hold line breaks
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(
                f"{path}, row starting at line {line}: {e}; a field that starts with a quote must be quoted "
                'whole, with its own quotes doubled ("""Best"" photo")'
            ) from None
        if row:
            yield line, row


def _fields(row: list[str], width: int, line: int, path: Path) -> list[str]:
    """``row`` cut to ``width`` fields; more fields that are not empty are an error: an unquoted
    delimiter in a caption would otherwise cut it short without a word."""
    if any(f.strip() for f in row[width:]):
        raise ValueError(
            f"{path}, line {line}: {len(row)} fields where the first row has {width} ({row!r:.200}); "
            "quote a caption that holds the delimiter"
        )
    return row[:width]


def _table_pairs(text: str, delimiter: str, path: Path) -> list[tuple[str, str]]:
    rows = _csv_rows(text, delimiter, path)
    first = next(rows, None)
    if first is None:
        return []
    header = [h.strip() for h in first[1]]
    if _find(header, FILE_KEYS) is None:  # no header: file name and caption
        if len(header) != 2:
            name = {",": "comma", "\t": "tab"}.get(delimiter, repr(delimiter))
            raise ValueError(
                f"{path}: without a header row the file needs exactly two columns, file name and caption, "
                f"separated by a {name} (the first row has {len(header)}: {header!r:.200}); a .csv file is "
                "read comma-separated, a .tsv tab-separated"
            )
        pairs = []
        for line, row in [first, *rows]:
            row = _fields(row, 2, line, path)
            pairs.append((row[0], row[1] if len(row) > 1 else ""))
        return pairs
    file_col = header.index(_pick(header, FILE_KEYS, "file name", str(path)))
    caption_col = header.index(_pick(header, CAPTION_KEYS, "caption", str(path)))
    pairs = []
    for line, row in rows:
        row = _fields(row, len(header), line, path)
        if file_col >= len(row):
            raise ValueError(f"{path}, line {line}: no {header[file_col]!r} field ({row!r:.200})")
        pairs.append((row[file_col], row[caption_col] if caption_col < len(row) else ""))
    return pairs


def _json_pairs(rows: list[tuple[str, object]], path: Path) -> list[tuple[str, str]]:
    """Each row an object with a file name and (under any of :data:`CAPTION_KEYS`, row by row) captions."""
    pairs, captioned = [], False
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, {where}: expected an object with a file name and a caption, got {row!r:.80}"
            )
        file_key = _pick(list(row), FILE_KEYS, "file name", f"{path}, {where}")
        caption_key = _find(list(row), CAPTION_KEYS)
        captioned |= caption_key is not None
        texts = _texts(row[caption_key] if caption_key is not None else None, f"{path}, {where}")
        pairs += [(str(row[file_key]), t) for t in texts]
    if rows and not captioned:
        _pick(list(rows[0][1]), CAPTION_KEYS, "caption", str(path))  # names the keys it has
    return pairs


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # json.loads would keep the last value of each and drop the others without a word
        raise ValueError(
            f"{twice[0]!r} is a key twice in one object; give an image several captions as a list"
        )
    return dict(pairs)


def _load_json(text: str, where: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    except ValueError as e:  # a key twice (_unique_keys)
        raise ValueError(f"{where}: {e}") from None


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """``(file name, caption)`` pairs, one per row, from a CSV/TSV (with a header, or two columns without),
    JSONL or JSON file (a list of rows, or an object file name -> caption). An image may have several
    captions (rows, or a list), each a sample of its own, as in COCO's five per image. A row without a
    caption gives an empty one (the writer counts it as ``missing_caption``); a file that cannot be read
    as captions (not UTF-8, broken quoting, a row with too many fields, a line that is not JSON) is a
    ``ValueError`` naming its line."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _load_json(text, str(path))
        if isinstance(data, dict):
            return [(str(k), t) for k, v in data.items() for t in _texts(v, f"{path}, {k!r}")]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of rows or an object file name -> caption")
        return _json_pairs([(f"item {i}", row) for i, row in enumerate(data)], path)
    if suffix == ".jsonl":
        rows = []
        # lines end at "\n" only: str.splitlines also splits at U+2028 and others, which JSON strings hold raw
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                rows.append((f"line {n}", _load_json(line, f"{path}, line {n}")))
        return _json_pairs(rows, path)
    return _table_pairs(text, "\t" if suffix in (".tsv", ".tab") else ",", path)


def folder_records(
    image_dir: str | Path, captions: str | Path, skipped: Counter | None = None
) -> Iterator[Record]:
    """Records for every entry of the captions file whose image exists under ``image_dir`` (an image with
    several captions gives one record each). The captions file is read here, at the call, so one that
    cannot be read fails (``ValueError``, :func:`read_captions`) before any shard is opened."""
    return _folder_records(Path(image_dir), read_captions(captions), captions, skipped)


def _listed_file(image_dir: Path, name: str) -> Path:
    """``image_dir / name``, or the file whose name differs only in Unicode normalisation: macOS writes
    "é" decomposed (NFD) in file names, spreadsheets composed (NFC); the two look the same everywhere."""
    path = image_dir / name
    if not path.is_file():
        for form in ("NFC", "NFD"):
            other = image_dir / unicodedata.normalize(form, name)
            if other.is_file():
                return other
    return path


def _folder_records(
    image_dir: Path, pairs: list[tuple[str, str]], captions: str | Path, skipped: Counter | None
) -> Iterator[Record]:
    skipped = skipped if skipped is not None else Counter()
    folders: dict[Path, dict[str, list[str]]] = {}  # folder -> lower-cased file name -> its files' names
    # by file name (several captions of one file keep their order): the keys follow the names
    for i, (name, caption) in enumerate(sorted(pairs, key=lambda row: row[0])):
        path = _listed_file(image_dir, name)
        if not path.is_file():
            skipped["missing_image"] += 1
            if path.parent.is_dir() and path.parent not in folders:
                folders[path.parent] = {}
                for p in path.parent.iterdir():
                    folders[path.parent].setdefault(p.name.lower(), []).append(p.name)
            near = folders.get(path.parent, {}).get(path.name.lower(), [])
            # a list written on macOS or Windows, whose file systems ignore case, works there and not here
            hint = f" (a file named {near[0]} differs only in case)" if near else ""
            log.warning("skipping %s: listed in %s but not found%s", path, captions, hint)
            continue
        if not caption.strip():
            skipped["missing_caption"] += 1
            log.warning("skipping %s: empty caption", path)
            continue
        image = path.read_bytes()
        problem = image_problem(image)
        if problem is not None:
            skipped["corrupt_image"] += 1
            log.warning("skipping %s: %s", path, problem)
            continue
        meta = {"source_file": name}
        yield Record(key=f"{i:09d}", image=image, caption=caption.strip(), meta=meta)


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is no usable image, or None: PIL must recognise it and its structure check out
    (``verify``: no full decode, so a truncated JPEG body still passes; training counts those as
    ``corrupt_image``). The reason names what PIL found: a picture over PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) opens in any viewer, so "not a readable image" alone would mislead."""
    if not data:
        return "an empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.DecompressionBombError as e:
        return f"{e} (PIL's Image.MAX_IMAGE_PIXELS; the loader skips such images too)"
    except IMAGE_ERRORS as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


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
    # hidden files are no samples: macOS leaves ._NAME (AppleDouble) beside each copied file and .DS_Store
    for path in (p for p in files_under(root, hidden=False) if p.is_file()):
        if not any(path.match(pattern) for pattern in _I2D_SHARD_FILES):
            yield str(path.relative_to(root)), path.read_bytes()


def img2dataset_records(root: str | Path, skipped: Counter | None = None) -> Iterator[Record]:
    """Records from img2dataset output: its tar shards if there are any, else its ``files`` layout."""
    root = Path(root)
    skipped = skipped if skipped is not None else Counter()
    tars = [p for p in files_under(root, hidden=False) if p.name.endswith(SHARD_SUFFIXES)]
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
                try:
                    caption, why = read_caption(sample), "no caption"
                except ValueError as e:
                    caption, why = "", str(e)
                if not caption:
                    skipped["missing_caption"] += 1
                    log.warning("skipping %s: %s", key, why)
                    continue
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                except ValueError:
                    log.warning("%s: its json does not parse; keeping the sample without it", key)
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
                problem = image_problem(sample[image_ext])
                if problem is not None:
                    skipped["corrupt_image"] += 1
                    log.warning("skipping %s: %s", key, problem)
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
