"""The SLURM path end to end, through scripts/slurm/pretrain.sbatch itself: the script runs under bash with
the variables SLURM sets in a batch job (2 nodes x 1 task, job id 4242), with stub ``srun`` and ``scontrol``
first on PATH. The srun stub starts one task per node-slot with the task variables real srun sets
(SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS) and, like SLURM's ``--signal``, passes a signal
on to every process of every task (the data-loader workers included); the scontrol stub records its argv.

SIGUSR1 mid-run -> both ranks finish the step, ``preempt-step<N>.ckpt`` is saved, ``scontrol requeue 4242``
is issued once (rank 0), the job exits 0 -> the same script with the same job id (what SLURM runs after a
requeue) lands in the same run directory and resumes from that checkpoint with ``ckpt_path=auto``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from launchhelpers import (
    BIN,
    ROOT,
    SMALL_MODEL,
    env,
    free_port,
    kill_session,
    probe,
    read_jsonl,
    start,
    text,
    wait_for,
    wds_overrides,
    write_test_shards,
)

from runconf import QUIET

pytestmark = pytest.mark.slow

JOB_ID = "4242"
SRUN = """#!{python}
# Stub srun (test): one task per node-slot with srun's task variables; SIGUSR1/SIGTERM go to every process
# of every task (as SLURM's --signal does); --kill-on-bad-exit=1 stops the others when one fails.
import os, signal, subprocess, sys, time
args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
with open(os.environ["SRUN_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
with open(os.environ["SRUN_PIDFILE"], "w") as f:
    f.write(str(os.getpid()))
nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for node in range(nodes):
    for local in range(per_node):
        task = {{"SLURM_PROCID": str(node * per_node + local), "SLURM_LOCALID": str(local),
                "SLURM_NODEID": str(node), "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_ID": "0"}}
        procs.append(subprocess.Popen(args, env=os.environ | task, start_new_session=True))

def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)

signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
rcs = [None] * len(procs)
while None in rcs:
    for i, p in enumerate(procs):
        if rcs[i] is None and p.poll() is not None:
            rcs[i] = p.returncode
            if p.returncode != 0 and "--kill-on-bad-exit=1" in opts:
                for q in procs:
                    if q.poll() is None:
                        os.killpg(q.pid, signal.SIGKILL)
    time.sleep(0.1)
sys.exit(max(abs(rc) for rc in rcs))
"""
SCONTROL = '#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n'


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_test_shards(tmp_path_factory.mktemp("shards"))


def slurm_env(tmp: Path) -> dict[str, str]:
    stubs = tmp / "stubs"
    stubs.mkdir()
    for name, body in (("srun", SRUN.format(python=sys.executable)), ("scontrol", SCONTROL)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    return env(
        PATH=os.pathsep.join((str(stubs), str(BIN), os.environ["PATH"])),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="clipforge",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_NODELIST="127.0.0.1",
        MASTER_PORT=str(free_port()),  # Lightning would derive it from the job id: might be taken here
        CLIPFORGE_OUTPUT_ROOT=str(tmp / "outputs"),
        SCONTROL_LOG=str(tmp / "scontrol.log"),
        SRUN_LOG=str(tmp / "srun.log"),
        SRUN_PIDFILE=str(tmp / "srun.pid"),
    )


def test_sbatch_script_requeues_on_sigusr1_and_the_requeued_job_resumes(shards, tmp_path: Path) -> None:
    environ = slurm_env(tmp_path)
    probe_dir, steps = tmp_path / "probe", 10
    # What a user appends to `sbatch scripts/slurm/pretrain.sbatch`, plus CPU and test sizes.
    overrides = [
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.timeout.seconds=60",
        *SMALL_MODEL, *QUIET, "logger=csv", "scheduler.warmup_steps=2", f"trainer.max_steps={steps}",
        "callbacks.periodic_checkpoint.every_n_train_steps=4", *wds_overrides(shards),
        *probe(probe_dir, pause_at=5),
    ]  # fmt: skip
    cmd = ["bash", str(ROOT / "scripts" / "slurm" / "pretrain.sbatch"), *overrides]
    log = tmp_path / "job-1.log"
    proc = start(cmd, log, tmp_path, environ)
    try:
        for rank in (0, 1):  # both tasks wait at the start of step 6, i.e. after 5 steps
            wait_for(probe_dir / f"paused-rank{rank}.json", timeout=300, procs=[proc])
        srun_pid = int((tmp_path / "srun.pid").read_text())
        os.kill(srun_pid, signal.SIGUSR1)  # SLURM's --signal=USR1@120
        time.sleep(1.0)  # let the signal reach every task before the step goes on
        (probe_dir / "go").touch()
        assert proc.wait(timeout=300) == 0, text(log)[-6000:]
    finally:
        kill_session(proc.pid)

    run_dir = tmp_path / "outputs" / f"clipforge-{JOB_ID}"  # RUN_DIR of the script
    preempt = run_dir / "checkpoints" / "preempt-step0000006.ckpt"
    assert preempt.is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert torch.load(preempt, map_location="cpu", weights_only=True)["global_step"] == 6
    assert "SIGUSR1 received: saved" in text(log)
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]  # once, by rank 0
    srun = (tmp_path / "srun.log").read_text().splitlines()[0]
    assert srun.startswith(
        "--kill-on-bad-exit=1 clipforge-train trainer=ddp trainer.num_nodes=2 trainer.devices=1"
    )
    assert f"hydra.run.dir={run_dir} ckpt_path=auto" in srun
    assert "clipforge run summary" not in text(log)  # a preempted job skips the end-of-training work

    # SLURM runs the same batch script again under the same job id.
    log = tmp_path / "job-2.log"
    proc = start(cmd, log, tmp_path, environ)
    try:
        assert proc.wait(timeout=300) == 0, text(log)[-6000:]
    finally:
        kill_session(proc.pid)
    assert "preempt-step0000006.ckpt (step 6)" in text(log)
    trained = [line["step"] for line in read_jsonl(probe_dir / "rank0.jsonl")]
    # Steps 1-6 ran before the requeue (the preemption callback saves at the end of step 6 and leaves once
    # the step is logged, after every hook of the step has run, the probe's too), 7-10 after: none lost,
    # none repeated.
    assert trained == list(range(1, steps + 1))
    assert read_jsonl(probe_dir / "rank1.jsonl")[-1]["step"] == steps
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps
    assert text(log).count("clipforge run summary") == 1
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]  # not again
