"""Finding and reading WebDataset tar shards (Breuel et al., 2020): URL expansion, ``pipe:`` streams,
grouping tar members into samples, and accounting for every way a shard can fail.

A URL is a local path or ``pipe:COMMAND`` (the command writes the tar to stdout, e.g.
``pipe:aws s3 cp s3://bucket/00001.tar -``); other schemes go through ``webdataset.gopen``. Lists use
brace expansion (``data/{00000..00099}.tar``); ``::`` separates sources, as in open_clip.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import select
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import braceexpand

log = logging.getLogger(__name__)

# Seconds a pipe: command may write nothing before its shard counts as broken (a stalled download).
PIPE_STALL_S = 300.0

# Sample members that hold the image, in order of preference: any format PIL reads.
# What a shard file is named: a tar, or a tar gzipped by another tool (read as it is)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")

# Why a sample or a shard was skipped; the DataModule logs each as data/skipped_<cause>.
CAUSES: tuple[str, ...] = (
    "corrupt_image",  # the image bytes do not decode
    "missing_image",  # a sample without an image member
    "missing_caption",  # a sample without a (non-empty) caption, or whose .txt is not UTF-8
    "missing_label",  # zero-shot data without an integer json "label"
    "empty_shard",  # a shard with no samples (zero bytes, or a tar without members)
    "truncated_shard",  # a shard that ends mid-stream; samples before the break are kept
    "unreadable_shard",  # a shard that cannot be opened (missing, permissions, failing pipe command)
    "lost_samples",  # samples the manifest promised but a broken shard did not deliver
    "repeated_samples",  # samples read a second time to keep every rank's batch count (only after skips)
)


class DataError(RuntimeError):
    """Input that training cannot go on with: no shards, or most samples failing."""


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _shards_only(pattern: str, matched: list[str]) -> list[str]:
    """The files a glob matched that are named as shards (:data:`SHARD_SUFFIXES`), the others named in a
    warning: ``dir/*`` also matches a manifest, img2dataset's ``_stats.json`` and ``.parquet``. When none is
    named as a shard, all of them (shards named otherwise)."""
    shards = [m for m in matched if m.endswith(SHARD_SUFFIXES)]
    if not shards or len(shards) == len(matched):
        return matched
    others = [os.path.basename(m) for m in matched if not m.endswith(SHARD_SUFFIXES)]
    log.warning(
        "shard pattern %r also matches %d files that are not shards, left out: %s",
        pattern,
        len(others),
        ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""),
    )
    return shards


def expand_urls(urls: str | list[str]) -> list[list[str]]:
    """Expand a URL spec into sources, each a list of shard URLs.

    ``urls`` is one string (sources separated by ``::``) or a list of strings (one source each). Braces
    are expanded; local patterns with ``*``/``?`` are globbed (sorted). Fails at once, naming the
    pattern, if a source matches nothing or none of its local shards exists; shards missing from a
    source that has others are logged (and later counted as ``unreadable_shard``).
    """
    specs = urls.split("::") if isinstance(urls, str) else [str(u) for u in urls]
    if not specs or not any(s.strip() for s in specs):
        raise DataError("no shard URLs given")
    sources = []
    for spec in specs:
        spec = spec.strip()
        expanded: list[str] = []
        for url in braceexpand.braceexpand(spec):
            if not url.startswith("pipe:") and "://" not in url and _has_glob(url):
                expanded += _shards_only(url, sorted(glob.glob(os.path.expanduser(url))))
            else:
                expanded.append(url if url.startswith("pipe:") else os.path.expanduser(url))
        if not expanded:
            raise DataError(f"shard pattern {spec!r} matches no shard")
        folder = next((u for u in expanded if os.path.isdir(u)), None)
        if folder is not None:  # read as a tar, a folder only fails later, as an unreadable shard
            raise DataError(
                f"shard URL {folder!r} is a folder, not a shard: name its shards, e.g. "
                f"'{os.path.join(folder, '*.tar')}' or a brace pattern like '{os.path.join(folder, '{00000..00099}.tar')}'"
            )
        missing = missing_local(expanded)
        if missing and len(missing) == len(expanded):
            comma = "," in missing[0]  # a brace list's commas are expanded: one left is a list by mistake
            raise DataError(
                f"shard pattern {spec!r} matches no shard: none of its {len(expanded)} paths exist "
                f"(first: {missing[0]!r})"
                + ("; list shards with '::' (a::b), not commas, or a brace list '{a,b}.tar'" if comma else "")
            )
        if missing:
            # A few shards lost from storage (or never downloaded) are bad input like a truncated shard:
            # the loader counts them as unreadable and the skip-fraction limit decides (the data module
            # fails at once when they alone exceed it). A pattern matching nothing is an error above.
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            log.warning(
                "shard pattern %r: %d of %d shards are missing and will be skipped as unreadable: %s",
                spec,
                len(missing),
                len(expanded),
                shown,
            )
        sources.append(expanded)
    return sources


def same_shard(url: str) -> str:
    """What ``url`` names, spelled one way: a local path (or ``file://``) as its real absolute path, so that
    ``data/00001.tar``, ``./data/00001.tar`` and the absolute path compare equal; any other URL as it is."""
    path = url.removeprefix("file://")
    return os.path.realpath(path) if not path.startswith("pipe:") and "://" not in path else url


def missing_local(urls: list[str]) -> list[str]:
    """The local shard paths among ``urls`` that do not exist."""
    return [u for u in urls if not u.startswith("pipe:") and "://" not in u and not os.path.exists(u)]


@dataclass
class RawSample:
    """One sample's undecoded members (``{"jpg": b"...", "txt": b"...", ...}``) and where it came from."""

    key: str
    url: str
    members: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ShardResult:
    """What reading a shard (or a segment of one) came to: samples delivered and the failure, if any."""

    delivered: int = 0
    failure: str | None = None  # one of the *_shard causes
    message: str = ""
    more: bool = False  # the read stopped at its count, and a whole sample followed (asked with peek)


class _StallGuard(io.RawIOBase):
    """A ``pipe:`` command's output that raises ``TimeoutError`` when the command writes nothing for
    ``PIPE_STALL_S`` seconds (a stalled download would otherwise hold its DataLoader worker, and the run,
    forever); the shard then counts as unreadable or truncated like any broken one."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:
        if not select.select([self.raw], [], [], PIPE_STALL_S)[0]:
            raise TimeoutError(f"the command wrote nothing for {PIPE_STALL_S:g} s")
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open(url: str) -> tuple[IO[bytes], subprocess.Popen | None, IO[bytes] | None]:
    if url.startswith("pipe:"):
        errfile = tempfile.TemporaryFile()  # noqa: SIM115 (closed by read_shard). A file, not a pipe: a chatty command cannot block on it
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=errfile, bufsize=0)
        assert proc.stdout is not None
        return io.BufferedReader(_StallGuard(proc.stdout), 1 << 20), proc, errfile
    if "://" in url:
        from webdataset.gopen import gopen

        return gopen(url, "rb"), None, None
    return open(url, "rb", buffering=1 << 20), None, None


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def dotted_key_hint(key: str, exts: Iterable[str]) -> str:
    """Why a sample has no image when a dot in its key hid it (``a.b.jpg``: key ``a``, extension
    ``b.jpg``), or ``""``."""
    hidden = sorted(e for e in exts if "." in e and e.rsplit(".", 1)[-1] in IMAGE_EXTS)
    if not hidden:
        return ""
    return (
        f"{key}.{hidden[0]} is an image, but WebDataset keys end at the first dot of a file name, so its "
        f"key is {key!r}: write the shards with no dot in the keys"
    )


def _keyless(name: str) -> bool:
    """A member of no sample: WebDataset's split gives no key to a base name without a dot (``README``)
    or starting with one (``.DS_Store``; macOS tar writes ``._NAME``, extended attributes, before each file
    that has some, e.g. a downloaded image: read as samples, they would split every real sample in two)."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") or "." not in base


def _sample_follows(tar: tarfile.TarFile, first: tarfile.TarInfo) -> bool:
    """Whether the sample that member ``first`` begins is whole: its members read through to the next
    sample or the end of the tar (a shard cut inside it holds no more than the samples before it)."""
    key = split_name(first.name)[0]
    exts: set[str] = set()
    info: tarfile.TarInfo | None = first
    try:
        while info is not None:
            if info.isfile() and not _keyless(info.name):
                k, ext = split_name(info.name)
                if k != key or ext in exts:  # the next sample (a repeated extension starts one)
                    break
                exts.add(ext)
            f = tar.extractfile(info) if info.isfile() else None
            if f is not None:
                f.read()
            info = tar.next()
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return False
    return True


def read_shard(
    url: str, result: ShardResult, start: int = 0, count: int | None = None, peek: bool = False
) -> Iterator[RawSample]:
    """Yield samples ``start .. start + count - 1`` of the tar at ``url`` (to the end if ``count`` is None).

    Never raises for bad data. A shard that cannot be opened or parsed, has no samples, or breaks off
    is reported in ``result.failure``; samples before a break are still yielded (but not a last one
    that the break left incomplete). Samples before ``start`` are read through but not kept. ``peek``:
    when the read stops at ``count``, read the next sample too, to tell whether a whole one follows
    (``result.more``: the shard holds more than its manifest says).
    """
    stream = proc = errfile = None
    index = 0  # samples completed so far in this shard
    members = 0
    stop = None if count is None else start + count
    reached_end = False  # read to the end of the stream (or failed): only then does an exit status count
    try:
        stream, proc, errfile = _open(url)
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (the stream is closed below)
        current: RawSample | None = None
        exts: set[str] = set()  # the current sample's extensions, kept or not (before ``start``)
        for info in tar:
            if not info.isfile() or _keyless(info.name):
                continue
            members += 1
            key, ext = split_name(info.name)
            # A repeated extension starts a new sample, as in open_clip's reader (webdataset's raises): a
            # key twice in a row is two samples, not one whose later members replace the earlier ones.
            if current is None or key != current.key or ext in exts:
                if current is not None:
                    if index >= start:
                        result.delivered += 1
                        yield current
                    index += 1
                    if stop is not None and index >= stop:
                        current = None
                        result.more = peek and _sample_follows(tar, info)
                        break
                current, exts = RawSample(key=key, url=url), set()
            exts.add(ext)
            if index >= start:
                f = tar.extractfile(info)
                current.members[ext] = f.read() if f is not None else b""
        else:
            reached_end = True
        if current is not None and index >= start:
            result.delivered += 1
            yield current
        if members == 0:
            result.failure, result.message = "empty_shard", "the tar has no members"
        elif count is not None and result.delivered < count:
            # a tar cut at a header boundary reads as a shorter, valid tar: only the manifest tells
            result.failure = "truncated_shard"
            result.message = f"ended after {start + result.delivered} samples; the manifest says more"
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        message = f"{type(e).__name__}: {e}"
        if members == 0 and "empty file" in str(e):
            result.failure = "empty_shard"
        elif members == 0:
            result.failure = "unreadable_shard"
        else:
            result.failure = "truncated_shard"
        result.message = message
        reached_end = not isinstance(e, TimeoutError)  # a stalled command is killed: its status says nothing
    finally:
        if stream is not None:
            stream.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            code = proc.wait()
            if code != 0 and reached_end and result.failure in (None, "empty_shard", "truncated_shard"):
                assert errfile is not None
                errfile.seek(0)
                stderr = errfile.read().decode(errors="replace").strip()[-300:]
                result.failure = "unreadable_shard" if members == 0 else "truncated_shard"
                result.message = f"command exited with status {code}: {stderr}"
        if errfile is not None:
            errfile.close()
    if result.failure is not None:
        log.warning(
            "shard %s: %s (%s); %d samples read", url, result.failure, result.message, result.delivered
        )
