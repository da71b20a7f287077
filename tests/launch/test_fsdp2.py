"""FSDP2 (``trainer/strategy=fsdp2``: Lightning's ModelParallelStrategy, ``fully_shard`` per block then the
root) on two CPU processes over gloo, launched as docs/launching.md shows: trained, preempted by SIGTERM on
both ranks (sharded save), resumed with ``ckpt_path=auto``, then consolidated with ``clipforge-consolidate``
into one file that ``clipforge-zeroshot`` and ``scripts/convert.py export`` read.

The weights it reaches are compared with a DDP run of the same command (same seed, data and steps): sharding
must not change what is learnt beyond float32 reduction order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launchhelpers import BIN, ROOT, SMALL_MODEL, env, text, wds_overrides, write_test_shards

from clipforge.checkpoint import load_checkpoint, load_model
from runconf import QUIET

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_test_shards(tmp_path_factory.mktemp("shards"))


def train(run_dir: Path, log: Path, shards: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``clipforge-train trainer=ddp [trainer/strategy=fsdp2]`` on 2 CPU processes (Lightning starts rank 1)."""
    cmd = [
        str(BIN / "clipforge-train"), "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "trainer.strategy.timeout.seconds=120", f"hydra.run.dir={run_dir}",
        "ckpt_path=auto", *SMALL_MODEL, *QUIET, "logger=csv", "trainer.log_every_n_steps=2",
        "scheduler.warmup_steps=2", f"trainer.max_steps={STEPS}", "callbacks.periodic_checkpoint.every_n_train_steps=4",
        *wds_overrides(shards), "data.stream.return_keys=false", *extra,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, cwd=run_dir.parent, env=env(), stdout=out, stderr=subprocess.STDOUT, timeout=400
        )
    assert proc.returncode == 0, text(log)[-6000:]
    return proc


def run(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_fsdp2_on_two_cpu_processes(shards, tmp_path: Path) -> None:
    run_dir = tmp_path / "fsdp2"
    sigterm_after_6 = (
        "+callbacks.fault._target_=faultinject.FaultInjector",
        "+callbacks.fault.action=sigterm",
        "+callbacks.fault.at_step=6",
    )
    # 1. Epoch 0 (6 steps, then validation), then both ranks get SIGTERM during step 7: each saves its
    # shards of preempt-step0000007.ckpt and exits 0.
    train(run_dir, tmp_path / "fsdp2-1.log", shards, "trainer/strategy=fsdp2", *sigterm_after_6)
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/samples_per_s" in metrics and "val/loss" in metrics  # throughput; validation_step
    preempt = run_dir / "checkpoints" / "preempt-step0000007.ckpt"
    assert preempt.is_dir(), text(tmp_path / "fsdp2-1.log")[-4000:]
    assert {p.name for p in preempt.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"}

    # 2. The same command resumes from the sharded directory and trains to the end.
    train(run_dir, tmp_path / "fsdp2-2.log", shards, "trainer/strategy=fsdp2")
    out = text(tmp_path / "fsdp2-2.log")
    assert "preempt-step0000007.ckpt (step 7)" in out
    assert out.count("clipforge run summary") == 1 and f"steps:             {STEPS}" in out
    # Evaluation callbacks cannot run a forward pass on sharded weights: one clear warning each, once.
    for name in ("ZeroShotCallback", "RetrievalCallback"):
        assert out.count(f"{name}: the strategy shards the model's weights (FSDP, FSDP2") == 1, name
    assert out.count("no final zero-shot evaluation") == 1
    last = (run_dir / "checkpoints" / "last.ckpt").resolve()
    assert last.is_dir() and last.name == f"periodic-step{STEPS:07d}.ckpt"

    # 3. The same training under DDP: the same weights, up to float32 reduction order.
    ddp_dir = tmp_path / "ddp"
    train(ddp_dir, tmp_path / "ddp.log", shards)
    ddp = load_checkpoint(ddp_dir / "checkpoints" / "last.ckpt")["state_dict"]
    fsdp2 = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]  # consolidated in memory
    assert ddp.keys() == fsdp2.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp2[k], ddp[k], rtol=0, atol=1e-5, msg=k)

    # 4. clipforge-consolidate -> one file; clipforge-zeroshot and export read it.
    consolidated = tmp_path / "fsdp2.ckpt"
    said = run(
        str(BIN / "clipforge-consolidate"),
        str(run_dir / "checkpoints" / "last.ckpt"),
        str(consolidated),
        cwd=tmp_path,
    )
    assert f"step {STEPS}" in said
    model, cfg = load_model(consolidated)
    assert model.logit_scale.shape == () and cfg["trainer"]["strategy"]["_target_"].endswith(
        "ModelParallelStrategy"
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, fsdp2[f"model.{k}"]), k
    said = run(
        str(BIN / "clipforge-zeroshot"), f"checkpoint={consolidated}", "eval.dataset.num_samples=60",
        "num_workers=0", "progress=false", f"hydra.run.dir={tmp_path / 'zeroshot'}", cwd=tmp_path,
    )  # fmt: skip
    assert "top-1" in said
    exported = tmp_path / "exported"
    run(sys.executable, str(ROOT / "scripts" / "convert.py"), "export", "--checkpoint", str(consolidated),
        "--out", str(exported), cwd=tmp_path)  # fmt: skip
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= {p.name for p in exported.iterdir()}


def test_fsdp2_with_grad_checkpointing_trains_the_weights_ddp_does(shards, tmp_path: Path) -> None:
    """Each block is recomputed under FSDP2's per-block all-gathers: the weights are DDP's without it."""
    train(
        tmp_path / "fsdp2",
        tmp_path / "fsdp2.log",
        shards,
        "trainer/strategy=fsdp2",
        "grad_checkpointing=true",
    )
    train(tmp_path / "ddp", tmp_path / "ddp.log", shards)
    fsdp2 = load_checkpoint(tmp_path / "fsdp2" / "checkpoints" / "last.ckpt")["state_dict"]
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["state_dict"]
    assert ddp.keys() == fsdp2.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp2[k], ddp[k], rtol=0, atol=1e-5, msg=k)
