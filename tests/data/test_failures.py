"""The skip-fraction limit is judged on enough evidence: an exact epoch over its planned samples, a
resampled stream over a window of samples and shards; never on the first shard a worker happens to meet."""

from __future__ import annotations

from pathlib import Path

import pytest
from datahelpers import write_sizes
from torch.utils.data import DataLoader

from clipforge.data.config import Augment, Stream
from clipforge.data.dataset import ShardDataset
from clipforge.data.failures import COLUMNS, FailurePolicy
from clipforge.data.loader import EpochLoader
from clipforge.data.manifest import find_manifest
from clipforge.data.shards import DataError, expand_urls


def totals(**kw: int) -> dict[str, int]:
    return dict.fromkeys(COLUMNS, 0) | kw


def test_exact_epochs_stop_once_the_failures_alone_exceed_the_limit_of_the_plan() -> None:
    policy = FailurePolicy(0.5)
    # 60 of 120 planned lost, however early: still reachable (every other sample may be good)
    assert policy.verdict(totals(lost_samples=60, samples_read=0), planned=120) is None
    assert policy.verdict(totals(lost_samples=40, corrupt_image=21), planned=120) == (
        "61 of the epoch's 120 planned samples failed"
    )


def test_streams_without_a_plan_are_judged_over_a_window_of_samples_and_shards() -> None:
    policy = FailurePolicy(0.5, min_samples=1000, min_shards=4)
    first_shard_bad = totals(unreadable_shard=1, lost_samples=200, samples_read=50, shards_read=1)
    assert policy.verdict(first_shard_bad, planned=None) is None  # 80% failed, but of one shard
    few_shards = totals(corrupt_image=900, samples_read=1200, shards_read=3)
    assert policy.verdict(few_shards, planned=None) is None
    enough = totals(corrupt_image=900, samples_read=1200, shards_read=4)
    assert policy.verdict(enough, planned=None) == "900 of 1200 samples read from 4 shards failed"
    healthy = totals(corrupt_image=100, samples_read=5000, shards_read=40)
    assert policy.verdict(healthy, planned=None) is None


def test_policy_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_fraction must be in"):
        FailurePolicy(1.5)


def _resampled(tmp_path: Path, bad: int, policy: FailurePolicy) -> tuple[EpochLoader, ShardDataset]:
    urls = write_sizes(tmp_path, [10] * 10)
    for u in urls[:bad]:
        Path(u).write_bytes(b"not a tar" * 50)
    sources = expand_urls(urls)
    ds = ShardDataset(
        sources, find_manifest(urls), batch_size=5, augment=Augment(image_size=8), context_length=8,
        stream=Stream(resampled=True, epoch_samples=50, shuffle_buffer=5), failures=policy,
    )  # fmt: skip
    epochs = iter(range(100))
    return EpochLoader(ds, DataLoader(ds, batch_size=None), lambda: next(epochs), lambda: None), ds


def test_a_resampled_stream_with_a_few_bad_shards_runs_on(tmp_path: Path) -> None:
    loader, ds = _resampled(
        tmp_path, bad=2, policy=FailurePolicy(0.5, min_samples=40, min_shards=4, check_every=2)
    )
    for _ in range(4):
        assert len(list(loader)) == 10
    counts = ds.skip_counts()
    assert counts["unreadable_shard"] > 0 and counts["lost_samples"] == 10 * counts["unreadable_shard"]


def test_a_mostly_bad_resampled_stream_stops_naming_the_shards(tmp_path: Path) -> None:
    loader, _ = _resampled(
        tmp_path, bad=8, policy=FailurePolicy(0.5, min_samples=40, min_shards=4, check_every=2)
    )
    with pytest.raises(
        DataError, match=r"samples read from \d+ shards failed .*unreadable_shard.*0000[0-7]\.tar"
    ):
        for _ in range(20):
            list(loader)
