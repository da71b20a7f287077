"""The documented multi-node command (docs/launching.md, "2 nodes x 8 GPUs with torchrun") run as two
"nodes" on this machine: two ``torchrun --nnodes=2 --nproc-per-node=1`` invocations meeting at a c10d
rendezvous on 127.0.0.1, DDP over gloo on CPU, on WebDataset shards written by the project's shard writer.

Checked: both nodes finish; every rank reads its own shards and takes the same number of batches
(exact epochs: disjoint shards covering the data once; resampled: each rank its own draw); only global
rank 0 writes checkpoints and prints the summary; a node killed mid-run (SIGKILL to all its processes)
stops the other within the collective timeout with an error naming the lost rank, a hung node (SIGSTOP)
too, and the same command relaunched on both nodes with ``ckpt_path=auto`` resumes from the checkpoint.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from launchhelpers import (
    BIN,
    HELDOUT,
    SHARD_SIZE,
    SMALL_MODEL,
    TRAIN_SHARDS,
    env,
    free_port,
    kill_session,
    probe,
    read_jsonl,
    shard_of,
    start,
    text,
    wait,
    wait_for,
    wds_overrides,
    write_test_shards,
)

from runconf import QUIET

pytestmark = pytest.mark.slow

BATCH = 16
STEPS_PER_EPOCH = TRAIN_SHARDS * SHARD_SIZE // (2 * BATCH)  # 192 samples over 2 ranks: 6 steps
# trainer.strategy.timeout: how long a survivor may wait for a lost node. Also how long rank 1 waits at a
# barrier while rank 0 alone writes a checkpoint, so not short on a shared 2-core machine; the frozen-node
# test, whose duration it sets, uses the shorter one.
TIMEOUT_S, STOP_TIMEOUT_S = 60, 30
GRACE_S = 5  # clipforge.train.LOST_RANK_GRACE_S: the survivor's check-in wait before it names the lost rank


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_test_shards(tmp_path_factory.mktemp("shards"))


def node_command(port: int, run_dir: Path, *overrides: str, timeout: int = TIMEOUT_S) -> list[str]:
    """docs/launching.md's torchrun command with one process per node, CPU and gloo, and small sizes."""
    return [
        str(BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
        "-m", "clipforge.train", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1",
        "trainer.accelerator=cpu", "trainer.precision=32-true",
        f"hydra.run.dir={run_dir}", "ckpt_path=auto",
        f"trainer.strategy.timeout.seconds={timeout}",
        *SMALL_MODEL, *QUIET, "logger=csv", "scheduler.warmup_steps=2", "trainer.log_every_n_steps=2",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        *overrides,
    ]  # fmt: skip


def launch_pair(tmp: Path, name: str, cmd: list[str]) -> tuple[list, list[Path]]:
    logs = [tmp / f"{name}-node{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        procs.append(start(cmd, log, tmp, env()))
        time.sleep(0.5)  # the first agent to start hosts the rendezvous store
    return procs, logs


def rank_of(log: Path) -> int:
    """The global rank Lightning gave this node's process (it prints it at start)."""
    out = text(log)
    return 0 if "GLOBAL_RANK: 0," in out else 1 if "GLOBAL_RANK: 1," in out else -1


def failure(logs: list[Path]) -> str:
    return "\n\n".join(f"--- {log.name}\n{text(log)[-4000:]}" for log in logs)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_two_torchrun_nodes_train_on_their_own_shards(shards, tmp_path: Path, mode: str) -> None:
    run_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    data = wds_overrides(shards, BATCH)
    if mode == "resampled":
        data += ("data.stream.resampled=true", f"data.stream.epoch_samples={TRAIN_SHARDS * SHARD_SIZE}")
    cmd = node_command(free_port(), run_dir, *data, *probe(probe_dir), f"trainer.max_steps={STEPS_PER_EPOCH}")
    procs, logs = launch_pair(tmp_path, mode, cmd)
    assert wait(procs, timeout=300) == [0, 0], failure(logs)

    ranks = {rank_of(log): log for log in logs}
    assert set(ranks) == {0, 1}, failure(logs)
    assert "distributed_backend=gloo" in text(ranks[0])
    # Rank 0 alone prints the summary, after the distributed zero-shot evaluation of the held-out set.
    assert text(ranks[0]).count("clipforge run summary") == 1, failure(logs)
    assert "clipforge run summary" not in text(ranks[1])
    assert f"steps:             {STEPS_PER_EPOCH}" in text(ranks[0])
    assert "held-out zero-shot top-1" in text(ranks[0]) and f"{HELDOUT} images" in text(ranks[0])

    # The same number of full batches on both ranks, each of its own samples.
    batches = [read_jsonl(probe_dir / f"rank{r}.jsonl") for r in (0, 1)]
    assert [len(b) for b in batches] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH]
    assert all(len(line["keys"]) == BATCH for b in batches for line in b)
    keys = [[k for line in b for k in line["keys"]] for b in batches]
    if mode == "exact":
        # One epoch: the ranks split the shards between them and together see every sample once.
        assert not set(keys[0]) & set(keys[1])
        assert len(set(keys[0]) | set(keys[1])) == TRAIN_SHARDS * SHARD_SIZE
        assert not {shard_of(k) for k in keys[0]} & {shard_of(k) for k in keys[1]}
    else:
        # Each rank draws shards with replacement from its own generator: two different streams.
        assert [shard_of(k) for k in keys[0]] != [shard_of(k) for k in keys[1]]
        assert keys[0] != keys[1]

    # Only global rank 0 wrote checkpoint files, and they are all there.
    saves = [read_jsonl(probe_dir / f"saves-rank{r}.jsonl") for r in (0, 1)]
    assert saves[0] and not saves[1]
    written = {Path(s["path"]).name for s in saves[0]}
    on_disk = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt") if not p.is_symlink()}
    assert on_disk <= written and "periodic-step0000006.ckpt" in on_disk
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == STEPS_PER_EPOCH
    assert last["clipforge_config"]["trainer"]["num_nodes"] == 2
    # Throughput and evaluation callbacks logged under two nodes (rank 0's CSV).
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    for key in ("train/samples_per_s", "val/loss", "val/zeroshot_top1", "val/i2t_r1"):
        assert key in metrics, key


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_lost_node_stops_the_other_naming_it_and_the_pair_resumes(shards, tmp_path: Path, how: str) -> None:
    """Rank 1 stops at the start of its sixth step (global step 5; checkpoints exist at steps 2 and 4); the
    test then kills every process of its node (sigkill) or freezes them (sigstop: a hung node whose sockets
    stay open; the survivor gives up after trainer.strategy.timeout, 30 s here). Rank 1 is the node started second (c10d ranks follow the agents' pids), so the lost node is
    not the one hosting the rendezvous store, as on a cluster where node 0 hosts it."""
    run_dir = tmp_path / "run"
    steps, block_at = 2 * STEPS_PER_EPOCH, 5
    data = (*wds_overrides(shards, BATCH), f"trainer.max_steps={steps}")
    timeout = STOP_TIMEOUT_S if how == "sigstop" else TIMEOUT_S
    blocking = probe(tmp_path / "probe1", block_rank=1, block_at=block_at)
    cmd = node_command(free_port(), run_dir, *data, *blocking, timeout=timeout)
    procs, logs = launch_pair(tmp_path, "first", cmd)
    marker = tmp_path / "probe1" / "blocked-rank1.json"
    try:
        wait_for(marker, timeout=300, procs=procs)
    except BaseException:
        for p in procs:
            kill_session(p.pid)
        raise AssertionError(failure(logs)) from None
    blocked = json.loads(marker.read_text())
    lost = next(i for i, p in enumerate(procs) if p.pid == blocked["ppid"])  # that node's torchrun agent
    survivor = procs[1 - lost]
    sig = signal.SIGKILL if how == "sigkill" else signal.SIGSTOP
    t0 = time.monotonic()
    for pgid in (procs[lost].pid, blocked["pgid"]):  # the agent's session and the worker's (with its loaders)
        kill_session(pgid, sig)
    try:
        rc = survivor.wait(timeout=timeout + GRACE_S + 60)
    finally:
        for pgid in (procs[lost].pid, blocked["pgid"]):
            kill_session(pgid, signal.SIGKILL)
        procs[lost].wait()
    waited = time.monotonic() - t0
    out = text(logs[1 - lost])
    assert rc != 0, failure(logs)
    assert "LostRankError" in out and "lost rank 1" in out, failure(logs)
    assert f"trainer.strategy.timeout = {timeout} s" in out
    # A dead peer is noticed at once; a hung one after the timeout. Then GRACE_S for the check-in.
    limit = timeout + GRACE_S + 15 if how == "sigstop" else GRACE_S + 15
    assert waited < limit, f"the survivor took {waited:.0f} s to exit\n" + failure(logs)
    if how == "sigstop":
        assert waited > timeout - 2, f"exited after {waited:.0f} s, before the timeout?\n{out[-3000:]}"
        return

    # The same command on both nodes resumes the pair from the newest checkpoint (step 4).
    cmd = node_command(free_port(), run_dir, *data, *probe(tmp_path / "probe2"))
    procs, logs = launch_pair(tmp_path, "resumed", cmd)
    assert wait(procs, timeout=300) == [0, 0], failure(logs)
    for log in logs:
        assert "periodic-step0000004.ckpt (step 4)" in text(log), failure(logs)
    resumed = [read_jsonl(tmp_path / "probe2" / f"rank{r}.jsonl") for r in (0, 1)]
    # Step 5 is trained again (it ended after the last checkpoint), then the run goes on to the end.
    assert [[line["step"] for line in r] for r in resumed] == [list(range(5, steps + 1))] * 2
    assert resumed[0][0]["batch"] == 4  # the data position came back: batch 4 of epoch 0
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps
