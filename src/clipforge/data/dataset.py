"""The WebDataset (Breuel et al., 2020) image-text stream for CLIP pretraining (Radford et al., 2021): a
chain of small generator stages, run inside the DataLoader workers::

    plan (plan.py) -> read (read.py) -> shuffle (shuffle.py) -> decode (decode.py)
        [-> regions (regions.py)] -> batch (batch.py)

Modes:

* exact (training, the default): one pass over the shards per epoch following :mod:`clipforge.data.plan`:
  every rank gets the same batches, no sample is seen twice, none is dropped beyond the final partial
  global batch.
* resampled (``stream.resampled``): an endless stream (shards drawn with replacement, sources mixed by
  weight), cut into epochs of ``epoch_samples``; every rank and worker draws from its own seeded generator.
* eval (``train=False``): one ordered pass, no shuffling, partial last batch; rank ``r`` reads only the
  ``r``-th contiguous block of the batches one process would make (:func:`~clipforge.data.plan.plan_eval`),
  so the ranks' batch counts may differ by one. Without a manifest whole shards go to the ranks and each
  shard is cut into its own batches, so the batches are again the same for any number of ranks.

A few bad files never stop training and none passes silently. Every skipped sample or shard is counted
by cause (:data:`clipforge.data.shards.CAUSES`), with the samples read, in shared-memory tables that the
workers write and the main process reads (``skip_counts``, ``progress_counts``;
:mod:`clipforge.data.failures`). Whether there is too much bad input is decided in the main process
from the counts of all ranks (:class:`clipforge.data.loader.EpochLoader`); evaluation passes judge their
own counts when they end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data import plan
from clipforge.data.batch import Collate, Refill, batches, open_batches, slot_code, slot_of
from clipforge.data.config import Augment, Stream
from clipforge.data.decode import ClassIndex, Sample, Target, decode
from clipforge.data.failures import FailureMonitor, FailurePolicy, new_tables, table_totals, worst_shards
from clipforge.data.read import read_segments, read_shards
from clipforge.data.regions import CollateRegions, locate
from clipforge.data.shards import CAUSES, DataError, RawSample
from clipforge.data.shuffle import block_shuffle, block_start
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import CROP_DRAWS, ImageTransform


@dataclass(frozen=True)
class _Pass:
    """One worker's pass over one epoch of its rank's batches."""

    epoch: int
    worker: int  # the logical worker: roles rotate after a resume
    num_workers: int
    consumed: int  # batches of this rank's epoch already trained (the resume point)
    monitor: FailureMonitor
    collate: Collate
    start: int = -1  # exact mode: the slot_code to resume at (-1: behind the consumed batches' samples)
    # exact mode: the slots this pass has used, and whether it re-reads the whole set (batch.slot_code)
    slot: list[int] = field(default_factory=lambda: [-1, 0])


class ShardDataset(IterableDataset):
    """Batches ``(images, tokens)`` (or ``(images, labels)``) from WebDataset shards; use with
    ``DataLoader(dataset, batch_size=None)``. ``counts``: samples per shard (the manifest), needed for
    exact epochs. ``target``: ``"text"`` (captions), ``"label"`` (integer labels: ``.cls`` or json
    ``label``) or the class names (labels may be names too). See the module docstring for the modes."""

    def __init__(
        self,
        sources: list[list[str]],
        counts: dict[str, int] | None = None,
        *,
        batch_size: int,
        train: bool = True,
        stream: Stream | None = None,
        augment: Augment | None = None,
        target: str | Sequence[str] = "text",
        context_length: int = 77,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        failures: FailurePolicy | None = None,
    ) -> None:
        if isinstance(target, str) and target not in ("text", "label"):
            raise ValueError(f"target must be 'text', 'label' or the class names, got {target!r}")
        self.stream, self.augment = stream or Stream(), augment or Augment()
        self.mode = ("resampled" if self.stream.resampled else "exact") if train else "eval"
        self.sources, self.counts = sources, counts
        self.urls = [u for src in sources for u in src]
        if self.mode == "exact" and counts is None:
            raise DataError(
                "exact-epoch mode needs samples per shard: write a manifest next to the shards with "
                "`clipforge-shards manifest DIR` (or pass data.manifest=...), or use "
                "data.stream.resampled=true with data.stream.epoch_samples"
            )
        weights = self.stream.weights if train else None  # evaluation sets are read whole, never weighted
        self.weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(self.weights) != len(sources):
            raise ValueError(
                f"data.stream.weights: {len(self.weights)} weights for {len(sources)} sources (the patterns "
                "of data.train_urls between '::', or the items of its list); give one weight per source"
            )
        self.batch_size, self.seed = batch_size, self.stream.seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, self.stream.shuffle_buffer) if train else 1
        self.transform = ImageTransform(
            self.augment.image_size,
            train=train,
            scale=self.augment.scale,
            ratio=self.augment.ratio,
            interpolation=self.augment.interpolation,
        )
        # class names: labels that are names count by their index, integer labels as they are
        self.target: Target = target if isinstance(target, str) else ClassIndex(target)
        self.context_length = context_length
        self.failures = failures or FailurePolicy()
        # Training JPEGs go to the main process encoded (gpu_decode); evaluation batches stay tensors.
        self.defer = train and self.augment.decode_device != "cpu"
        self.regions = train and target == "text" and self.stream.regions
        # Shared with the workers: [epoch, batches already consumed this epoch], counts per worker and
        # failures per shard (clipforge.data.failures).
        self._control = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._counts, self._per_shard = new_tables(num_workers, len(self.urls))
        self._tokenizer: Tokenizer | None = None
        # Set by the training loader before it iterates: each batch then ends with the skips (a CAUSES
        # vector) its worker counted while making it, so training can tell what it consumed from what
        # the workers read ahead (clipforge.data.loader.SkipTally).
        self.tally_skips = False
        # Exact mode: per logical worker, the stream slot (bad samples included) to resume at; -1: unknown.
        self._slots = torch.full((max(1, num_workers),), -1, dtype=torch.int64).share_memory_()

    # ----------------------------------------------------------------------------------- main process
    def set_epoch(self, epoch: int) -> None:
        self._control[0] = epoch

    def set_resume(self, consumed_batches: int, slots: Sequence[int] | None = None) -> None:
        """Make the next iteration skip the first ``consumed_batches`` batches of this rank's epoch.
        ``slots``: per logical worker, the stream slot behind its last consumed batch (what a batch's
        tally carries), so the samples that bad ones pulled forward are not read again; without it (or
        for another number of workers) each worker starts behind its consumed batches' sample count."""
        self._control[1] = consumed_batches
        self._slots.fill_(-1)
        if slots is not None and len(slots) == len(self._slots):
            self._slots.copy_(torch.as_tensor(list(slots), dtype=torch.int64))

    @property
    def num_batches(self) -> int | None:
        """Batches per rank per epoch (None in eval mode without a manifest)."""
        if self.mode == "resampled":
            return max(1, (self.stream.epoch_samples or 0) // (self.world_size * self.batch_size))
        if self.counts is None:
            return None
        total = sum(self.counts[u] for u in self.urls)
        if self.mode == "eval":  # this rank's block of the batches
            return plan.worker_batches(-(-total // self.batch_size), self.rank, self.world_size)[1]
        return plan.epoch_shape(total, self.world_size, self.batch_size, self.stream.drop_last).steps

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped on this rank, by cause: so far in training, in the last pass in eval
        mode."""
        totals = table_totals(self._counts)
        return {c: totals[c] for c in CAUSES}

    def progress_counts(self) -> torch.Tensor:
        """This rank's counts of :data:`~clipforge.data.failures.COLUMNS` (causes, samples read, shards
        opened) as one int64 vector, to be summed over ranks."""
        return self._counts.sum(0)

    def worst_shards(self, n: int = 8) -> list[str]:
        """This rank's shards with most failures, for error messages."""
        return worst_shards(self._per_shard, self.urls, n)

    def planned_samples(self, consumed_batches: int) -> int | None:
        """Samples all ranks still read in this epoch after ``consumed_batches`` per rank (exact mode)."""
        if self.mode != "exact" or self.counts is None:
            return None
        total = sum(self.counts[u] for u in self.urls)
        shape = plan.epoch_shape(total, self.world_size, self.batch_size, self.stream.drop_last)
        done = min(consumed_batches * self.batch_size, shape.per_rank)
        return self.world_size * (shape.per_rank - done)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokenizer"] = None  # rebuilt in each worker; cheaper than pickling the BPE tables
        return state

    # ---------------------------------------------------------------------------------------- workers
    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, consumed = int(self._control[0]), int(self._control[1])
        # The DataLoader asks worker 0 first; after a resume at batch T the next batch of the
        # uninterrupted run is logical worker T mod K's, so the roles rotate to keep the exact order.
        worker = (physical + consumed) % num_workers
        url_index = {u: i for i, u in enumerate(self.urls)}
        where = f"worker {physical} of rank {self.rank}"
        monitor = FailureMonitor(
            self._counts, self._per_shard, physical % self._counts.shape[0], url_index, where
        )
        if self.mode == "eval":  # an evaluation set's counts are those of its last pass (skip_counts)
            self._counts[monitor.row].zero_()
        if self._tokenizer is None and self.target == "text":
            self._tokenizer = Tokenizer(self.context_length)
        regions = CollateRegions(self._tokenizer) if self.regions and self._tokenizer is not None else None
        collate = Collate(
            self.augment.image_size,
            self._tokenizer,
            self.defer,
            self.stream.return_keys,
            regions,
            (self.augment.mean, self.augment.std),
        )
        exact = self.mode == "exact" and num_workers == len(self._slots)
        start = int(self._slots[worker]) if exact else -1
        p = _Pass(epoch, worker, num_workers, consumed, monitor, collate, start)
        out = self._resampled(p) if self.mode == "resampled" else self._ordered(p)
        yield from self._tallied(out, monitor.row, p) if self.tally_skips else out

    def _tallied(self, out: Iterator[tuple], row: int, p: _Pass) -> Iterator[tuple]:
        """``out``'s batches, each followed by a tally: the skips (a CAUSES vector) its worker's ``row``
        counted since the last one, then the logical worker and the stream slot behind the batch (-1
        outside exact mode)."""
        causes = len(CAUSES)
        last = self._counts[row, :causes].clone()
        for batch in out:
            now = self._counts[row, :causes].clone()
            code = slot_code(p.slot[0], bool(p.slot[1]))
            yield (*batch, torch.cat([now - last, torch.tensor([p.worker, code])]))
            last = now

    def _samples(
        self, raw: Iterable[RawSample | None], rng: np.random.Generator, monitor: FailureMonitor
    ) -> Iterator[Sample]:
        """decode (and regions) over a raw stream; ``rng`` gives every sample slot its crop draws."""
        samples = decode(raw, self.transform, rng, monitor, self.target, self.defer)
        return locate(samples) if self.regions else samples

    def _ordered(self, p: _Pass) -> Iterator[tuple]:
        """Exact and eval modes: this worker's planned segments, block-shuffled, cut into planned batches."""
        salt = (self.seed, p.epoch, self.rank, p.worker)
        if self.mode == "eval":
            segs, sizes = plan.plan_eval(
                self.urls, self.counts, self.batch_size, p.worker, p.num_workers, self.rank, self.world_size
            )
        else:
            assert self.counts is not None  # checked in __init__
            wp = plan.plan_worker(
                self.urls,
                self.counts,
                seed=self.seed,
                epoch=p.epoch,
                rank=self.rank,
                world_size=self.world_size,
                worker=p.worker,
                num_workers=p.num_workers,
                batch_size=self.batch_size,
                drop_last=self.stream.drop_last,
            )
            segs, sizes = wp.segments, wp.batch_sizes
        done = plan.delivered(p.consumed, p.worker, p.num_workers) if self.mode == "exact" else 0
        skip, sizes = sum(sizes[:done]), sizes[done:]
        # Bad samples before the resume point pulled later ones into the consumed batches: the slot the
        # worker had reached (its tally) is where its stream goes on; the sample count, only without one.
        start, in_whole_set = slot_of(p.start)
        skip = start if start >= 0 else skip
        # Crop randomness is a function of the stream slot (clipforge.data.decode): skipping n slots
        # advances the generator by n * CROP_DRAWS, so the resumed crops are the uninterrupted run's.
        rng = np.random.default_rng([*salt, 0xC20])
        rng.bit_generator.advance(skip * CROP_DRAWS)
        m = self.shuffle_buffer

        def shuffled(
            segments: list[plan.Segment],
            skip: int,
            salt: tuple,
            mon: FailureMonitor,
            slot: list[int] | None = None,
        ) -> Iterator[Sample]:
            raw = read_segments(plan.skip_segments(segments, block_start(skip, m)), mon, self.counts)
            slots = block_shuffle(raw, m, salt, skip)
            return self._samples(slots if slot is None else _counted(slots, slot), rng, mon)

        pass_ended = (lambda: p.monitor.check_final(self.failures)) if self.mode == "eval" else None
        if self.counts is None:  # eval without a manifest: the length is unknown; batches shard by shard
            per_shard = (shuffled([seg], 0, salt, p.monitor) for seg in segs)
            yield from open_batches(per_shard, self.batch_size, p.collate, pass_ended)
            return
        # Slots go on through the re-read passes that top up the last batches (Refill): a resume there
        # starts the main stream at its end and skips the rest in the passes.
        own = sum(max(0, s.count) for s in segs)
        p.slot[:] = [skip, int(in_whole_set)]
        samples = shuffled(segs, min(skip, own), salt, p.monitor, p.slot)

        def reread(k: int, whole: bool, skip: int = 0) -> Iterator[Sample]:
            # Re-read this worker's own range, or the whole epoch's shards; nothing is counted twice.
            source = plan.whole_set(self.urls, self.counts) if whole else segs
            p.slot[1] = int(whole)
            return shuffled(source, skip, (*salt, k), p.monitor.quiet(), p.slot)

        def give_up(reason: str) -> DataError:
            return self.failures.error(reason, table_totals(self._counts), self.worst_shards(), 1)

        if self.mode == "eval":  # a sample twice would count twice in val/loss and zero-shot accuracy
            yield from batches(samples, sizes, p.collate, None, pass_ended, stop_early=True)
            return
        total = sum(self.counts[u] for u in self.urls)
        refill = Refill(reread, p.monitor, give_up, lengths=(own, total))
        refill.resume_at(max(0, skip - own), in_whole_set)
        yield from batches(samples, sizes, p.collate, refill, pass_ended)

    def _resampled(self, p: _Pass) -> Iterator[tuple]:
        """Resampled mode: drawn shards, block-shuffled, in this worker's share of the epoch's batches."""
        # Keyed to the resume point too: a resumed epoch is a fresh draw, not a replay.
        salt = (self.seed, p.epoch, self.rank, p.worker, p.consumed)
        rng = np.random.default_rng([*salt, 0xC20])
        _, n = plan.worker_batches(self.num_batches or 0, p.worker, p.num_workers)
        sizes = [self.batch_size] * max(0, n - plan.delivered(p.consumed, p.worker, p.num_workers))
        urls = plan.draw_shards(
            self.sources, self.weights, self.counts, np.random.default_rng([*salt, 0x5E5A])
        )
        raw = block_shuffle(read_shards(urls, p.monitor, self.counts), self.shuffle_buffer, salt)
        yield from batches(self._samples(raw, rng, p.monitor), sizes, p.collate)


def _counted(slots: Iterable[RawSample | None], slot: list[int]) -> Iterator[RawSample | None]:
    """``slots`` passed through, counting each into ``slot[0]``: decoding pulls one at a time, so after a
    batch it is the slot behind the batch's last sample."""
    for x in slots:
        slot[0] += 1
        yield x
