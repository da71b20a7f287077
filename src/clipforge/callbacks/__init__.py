"""Lightning callbacks that log what a contrastive pretraining run needs (CLIP, Radford et al., 2021;
SigLIP, Zhai et al., 2023): throughput and MFU, data-skip counters and the image-text similarity matrix.
The loss, temperature, logit statistics and feature norms are logged by the module itself."""

from clipforge.callbacks.data_skips import DataSkipMonitor
from clipforge.callbacks.schedule import logging_step
from clipforge.callbacks.similarity import SimilarityHeatmap
from clipforge.callbacks.throughput import ThroughputMonitor, model_flops_per_sample

__all__ = [
    "DataSkipMonitor",
    "SimilarityHeatmap",
    "ThroughputMonitor",
    "logging_step",
    "model_flops_per_sample",
]
