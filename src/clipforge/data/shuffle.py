"""The shuffle stage of the WebDataset stream (Breuel et al., 2020): a *block* shuffle, one for the exact,
the resampled and the re-read passes alike.

Consecutive blocks of ``size`` samples are each permuted by a generator seeded with ``(*salt, block)``.
Mixing is like that of a shuffle buffer of the same size, but output position ``o`` always comes from
block ``o // size``, and a block's permutation depends on nothing read before it. So a resume at output
position ``skip`` re-reads only the block that holds it, and the reader skips whole shards before that
without opening them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def block_start(skip: int, size: int) -> int:
    """The input position where :func:`block_shuffle` must begin to resume at output position ``skip``."""
    return skip - skip % size


def block_shuffle(samples: Iterable[T], size: int, salt: Sequence[int], skip: int = 0) -> Iterator[T]:
    """``samples`` permuted within blocks of ``size``, starting at output position ``skip``.

    ``samples`` must begin at input position :func:`block_start` ``(skip, size)``. The last block may be
    short (a finite stream); ``size`` 1 passes samples through unchanged.
    """
    block, drop = divmod(skip, size)
    source = iter(samples)
    while True:
        chunk = [s for _, s in zip(range(size), source)]
        if not chunk:
            return
        if size > 1:  # a block of one is its own permutation: spare the generator
            perm = np.random.default_rng([*salt, block]).permutation(len(chunk))
            chunk = [chunk[i] for i in perm]
        yield from chunk[drop:]
        drop = 0
        block += 1
