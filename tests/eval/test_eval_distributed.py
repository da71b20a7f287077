"""Two gloo ranks on the CPU give the same results as one process."""

from __future__ import annotations

import math

import torch
import torch.multiprocessing as mp
from evalhelpers import distributed_worker, run_all_evaluations

from clipforge.eval.distributed import shard_range


def test_shard_range_partitions_in_order():
    for n in (0, 1, 5, 23):
        for world in (1, 2, 3, 8):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=path)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_two_ranks_equal_one_rank(tmp_path, handset_model, tokenizer):
    single = run_all_evaluations(handset_model, tokenizer)
    # the case must exercise errors, or equality would be trivial
    assert 0.3 < single["zeroshot"]["top1"] < 1.0 and single["retrieval"]["i2t_r1"] < 1.0
    assert single["retrieval"]["num_unique_images"] == 22  # the repeated image, seen by both ranks, is one
    _assert_same(single["retrieval"], single["retrieval_stream"])
    # fork: the children reuse the parent's imports, which spawn would redo (seconds each on 2 cores)
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(distributed_worker, args=args, nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        _assert_same(single, got, f"rank{rank}")
