"""The WebDataset (Breuel et al., 2020) image-text stream for CLIP pretraining (Radford et al., 2021):
shard reading, shuffling, decoding, transforms, tokenization and batching, all inside DataLoader workers.

Modes:

* ``exact``: one pass over the shards per epoch following :mod:`clipforge.data.plan`: every rank gets the
  same batches, no sample is seen twice, none is dropped beyond the final partial global batch.
* ``resampled``: an endless stream (shards drawn with replacement, sources mixed by weight), cut into
  epochs of ``epoch_samples``; every rank and worker draws from its own seeded generator.
* ``eval``: one ordered pass on every rank, no shuffling, partial last batch.

Shuffling is a *block* shuffle: a worker reads ``shuffle_buffer`` consecutive samples of its range,
permutes them with a generator seeded by (seed, epoch, rank, worker, block) and emits them. Mixing is
like that of a shuffle buffer of the same size, but output position ``o`` always comes from block
``o // shuffle_buffer``: resuming at batch T re-reads one partial block instead of the whole prefix, and
whole shards before it are skipped without opening them.

A few bad files never stop training and none passes silently. Every skipped sample or shard is counted
by cause (:data:`clipforge.data.shards.CAUSES`), with the samples read, in shared-memory tables that the
workers write and the main process reads (``skip_counts``, ``progress_counts``;
:mod:`clipforge.data.failures`). When samples are lost, the worker re-reads its own range (counted as
``repeated_samples``), or the whole set if its own range has nothing readable, so its batch count, and
so every rank's, stays as planned. Whether there is too much bad input is decided in the main process
from the counts of all ranks (:class:`clipforge.data.datamodule.EpochLoader`); evaluation passes judge
their own counts when they end.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data import plan as planning
from clipforge.data.failures import FailureMonitor, FailurePolicy, new_tables, table_totals
from clipforge.data.gpu_decode import EncodedBatch
from clipforge.data.shards import CAUSES, IMAGE_EXTS, DataError, RawSample, ShardResult, read_shard
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import CROP_DRAWS, ImageTransform, normalize_into

log = logging.getLogger(__name__)

MODES = ("exact", "resampled", "eval")
Decoded = tuple[object, object, str]  # (uint8 (3, S, S) image or _Encoded, caption or label, key)


def _new_shared_batch(size: int, image_size: int) -> torch.Tensor:
    """A batch tensor allocated straight in shared memory, so handing it to the main process is free."""
    shape = (size, 3, image_size, image_size)
    try:
        storage = torch.UntypedStorage._new_shared(size * 3 * image_size * image_size * 4)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
    except (AttributeError, RuntimeError):  # private API: fall back to the DataLoader's own copy
        return torch.empty(shape, dtype=torch.float32)


class ShardDataset(IterableDataset):
    """Batches ``(images, tokens)`` (or ``(images, labels)``) from WebDataset shards; use with
    ``DataLoader(dataset, batch_size=None)``. See the module docstring for the modes."""

    def __init__(
        self,
        sources: list[list[str]],
        *,
        batch_size: int,
        image_size: int,
        context_length: int = 77,
        counts: dict[str, int] | None = None,
        mode: str = "exact",
        epoch_samples: int | None = None,
        weights: list[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        train_transform: bool = True,
        scale: tuple[float, float] = (0.9, 1.0),
        interpolation: str = "bicubic",
        target: str = "text",
        failure_policy: FailurePolicy | None = None,
        return_keys: bool = False,
        decode_device: str = "cpu",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if target not in ("text", "label"):
            raise ValueError(f"target must be 'text' or 'label', got {target!r}")
        self.urls = [u for src in sources for u in src]
        if mode == "exact" and weights is not None and len(set(weights)) > 1:
            raise ValueError(
                "source weights need resampled=True: an exact epoch reads every sample once, so it cannot "
                "up- or down-weight a source"
            )
        if mode == "resampled" and not epoch_samples:
            raise ValueError("resampled mode needs epoch_samples (global samples per epoch)")
        if mode == "exact" and counts is None:
            raise DataError(
                "exact-epoch mode needs samples per shard: write a manifest next to the shards with "
                "`clipforge-shards manifest DIR` (or pass manifest=...), or use resampled=True with "
                "epoch_samples"
            )
        self.sources = sources
        self.counts = counts
        self.batch_size, self.image_size = batch_size, image_size
        self.context_length = context_length
        self.mode, self.epoch_samples, self.seed = mode, epoch_samples, seed
        self.weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(self.weights) != len(sources):
            raise ValueError(f"{len(self.weights)} weights for {len(sources)} sources")
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer) if mode != "eval" else 1
        self.drop_last = drop_last
        self.transform = ImageTransform(
            image_size, train=train_transform, scale=scale, interpolation=interpolation
        )
        self.target = target
        self.failure_policy = failure_policy or FailurePolicy()
        self.return_keys = return_keys
        self.defer_decode = decode_device != "cpu"  # JPEGs go to the main process encoded (gpu_decode)
        # Shared with the workers: [epoch, batches already consumed this epoch], counts per worker and
        # failures per shard (clipforge.data.failures).
        self._control = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._counts, self._per_shard = new_tables(num_workers, len(self.urls))
        self._tokenizer: Tokenizer | None = None

    # ----------------------------------------------------------------------------------- main process
    def set_epoch(self, epoch: int) -> None:
        self._control[0] = epoch

    def set_resume(self, consumed_batches: int) -> None:
        """Make the next iteration skip the first ``consumed_batches`` batches of this rank's epoch."""
        self._control[1] = consumed_batches

    @property
    def num_batches(self) -> int | None:
        """Batches per rank per epoch (None in eval mode without a manifest)."""
        if self.mode == "resampled":
            return max(1, self.epoch_samples // (self.world_size * self.batch_size))
        if self.counts is None:
            return None
        total = sum(self.counts[u] for u in self.urls)
        if self.mode == "eval":
            return -(-total // self.batch_size)
        return planning.epoch_shape(total, self.world_size, self.batch_size, self.drop_last).steps

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped on this rank so far, by cause."""
        totals = table_totals(self._counts)
        return {c: totals[c] for c in CAUSES}

    def progress_counts(self) -> torch.Tensor:
        """This rank's counts of :data:`~clipforge.data.failures.COLUMNS` (causes, samples read, shards
        opened) as one int64 vector, to be summed over ranks."""
        return self._counts.sum(0)

    def worst_shards(self, n: int = 8) -> list[str]:
        """This rank's shards with most failures, for error messages."""
        from clipforge.data.failures import worst_shards

        return worst_shards(self._per_shard, self.urls, n)

    def planned_samples(self, consumed_batches: int) -> int | None:
        """Samples all ranks still read in this epoch after ``consumed_batches`` per rank (exact mode)."""
        if self.mode != "exact" or self.counts is None:
            return None
        shape = planning.epoch_shape(
            sum(self.counts[u] for u in self.urls), self.world_size, self.batch_size, self.drop_last
        )
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
        where = f"worker {physical} of rank {self.rank}"
        row = physical % self._counts.shape[0]
        monitor = FailureMonitor(
            self._counts, self._per_shard, row, {u: i for i, u in enumerate(self.urls)}, where
        )
        if self._tokenizer is None and self.target == "text":
            self._tokenizer = Tokenizer(self.context_length)
        # Crop randomness is a function of the output position: every sample slot takes exactly
        # CROP_DRAWS uniforms, so a resume at position p advances the generator by p * CROP_DRAWS and
        # draws the same crops as the uninterrupted run.
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 0xC20])
        if self.mode == "resampled":
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker, consumed, 0xC20])
            _, n = planning.worker_batches(self.num_batches or 0, worker, num_workers)
            done = planning.delivered(consumed, worker, num_workers)
            sizes = [self.batch_size] * max(0, n - done)
            stream = self._resampled(epoch, worker, consumed, monitor)
            samples = self._decoded(stream, monitor, rng)
            yield from self._batches(samples, sizes, monitor, refill=None)
            return
        segs, sizes, salt = self._ordered_plan(epoch, worker, num_workers)
        done = planning.delivered(consumed, worker, num_workers) if self.mode == "exact" else 0
        skip = sum(sizes[:done])
        sizes = sizes[done:]
        rng.bit_generator.advance(skip * CROP_DRAWS)

        def refill(pass_index: int, whole_set: bool) -> Iterator[Decoded]:
            # Re-read this worker's own range; if that has nothing readable, the whole epoch's shards.
            quiet = monitor.quiet()
            source = segs
            if whole_set and self.counts is not None:
                source = planning.segments(self.urls, self.counts, 0, sum(self.counts[u] for u in self.urls))
            elif whole_set:
                source = [planning.Segment(u, 0, -1) for u in self.urls]
            return self._decoded(self._blocks(source, 0, (*salt, pass_index), quiet), quiet, rng)

        stream = self._blocks(segs, skip, salt, monitor)
        yield from self._batches(self._decoded(stream, monitor, rng), sizes, monitor, refill)

    def _ordered_plan(self, epoch: int, worker: int, num_workers: int) -> tuple[list, list[int], tuple]:
        """Segments to read and batch sizes to yield for exact and eval modes."""
        salt = (self.seed, epoch, self.rank, worker)
        if self.counts is None:  # eval without a manifest: whole shards round-robin over workers
            mine = self.urls[worker::num_workers]
            return [planning.Segment(u, 0, -1) for u in mine], [], salt
        if self.mode == "eval":
            total = sum(self.counts[u] for u in self.urls)
            steps = -(-total // self.batch_size)
            first, n = planning.worker_batches(steps, worker, num_workers)
            begin, end = first * self.batch_size, min(total, (first + n) * self.batch_size)
            sizes = [min(self.batch_size, end - b) for b in range(begin, end, self.batch_size)]
            return planning.segments(self.urls, self.counts, begin, end), sizes, salt
        wp = planning.plan_worker(
            self.urls,
            self.counts,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )
        return wp.segments, wp.batch_sizes, salt

    def _read(self, segs: list[planning.Segment], monitor: FailureMonitor) -> Iterator[RawSample | None]:
        """Raw samples of the segments in order; ``None`` stands in for each sample a broken shard lost,
        so that positions (and with them block shuffles and resume points) do not move."""
        for seg in segs:
            result = ShardResult()
            count = None if seg.count < 0 else seg.count
            monitor.shard_opened()
            for sample in read_shard(seg.url, result, seg.start, count):
                monitor.samples_read()  # the denominator counts every sample read, good or bad
                yield sample
            if result.failure is not None:
                monitor.shard_failed(result.failure, seg.url)
            lost = 0 if count is None else count - result.delivered
            if lost > 0:
                monitor.sample_failed("lost_samples", seg.url, n=lost)
                yield from [None] * lost

    def _blocks(
        self, segs: list[planning.Segment], skip: int, salt: tuple, monitor: FailureMonitor
    ) -> Iterator[RawSample | None]:
        """Block-shuffled raw stream of the segments, starting at output position ``skip``."""
        m = self.shuffle_buffer
        block = skip // m
        source = self._read(planning.skip_segments(segs, block * m), monitor)
        drop = skip - block * m
        while True:
            chunk = [s for _, s in zip(range(m), source)]
            if not chunk:
                return
            if m > 1:
                perm = np.random.default_rng([*salt, block]).permutation(len(chunk))
                chunk = [chunk[i] for i in perm]
            yield from chunk[drop:]
            drop = 0
            block += 1

    def _resampled(
        self, epoch: int, worker: int, consumed: int, monitor: FailureMonitor
    ) -> Iterator[RawSample | None]:
        """Endless stream: a source by weight, then a shard of it, then that shard's samples, block-shuffled."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, consumed, 0x5E5A])
        probs = np.array(self.weights, dtype=np.float64)
        if self.counts is not None:  # weights are shares of *samples*: correct for mean shard size
            probs /= np.array([np.mean([self.counts[u] for u in src]) for src in self.sources])
        probs /= probs.sum()
        failed_in_row: list[str] = []

        def raw() -> Iterator[RawSample]:
            while True:
                src = self.sources[int(rng.choice(len(self.sources), p=probs))]
                url = src[int(rng.integers(len(src)))]
                result = ShardResult()
                monitor.shard_opened()
                for sample in read_shard(url, result):
                    monitor.samples_read()
                    yield sample
                if result.failure is not None:
                    monitor.shard_failed(result.failure, url)
                    lost = (self.counts or {}).get(url, 0) - result.delivered  # known with a manifest
                    if lost > 0:
                        monitor.sample_failed("lost_samples", url, n=lost)
                failed_in_row[:] = [*failed_in_row, url] if result.delivered == 0 else []
                if len(failed_in_row) >= 16:
                    raise DataError(
                        f"16 shards in a row gave no sample in {monitor.where}: "
                        + ", ".join(sorted(set(failed_in_row))[:8])
                    )

        m, source, block = self.shuffle_buffer, raw(), 0
        while True:
            chunk = [s for _, s in zip(range(m), source)]
            perm = np.random.default_rng([self.seed, epoch, self.rank, worker, consumed, block]).permutation(
                m
            )
            yield from (chunk[i] for i in perm)
            block += 1

    def _decode(self, raw: RawSample, monitor: FailureMonitor, draws: np.ndarray | None) -> Decoded | None:
        members = raw.members
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            monitor.sample_failed("missing_image", raw.url, raw.key)
            return None
        if self.target == "text":
            target: object = members.get("txt", b"").decode("utf-8", "replace").strip()
            if not target and "json" in members:  # img2dataset also keeps the caption in the json
                try:
                    target = str(json.loads(members["json"]).get("caption") or "").strip()
                except (ValueError, AttributeError):
                    target = ""
            if not target:
                monitor.sample_failed("missing_caption", raw.url, raw.key)
                return None
        else:
            try:
                target = int(json.loads(members["json"])["label"])
            except (KeyError, ValueError, TypeError):
                monitor.sample_failed("missing_label", raw.url, raw.key)
                return None
        try:
            if self.defer_decode:
                with Image.open(io.BytesIO(members[ext])) as img:  # parses the header only
                    if img.format == "JPEG":
                        box = self.transform.box(img.size[0], img.size[1], draws)
                        return _Encoded(members[ext], box), target, f"{raw.url}/{raw.key}"
            pixels = self.transform(members[ext], draws)
        except (OSError, SyntaxError, ValueError, RuntimeError, EOFError, Image.DecompressionBombError):
            # what PIL and torchvision raise for bad bytes; anything else is a bug and propagates
            monitor.sample_failed("corrupt_image", raw.url, raw.key)
            return None
        return pixels, target, f"{raw.url}/{raw.key}"

    def _decoded(
        self, stream: Iterator[RawSample | None], monitor: FailureMonitor, rng: np.random.Generator
    ) -> Iterator[Decoded]:
        for raw in stream:
            draws = rng.random(CROP_DRAWS) if self.transform.train else None  # taken by every slot
            if raw is None:  # lost with its shard; already counted
                continue
            out = self._decode(raw, monitor, draws)
            if out is not None:
                yield out

    def _collate(self, items: list[Decoded]) -> tuple:
        if self.defer_decode:
            images: torch.Tensor | EncodedBatch = _encoded_batch([it[0] for it in items])
        else:
            shared = get_worker_info() is not None
            out = _new_shared_batch(len(items), self.image_size) if shared else None
            images = normalize_into([it[0] for it in items], out)
        if self.target == "text":
            targets = self._tokenizer([it[1] for it in items])
        else:
            targets = torch.tensor([it[1] for it in items], dtype=torch.long)
        if self.return_keys:
            return images, targets, [it[2] for it in items]
        return images, targets

    def _batches(
        self, samples: Iterator[Decoded], sizes: list[int], monitor: FailureMonitor, refill
    ) -> Iterator[tuple]:
        """Cut ``samples`` into batches of ``sizes`` (all remaining samples if ``sizes`` is empty, for eval
        without a manifest). When samples run out early, ``refill(k, whole_set)`` supplies a k-th re-read
        pass: of this worker's range, or of the whole set once a pass of the range gave nothing."""
        items: list[Decoded] = []
        if not sizes:  # unknown length: plain batching with a partial last batch
            for it in samples:
                items.append(it)
                if len(items) == self.batch_size:
                    yield self._collate(items)
                    items = []
            monitor.check_final(self.failure_policy)
            if items:
                yield self._collate(items)
            return
        passes, got, whole_set = 0, False, False
        for size in sizes:
            while len(items) < size:
                nxt = next(samples, None)
                if nxt is None:
                    if self.mode == "eval":
                        monitor.check_final(self.failure_policy)
                    if refill is None:
                        raise DataError(f"the sample stream ended early in {monitor.where}")
                    if passes > 0 and not got:
                        if whole_set:  # every shard of the set was read and none gave a sample
                            raise self.failure_policy.error(
                                "no sample of any shard could be read",
                                table_totals(self._counts),
                                self.worst_shards(),
                                1,
                            )
                        whole_set = True
                    passes, got = passes + 1, False
                    log.warning(
                        "%s: re-reading %s (pass %d) to keep its batch count",
                        monitor.where,
                        "the whole set" if whole_set else "its range",
                        passes,
                    )
                    samples = _counted(refill(passes, whole_set), monitor)
                    continue
                got = True
                items.append(nxt)
            yield self._collate(items[:size])
            items = items[size:]
        if passes == 0 and self.mode == "eval":
            monitor.check_final(self.failure_policy)


class _Encoded:
    """A JPEG kept encoded for :class:`~clipforge.data.gpu_decode.JpegDecoder`, with its crop box."""

    __slots__ = ("box", "data")

    def __init__(self, data: bytes, box: tuple[float, float, float, float]) -> None:
        self.data, self.box = data, box


def _encoded_batch(items: list) -> EncodedBatch:
    data = [
        torch.frombuffer(bytearray(it.data), dtype=torch.uint8) if isinstance(it, _Encoded) else it
        for it in items
    ]
    boxes = torch.tensor([it.box if isinstance(it, _Encoded) else (0.0, 0.0, 0.0, 0.0) for it in items])
    return EncodedBatch(data, boxes.double())


def _counted(samples: Iterator[Decoded], monitor: FailureMonitor) -> Iterator[Decoded]:
    for s in samples:
        monitor.count("repeated_samples")
        yield s
