"""Every Lightning callback of a contrastive pretraining run (CLIP, Radford et al., 2021; SigLIP, Zhai et
al., 2023), one module per concern. The loss, temperature, logit statistics and feature norms are logged
by the module itself.

* what a run logs: ``throughput`` (samples/s, MFU), ``data_skips`` (skip counters), ``similarity``
  (image-text logit heatmap), ``attention`` (ViT attention pictures), ``evaluation`` (zero-shot,
  retrieval), ``last_step`` (validate the step that reaches ``max_steps``);
* what keeps it alive: ``periodic`` (step/time checkpoints), ``preemption`` (SIGTERM/SIGUSR1/Ctrl+C,
  SLURM requeue), ``nonfinite`` (skip non-finite steps, stop on divergence), ``rng`` (resumable RNG states);
* what a person watches: ``progress`` (the training bar, also after a mid-epoch resume);
* shared: ``schedule`` (when to log, ``EveryNSteps``); the skip of a forward outside training while the
  weights are sharded (FSDP) is :func:`clipforge.sharding.skip_when_sharded`.
"""

from clipforge.callbacks.attention import AttentionMapCallback
from clipforge.callbacks.data_skips import DataSkipMonitor
from clipforge.callbacks.evaluation import RetrievalCallback, ZeroShotCallback
from clipforge.callbacks.last_step import ValidateLastStep
from clipforge.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from clipforge.callbacks.periodic import PeriodicCheckpoint
from clipforge.callbacks.preemption import PreemptionCheckpoint
from clipforge.callbacks.progress import ProgressBar
from clipforge.callbacks.rng import ResumableRng
from clipforge.callbacks.schedule import logging_step
from clipforge.callbacks.similarity import SimilarityHeatmap
from clipforge.callbacks.throughput import ThroughputMonitor

__all__ = [
    "AttentionMapCallback",
    "DataSkipMonitor",
    "NonFiniteError",
    "NonFiniteGuard",
    "PeriodicCheckpoint",
    "PreemptionCheckpoint",
    "ProgressBar",
    "ResumableRng",
    "RetrievalCallback",
    "SimilarityHeatmap",
    "ThroughputMonitor",
    "ValidateLastStep",
    "ZeroShotCallback",
    "logging_step",
]
