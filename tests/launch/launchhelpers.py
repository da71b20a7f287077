"""Shared pieces of the launch tests: WebDataset shards in a tmp dir, a small model, processes started the
way a user starts them (each "node" in its own session, so a test can kill a whole node), and readers for
what :mod:`launchprobe` records."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from clipforge.data.sources import synthetic_records
from clipforge.data.synthetic import zeroshot_task
from clipforge.data.writer import write_shards
from gloohelpers import free_port  # noqa: F401  (the launch tests import it from here)
from runconf import towers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent  # torchrun, clipforge-train, ... of this environment
TRAIN_SHARDS, SHARD_SIZE, HELDOUT = 8, 24, 48

# A small model (two blocks per tower, so FSDP2 has several units to shard) that trains in ~0.1 s a step.
SMALL_MODEL = towers(32, 2, 2)


def write_test_shards(root: Path) -> dict[str, str]:
    """Synthetic captioned images written with the project's shard writer: 8 training shards of 24 and a
    held-out set of 48 (validation pairs and zero-shot labels); brace patterns for data=wds."""
    write_shards(
        synthetic_records("train", TRAIN_SHARDS * SHARD_SIZE), root / "train", SHARD_SIZE, progress=False
    )
    write_shards(synthetic_records("heldout", HELDOUT), root / "heldout", SHARD_SIZE, progress=False)
    return {
        "train": str(root / "train" / f"{{00000..{TRAIN_SHARDS - 1:05d}}}.tar"),
        "heldout": str(root / "heldout" / f"{{00000..{HELDOUT // SHARD_SIZE - 1:05d}}}.tar"),
    }


def wds_overrides(shards: dict[str, str], batch_size: int = 16) -> tuple[str, ...]:
    """data=wds on those shards, with validation, zero-shot classes and sample keys in every batch."""
    classnames, _ = zeroshot_task()
    return (
        "data=wds",
        f"data.train_urls='{shards['train']}'",
        f"data.val_urls='{shards['heldout']}'",
        f"data.zeroshot.urls='{shards['heldout']}'",
        f"data.zeroshot.classnames=[{','.join(classnames)}]",
        "data.zeroshot.templates=['a {}.']",
        f"data.batch_size={batch_size}",
        "data.num_workers=1",
        "data.stream.shuffle_buffer=48",
        "data.stream.return_keys=true",
    )


def probe(out_dir: Path, **options: int) -> tuple[str, ...]:
    """Overrides that add :class:`launchprobe.LaunchProbe` (``block_rank``, ``block_at``, ``pause_at``)."""
    args = ("+callbacks.probe._target_=launchprobe.LaunchProbe", f"+callbacks.probe.out_dir={out_dir}")
    return args + tuple(f"+callbacks.probe.{k}={v}" for k, v in options.items())


def env(**extra: str) -> dict[str, str]:
    """The environment of a launched process: launchprobe and the fault injector (tests/fault/faultinject.py)
    importable, one thread, no W&B."""
    path = os.pathsep.join(
        p
        for p in (str(HERE), str(HERE.parent / "fault"), str(HERE.parent), os.environ.get("PYTHONPATH", ""))
        if p
    )
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def start(cmd: list[str], log: Path, cwd: Path, environ: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (a "node": killpg reaches every process it started)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_session(p.pid)
        raise


def kill_session(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, sig)


def wait_for(path: Path, timeout: float, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited before {path.name} appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def shard_of(key: str) -> str:
    """``/tmp/.../train/00003.tar/000000042`` -> ``00003.tar``."""
    return key.rsplit("/", 2)[-2]


def text(log: Path) -> str:
    return log.read_text(errors="replace")
