"""The synthetic data set as a shard source (``data=synthetic``, ``data.source``): the procedural captioned
shapes of :mod:`clipforge.data.synthetic`, written once as WebDataset shards (Breuel et al., 2020) and then
read by the same :class:`~clipforge.data.datamodule.WebDataModule` as any other shards.

Each setting, the counts included, is part of the folder's name, so runs with other settings never write
where a run is reading; runs with the same settings share the folder, and a lock file makes the first one
write it while the others wait and then reuse it (a sweep started all at once on one machine). Each split's
``manifest.json`` records the settings: shards whose manifest differs (an older generator, a write that
was cut short) are rewritten.
Validation pairs and zero-shot images both come from the held-out split, whose attribute combinations
(``holdout``) never occur in training; the zero-shot task classifies the shape. ``seed`` fixes the
generated images (the same data set for every training seed; ``data.stream.seed`` drives shuffling and
augmentation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from clipforge.data import synthetic
from clipforge.data.config import ShardSet, ZeroShotSet
from clipforge.data.manifest import MANIFEST_NAME, read_manifest
from clipforge.data.sources import synthetic_records
from clipforge.data.writer import write_shards

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: images stored as PNG (lossless); 1 wrote JPEG at quality 95


@dataclass(frozen=True)
class SyntheticShards:
    """Writes ``num_train`` training and ``num_heldout`` held-out samples under ``root`` (in :attr:`folder`,
    named by every setting) and names them as a :class:`ShardSet`. Every setting but ``root`` and the
    other split's count is recorded in each split's manifest, so shards that differ are rewritten."""

    root: str
    num_train: int = 20_000
    num_heldout: int = 1_000
    image_size: int = 32
    samples_per_shard: int = 1_000
    seed: int = 0
    holdout: str = "tuples"

    def __post_init__(self) -> None:
        synthetic.check_holdout(self.holdout)

    @property
    def folder(self) -> Path:
        return Path(self.root) / (
            f"synthetic-{self.holdout}-{self.image_size}px-seed{self.seed}"
            f"-{self.num_train}+{self.num_heldout}-per{self.samples_per_shard}"
        )

    def _pattern(self, split: str, n: int) -> str:
        last = max(0, -(-n // self.samples_per_shard) - 1)
        return str(self.folder / split / f"{{00000..{last:05d}}}.tar")

    def shards(self) -> ShardSet:
        classnames, templates = synthetic.zeroshot_task()
        heldout = self._pattern("heldout", self.num_heldout)
        return ShardSet(
            self._pattern("train", self.num_train), heldout, ZeroShotSet(heldout, classnames, templates)
        )

    def _params(self, split: str, n: int) -> dict:
        images = {k: v for k, v in asdict(self).items() if k not in ("root", "num_train", "num_heldout")}
        return {
            "generator": "clipforge.data.synthetic",
            "version": GENERATOR_VERSION,
            "split": split,
            "num_samples": n,
            **images,
        }

    def prepare(self) -> None:
        """Write the shards unless a manifest with the same parameters is already there; another process
        preparing the same folder is waited for (its shards are then reused)."""
        with folder_lock(self.folder):
            self._write_missing()

    def _write_missing(self) -> None:
        for split, n in (("train", self.num_train), ("heldout", self.num_heldout)):
            out = self.folder / split
            params = self._params(split, n)
            manifest = out / MANIFEST_NAME
            if manifest.is_file() and read_manifest(manifest)["params"] == params:
                log.info("reusing %d synthetic %s samples in %s", n, split, out)
                continue
            write_shards(  # overwrite: the shards of other settings go, none is left beyond the new count
                synthetic_records(split, n, self.image_size, self.seed, self.holdout),
                out,
                max_count=self.samples_per_shard,
                params=params,
                total=n,
                desc=f"synthetic {split} shards",
                overwrite=True,
            )


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file beside it) across processes; while another
    process holds it, say so and wait. POSIX ``flock``: released by the kernel if the holder dies, so a
    killed run never leaves the folder locked. Elsewhere (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process to finish writing %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
