"""Two real gloo ranks: equal batches from unequal shards, with a collective at every step."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datahelpers import data_module, pattern, sample_ids, write_sizes

from gloohelpers import free_port, init_gloo

SIZES = [30, 3, 11, 1, 17, 26, 9]  # 97 samples in shards of very different sizes


def rank_main(rank: int, world: int, shards: str, port: int, out: str) -> None:
    init_gloo(rank, world, port)
    dm = data_module(shards, 8)
    dm.setup("fit")  # reads rank and world size from torch.distributed
    sizes, ids = [], []
    for epoch in range(2):
        dm.set_epoch(epoch)
        for _, _, keys in dm.train_dataloader():
            # a collective per step, like the loss's feature all-gather: unequal batch counts would hang here
            mine = torch.tensor([len(keys)])
            everyone = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            sizes.append([int(t) for t in everyone])
            ids.append(sample_ids(keys))
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"sizes": sizes, "ids": ids, "steps": dm.steps_per_epoch}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_get_equal_batches_and_disjoint_samples(tmp_path):
    write_sizes(tmp_path / "shards", SIZES)
    shards = pattern(tmp_path / "shards", len(SIZES))
    # fork: the children reuse the parent's imports, which spawn would redo (seconds each on 2 cores)
    args = (2, shards, free_port(), str(tmp_path))
    mp.start_processes(rank_main, args=args, nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    steps = r0["steps"]
    assert steps == r1["steps"] == 6 and len(r0["sizes"]) == len(r1["sizes"]) == 2 * steps
    assert all(a == b for a, b in r0["sizes"])  # same batch size on both ranks at every step
    for epoch in range(2):
        batches = (
            r0["ids"][epoch * steps : (epoch + 1) * steps] + r1["ids"][epoch * steps : (epoch + 1) * steps]
        )
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == 96  # 97 = 6 steps x 2 ranks x 8 + 1 left over
    assert r0["ids"][:steps] != r0["ids"][steps:]  # reshuffled across epochs


def resume_rank_main(rank: int, world: int, shards: str, port: int, out: str) -> None:
    from clipforge.callbacks.data_skips import total_skip_counts

    init_gloo(rank, world, port)
    full = data_module(shards, 8)
    for epoch in range(2):
        full.set_epoch(epoch)
        for _ in full.train_dataloader():
            pass
    first = data_module(shards, 8)
    first.set_epoch(0)
    for _ in first.train_dataloader():
        pass
    saved = [first.state_dict()]  # a collective on every rank, as Lightning's checkpoint saving is
    dist.broadcast_object_list(saved)  # the file holds rank 0's copy; every rank resumes from it
    resumed = data_module(shards, 8)
    resumed.load_state_dict(saved[0])
    resumed.set_epoch(1)
    for _ in resumed.train_dataloader():
        pass
    counts = {
        "full": total_skip_counts(full.skip_counts()),
        "resumed": total_skip_counts(resumed.skip_counts()),
    }
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(counts | {"mine": full.skip_counts()}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_resume_with_every_ranks_skip_counts(tmp_path):
    from test_corruption import rewrite

    urls = write_sizes(tmp_path / "shards", SIZES)
    for url in urls:
        rewrite(url, corrupt=set(range(3, 97, 10)))  # every tenth JPEG corrupt: 10 an epoch
    shards = pattern(tmp_path / "shards", len(SIZES))
    args = (2, shards, free_port(), str(tmp_path))
    mp.start_processes(resume_rank_main, args=args, nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["full"] == r1["full"] and r0["full"]["corrupt_image"] == 20
    assert r0["mine"]["corrupt_image"] > 0 and r1["mine"]["corrupt_image"] > 0  # both ranks skip some
    assert r0["resumed"] == r1["resumed"] == r0["full"]  # epoch 0's skips on either rank were carried over


def mid_epoch_rank_main(rank: int, world: int, shards: str, port: int, out: str) -> None:
    init_gloo(rank, world, port)
    full = data_module(shards, 8)
    full.set_epoch(0)
    expected = [sample_ids(b[2]) for b in full.train_dataloader()]
    first = data_module(shards, 8)
    first.set_epoch(0)
    seen = []
    for batch in first.train_dataloader():
        seen.append(sample_ids(batch[2]))
        if len(seen) == 3:
            break
    saved = [first.state_dict()]  # a collective on every rank; the file holds rank 0's copy
    dist.broadcast_object_list(saved)
    resumed = data_module(shards, 8)
    resumed.load_state_dict(saved[0])
    resumed.set_epoch(0)
    seen += [sample_ids(b[2]) for b in resumed.train_dataloader()]
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"expected": expected, "seen": seen}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_resume_mid_epoch_after_skips_on_their_own_streams(tmp_path):
    # each rank skips other samples: the checkpoint (rank 0's file) must hold every rank's stream slots
    from test_corruption import rewrite

    urls = write_sizes(tmp_path / "shards", SIZES)
    for url in urls:
        rewrite(url, corrupt=set(range(3, 97, 10)))
    shards = pattern(tmp_path / "shards", len(SIZES))
    mp.start_processes(
        mid_epoch_rank_main,
        args=(2, shards, free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    for r in range(2):
        got = json.loads((tmp_path / f"{r}.json").read_text())
        assert got["seen"] == got["expected"], r
