"""The damage matrix: every way storage breaks a shard, alone and mixed, first and last in the read order,
with 1 and 2 loader workers and with 2 gloo ranks. A few bad shards never stop an epoch: it keeps the
length the manifest promises and every skip is counted by cause. A mostly bad set stops, on every rank
at the same batch, with a message naming the shards.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from datahelpers import add, data_module, sample_ids, write_sizes

from clipforge.data.plan import shard_order
from clipforge.data.shards import CAUSES, DataError
from gloohelpers import free_port, init_gloo

SIZES = [12] * 10  # 120 samples; batch 4
KINDS = (
    "truncated",
    "garbage",
    "empty",
    "missing",
    "corrupt_image",
    "missing_caption",
    "missing_image",
    "zero_byte_member",
    "failing_pipe",
)
# What each damage is counted as: {cause: count}; None = "some, fewer than the shard's 12".
EXPECTED: dict[str, dict[str, int | None]] = {
    "truncated": {"truncated_shard": 1, "lost_samples": None},
    "garbage": {"unreadable_shard": 1, "lost_samples": 12},
    "empty": {"empty_shard": 1, "lost_samples": 12},
    "missing": {"unreadable_shard": 1, "lost_samples": 12},
    "corrupt_image": {"corrupt_image": 2},
    "missing_caption": {"missing_caption": 2},
    "missing_image": {"missing_image": 2},
    "zero_byte_member": {"corrupt_image": 1, "missing_caption": 1},
    "failing_pipe": {"unreadable_shard": 1, "lost_samples": 12},
}
SEED = 0
# Causes that lose a sample (the rest name the shard a loss came from).
LOST_CAUSES = ("corrupt_image", "missing_image", "missing_caption", "lost_samples")
# Every shard-file damage at once, one per shard (a pipe: set is its own case).
EVERY_DAMAGE = {f"i{i}": k for i, k in enumerate(k for k in KINDS if k != "failing_pipe")}
MOSTLY_BAD = {f"i{i}": "garbage" for i in range(6)}  # 72 of 120 samples lost


def _rewrite(path: Path, edit) -> None:
    """Rewrite a shard, passing each (name, bytes) member through ``edit`` (None drops it)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            kept = edit(name, data)
            if kept is not None:
                add(tar, name, kept)


def damage(path: Path, kind: str) -> None:
    with tarfile.open(path) as tar:
        first = int(tar.getnames()[0].split(".")[0])  # the shard's first sample id
    two = {first + 3, first + 7}
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    elif kind == "garbage":
        path.write_bytes(os.urandom(4000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path.unlink()
    elif kind in ("corrupt_image", "missing_caption", "missing_image", "zero_byte_member"):

        def edit(name: str, data: bytes) -> bytes | None:
            i, ext = int(name.split(".")[0]), name.split(".", 1)[1]
            if kind == "corrupt_image" and ext == "jpg" and i in two:
                return data[:30] + b"\x00garbage" * 8
            if kind == "missing_caption" and ext == "txt" and i in two:
                return None
            if kind == "missing_image" and ext == "jpg" and i in two:
                return None
            if kind == "zero_byte_member" and (
                (ext == "jpg" and i == first + 3) or (ext == "txt" and i == first + 7)
            ):
                return b""
            return data

        _rewrite(path, edit)
    # failing_pipe: the shard stays; its pipe: URL fails (see urls_for)


def make_set(root: Path, damages: dict[str, str]) -> tuple[str | list[str], str | None]:
    """Shards with ``damages`` ({"first" | "last" | "i<N>": kind}) applied to the shards at those positions
    of epoch 0's read order; returns (train urls, manifest path for pipe: URLs)."""
    urls = write_sizes(root, SIZES)
    order = shard_order(urls, SEED, 0)
    targets = {}
    for where, kind in damages.items():
        idx = {"first": 0, "last": len(order) - 1}.get(where)
        target = order[idx] if idx is not None else order[int(where[1:])]
        targets[target] = kind
        damage(Path(target), kind)
    if "failing_pipe" in targets.values():
        pipes = [f"pipe:cat {u}" if targets.get(u) != "failing_pipe" else f"pipe:cat {u}.gone" for u in urls]
        return pipes, str(root / "manifest.json")
    return str(root / "{00000..00009}.tar"), None


def run_epoch(urls, manifest, workers: int) -> dict:
    """One training epoch through the data module; what a trainer would see."""
    dm = data_module(urls, 4, workers, manifest=manifest, stream={"seed": SEED})
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = {"steps": len(loader), "batches": 0, "ids": [], "error": None}
    try:
        for _, _, keys in loader:
            out["batches"] += 1
            out["ids"] += sample_ids(keys)
    except DataError as e:
        out["error"] = str(e)
    out["counts"] = dm.skip_counts()
    return out


def check_finished(out: dict, expected: dict[str, int | None]) -> None:
    assert out["error"] is None, out["error"]
    assert out["batches"] == out["steps"] == 30  # the manifest's length: 120 samples / 4
    counts = out["counts"]
    for cause, n in expected.items():
        assert counts[cause] > 0 if n is None else counts[cause] == n, (cause, counts)
    for cause in CAUSES:
        if cause not in expected and cause != "repeated_samples":
            assert counts[cause] == 0, (cause, counts)
    lost = sum(counts[c] for c in LOST_CAUSES)
    assert counts["repeated_samples"] == lost  # every lost sample made up for by a re-read


# Every kind with one worker; with two, the shard-level kinds and one sample-level kind (the split of a
# rank's range between workers is what differs, not the decoding).
ONE_RANK_CASES = [(k, w, 1) for k in KINDS for w in ("first", "last")] + [
    (k, w, 2)
    for k in ("truncated", "garbage", "missing", "corrupt_image", "failing_pipe")
    for w in ("first", "last")
]


@pytest.mark.parametrize(("kind", "where", "workers"), ONE_RANK_CASES)
def test_one_damaged_shard_one_rank(tmp_path, kind, where, workers):
    urls, manifest = make_set(tmp_path, {where: kind})
    check_finished(run_epoch(urls, manifest, workers), EXPECTED[kind])


@pytest.mark.parametrize("workers", [1, 2])
def test_every_damage_at_once_one_rank(tmp_path, workers):
    urls, manifest = make_set(tmp_path, EVERY_DAMAGE)
    out = run_epoch(urls, manifest, workers)
    expected: dict[str, int | None] = {"truncated_shard": 1, "unreadable_shard": 2, "empty_shard": 1}
    expected |= {"corrupt_image": 3, "missing_caption": 3, "missing_image": 2, "lost_samples": None}
    check_finished(out, expected)


def test_a_mostly_bad_set_stops_naming_the_shards(tmp_path):
    urls, manifest = make_set(tmp_path, MOSTLY_BAD)
    out = run_epoch(urls, manifest, 1)
    assert out["error"] is not None and "72 of the epoch's 120 planned samples failed" in out["error"]
    assert "unreadable_shard: 6" in out["error"] and ".tar (unreadable_shard, 12 failed)" in out["error"]


# ------------------------------------------------------------------------------------------ 2 gloo ranks
def _rank_main(rank: int, world: int, cases: list[tuple[str, list, str | None]], port: int, out: str) -> None:
    init_gloo(rank, world, port)
    results = {}
    for name, urls, manifest in cases:
        res = run_epoch(urls, manifest, 1)
        res.pop("ids")
        results[name] = res
        dist.barrier()  # the next case starts together on both ranks
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def two_rank_cases(root: Path) -> list[tuple[str, str | list[str], str | None]]:
    """(name, urls, manifest): each kind first and last in the read order ("<kind>-<where>"), then
    "mostly_bad"."""
    cases = []
    for kind in KINDS:
        for where in ("first", "last"):
            name = f"{kind}-{where}"
            cases.append((name, *make_set(root / name, {where: kind})))
    cases.append(("mostly_bad", *make_set(root / "mostly_bad", MOSTLY_BAD)))
    return cases


def test_two_gloo_ranks_finish_or_stop_together(tmp_path):
    cases = two_rank_cases(tmp_path)
    expected = {f"{kind}-{where}": EXPECTED[kind] for kind in KINDS for where in ("first", "last")}
    mp.start_processes(
        _rank_main, args=(2, cases, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    for name, exp in expected.items():
        for res in (r0[name], r1[name]):
            assert res["error"] is None, (name, res["error"])
            assert res["batches"] == res["steps"] == 15, name  # 120 samples / (2 ranks * 4)
        # each rank counts its own skips; together they are the damage
        total = {c: r0[name]["counts"][c] + r1[name]["counts"][c] for c in CAUSES}
        for cause, n in exp.items():
            assert total[cause] > 0 if n is None else total[cause] == n, (name, cause, total)
    bad0, bad1 = r0["mostly_bad"], r1["mostly_bad"]
    assert (
        bad0["error"] and bad1["error"] and bad0["batches"] == bad1["batches"]
    )  # the same decision, in step
    assert "on 2 ranks" in bad0["error"] and "unreadable_shard" in bad0["error"]
