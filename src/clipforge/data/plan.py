"""Epoch plans for WebDataset shards (Breuel et al., 2020) under data parallelism: which rank and which
DataLoader worker reads which samples, as pure arithmetic on the manifest's samples-per-shard.

Exact-epoch mode. Shards are put in an order drawn from ``(seed, epoch)`` and their samples numbered
0..N-1 along that order. With world size W and per-rank batch size B, every rank gets the *same* number
of samples ``c`` and hence the same batches::

    steps S = ceil(N / (W * B)), and the last step has p = floor((N - W * (S - 1) * B) / W) samples per rank
    c = (S - 1) * B + p                   (if p == 0 the last step is dropped: S -= 1, p = B)

Rank r reads the contiguous global range ``[r c, (r + 1) c)``, so it opens about N / W / shard_size shards
plus at most two that it shares with a neighbour (read from an offset). The ``N - W c < W`` samples left
at the end of the epoch's order are the only ones not seen (the final, partial global batch), and since
the order changes each epoch they are different samples every time. Every step has the same batch size
on every rank, which the all-gather of a contrastive loss needs; all steps are full except one, the rank's
last batch, which the DataLoader hands out last only when S is a multiple of the worker count K (it ends the
last worker's block, below; otherwise ``S mod K`` full steps follow it).
With ``drop_last`` the partial last step is dropped instead (S = floor(N / (W B))).

Inside a rank the S batches are split into contiguous blocks, one per worker (the first ``S mod K``
workers get one more). PyTorch's DataLoader asks workers round-robin, so after the main process has
taken T batches, worker k has delivered ``T // K + (k < T mod K)`` of them: that is how a resume point
(T, stored in the checkpoint) maps back to a position inside each worker's block.

Evaluation passes (:func:`plan_eval`) read the shards in order, each rank a contiguous block of the batches
one process would make, split into the same contiguous blocks per worker; resampled streams
(:func:`draw_shards`) have no plan but an endless seeded draw of shards.
This is the first stage of the pipeline (:mod:`clipforge.data.dataset`); nothing here reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive samples of shard ``url``, starting at sample ``start`` of that shard."""

    url: str
    start: int
    count: int


@dataclass(frozen=True)
class EpochShape:
    steps: int  # batches per rank per epoch
    per_rank: int  # samples per rank per epoch
    last_batch: int  # size of the final batch (== batch_size unless partial)
    dropped: int  # samples of the epoch that no rank sees


def epoch_shape(num_samples: int, world_size: int, batch_size: int, drop_last: bool = False) -> EpochShape:
    """Steps and samples per rank so that every rank has the same batch sizes at every step."""
    if num_samples < world_size:
        raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
    if drop_last:
        steps = num_samples // (world_size * batch_size)
        if steps == 0:
            raise ValueError(
                f"drop_last with {num_samples} samples, world size {world_size} and batch size {batch_size} "
                "leaves no batch; lower the batch size or keep the partial batch"
            )
        last = batch_size
    else:
        steps = math.ceil(num_samples / (world_size * batch_size))
        last = (num_samples - world_size * (steps - 1) * batch_size) // world_size
        if last == 0:
            steps, last = steps - 1, batch_size
    per_rank = (steps - 1) * batch_size + last
    return EpochShape(steps, per_rank, last, num_samples - world_size * per_rank)


def shard_order(urls: list[str], seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The epoch's shard order: a permutation drawn from ``(seed, epoch)``, the same on every rank."""
    if not shuffle:
        return list(urls)
    perm = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(urls))
    return [urls[i] for i in perm]


def worker_batches(steps: int, worker: int, num_workers: int) -> tuple[int, int]:
    """The contiguous block ``[first, first + n)`` of a rank's batches that worker ``worker`` produces."""
    base, extra = divmod(steps, num_workers)
    n = base + (worker < extra)
    first = worker * base + min(worker, extra)
    return first, n


def delivered(consumed: int, worker: int, num_workers: int) -> int:
    """How many of worker ``worker``'s batches are among the first ``consumed`` batches the DataLoader
    returned (round-robin over workers, each block as long as or one shorter than the previous)."""
    return consumed // num_workers + (worker < consumed % num_workers)


def segments(order: list[str], counts: dict[str, int], begin: int, end: int) -> list[Segment]:
    """The samples ``[begin, end)`` of the concatenation of ``order`` as per-shard segments."""
    out, offset = [], 0
    for url in order:
        n = counts[url]
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            out.append(Segment(url, lo - offset, hi - lo))
        offset += n
        if offset >= end:
            break
    return out


@dataclass(frozen=True)
class WorkerPlan:
    segments: list[Segment]  # what this worker reads, in order
    batch_sizes: list[int]  # the batches it yields, in order
    first_batch: int  # index of its first batch among the rank's batches


def plan_worker(
    urls: list[str],
    counts: dict[str, int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool = False,
    shuffle: bool = True,
) -> WorkerPlan:
    """Everything one worker of one rank reads and yields in one exact epoch."""
    total = sum(counts[u] for u in urls)
    shape = epoch_shape(total, world_size, batch_size, drop_last)
    first, n = worker_batches(shape.steps, worker, num_workers)
    sizes = [shape.last_batch if b == shape.steps - 1 else batch_size for b in range(first, first + n)]
    begin = rank * shape.per_rank + first * batch_size
    order = shard_order(urls, seed, epoch, shuffle)
    return WorkerPlan(segments(order, counts, begin, begin + sum(sizes)), sizes, first)


def skip_segments(segs: list[Segment], n: int) -> list[Segment]:
    """Drop the first ``n`` samples from a list of segments (whole segments skipped without reading)."""
    if n == 0:  # also the only skip possible for segments of unknown length (count < 0)
        return list(segs)
    out = []
    for s in segs:
        if n >= s.count:
            n -= s.count
            continue
        out.append(Segment(s.url, s.start + n, s.count - n))
        n = 0
    return out


def plan_eval(
    urls: list[str],
    counts: dict[str, int] | None,
    batch_size: int,
    worker: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[Segment], list[int]]:
    """An evaluation pass (in shard order, partial last batch): the segments worker ``worker`` of rank
    ``rank`` reads and the batch sizes it yields. The set is cut into the batches one process would make;
    rank ``r`` takes the contiguous block ``r`` of them (:func:`worker_batches`: blocks differ by at most
    one batch, none is padded or repeated) and its workers split that block the same way. Without a
    manifest, whole shards go round-robin to the ranks, then to the workers, and the batch sizes are
    unknown (``[]``): each shard is then cut into its own batches (:func:`~clipforge.data.batch.open_batches`)."""
    if counts is None:
        return [Segment(u, 0, -1) for u in urls[rank::world_size][worker::num_workers]], []
    total = sum(counts[u] for u in urls)
    first_r, n_r = worker_batches(-(-total // batch_size), rank, world_size)
    first_w, n = worker_batches(n_r, worker, num_workers)
    first = first_r + first_w
    begin, end = first * batch_size, min(total, (first + n) * batch_size)
    sizes = [min(batch_size, end - b) for b in range(begin, end, batch_size)]
    return segments(urls, counts, begin, end), sizes


def whole_set(urls: list[str], counts: dict[str, int] | None) -> list[Segment]:
    """Every sample of every shard, in ``urls`` order (what a worker re-reads when its own range has
    nothing readable)."""
    if counts is None:
        return [Segment(u, 0, -1) for u in urls]
    return segments(urls, counts, 0, sum(counts[u] for u in urls))


def draw_shards(
    sources: list[list[str]], weights: list[float], counts: dict[str, int] | None, rng: np.random.Generator
) -> Iterator[str]:
    """Resampled mode: shards drawn with replacement, endlessly: a source with probability proportional
    to ``weight / mean shard size`` (so weights are shares of *samples*; of shards without a manifest),
    then one of its shards uniformly."""
    probs = np.array(weights, dtype=np.float64)
    if counts is not None:
        probs /= np.array([np.mean([counts[u] for u in src]) for src in sources])
    probs /= probs.sum()
    while True:
        src = sources[int(rng.choice(len(sources), p=probs))]
        yield src[int(rng.integers(len(src)))]
