"""Fault injection through the real config tree: a SIGKILLed run resumes bit-exactly, NaN steps are
skipped and counted, divergence stops with a usable checkpoint, unsafe checkpoints and secrets are refused.

The killed run is a fork of the test process (a real SIGKILL of a real training process, without the
re-import a subprocess pays); tests/fault/test_fault_cli.py does the same through the command line.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from faulthelpers import (
    RUN,
    StepRecorder,
    assert_same_training_state,
    fault,
    final_state,
    load,
    run_forked,
)
from omegaconf import DictConfig, open_dict
from test_fault_files import malicious_checkpoint

from clipforge.callbacks import NonFiniteError, PeriodicCheckpoint, PreemptionCheckpoint
from clipforge.fault import UnsafeCheckpointError
from clipforge.train import train

RECORDER = ("+callbacks.recorder._target_=faulthelpers.StepRecorder",)
# Every SigLIP 2 part on, with box targets: the distillation objectives start at step 4 and the EMA averages
# from step 2, so the resumed stretch (steps 7-10) crosses none of these starts but depends on all of them.
SIGLIP2 = (
    "loss=siglip",
    "objectives=[locca,silc,tips]",
    "objectives.silc.start_frac=0.4",
    "objectives.tips.start_frac=0.4",
    "objectives.silc.num_local=2",
    "objectives.silc.local_grid=2",
    "decoder.num_box_bins=32",
    "ema.start_frac=0.2",
    "ema.decay=0.9",
)


@pytest.fixture(scope="module")
def fault_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault_data")


@pytest.fixture
def run_cfg(compose_cfg, fault_data_dir: Path) -> Callable[..., DictConfig]:
    def make(out: Path, *overrides: str) -> DictConfig:
        cfg = compose_cfg(*RUN, *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.data_dir = str(fault_data_dir)
        return cfg

    return make


@pytest.mark.parametrize(
    "variant",
    [
        (),
        ("loss=siglip",),  # the logit bias and SigLIP's scale come back too
        # two loader processes: the stream resumes mid-epoch in both (~15 s; tests/data/test_resume.py by default)
        pytest.param(("data.num_workers=2",), marks=pytest.mark.slow),
        SIGLIP2,  # EMA, decoder, distillation heads and centres, crops, masks and tasks come back too
    ],
    ids=["clip", "siglip", "two_loader_workers", "siglip2_objectives_ema"],
)
def test_sigkill_mid_step_then_auto_resume_matches_the_uninterrupted_run(
    run_cfg, tmp_path: Path, variant: tuple[str, ...]
) -> None:
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    train(run_cfg(base_dir, *variant))

    # Killed after the backward of step 8, before its update; the newest checkpoint is step 6 (mid-epoch).
    status = run_forked(lambda: train(run_cfg(run_dir, *variant, *fault("sigkill_before_optimizer_step", 7))))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "periodic-step0000006.ckpt" in names and not any(
        "step0000007" in n or "step0000008" in n for n in names
    )

    _, objs = train(run_cfg(run_dir, *variant, "ckpt_path=auto"))
    trainer = objs["trainer"]
    assert Path(trainer.ckpt_path).name == "periodic-step0000006.ckpt"
    assert trainer.global_step == 10
    base, resumed = final_state(base_dir), final_state(run_dir)
    if "loss=siglip" in variant:
        assert "model.logit_bias" in base["state_dict"]
    if variant == SIGLIP2:
        keys = base["state_dict"].keys()
        assert {"ema.steps", "objectives.silc.centre", "objectives.tips.mask_token"} <= keys
        assert "ema.shadow.objectives.locca.decoder.head.weight" in keys
    assert_same_training_state(base, resumed)


def test_nan_batch_is_skipped_counted_and_training_goes_on(run_cfg, tmp_path: Path) -> None:
    # logit scale starts above the clamp (exp(6) > 100): it must come back and stay in range
    cfg = run_cfg(
        tmp_path, *RECORDER, *fault("nan_batch", 2), "trainer.max_steps=5", "model.init_logit_scale=6.0"
    )
    _, objs = train(cfg)
    trainer, module = objs["trainer"], objs["module"]
    rec = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    guard = trainer.callbacks[[type(cb).__name__ for cb in trainer.callbacks].index("NonFiniteGuard")]
    w = rec.weights
    assert all(torch.equal(w[3][k], w[2][k]) for k in w[2]), "the NaN step changed the weights"
    assert not all(torch.equal(w[4][k], w[3][k]) for k in w[3]), "training stopped after the NaN step"
    assert all(torch.isfinite(t).all() for t in w[5].values())
    assert guard.total == 1 and guard.consecutive == 0
    assert trainer.callback_metrics["train/nonfinite_steps"].item() == 1
    # AdamW's own step count shows exactly one update was skipped
    opt = trainer.optimizers[0]
    assert {int(s["step"]) for s in opt.state.values()} == {trainer.global_step - 1}
    assert module.model.logit_scale.item() <= math.log(100) + 1e-6
    assert load(tmp_path / "checkpoints" / "last.ckpt")["callbacks"]["NonFiniteGuard"]["total"] == 1


def test_a_nan_batch_does_not_poison_the_distillation_centres(run_cfg, tmp_path: Path) -> None:
    # SILC and TIPS from the first step: the NaN batch of step 3 reaches the teacher, whose scores feed the
    # running DINO centres. Only that step may be skipped; the next ones train on finite losses.
    starts = ("objectives.silc.start_frac=0", "objectives.tips.start_frac=0", "trainer.max_steps=5")
    _, objs = train(run_cfg(tmp_path, *SIGLIP2, *starts, *fault("nan_batch", 2)))
    trainer, module = objs["trainer"], objs["module"]
    guard = trainer.callbacks[[type(cb).__name__ for cb in trainer.callbacks].index("NonFiniteGuard")]
    assert guard.total == 1 and guard.consecutive == 0
    for name in ("silc", "tips"):
        assert torch.isfinite(module.objectives[name].centre).all(), name
        assert torch.isfinite(module.ema["objectives"][name].centre).all(), name
        assert math.isfinite(trainer.callback_metrics[f"train/{name}_loss"].item()), name


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint_from_before(run_cfg, tmp_path: Path) -> None:
    cfg = run_cfg(tmp_path, *fault("nan_batch", 3, count=3), "callbacks.nonfinite_guard.max_consecutive=3")
    ckpt = tmp_path / "checkpoints" / "nonfinite-step0000006.ckpt"

    def diverge_then_sigterm() -> None:
        with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(4\.\.6\)") as err:
            train(cfg)
        assert str(ckpt) in str(err.value)
        # The run is over: SIGTERM must terminate again, not set a stale preemption flag.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    status = run_forked(diverge_then_sigterm)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    stopped, before = load(ckpt), load(tmp_path / "checkpoints" / "periodic-step0000003.ckpt")
    assert stopped["global_step"] == 6
    # Nothing of steps 4-6 was applied: weights and optimizer moments are those after step 3.
    assert all(torch.equal(stopped["state_dict"][k], v) for k, v in before["state_dict"].items())
    for i, s in before["optimizer_states"][0]["state"].items():
        assert torch.equal(stopped["optimizer_states"][0]["state"][i]["exp_avg"], s["exp_avg"])


def test_a_run_resumed_from_its_divergence_checkpoint_starts_a_new_streak(run_cfg, tmp_path: Path) -> None:
    # As the error advises: lower the learning rate and resume from the divergence checkpoint. One bad batch
    # right after the resume is one skipped step, not the fourth of the previous attempt's streak.
    limit = "callbacks.nonfinite_guard.max_consecutive=3"
    with pytest.raises(NonFiniteError):
        train(run_cfg(tmp_path, *fault("nan_batch", 3, count=3), limit))
    ckpt = tmp_path / "checkpoints" / "nonfinite-step0000006.ckpt"
    resumed = run_cfg(tmp_path, *fault("nan_batch", 6), limit, f"ckpt_path={ckpt}", "optimizer.lr=1e-4")
    _, objs = train(resumed)
    trainer = objs["trainer"]
    guard = trainer.callbacks[[type(cb).__name__ for cb in trainer.callbacks].index("NonFiniteGuard")]
    assert trainer.global_step == 10
    assert guard.total == 4 and guard.consecutive == 0


def test_training_refuses_a_malicious_checkpoint(run_cfg, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        train(run_cfg(tmp_path / "out", f"ckpt_path={bad}"))
    assert not marker.exists()
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything was built


def test_secrets_never_reach_logged_configs_or_checkpoints(
    run_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed"
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = run_cfg(
        tmp_path,
        "logger=csv",
        "trainer.max_steps=1",
        "+notify.api_key=sk-live-abcdef123456",
        "+notify.copied=${oc.env:WANDB_API_KEY}",
    )
    train(cfg)
    hparams = next(tmp_path.rglob("hparams.yaml"))
    logged = yaml.safe_load(hparams.read_text())
    assert logged["notify"] == {"api_key": "***", "copied": "***"}
    stored = load(tmp_path / "checkpoints" / "last.ckpt")["clipforge_config"]
    assert stored["notify"] == {"api_key": "***", "copied": "***"}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".ckpt", ".csv", ".log"):
            data = path.read_bytes()
            assert key.encode() not in data and b"sk-live-abcdef123456" not in data, path


# accum_freq=2 trains by manual optimization, where Lightning's ModelCheckpoint ignored the time trigger
# (every_n_minutes saved nothing until the end) and warned about a test-only "saved_models" convention.
@pytest.mark.parametrize("accum_freq", [1, 2])
def test_time_based_checkpoints_keep_the_newest_and_own_last_ckpt(
    run_cfg, tmp_path: Path, accum_freq: int, recwarn: pytest.WarningsRecorder
) -> None:
    # A vanishing interval saves after every step; only the keep_last=2 newest stay.
    cfg = run_cfg(
        tmp_path,
        f"module.accum_freq={accum_freq}",
        "trainer.max_steps=5",
        "callbacks.periodic_checkpoint.every_n_train_steps=null",
        "callbacks.periodic_checkpoint.every_n_minutes=1e-9",
    )
    train(cfg)
    ckpts = tmp_path / "checkpoints"
    periodic = sorted(p.name for p in ckpts.glob("periodic-*.ckpt"))
    assert periodic == ["periodic-step0000004.ckpt", "periodic-step0000005.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "periodic-step0000005.ckpt"
    assert not list(ckpts.glob("last-v*.ckpt"))  # model_checkpoint handed last.ckpt over
    assert not list(ckpts.glob("*.tmp"))
    assert not [w for w in recwarn if "pre-optimization state" in str(w.message)]


def test_last_ckpt_never_points_at_a_removed_file(run_cfg, tmp_path: Path, monkeypatch) -> None:
    # With keep_last=1 the rotation removed the file last.ckpt linked to before relinking it: a SIGKILL
    # in between left last.ckpt dangling (ckpt_path=<dir>/last.ckpt: no such file). Checked at each removal.
    from lightning.pytorch.strategies import Strategy

    last, dangling = tmp_path / "checkpoints" / "last.ckpt", []
    remove = Strategy.remove_checkpoint

    def remove_and_look(self: Strategy, filepath: Any) -> None:
        remove(self, filepath)
        if last.is_symlink() and not last.exists():
            dangling.append(Path(filepath).name)

    monkeypatch.setattr(Strategy, "remove_checkpoint", remove_and_look)
    cfg = run_cfg(
        tmp_path,
        "trainer.max_steps=3",
        "~callbacks.model_checkpoint",
        "callbacks.periodic_checkpoint.keep_last=1",
        "callbacks.periodic_checkpoint.every_n_train_steps=1",
    )
    train(cfg)
    assert dangling == []
    assert os.readlink(last) == "periodic-step0000003.ckpt"
    assert sorted(p.name for p in last.parent.glob("periodic-*.ckpt")) == ["periodic-step0000003.ckpt"]


def test_a_resumed_run_keeps_only_the_keep_last_newest_periodic_checkpoints(run_cfg, tmp_path: Path) -> None:
    # Lightning never deletes the file a run resumed from, so each ckpt_path=auto restart (a node lost,
    # a job requeued) left one full checkpoint behind beyond keep_last=2.
    periodic_only = "~callbacks.model_checkpoint"  # its best-by-val file at step 5 would be resumed from
    train(run_cfg(tmp_path, "trainer.max_steps=5", periodic_only))  # periodic-step3, periodic-step5 (final)
    _, objs = train(run_cfg(tmp_path, "ckpt_path=auto", periodic_only))  # saves at 6, 9 and 10
    assert Path(objs["trainer"].ckpt_path).name == "periodic-step0000005.ckpt"
    periodic = sorted(p.name for p in (tmp_path / "checkpoints").glob("periodic-*.ckpt"))
    assert periodic == ["periodic-step0000009.ckpt", "periodic-step0000010.ckpt"]


def test_a_finished_run_extends_alike_from_its_last_validations_checkpoint_and_its_periodic_one(
    run_cfg, tmp_path: Path
) -> None:
    # A run that max_steps stops mid-epoch validates its last step, and the best-by-val checkpoint written
    # then is the newest at that step, so auto-resume takes it: the extended run must be the one resumed
    # from the periodic file saved before that validation, bit for bit.
    first, second = tmp_path / "a", tmp_path / "b"
    train(run_cfg(first, "trainer.max_steps=6"))
    shutil.copytree(first, second)
    _, objs = train(run_cfg(first, "ckpt_path=auto"))
    assert Path(objs["trainer"].ckpt_path).name == "step0000006.ckpt"
    train(run_cfg(second, f"ckpt_path={second / 'checkpoints' / 'periodic-step0000006.ckpt'}"))
    assert_same_training_state(final_state(first), final_state(second))


def test_a_resume_with_another_periodic_cadence_goes_on_rotating_the_same_files(
    run_cfg, tmp_path: Path
) -> None:
    # The callback's state (the files it rotates) was stored under a key that named the cadence: a resume
    # with another every_n_train_steps restored none of it, and the earlier files stayed for good.
    train(run_cfg(tmp_path, "trainer.max_steps=4", "callbacks.periodic_checkpoint.every_n_train_steps=2"))
    train(run_cfg(tmp_path, "ckpt_path=auto"))  # saves at 6, 9 and 10
    periodic = sorted(p.name for p in (tmp_path / "checkpoints").glob("periodic-*.ckpt"))
    assert periodic == ["periodic-step0000009.ckpt", "periodic-step0000010.ckpt"]


# Lightning's own accumulation (trainer.accumulate_grad_batches): a step spans two batches. A checkpoint
# written after the first counted it as trained but held none of its gradients, so the resumed run took
# that step on the second batch alone.
ACCUMULATE = ("+trainer.accumulate_grad_batches=2", "trainer.max_steps=6")


@pytest.mark.parametrize("sig", ["sigterm", "sigusr1"])
def test_a_preemption_mid_accumulation_saves_after_the_step_and_resumes_exactly(
    run_cfg, tmp_path: Path, sig: str
) -> None:
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    train(run_cfg(base_dir, *ACCUMULATE))
    # the signal at the first batch of step 4
    status = run_forked(lambda: train(run_cfg(run_dir, *ACCUMULATE, *fault(sig, 3))))
    assert os.WIFEXITED(status), status
    assert [p.name for p in (run_dir / "checkpoints").glob("preempt-*.ckpt")] == ["preempt-step0000004.ckpt"]
    train(run_cfg(run_dir, *ACCUMULATE, "ckpt_path=auto"))
    assert_same_training_state(final_state(base_dir), final_state(run_dir))


def test_the_time_trigger_waits_for_the_end_of_an_accumulated_step(
    run_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.callbacks import model_checkpoint

    # A clock that reads an hour later from the third batch on, the first of step 2: the interval runs out
    # where a save would hold half a step.
    trainers: list[Any] = []
    setup = PeriodicCheckpoint.setup

    def record(cb: PeriodicCheckpoint, trainer: Any, *args: Any, **kwargs: Any) -> None:
        trainers.append(trainer)
        setup(cb, trainer, *args, **kwargs)

    monkeypatch.setattr(PeriodicCheckpoint, "setup", record)

    def monotonic() -> float:
        return 3600.0 * (trainers[-1].fit_loop.epoch_loop.batch_progress.total.ready >= 3)

    monkeypatch.setattr(model_checkpoint, "time", SimpleNamespace(monotonic=monotonic))
    cfg = run_cfg(
        tmp_path,
        *ACCUMULATE,
        "trainer.max_steps=3",
        "callbacks.periodic_checkpoint.every_n_train_steps=null",
        "callbacks.periodic_checkpoint.every_n_minutes=1",
        "callbacks.periodic_checkpoint.keep_last=5",
    )
    train(cfg)
    periodic = sorted(p.name for p in (tmp_path / "checkpoints").glob("periodic-*.ckpt"))
    assert periodic == ["periodic-step0000002.ckpt", "periodic-step0000003.ckpt"]


def test_periodic_checkpoint_needs_a_trigger() -> None:
    with pytest.raises(ValueError, match="every_n_train_steps and/or every_n_minutes"):
        PeriodicCheckpoint(every_n_train_steps=None, every_n_minutes=None)


def test_each_preemption_replaces_the_previous_preemption_checkpoint(run_cfg, tmp_path: Path) -> None:
    # A job requeued again and again must not keep one full checkpoint per preemption.
    for at in (2, 5):
        status = run_forked(lambda at=at: train(run_cfg(tmp_path, *fault("sigterm", at), "ckpt_path=auto")))
        assert os.WIFEXITED(status), status
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("preempt-*.ckpt"))
    assert names == ["preempt-step0000006.ckpt"]
    _, objs = train(run_cfg(tmp_path, "ckpt_path=auto"))
    assert Path(objs["trainer"].ckpt_path).name == "preempt-step0000006.ckpt"
    assert objs["trainer"].global_step == 10


def test_a_resume_past_max_steps_is_refused_and_one_at_it_says_the_run_is_complete(
    run_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Lightning trains nothing from a checkpoint at or beyond max_steps, and said nothing of it.
    train(run_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"at step 10, beyond trainer\.max_steps=6"):
        train(run_cfg(tmp_path, "ckpt_path=auto", "trainer.max_steps=6"))
    with caplog.at_level("WARNING", logger="clipforge.fault.resume"):
        _, objs = train(run_cfg(tmp_path, "ckpt_path=auto"))
    assert objs["trainer"].global_step == 10
    assert "already at trainer.max_steps=10" in caplog.text


def test_a_preempted_run_logs_the_step_it_saved_at(run_cfg, tmp_path: Path) -> None:
    # The preemption left from on_train_batch_end, before Lightning logs the step's metrics: that step's row
    # (train/loss, train/lr, ...) was never written, and the resumed run went on from the next step.
    # Step 6 is also a periodic step: its state is saved once, as the preemption file.
    logged = ("logger=csv", "trainer.log_every_n_steps=1")
    status = run_forked(lambda: train(run_cfg(tmp_path, *logged, *fault("sigterm", 5))))
    assert os.WIFEXITED(status), status
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("p*-step*.ckpt"))
    assert saved == ["periodic-step0000003.ckpt", "preempt-step0000006.ckpt"]
    train(run_cfg(tmp_path, *logged, "ckpt_path=auto"))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert sorted(steps) == list(range(10))


def test_a_preemption_at_the_last_step_leaves_without_the_end_of_training_work(
    run_cfg, tmp_path: Path
) -> None:
    # Step 10 reaches max_steps mid-epoch: the run leaves from the epoch end's hook, without the final periodic
    # save (the preemption file holds that state) or the summary; the resume has nothing left to train.
    status = run_forked(lambda: train(run_cfg(tmp_path, *fault("sigterm", 9))))
    assert os.WIFEXITED(status), status
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("p*-step*.ckpt"))
    assert saved == ["periodic-step0000006.ckpt", "periodic-step0000009.ckpt", "preempt-step0000010.ckpt"]
    _, objs = train(run_cfg(tmp_path, "ckpt_path=auto"))
    assert objs["trainer"].global_step == 10


def test_a_run_after_one_that_failed_in_this_process_still_saves_on_sigterm(run_cfg, tmp_path: Path) -> None:
    # The failed fit leaves its preemption handler installed (Lightning puts back the handler it found); the
    # next run's handler must not chain to it, or SIGTERM kills that run instead of saving it.
    diverge = (*fault("nan_batch", 0), "callbacks.nonfinite_guard.max_consecutive=1", "trainer.max_steps=2")
    with pytest.raises(NonFiniteError):
        train(run_cfg(tmp_path / "failed", *diverge))
    status = run_forked(lambda: train(run_cfg(tmp_path / "run", *fault("sigterm", 2))))
    assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)}"
    assert (tmp_path / "run" / "checkpoints" / "preempt-step0000003.ckpt").is_file()


def test_a_failed_run_closes_its_wandb_run_so_the_next_one_starts_its_own(run_cfg, tmp_path: Path) -> None:
    import wandb

    diverge = (*fault("nan_batch", 0), "callbacks.nonfinite_guard.max_consecutive=1", "trainer.max_steps=2")
    with pytest.raises(NonFiniteError):
        train(run_cfg(tmp_path / "failed", "logger=wandb", *diverge))
    assert wandb.run is None
    _, objs = train(run_cfg(tmp_path / "next", "logger=wandb", "trainer.max_steps=1"))
    assert Path(objs["logger"].experiment.dir).is_relative_to(tmp_path / "next")


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """Ctrl+C as an interactive shell delivers it (KeyboardInterrupt). A process started in the background
    (``nohup``, ``cmd &`` in a script: how CI may start pytest) has SIGINT ignored, and the preemption
    callback rightly leaves an ignored Ctrl+C ignored; these tests are about the terminal case."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_preempted_run_closes_its_wandb_run_so_the_next_one_starts_its_own(
    run_cfg, tmp_path: Path, ctrl_c_as_in_a_terminal
) -> None:
    # A preemption leaves by SystemExit (status 0), not an Exception: the W&B run must still be closed.
    import wandb

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            train(run_cfg(tmp_path / "preempted", "logger=wandb", *fault("sigint", 1)))
    finally:
        signal.signal(signal.SIGINT, before)
    assert wandb.run is None
    _, objs = train(run_cfg(tmp_path / "next", "logger=wandb", "trainer.max_steps=1"))
    assert Path(objs["logger"].experiment.dir).is_relative_to(tmp_path / "next")


def test_ctrl_c_saves_at_the_end_of_the_step_and_the_run_resumes_there(
    run_cfg, tmp_path: Path, capfd: pytest.CaptureFixture, ctrl_c_as_in_a_terminal
) -> None:
    # One Ctrl+C at the start of step 5: the step finishes, preempt-step5 is saved, the run leaves as on
    # SIGTERM (SystemExit, status 0) and this process gets its own Ctrl+C handling back.
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as leaving:
            train(run_cfg(tmp_path, *fault("sigint", 4)))
        assert not leaving.value.code, (
            "Ctrl+C did not end the run cleanly (Lightning's exit(1) on KeyboardInterrupt)"
        )
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)
    err = capfd.readouterr().err
    assert "Ctrl+C: saving a checkpoint at the end of the current step" in err and "again" in err
    preempt = tmp_path / "checkpoints" / "preempt-step0000005.ckpt"
    assert load(preempt)["global_step"] == 5
    _, objs = train(run_cfg(tmp_path, "ckpt_path=auto"))
    assert Path(objs["trainer"].ckpt_path).name == preempt.name
    assert objs["trainer"].global_step == 10


def test_a_stopped_run_leaves_without_waiting_for_another_batch(
    run_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctrl_c_as_in_a_terminal
) -> None:
    # The run left from the next batch's start, so it first waited for one more batch from the loader: minutes
    # where the shards stream from a stalled store, past a scheduler's grace period (then SIGKILL, the W&B run
    # unfinished). The loader is sized, so Lightning fetches each batch as its step starts: five, no more.
    from clipforge.data.dataset import ShardDataset

    fetched: list[int] = []
    iterate = ShardDataset.__iter__

    def counting(self: ShardDataset) -> Any:
        for batch in iterate(self):
            fetched.append(self.mode != "eval")
            yield batch

    monkeypatch.setattr(ShardDataset, "__iter__", counting)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            train(run_cfg(tmp_path, *fault("sigint", 4)))
    finally:
        signal.signal(signal.SIGINT, before)
    assert load(tmp_path / "checkpoints" / "preempt-step0000005.ckpt")["global_step"] == 5
    assert sum(fetched) == 5


def test_ctrl_c_in_the_last_validation_skips_the_final_evaluation(
    run_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture, ctrl_c_as_in_a_terminal
) -> None:
    # Ctrl+C while the run validates after its last step: no step is left to stop at, so the run ends
    # complete and saved, and the final evaluation (minutes on a real held-out set) is not started.
    cfg = run_cfg(tmp_path, "trainer.max_steps=8", "final_eval=true", *fault("sigint_validation", 8))
    with caplog.at_level("WARNING", logger="clipforge.train"):
        metrics, objs = train(cfg)
    assert objs["trainer"].global_step == 8
    assert "SIGINT received during the last validation" in caplog.text
    assert not any(k.startswith("final/") for k in metrics)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_a_second_ctrl_c_aborts_at_once_without_saving(
    run_cfg, tmp_path: Path, ctrl_c_as_in_a_terminal
) -> None:
    def interrupted_twice() -> None:
        try:
            train(run_cfg(tmp_path, *fault("sigint", 4, count=2)))
        except SystemExit as e:  # Lightning answers KeyboardInterrupt with exit(1)
            os._exit(40 + int(e.code or 0))

    status = run_forked(interrupted_twice)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 41, status
    assert not list((tmp_path / "checkpoints").glob("preempt-*"))


def test_ctrl_c_stays_ignored_where_it_was_and_off_the_main_thread_nothing_is_installed() -> None:
    trainer = SimpleNamespace(local_rank=0)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup or in a background job
    try:
        callback = PreemptionCheckpoint()
        callback.setup(trainer, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == callback._handler
        callback.teardown(trainer, None, "fit")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        worker = threading.Thread(target=PreemptionCheckpoint().setup, args=(trainer, None, "fit"))
        worker.start()
        worker.join()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
