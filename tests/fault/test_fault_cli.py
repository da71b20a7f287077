"""The fault-injection suite through the command line (`python -m clipforge.train`), one process per run:
SIGKILL mid-save and mid-epoch, a corrupted newest checkpoint, SIGTERM and SIGUSR1 preemption. Every
interrupted run is resumed with ckpt_path=auto and must end bitwise equal to the uninterrupted run.

Each process imports torch and Lightning, so most cases are slow; one SIGKILL mid-save (with the
baseline it resumes to) stays in the default suite, so CI runs the command line. The signals are also
sent to in-process runs by default (tests/fault/test_fault_training.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faulthelpers import RUN, assert_same_training_state, fault, final_state, load

slow = pytest.mark.slow


def cli(run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "clipforge.train",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}",
        *RUN,
        *overrides,
    ]
    # the fault injector (faultinject.py, beside this file) is a test tool, not part of the package
    path = os.pathsep.join(
        p
        for p in (
            str(Path(__file__).parent),
            str(Path(__file__).parents[1]),
            os.environ.get("PYTHONPATH", ""),
        )
        if p
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_data")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    run = tmp_path_factory.mktemp("baseline")
    ok(cli(run, data_dir))
    return final_state(run)


def test_sigkill_mid_save_keeps_the_previous_checkpoint(baseline, data_dir: Path, tmp_path: Path) -> None:
    killed(cli(tmp_path, data_dir, *fault("sigkill_in_save", 6)))
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / "periodic-step0000006.ckpt.tmp"
    assert partial.is_file() and not (ckpts / "periodic-step0000006.ckpt").exists()
    assert os.readlink(ckpts / "last.ckpt") == "periodic-step0000003.ckpt"  # still a valid link
    assert load(ckpts / "last.ckpt")["global_step"] == 3
    proc = ok(cli(tmp_path, data_dir, "ckpt_path=auto"))
    assert "step0000004.ckpt (step 4)" in proc.stderr + proc.stdout  # the validation checkpoint at step 4
    assert_same_training_state(baseline, final_state(tmp_path))


@slow
def test_sigkill_after_a_step_resumes_from_the_validation_checkpoint(
    baseline, data_dir: Path, tmp_path: Path
) -> None:
    # Killed after step 5 (epoch 2, batch 1), before its checkpoints; the newest is the end of epoch 1.
    killed(cli(tmp_path, data_dir, *fault("sigkill_batch_end", 5)))
    proc = ok(cli(tmp_path, data_dir, "ckpt_path=auto"))
    assert "step0000004.ckpt (step 4)" in proc.stderr + proc.stdout
    assert_same_training_state(baseline, final_state(tmp_path))


@slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    baseline, data_dir: Path, tmp_path: Path
) -> None:
    killed(cli(tmp_path, data_dir, *fault("sigkill_batch_end", 7)))
    newest = tmp_path / "checkpoints" / "periodic-step0000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a copy cut short
    proc = ok(cli(tmp_path, data_dir, "ckpt_path=auto"))
    out = proc.stderr + proc.stdout
    assert "auto-resume skips" in out and "periodic-step0000006.ckpt" in out
    assert "step0000004.ckpt (step 4)" in out
    assert_same_training_state(baseline, final_state(tmp_path))


@pytest.mark.parametrize(
    ("action", "step"),
    [  # signal during step 5 / validation after 4
        pytest.param("sigterm", 5, marks=slow),  # in-process: tests/fault/test_fault_training.py, by default
        pytest.param("sigusr1", 5, marks=slow),
        pytest.param("sigterm_validation", 4, marks=slow),
    ],
)
def test_preemption_signal_saves_exits_cleanly_and_resumes(
    baseline, data_dir: Path, tmp_path: Path, action: str, step: int
) -> None:
    proc = ok(cli(tmp_path, data_dir, *fault(action, 4)))  # exit status 0
    preempt = tmp_path / "checkpoints" / f"preempt-step{step:07d}.ckpt"
    assert load(preempt)["global_step"] == step
    assert "clipforge run summary" not in proc.stdout  # left at once: no end-of-training work
    proc = ok(cli(tmp_path, data_dir, "ckpt_path=auto"))
    assert f"{preempt.name} (step {step})" in proc.stderr + proc.stdout
    assert_same_training_state(baseline, final_state(tmp_path))


def test_missing_explicit_checkpoint_fails_at_once_naming_it(data_dir: Path, tmp_path: Path) -> None:
    proc = cli(tmp_path, data_dir, f"ckpt_path={tmp_path}/gone.ckpt")
    assert proc.returncode != 0 and "gone.ckpt" in proc.stderr
