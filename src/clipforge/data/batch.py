"""The batch stage of the WebDataset stream (Breuel et al., 2020): decoded samples -> the batches a
DataLoader worker hands to the main process, of exactly the sizes the plan promised.

When a training worker's samples run out early (bad samples were skipped), :class:`Refill` supplies
re-read passes, counted as ``repeated_samples``: of the worker's own range, or of the whole set once a pass
of the range gave nothing. So its batch count, and every rank's with it, stays as planned (a contrastive
loss all-gathers equal shapes at every step). An evaluation pass re-reads nothing: its last batch is
shorter (ranks that end first take padding steps, ``clipforge.distributed.EvenSteps``).

A batch is ``(images, targets[, keys][, regions])``: images ``(B, 3, S, S)`` float32 normalised (or an
:class:`~clipforge.data.gpu_decode.EncodedBatch`), targets the tokenized captions ``(B, L)`` or the
labels ``(B,)``, keys the samples' ``<shard>/<key>`` (``return_keys``), regions the mapping of
:mod:`clipforge.data.regions` (``regions``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import get_worker_info

from clipforge.data.decode import Encoded, Sample
from clipforge.data.failures import FailureMonitor
from clipforge.data.gpu_decode import EncodedBatch
from clipforge.data.shards import DataError
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, normalize_into

log = logging.getLogger(__name__)


def _new_shared_batch(size: int, image_size: int) -> torch.Tensor:
    """A batch tensor allocated straight in shared memory, so handing it to the main process is free."""
    shape = (size, 3, image_size, image_size)
    try:
        storage = torch.UntypedStorage._new_shared(size * 3 * image_size * image_size * 4)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
    except (AttributeError, RuntimeError):  # private API: fall back to the DataLoader's own copy
        return torch.empty(shape, dtype=torch.float32)


def _encoded_batch(images: list[torch.Tensor | Encoded]) -> EncodedBatch:
    data = [
        torch.frombuffer(bytearray(x.data), dtype=torch.uint8) if isinstance(x, Encoded) else x
        for x in images
    ]
    boxes = torch.tensor([x.box if isinstance(x, Encoded) else (0.0, 0.0, 0.0, 0.0) for x in images])
    return EncodedBatch(data, boxes.double())


class Collate:
    """Samples -> one batch tuple (see the module docstring). ``tokenizer`` None: integer labels.
    ``defer``: images go out as an ``EncodedBatch`` for the GPU decoder. ``regions``: a callable that
    turns the samples into the regions mapping, or None."""

    def __init__(
        self,
        image_size: int,
        tokenizer: Tokenizer | None,
        defer: bool = False,
        return_keys: bool = False,
        regions: Callable[[list[Sample]], dict[str, torch.Tensor]] | None = None,
        mean_std: tuple[Sequence[float], Sequence[float]] = (CLIP_MEAN, CLIP_STD),
    ) -> None:
        self.image_size, self.tokenizer, self.defer = image_size, tokenizer, defer
        self.return_keys, self.regions = return_keys, regions
        self.mean, self.std = mean_std

    def __call__(self, items: list[Sample]) -> tuple[Any, ...]:
        images = [s.image for s in items]
        if self.defer:
            pixels: torch.Tensor | EncodedBatch = _encoded_batch(images)
        else:
            shared = get_worker_info() is not None
            out = _new_shared_batch(len(items), self.image_size) if shared else None
            pixels = normalize_into(images, out, self.mean, self.std)
        if self.tokenizer is not None:
            targets = self.tokenizer([s.target for s in items])
        else:
            targets = torch.tensor([s.target for s in items], dtype=torch.long)
        batch: tuple[Any, ...] = (pixels, targets)
        if self.return_keys:
            batch += ([s.key for s in items],)
        if self.regions is not None:
            batch += (self.regions(items),)
        return batch


def slot_code(slot: int, whole_set: bool) -> int:
    """A worker's stream slot as its batches' tally carries it and a checkpoint keeps it: ``slot``, or
    ``-2 - slot`` once the worker re-reads the whole set (its re-read passes then have the set's length,
    which a resume must know); -1 stands for unknown."""
    return -2 - slot if whole_set else slot


def slot_of(code: int) -> tuple[int, bool]:
    """``(slot, whole_set)`` of a :func:`slot_code` (-1: unknown)."""
    return (-2 - code, True) if code <= -2 else (code, False)


class Refill:
    """Re-read passes for a worker whose samples ran out: ``reread(k, whole_set, skip)`` gives the k-th
    pass, of the worker's range or (once a pass of it gave nothing) of the whole set, from its slot
    ``skip``; ``give_up(reason)`` is the error when even the whole set gives nothing. ``lengths``: the
    slots of a pass of the range and of the whole set (for :meth:`resume_at`)."""

    def __init__(
        self,
        reread: Callable[[int, bool, int], Iterator[Sample]],
        monitor: FailureMonitor,
        give_up: Callable[[str], Exception],
        lengths: tuple[int, int] = (0, 0),
    ) -> None:
        self.reread, self.monitor, self.give_up = reread, monitor, give_up
        self.passes, self.whole_set, self.skip = 0, False, 0
        self.lengths = lengths

    def resume_at(self, skip: int, whole_set: bool = False) -> None:
        """Go on behind the first ``skip`` slots of re-read passes, which a resumed run already trained on:
        passes of the range or, if the worker had switched (``whole_set``), the one pass of the range that
        gave nothing and then passes of the whole set."""
        own, total = self.lengths
        if whole_set:
            self.passes, self.skip = divmod(max(0, skip - own), max(1, total))
            self.passes, self.whole_set = self.passes + 1, True
        elif own > 0:
            self.passes, self.skip = divmod(skip, own)
        else:
            self.skip = skip

    def next_pass(self, previous_gave_any: bool) -> Iterator[Sample]:
        if self.passes > 0 and not previous_gave_any:
            if self.whole_set:  # every shard of the set was read and none gave a sample
                raise self.give_up("no sample of any shard could be read")
            self.whole_set = True
        skip, self.skip = self.skip, 0
        self.passes += 1
        log.warning(
            "%s: re-reading %s (pass %d) to keep its batch count",
            self.monitor.where,
            "the whole set" if self.whole_set else "its range",
            self.passes,
        )
        return self._counted(self.reread(self.passes, self.whole_set, skip))

    def _counted(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            self.monitor.count("repeated_samples")
            yield s


def batches(
    samples: Iterator[Sample],
    sizes: list[int],
    collate: Callable[[list[Sample]], tuple],
    refill: Refill | None = None,
    pass_ended: Callable[[], None] | None = None,
    stop_early: bool = False,
) -> Iterator[tuple]:
    """Cut ``samples`` into batches of ``sizes``, re-reading through ``refill`` when they run out early.
    ``pass_ended`` is called once, when the first pass over the data ends (evaluation passes judge their
    own failure counts there). ``stop_early`` (evaluation passes): samples that run out early end the
    pass instead, the ones left a last, shorter batch, so no sample is read twice."""
    items: list[Sample] = []
    got, ended = True, False
    for size in sizes:
        while len(items) < size:
            nxt = next(samples, None)
            if nxt is None:
                if pass_ended is not None and not ended:
                    pass_ended()
                ended = True
                if stop_early:
                    if items:
                        yield collate(items)
                    return
                if refill is None:
                    raise DataError("the sample stream ended early")
                samples, got = refill.next_pass(got), False
                continue
            got = True
            items.append(nxt)
        yield collate(items[:size])
        items = items[size:]
    if pass_ended is not None and not ended:
        pass_ended()


def open_batches(
    shards: Iterable[Iterator[Sample]],
    batch_size: int,
    collate: Callable[[list[Sample]], tuple],
    pass_ended: Callable[[], None] | None = None,
) -> Iterator[tuple]:
    """Batches for a pass of unknown length (evaluation without a manifest): each shard's samples are
    cut into batches of ``batch_size`` and a partial last one, so no batch spans two shards and the
    batches do not depend on how the shards are dealt to ranks and workers. ``pass_ended`` is called
    before the pass's last partial batch (after its last full one when there is none)."""
    last: list[Sample] = []
    for samples in shards:
        if last:
            yield collate(last)  # the previous shard's partial batch: not the pass's last
        last = []
        for s in samples:
            last.append(s)
            if len(last) == batch_size:
                yield collate(last)
                last = []
    if pass_ended is not None:
        pass_ended()
    if last:
        yield collate(last)
