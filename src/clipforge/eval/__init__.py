"""Evaluation of contrastive image-text models as in CLIP (Radford et al., 2021): zero-shot
classification from prompt ensembles, image-text retrieval recall@K and linear probes, as pure
functions that shard across ranks, plus thin Lightning callbacks (``clipforge.callbacks.evaluation``) and
the ``clipforge-zeroshot`` command (``clipforge.eval.cli``)."""

from clipforge.eval.linear_probe import linear_probe
from clipforge.eval.metadata import load_classnames, load_templates
from clipforge.eval.retrieval import evaluate_retrieval
from clipforge.eval.zeroshot import (
    IGNORE_LABEL,
    build_zero_shot_classifier,
    evaluate_zero_shot,
    predict,
    zero_shot_eval,
)

__all__ = [
    "IGNORE_LABEL",
    "build_zero_shot_classifier",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "linear_probe",
    "load_classnames",
    "load_templates",
    "predict",
    "zero_shot_eval",
]
