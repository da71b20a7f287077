"""The read stage of the WebDataset stream (Breuel et al., 2020): the raw samples of a plan's shards, in
order, with every shard opened, sample read and failure counted (:mod:`clipforge.data.failures`).

* :func:`read_segments` reads the segments of an exact or evaluation plan. A placeholder ``None`` stands
  in for each sample a broken shard lost, so positions, and with them block shuffles and resume points,
  do not move.
* :func:`read_shards` reads whole shards as a resampled plan draws them (an endless stream), and stops
  the worker when many shards in a row give nothing: no readable input is left.

One shard is read by :func:`clipforge.data.shards.read_shard`, which never raises for bad data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from clipforge.data.failures import FailureMonitor
from clipforge.data.plan import Segment
from clipforge.data.shards import DataError, RawSample, ShardResult, read_shard

MAX_FAILED_IN_A_ROW = 16  # resampled shards in a row that gave no sample before a worker gives up


def _read_counted(
    url: str, monitor: FailureMonitor, start: int = 0, count: int | None = None, peek: bool = False
) -> Iterator[RawSample]:
    """Samples of one shard; its opening, its samples and its failure go to ``monitor``. The result of
    the read is the generator's return value."""
    result = ShardResult()
    monitor.shard_opened()
    for sample in read_shard(url, result, start, count, peek):
        monitor.samples_read()  # the denominator counts every sample read, good or bad
        yield sample
    if result.failure is not None:
        monitor.shard_failed(result.failure, url)
    return result


def read_segments(
    segs: Iterable[Segment], monitor: FailureMonitor, counts: dict[str, int] | None = None
) -> Iterator[RawSample | None]:
    """Raw samples of the segments in order; ``None`` for each sample a broken shard did not deliver.
    ``counts`` (the manifest) tells when a shard holds more samples than it says: those are never read."""
    for seg in segs:
        count = None if seg.count < 0 else seg.count
        end = None if counts is None else counts.get(seg.url)
        peek = count is not None and end is not None and seg.start + count >= end  # the shard's last part
        result = yield from _read_counted(seg.url, monitor, seg.start, count, peek)
        lost = 0 if count is None else count - result.delivered
        if lost > 0:
            monitor.sample_failed("lost_samples", seg.url, n=lost)
            yield from [None] * lost
        if result.more and end is not None:
            monitor.manifest_short(seg.url, end)


def read_shards(
    urls: Iterable[str], monitor: FailureMonitor, counts: dict[str, int] | None
) -> Iterator[RawSample]:
    """Raw samples of each shard of ``urls`` in turn (whole shards, a resampled plan's draws)."""
    failed_in_row: list[str] = []
    for url in urls:
        result = yield from _read_counted(url, monitor)
        if result.failure is not None:
            lost = (counts or {}).get(url, 0) - result.delivered  # known with a manifest
            if lost > 0:
                monitor.sample_failed("lost_samples", url, n=lost)
        failed_in_row = [*failed_in_row, url] if result.delivered == 0 else []
        if len(failed_in_row) >= MAX_FAILED_IN_A_ROW:
            raise DataError(
                f"{MAX_FAILED_IN_A_ROW} shards in a row gave no sample in {monitor.where}: "
                + ", ".join(sorted(set(failed_in_row))[:8])
            )
