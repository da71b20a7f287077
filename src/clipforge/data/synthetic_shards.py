"""The synthetic data set as a shard source (``data=synthetic``, ``data.source``): the procedural captioned
shapes of :mod:`clipforge.data.synthetic`, written once as WebDataset shards (Breuel et al., 2020) and then
read by the same :class:`~clipforge.data.datamodule.WebDataModule` as any other shards.

The shards are rewritten only when their parameters change: each split's ``manifest.json`` records them.
Validation pairs and zero-shot images both come from the held-out split, whose attribute combinations
(``holdout``) never occur in training; the zero-shot task classifies the shape. ``seed`` fixes the
generated images (the same data set for every training seed; ``data.stream.seed`` drives shuffling and
augmentation).
"""

from __future__ import annotations

import logging
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
    named by the settings that change the images) and names them as a :class:`ShardSet`. Every setting but
    the two counts and ``root`` is recorded in each split's manifest, so a change rewrites the shards."""

    root: str
    num_train: int = 20_000
    num_heldout: int = 1_000
    image_size: int = 32
    samples_per_shard: int = 1_000
    seed: int = 0
    holdout: str = "tuples"

    def __post_init__(self) -> None:
        if self.holdout not in synthetic.HOLDOUTS:
            raise ValueError(f"holdout must be one of {synthetic.HOLDOUTS}, got {self.holdout!r}")

    @property
    def folder(self) -> Path:
        return Path(self.root) / f"synthetic-{self.holdout}-{self.image_size}px-seed{self.seed}"

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
        """Write the shards unless a manifest with the same parameters is already there."""
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
