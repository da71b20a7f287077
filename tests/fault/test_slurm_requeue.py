"""The SLURM requeue call of the preemption callback against a stub ``scontrol`` on PATH that records its
argv (fast; the whole sbatch script with SIGUSR1 and a resume is tests/launch/test_slurm_sbatch.py)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from clipforge.callbacks.preemption import PreemptionCheckpoint, requeue_slurm_job, slurm_job_id


@pytest.fixture
def scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stub scontrol first on PATH; returns the file its argv lines go to. SCONTROL_RC sets its status."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "stub failure" >&2\nexit ${{SCONTROL_RC:-0}}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


def test_requeue_runs_scontrol_requeue_with_the_job_id(scontrol: Path) -> None:
    assert requeue_slurm_job("4242")
    assert requeue_slurm_job("77_3")  # an array task
    assert scontrol.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]


def test_job_id_is_the_array_task_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert slurm_job_id() == "4243"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "4200_7"


def test_a_failed_or_impossible_requeue_is_a_warning_not_a_crash(
    scontrol: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("SCONTROL_RC", "1")
    assert not requeue_slurm_job("4242")
    assert "scontrol requeue 4242 failed (1): stub failure" in caplog.text
    assert not requeue_slurm_job("42; rm -rf /")  # never reaches a command line
    assert "unexpected SLURM job id" in caplog.text
    assert scontrol.read_text().splitlines() == ["requeue 4242"]
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not requeue_slurm_job("4242")
    assert "scontrol is not on PATH" in caplog.text


class _Trainer:
    """What ``PreemptionCheckpoint._checkpoint`` touches of a trainer, recording the saves."""

    def __init__(self, root: Path) -> None:
        self.global_step, self.is_global_zero, self.checkpoint_callback = 7, True, None
        self.default_root_dir, self.saved = str(root), []
        self.strategy = type("Strategy", (), {"remove_checkpoint": staticmethod(lambda path: None)})()

    def save_checkpoint(self, path: str) -> None:
        self.saved.append(path)


@pytest.mark.parametrize(
    ("sig", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, True), (signal.SIGINT, False)]
)
def test_a_scheduler_signal_requeues_the_job_and_ctrl_c_does_not(
    scontrol: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, requeued: bool
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    callback, trainer = PreemptionCheckpoint(dirpath=str(tmp_path / "ckpt")), _Trainer(tmp_path)
    callback.received = sig
    callback._checkpoint(trainer)
    assert trainer.saved == [str(tmp_path / "ckpt" / "preempt-step0000007.ckpt")]
    assert (scontrol.read_text().splitlines() if scontrol.exists() else []) == (
        ["requeue 4242"] if requeued else []
    )
