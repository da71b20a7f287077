"""``train/samples_per_s`` counts training time only (clipforge.callbacks.throughput)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from clipforge.callbacks import ThroughputMonitor, throughput


def _timed_run(monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A ThroughputMonitor on a fake trainer and clock: (monitor, trainer, module, clock, logged, step)."""
    clock = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    logged: dict[int, float] = {}
    trainer = SimpleNamespace(
        log_every_n_steps=2,
        global_step=0,
        should_stop=False,
        world_size=1,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )

    def log(name: str, value: Any, **kwargs: Any) -> None:
        logged[trainer.global_step] = value

    module = SimpleNamespace(config={}, log=log)
    batch = (torch.zeros(8, 3), torch.zeros(8, 4))
    cb = ThroughputMonitor()

    def step(load: float = 0.25, compute: float = 0.75) -> None:
        clock[0] += load  # the loader hands the batch over
        cb.on_train_batch_start(trainer, module, batch, 0)
        clock[0] += compute
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, {}, batch, 0)

    return cb, trainer, module, clock, logged, step


def test_samples_per_s_leaves_out_validation_and_epoch_end_work(monkeypatch: pytest.MonkeyPatch) -> None:
    cb, trainer, module, clock, logged, step = _timed_run(monkeypatch)

    def pause(seconds: float) -> None:
        cb.on_validation_start(trainer, module)
        clock[0] += seconds  # validation, then the epoch-end evaluations and checkpoints

    cb.on_train_start(trainer, module)
    cb.on_train_epoch_start(trainer, module)
    step(load=5.0)  # step 1: warm-up, not timed
    step()
    step()
    pause(60.0)  # at the epoch's end
    cb.on_train_epoch_start(trainer, module)
    step()  # the new epoch's first batch: its loading counts
    step()
    pause(60.0)  # in mid-epoch (val_check_interval)
    step()
    # 8 samples a second of training; after a mid-epoch validation only the batch's compute is timed
    assert logged == {2: 8.0, 4: 16 / 2.0, 6: 16 / 1.75}


def test_samples_per_s_leaves_out_pictures_and_evaluations_drawn_between_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clipforge.callbacks.schedule import off_the_clock

    cb, trainer, module, clock, logged, step = _timed_run(monkeypatch)
    cb.on_train_start(trainer, module)
    cb.on_train_epoch_start(trainer, module)
    step(load=5.0)  # warm-up
    step()
    with off_the_clock(trainer):  # a heatmap or a zero-shot evaluation after step 2's batch
        clock[0] += 30.0
    step()
    step()
    assert logged == {2: 8.0, 4: 8.0}  # it made step 4's window read 16 / 32 s: 0.5 samples/s
