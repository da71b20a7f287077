import itertools

import pytest

from clipforge.data import plan


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_shape_same_batches_on_every_rank_and_drops_less_than_a_global_batch(drop_last):
    for n, w, b in itertools.product([7, 64, 65, 100, 129, 1000, 1001], [1, 2, 3, 8], [1, 4, 16]):
        if n < w or (drop_last and n < w * b):
            continue
        s = plan.epoch_shape(n, w, b, drop_last)
        assert s.per_rank == (s.steps - 1) * b + s.last_batch
        assert 1 <= s.last_batch <= b
        assert s.dropped == n - w * s.per_rank
        if drop_last:
            assert s.last_batch == b and s.dropped < w * b
        else:
            assert 0 <= s.dropped < w  # only the final partial global batch loses samples


def test_epoch_shape_drops_a_last_step_too_small_to_split():
    s = plan.epoch_shape(2 * 32 * 2 + 1, 2, 32)  # one sample left over for two ranks
    assert (s.steps, s.last_batch, s.dropped) == (2, 32, 1)


def round_robin(blocks):
    """What torch's DataLoader returns for IterableDataset workers: one batch from each live worker in turn."""
    iters = [iter(b) for b in blocks]
    live = list(range(len(iters)))
    out = []
    while live:
        for k in list(live):
            try:
                out.append(next(iters[k]))
            except StopIteration:
                live.remove(k)
    return out


@pytest.mark.parametrize(("steps", "workers"), [(10, 3), (3, 5), (12, 4), (1, 2), (7, 1)])
def test_worker_blocks_cover_the_epoch_and_delivered_matches_round_robin(steps, workers):
    blocks = []
    for k in range(workers):
        first, n = plan.worker_batches(steps, k, workers)
        blocks.append([(k, first + i) for i in range(n)])
    assert sorted(b for blk in blocks for _, b in blk) == list(range(steps))
    order = round_robin(blocks)
    for t in range(steps + 1):
        got = order[:t]
        for k in range(workers):
            assert plan.delivered(t, k, workers) == sum(1 for w, _ in got if w == k)


def test_plan_worker_partitions_the_epoch_over_ranks_and_workers():
    urls = [f"s{i}.tar" for i in range(5)]
    counts = dict(zip(urls, [13, 2, 40, 7, 21]))  # 83 samples
    seen = []
    batch_counts = {}
    for rank, worker in itertools.product(range(3), range(2)):
        wp = plan.plan_worker(
            urls, counts, seed=1, epoch=4, rank=rank, world_size=3, worker=worker, num_workers=2, batch_size=4
        )
        assert sum(s.count for s in wp.segments) == sum(wp.batch_sizes)
        batch_counts.setdefault(rank, []).extend(wp.batch_sizes)
        seen += [(s.url, s.start + i) for s in wp.segments for i in range(s.count)]
    assert len(seen) == len(set(seen)) == 83 - 83 % 3
    assert batch_counts[0] == batch_counts[1] == batch_counts[2]


def test_shard_order_depends_on_epoch_and_seed_only():
    urls = [str(i) for i in range(20)]
    assert plan.shard_order(urls, 0, 1) == plan.shard_order(urls, 0, 1)
    assert plan.shard_order(urls, 0, 1) != plan.shard_order(urls, 0, 2)
    assert plan.shard_order(urls, 0, 1) != plan.shard_order(urls, 1, 1)
    assert sorted(plan.shard_order(urls, 0, 1)) == sorted(urls)


def test_skip_segments_skips_whole_segments_without_reading():
    segs = [plan.Segment("a", 5, 3), plan.Segment("b", 0, 4)]
    assert plan.skip_segments(segs, 2) == [plan.Segment("a", 7, 1), plan.Segment("b", 0, 4)]
    assert plan.skip_segments(segs, 3) == [plan.Segment("b", 0, 4)]
    assert plan.skip_segments(segs, 6) == [plan.Segment("b", 3, 1)]
    assert plan.skip_segments(segs, 7) == []


@pytest.mark.parametrize(
    ("sizes", "batch", "world", "workers"), [([7, 6], 3, 2, 1), ([5, 1, 9], 4, 3, 2), ([2], 3, 4, 2)]
)
def test_eval_plan_splits_the_one_process_batches_over_ranks_without_repeats(sizes, batch, world, workers):
    """Every sample once over all ranks and workers, in the batches one process makes; ranks differ by at
    most one batch (with fewer batches than ranks, some ranks get none)."""
    urls = [f"s{i}" for i in range(len(sizes))]
    counts = dict(zip(urls, sizes))

    def samples(segs):
        return [(s.url, s.start + j) for s in segs for j in range(s.count)]

    one = [plan.plan_eval(urls, counts, batch, k, workers) for k in range(workers)]
    per_rank, got_samples, got_sizes = [], [], []
    for r in range(world):
        parts = [plan.plan_eval(urls, counts, batch, k, workers, r, world) for k in range(workers)]
        per_rank.append(sum(len(sz) for _, sz in parts))
        got_samples += [x for segs, _ in parts for x in samples(segs)]
        got_sizes += [n for _, sz in parts for n in sz]
    assert got_samples == [x for segs, _ in one for x in samples(segs)]  # in order, none twice
    assert got_sizes == [n for _, sz in one for n in sz]  # the one-process batches
    assert max(per_rank) - min(per_rank) <= 1
    # without a manifest: whole shards, each on one rank and worker
    shards = [
        s.url
        for r in range(world)
        for k in range(workers)
        for s in plan.plan_eval(urls, None, batch, k, workers, r, world)[0]
    ]
    assert sorted(shards) == urls
