"""Sharded evaluation of CLIP-style models (Radford et al., 2021): which part of a held-out set each rank
scores.

Every rank evaluates its own part; counts are summed and embeddings gathered with the shared collectives of
:mod:`clipforge.distributed`, so every rank ends with the same result. Without torch.distributed (or with
``enabled=False``) every helper is the identity, so the same code path runs in one process and in tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from clipforge.distributed import EvenSteps, world_info


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous block ``[start, stop)`` of ``n`` items owned by ``rank``; blocks differ by at most 1.

    Contiguous blocks (not strided ones) keep rank-order concatenation equal to the original order,
    which retrieval needs to keep image i paired with caption i. Nothing is padded or repeated, so
    counts reduce to exactly the single-process counts (unlike ``DistributedSampler``).
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return range(start, stop)


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """This rank's contiguous block of a map-style dataset; the dataset itself when ``world_size == 1``."""
    if world_size == 1:
        return dataset
    return Subset(dataset, list(shard_range(len(dataset), rank, world_size)))  # type: ignore[arg-type]


class StridedBatches:
    """Every ``world_size``-th batch of an iterable, starting at ``rank``: batch i goes to rank i % world.

    For data that cannot be split by index (an iterable that every rank reads in full): all
    ranks read the same deterministic batch sequence, but each runs the model on its own batches
    only, so every sample is scored exactly once. Pairs within a batch stay together.
    """

    def __init__(self, loader: Iterable[Any], rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.loader), self.rank, None, self.world_size)

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        return len(range(self.rank, n, self.world_size))


def shard_dataloader(loader: Iterable[Any], enabled: bool = True) -> Iterable[Any]:
    """This rank's part of ``loader``, such that the parts of all ranks hold every sample exactly once.

    A ``DataLoader`` over a map-style dataset is rebuilt over this rank's contiguous block (same batch
    size, workers, collate). An iterable dataset that already splits by rank (it has
    ``world_size`` equal to the process group's, as the data module's evaluation sets do) is returned
    as it is, without the padding steps of an :class:`~clipforge.distributed.EvenSteps` around it; any
    other iterable is strided by batch (:class:`StridedBatches`), which needs the same batch order on
    every rank.
    """
    if isinstance(loader, EvenSteps):  # its padding keeps a step count even; an evaluation counts none
        loader = loader.loader
    rank, world = world_info(enabled=enabled)
    if world == 1:
        return loader
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and dataset is not None and not isinstance(dataset, IterableDataset):
        return DataLoader(
            shard_dataset(dataset, rank, world),
            batch_size=loader.batch_size,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=False,
            persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        )
    if dataset is not None and getattr(dataset, "world_size", 1) == world:
        return loader
    return StridedBatches(loader, rank, world)
