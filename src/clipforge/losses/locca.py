"""The decoder objective of LocCa (Wan et al., 2024, "LocCa: Visual Pretraining with Location-aware
Captioners"), which SigLIP 2 (Tschannen et al., 2025, Sec. 2.2) trains with equal weight beside the sigmoid
loss for the whole run: a text decoder cross-attends to the image tower's un-pooled tokens and, with
teacher forcing, predicts one of three targets per image (:mod:`clipforge.models.decoder`): its caption,
the box of a referring expression, or the caption of a region given its box. The loss is the
cross-entropy of the target tokens, averaged over every target token of the global batch.

Box targets come from the batch: ``extras["boxes"]`` (B, 4) normalised ``[x0, y0, x1, y1]`` in the frame
of the (augmented) image the model sees, a row of NaN where a sample has none, and
``extras["region_tokens"]`` (B, L) the BPE tokens of the phrase that refers to that box (the tokenizer's
output, ``[SOT] ... [EOT] 0 ...``). Samples without a box are always captioned; each sample with one draws
its task with ``task_probs`` (caption, referring, grounded). Without any box data every sample is captioned.

Parallel prediction (``decoder.parallel_prob``, off by default): CapPa's (Tschannen et al., 2023, "Image
Captioners Are Scalable Vision Learners Too"). In training, each sample is drawn with that probability to
have its answer predicted in parallel: its answer inputs become the decoder's mask token and its
self-attention is bidirectional (the task prompt stays visible; :mod:`clipforge.models.decoder`). Same
targets, same cross-entropy. At 0 nothing is drawn, so the loss and the random stream are as without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from clipforge.losses.objective import (
    Objective,
    ObjectiveBatch,
    Teacher,
    check_matches,
    global_count,
    world_mean_coef,
)
from clipforge.models.clip import CLIP
from clipforge.models.decoder import TASKS, TextDecoder, bpe_words


def caption_loss(
    logits: Tensor, targets: Tensor, is_target: Tensor | None = None, group: dist.ProcessGroup | None = None
) -> Tensor:
    """This rank's share (``W / N * sum``) of the mean cross-entropy over the ``N`` target tokens of the
    global batch. logits (..., V), targets (...) ids; ``is_target`` (...) bool selects the target tokens
    (None: every position is one)."""
    if is_target is not None:
        logits, targets = logits[is_target], targets[is_target]  # (M, V), (M,)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), targets.reshape(-1), reduction="sum")
    count = global_count(targets.numel(), logits.device, group)
    return ce * world_mean_coef(count, group).to(dtype)


class LocCaLoss(Objective):
    """``objectives=locca``: the decoder's captioning / referring / grounded-captioning loss.

    Box targets are read from the batch's extras, which the data module provides with
    ``data.stream.regions`` (:mod:`clipforge.data.regions`; see the module docstring).
    """

    def __init__(
        self,
        decoder: TextDecoder,
        weight: float = 1.0,
        start_frac: float = 0.0,
        task_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    ) -> None:
        super().__init__(weight, start_frac)
        if len(task_probs) != len(TASKS) or min(task_probs) < 0 or sum(task_probs) <= 0:
            raise ValueError(
                f"task_probs must be {len(TASKS)} non-negative numbers for {TASKS}, got {task_probs}"
            )
        self.decoder = decoder
        self.task_probs = tuple(float(p) / sum(task_probs) for p in task_probs)
        self.last_tasks: list[str] = []  # the tasks of the last batch (for logging and tests)
        self.last_parallel: list[bool] = []  # which samples of the last batch were predicted in parallel

    def check_model(self, model: CLIP) -> None:
        # the decoder reads the image tower's tokens and writes the text tower's BPE ids at its length
        dec = self.decoder
        check_matches("decoder.image_dim", dec.image_dim, "model.vision.embed_dim", model.visual.embed_dim)
        check_matches(
            "decoder.vocab_size", dec.text_vocab_size, "model.text.vocab_size", model.text.vocab_size
        )
        check_matches(
            "decoder.context_length",
            dec.context_length,
            "model.text.context_length",
            model.text.context_length,
        )

    def targets(self, batch: ObjectiveBatch) -> tuple[Tensor | None, Tensor | None]:
        """``(boxes (B, 4) or None, region_tokens (B, L) or None)`` of the batch."""
        boxes = batch.extras.get("boxes")
        return (boxes, batch.extras.get("region_tokens")) if boxes is not None else (None, None)

    def sample_tasks(self, has_box: list[bool]) -> list[str]:
        """One task per sample (torch's per-step seeded generator): captioning where there is no box."""
        draws = torch.multinomial(torch.tensor(self.task_probs), len(has_box), replacement=True).tolist()
        return [TASKS[d] if ok else "caption" for d, ok in zip(draws, has_box)]

    def sample_parallel(self, batch_size: int) -> Tensor | None:
        """(B,) bool: the samples predicted in parallel, each with probability ``decoder.parallel_prob``
        (torch's per-step seeded generator); None (nothing drawn) when it is 0 or in eval mode."""
        p = self.decoder.parallel_prob
        if p == 0 or not self.training:
            return None
        return torch.rand(batch_size) < p

    def forward(self, batch: ObjectiveBatch, student: CLIP, teacher: Teacher | None) -> Tensor:
        boxes, region_tokens = self.targets(batch)
        B = batch.tokens.shape[0]
        captions = bpe_words(batch.tokens)
        if boxes is not None and region_tokens is not None:
            boxes = boxes.detach().float().cpu()
            regions: list[list[int] | None] = list(bpe_words(region_tokens))
            has_box = [bool(torch.isfinite(b).all()) and len(r) > 0 for b, r in zip(boxes, regions)]
        else:
            regions, has_box = [None] * B, [False] * B
        tasks = self.sample_tasks(has_box)
        seq, is_target = self.decoder.sequences(tasks, captions, regions, boxes)
        parallel = self.sample_parallel(B)
        masked = None
        if parallel is not None and bool(parallel.any()):  # a CPU tensor: no device sync
            masked = self.decoder.parallel_inputs(is_target, parallel).to(batch.tokens.device)
        seq, is_target = seq.to(batch.tokens.device), is_target.to(batch.tokens.device)
        hidden = self.decoder.forward_features(seq[:, :-1], batch.image_tokens, masked)  # (B, S - 1, width)
        wanted = is_target[:, 1:]  # score only the target positions: the vocabulary is large
        self.last_tasks = tasks
        self.last_parallel = parallel.tolist() if parallel is not None else [False] * B
        return caption_loss(self.decoder.head(hidden[wanted]), seq[:, 1:][wanted])

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, start_frac={self.start_frac}, task_probs={self.task_probs}, "
            f"parallel_prob={self.decoder.parallel_prob}"
        )
