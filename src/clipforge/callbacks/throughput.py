"""Throughput, model FLOPs utilisation and peak memory of a training run.

MFU as defined in PaLM (Chowdhery et al., 2022, appendix B): model FLOPs per sample (forward and
backward, counted once by ``torch.utils.flop_counter`` rather than by a formula) times samples per second
per device, over the device's peak. Recomputation (activation checkpointing, feature-cache accumulation's
extra forward) is not counted: it is work the hardware does, not progress of the model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clipforge.callbacks.schedule import logging_step, take_off_clock
from clipforge.flops import model_flops_per_sample, peak_tflops

log = logging.getLogger(__name__)


class ThroughputMonitor(Callback):
    """Logs ``train/samples_per_s`` (all ranks together, on the progress bar), and on CUDA ``train/mfu``
    and ``train/peak_mem_gib`` (this rank's peak allocated memory).

    Rates are averaged over the steps between two logging steps and timed on the host, so nothing here
    synchronises with the device: over a window the host cannot run ahead of the device for long. The first
    step (warm-up, compilation) is excluded, and so is the time between training batches spent on
    validation and on what runs at an epoch's end (evaluations, checkpoints): counted, it made every window
    with a validation report a fraction of the rate. Loading the batches is training time, the first of an
    epoch included; the pictures and evaluations that callbacks draw between batches
    (:func:`~clipforge.callbacks.schedule.off_the_clock`) are not. ``peak_flops`` is per device; ``None`` means the device's dense bf16 peak from
    ``clipforge.flops.PEAK_BF16_TFLOPS`` (by CUDA device name), and no MFU on the CPU or a device not in
    it. Set it there to log MFU too.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self.flops_per_sample: int | None = None
        self._mark: float | None = None  # when the time of the next batch started to count
        self._elapsed = 0.0  # training time of the window so far
        self._samples = 0
        self._paused = False  # a validation ran since the last batch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark, self._elapsed, self._samples, self._paused = None, 0.0, 0, False
        self._cuda = trainer.strategy.root_device.type == "cuda"
        tflops = peak_tflops(trainer.strategy.root_device)
        self._peak = self.peak_flops if self.peak_flops is not None else (tflops and tflops * 1e12)
        config = getattr(pl_module, "config", None) or {}
        if self._peak and self.flops_per_sample is None:
            if "model" in config:
                self.flops_per_sample = model_flops_per_sample(config["model"], config.get("loss"))
                log.info("model FLOPs per sample (forward + backward): %.3g", self.flops_per_sample)
            else:
                log.warning("no model config on the module: MFU is not logged")
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every epoch-end hook (this callback's is not necessarily the first) has run: count from here.
        if self._mark is not None:
            self._mark = time.perf_counter()
            take_off_clock(trainer)  # the epoch-end evaluations were before the mark
        self._paused = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._paused and self._mark is not None:  # a validation in mid-epoch (val_check_interval)
            self._mark = time.perf_counter()
            take_off_clock(trainer)
        self._paused = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        off = take_off_clock(trainer)  # pictures and evaluations drawn since the mark
        if self._mark is None:  # the window starts after the first step
            self._mark, self._elapsed, self._samples = now, 0.0, 0
            return
        self._elapsed += now - self._mark - off
        self._mark = now
        self._samples += len(batch[0]) * trainer.world_size
        if not logging_step(trainer, step_done=True) or self._elapsed <= 0:
            return
        samples_per_s = self._samples / self._elapsed
        self._elapsed, self._samples = 0.0, 0
        pl_module.log("train/samples_per_s", samples_per_s, prog_bar=True)
        if self._peak and self.flops_per_sample:
            mfu = self.flops_per_sample * samples_per_s / (self._peak * trainer.world_size)
            pl_module.log("train/mfu", mfu)
        if self._cuda:
            peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
            pl_module.log("train/peak_mem_gib", peak)
