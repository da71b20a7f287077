"""The default pipeline under ``trainer=ddp`` on two CPU processes (gloo): synthetic shards to the end,
checkpoint and summary included, launched the way a user launches it (``python -m clipforge.train``)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import load_model

STEPS = 4
SMALL = (
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=2",
    "logger=csv",
    "data.source.num_train=128",
    "data.source.num_heldout=32",
    "data.source.samples_per_shard=32",
    "data.batch_size=16",
    "data.num_workers=0",
)


def test_ddp_two_cpu_processes_run_to_the_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "clipforge.train", *SMALL,
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "Starting with 2 processes" in out
    # The summary comes from global rank 0 only, after the held-out zero-shot evaluation.
    assert proc.stdout.count("clipforge run summary") == 1
    assert f"steps:             {STEPS}" in proc.stdout
    assert "held-out zero-shot top-1" in proc.stdout

    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    model, cfg = load_model(last)
    assert cfg["trainer"]["strategy"]["_target_"].endswith("DDPStrategy") and cfg["trainer"]["devices"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Both ranks logged to one CSV (rank 0): every step of the run is there.
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/samples_per_s" in metrics


# -- the documented launch commands ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
SHELL_VARS = {
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_JOB_NAME": "clipforge",
    "SLURM_JOB_ID": "7",
}


def launch_commands(text: str) -> list[list[str]]:
    """The Hydra overrides of every ``clipforge-train`` / ``-m clipforge.train`` / ``sbatch ...`` command
    line in ``text``, as the shell would pass them (variables filled in, placeholders made real)."""
    text = text.replace("\\\n", " ")
    text = re.sub(
        r"\$\{?(\w+)(:-[^}]*)?\}?", lambda m: SHELL_VARS.get(m.group(1), "/x"), text.replace('"$@"', "")
    )
    commands = []
    for line in text.splitlines():
        words = shlex.split(line) if not line.lstrip().startswith("#") else []
        for entry in ("clipforge-train", "clipforge.train", "scripts/slurm/pretrain.sbatch"):
            if entry in words:
                args = words[words.index(entry) + 1 :]
                commands.append(
                    [a.replace("=...", "='/x/{0..1}.tar'") for a in args if not a.startswith("hydra.")]
                )
    return commands


def test_documented_launch_commands_compose(compose_cfg) -> None:
    """Every command in docs/launching.md and the SLURM script composes (a misspelt key would not)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "launching.md").read_text(), flags=re.S)
    docs = launch_commands("\n".join(blocks))
    (slurm,) = launch_commands((ROOT / "scripts" / "slurm" / "pretrain.sbatch").read_text())
    assert len(docs) >= 8
    for args in [*docs, slurm]:
        cfg = compose_cfg(*args)
        if "trainer=ddp" in args:
            assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
            assert cfg.trainer.strategy._target_.endswith(
                ("DDPStrategy", "FSDPStrategy", "ModelParallelStrategy")
            )
    assert {"trainer.num_nodes=2", "trainer.devices=8", "ckpt_path=auto"} <= set(slurm)


def test_fsdp_strategy_config_wraps_transformer_blocks(compose_cfg) -> None:
    """Lightning runs FSDP on GPUs only, so here the strategy object alone is built and checked."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from clipforge.models.layers import Block

    cfg = compose_cfg("trainer=ddp", "trainer/strategy=fsdp")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert Block in policy._module_classes
    assert strategy.kwargs["use_orig_params"]  # what ContrastiveModule's name-based decay groups expect


def test_fsdp2_strategy_config_is_lightnings_model_parallel_with_sharded_saves(compose_cfg) -> None:
    """trainer/strategy=fsdp2 builds ModelParallelStrategy (FSDP2 is applied by the module's configure_model;
    it runs on two CPU processes in tests/launch/test_fsdp2.py)."""
    from datetime import timedelta

    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = compose_cfg("trainer=ddp", "trainer/strategy=fsdp2", "trainer.strategy.timeout.seconds=60")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._save_distributed_checkpoint and strategy._timeout == timedelta(seconds=60)


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_both_at_the_same_step_with_one_checkpoint(tmp_path: Path) -> None:
    # Ctrl+C reaches rank 1 only (at the start of step 3): both ranks finish step 3, agree to stop, and
    # rank 0 saves preempt-step3; the run exits 0 with no end-of-training work.
    run_dir = tmp_path / "run"
    fault = (
        "+callbacks.fault._target_=faultinject.FaultInjector",
        "+callbacks.fault.action=sigint",
        "+callbacks.fault.at_step=2",
        "+callbacks.fault.rank=1",
    )
    cmd = [
        sys.executable, "-m", "clipforge.train", *SMALL, "trainer.max_steps=8", *fault,
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    path = os.pathsep.join([str(Path(__file__).parent / "fault"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    # Ctrl+C as a terminal delivers it: pytest started in the background (as CI may) ignores SIGINT, and
    # an ignored disposition passes to children, where the callback rightly keeps ignoring it.
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "clipforge run summary" not in proc.stdout
    preempt = sorted((run_dir / "checkpoints").glob("preempt-*.ckpt"))
    assert [p.name for p in preempt] == ["preempt-step0000003.ckpt"]
    assert torch.load(preempt[0], map_location="cpu", weights_only=True)["global_step"] == 3
    out = proc.stdout + proc.stderr
    assert out.count("at step 3, exiting") == 2, out[-4000:]  # each rank left after the same step
