"""The training loader's epochs, resume position and failure verdict, in the main process, around the
WebDataset stream (Breuel et al., 2020) of :mod:`clipforge.data.dataset`.

:class:`Position` is the one holder of where the training stream is: the epoch, the batches of it handed
out, and a position restored from a checkpoint that the next pass must start from. The data module owns
it; Lightning saves and restores it through both ``WebDataModule.state_dict`` and the loader's own
``state_dict`` (its resumable-loader protocol), which read and write the same object.

:class:`EpochLoader` wraps the DataLoader: before each pass it tells the dataset the epoch (from
``trainer.current_epoch``, :meth:`WebDataModule.set_epoch` or a counter) and the batches to skip; while
it iterates, it sums the failure counts of all ranks and stops the run, on every rank at the same batch,
when :class:`~clipforge.data.failures.FailurePolicy` says the input is bad.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch
from torch.utils.data import DataLoader

from clipforge.data.dataset import ShardDataset
from clipforge.data.failures import COLUMNS
from clipforge.data.shards import CAUSES
from clipforge.distributed import all_reduce_sum

log = logging.getLogger(__name__)
T = TypeVar("T")

POSITION_KEYS = ("epoch", "batches")  # where the stream is
# What must match for the rest of an epoch to line up exactly with what was already seen: the rank and
# worker split, and the plan's inputs (the shard list and its sample counts, the order and shuffle settings).
FINGERPRINT_KEYS = (
    "world_size",
    "num_workers",
    "batch_size",
    "seed",
    "shards",
    "samples",
    "shard_list",
    "drop_last",
    "shuffle_buffer",
    "resampled",
)


class BatchLog(Generic[T]):
    """A value after each batch of the epoch handed out, from the batch a pass began after; the newest
    :attr:`KEEP` are kept (training lags the loader only by its prefetch)."""

    KEEP = 256

    def __init__(self) -> None:
        self._after: dict[int, T] = {}

    def __bool__(self) -> bool:
        return bool(self._after)

    def begin(self, resume: int, value: T) -> None:
        self._after = {resume: value}

    def latest(self) -> T:
        return self._after[max(self._after)]

    def add(self, handed_out: int, value: T) -> None:
        self._after[handed_out] = value
        if len(self._after) > self.KEEP:
            del self._after[min(self._after)]

    def after(self, batches: int | None) -> tuple[int, T]:
        """The value after the first ``batches`` (None: all handed out), or, when that one is not kept,
        after the nearest batch before it (the oldest kept if none): ``(its batch count, value)``."""
        key = max(self._after) if batches is None else batches
        if key not in self._after:
            key = max((k for k in self._after if k <= key), default=min(self._after))
        return key, self._after[key]


class SkipTally:
    """This rank's skipped samples and shards (a :data:`CAUSES` vector) behind the batches training
    consumed: what a checkpoint carries, so that a resumed run's counts go on from where the uninterrupted
    run's were. The workers read ahead of training, and a resume reads those batches again; so each batch
    brings the skips its worker counted while making it (``ShardDataset.tally_skips``), and a pass that
    ran to its end adds what its workers counted after their last batches."""

    def __init__(self) -> None:
        self.carried = torch.zeros(len(CAUSES), dtype=torch.int64)  # restored: counted before this process
        self._base = torch.zeros_like(self.carried)  # this process's counts when the current pass began
        self._after: BatchLog[torch.Tensor] = BatchLog()  # this pass's skips
        self._warned = False

    def begin(self, counted: torch.Tensor, resume: int) -> None:
        """A pass starts after ``resume`` batches of its epoch; ``counted``: this process's counts so far."""
        self._base = counted.clone()
        self._after.begin(resume, torch.zeros_like(self.carried))

    def batch(self, handed_out: int, skipped: torch.Tensor) -> None:
        self._after.add(handed_out, self._after.latest() + skipped)

    def end(self, handed_out: int, counted: torch.Tensor) -> None:
        """The pass ran to its end: every skip its workers counted belongs to it."""
        self._after.add(handed_out, counted - self._base)

    def consumed(self, batches: int | None) -> torch.Tensor:
        """Skips behind the first ``batches`` of the epoch (None: all handed out), with this process's
        earlier passes and the carried counts."""
        if not self._after:
            return self.carried.clone()
        key, skipped = self._after.after(batches)
        if batches is not None and key != batches and not self._warned:
            self._warned = True
            log.warning("skip counts known after %d batches, not %d: a resume may miscount", key, batches)
        return self.carried + self._base + skipped

    def restore(self, by_rank: list[dict[str, int]], rank: int, world: int) -> None:
        """This rank's share of a checkpoint's per-rank counts (every rank's row once over any new world)."""
        rows = [torch.tensor([int(r.get(c, 0)) for c in CAUSES]) for r in by_rank[rank::world]]
        self.carried = torch.stack(rows).sum(0) if rows else torch.zeros_like(self.carried)


class SlotTally:
    """Exact mode: per logical worker, the stream slot (bad samples included) behind the last batch it
    gave, after each batch handed out (-1: none yet). Bad samples pull later ones into a worker's
    batches, so its next sample is not where the batches' sample count says; a resume starts each worker
    at its slot."""

    def __init__(self) -> None:
        self._after: BatchLog[list[int]] = BatchLog()
        self._workers = 0

    def begin(self, resume: int, workers: int, slots: list[int] | None) -> None:
        self._workers = workers
        self._after.begin(resume, list(slots) if slots is not None else [-1] * workers)

    def batch(self, handed_out: int, worker: int, slot: int) -> None:
        row = list(self._after.latest())
        if slot != -1:  # -1 outside exact mode; a batch.slot_code
            row[worker] = slot
        self._after.add(handed_out, row)

    def at(self, batches: int | None) -> list[int]:
        """The slots behind the first ``batches`` of the epoch (None: all handed out); -1 where unknown."""
        if self._after:
            key, row = self._after.after(batches)
            if batches is None or key == batches:
                return list(row)
        return [-1] * self._workers


class Position:
    """Where the training stream is: ``epoch`` being read (-1: none yet), ``yielded`` batches of it handed
    out (resumed ones included), and ``restored``, a checkpoint's position not yet started from (with
    ``slots``, every rank's :class:`SlotTally` row, when it has them); ``skips``, the skip counts that go
    with it."""

    def __init__(self) -> None:
        self.epoch, self.yielded = -1, 0
        self.restored: dict | None = None
        self.skips = SkipTally()
        self.slots = SlotTally()
        self._warned: dict | None = None  # the restored position and changes last warned about

    def start(
        self, epoch: int, num_batches: int, rank: int = 0, workers: int = 1
    ) -> tuple[int, list[int] | None]:
        """Begin a pass over ``epoch`` read by ``workers`` loader workers; returns the batches to skip
        (those of a restored position) and this rank's worker slots to resume at (None: unknown)."""
        resume, slots = 0, None
        if self.restored is not None and int(self.restored["epoch"]) == epoch:
            resume = min(int(self.restored["batches"]), num_batches)
            rows = self.restored.get("slots")
            if (
                rows
                and rank < len(rows)
                and len(rows[rank]) == workers
                and resume == int(self.restored["batches"])
            ):
                slots = [int(x) for x in rows[rank]]
            log.info("resuming epoch %d of the data stream after %d batches", epoch, resume)
        elif self.restored is not None:
            log.info(
                "checkpoint's data position is for epoch %s; starting epoch %d fresh",
                self.restored["epoch"],
                epoch,
            )
        self.restored = None
        self.epoch, self.yielded = epoch, resume
        self.slots.begin(resume, workers, slots)
        return resume, slots

    def state_dict(self, consumed: int | None, fingerprint: dict) -> dict:
        """``{epoch, batches, world_size, num_workers, batch_size, seed}``; ``consumed``: batches training
        has finished (Lightning's progress counter), else those handed out."""
        if self.restored is not None:  # restored but not started yet: keep the restored position
            return dict(self.restored)
        return {"epoch": self.epoch, "batches": self.yielded if consumed is None else consumed, **fingerprint}

    def load_state_dict(self, state: dict, fingerprint: dict) -> None:
        if not state:
            return
        changed = {k: (state[k], v) for k, v in fingerprint.items() if k in state and state[k] != v}
        # Lightning restores the same state twice (the data module's and the train loader's copy, which
        # lacks the slots): one warning for one position and one set of changes.
        said = {"changed": changed, **{k: state.get(k) for k in POSITION_KEYS}}
        if changed and said != self._warned:
            self._warned = said
            log.warning(
                "data position restored with a different %s (checkpoint, config): the rest of epoch %s will "
                "not line up exactly with what was already seen (some of its samples may repeat or be skipped)",
                changed,
                state.get("epoch"),
            )
        same = self.restored is not None and all(self.restored.get(k) == state.get(k) for k in POSITION_KEYS)
        kept = self.restored.get("slots") if same and self.restored is not None else None
        self.restored = {k: state[k] for k in POSITION_KEYS if k in state}
        # Lightning restores the data module's copy (with every rank's slots) and the loader's (without);
        # slots only line up when the split into ranks and workers and the plan are unchanged.
        slots = state.get("slots", kept)
        if slots and not changed:
            self.restored["slots"] = slots


class EpochLoader:
    """Train loader: before each pass, sets the dataset's epoch and resume point; counts what it yields."""

    def __init__(
        self,
        dataset: ShardDataset,
        loader: DataLoader,
        epoch_fn: Callable[[], int | None],
        progress_fn: Callable[[], int | None],
        position: Position | None = None,
    ) -> None:
        # not called `dataset`: Lightning would then warn that an IterableDataset has a length
        self.shards, self.loader = dataset, loader
        self._epoch_fn, self._progress_fn = epoch_fn, progress_fn
        self.position = position if position is not None else Position()
        self._run_start: torch.Tensor | None = None  # counts when a resampled stream began
        dataset.tally_skips = True  # before any worker copies it: every batch ends with its skips

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def workers(self) -> int:
        """The dataset's logical workers (one when the main process reads)."""
        return max(1, self.loader.num_workers)

    def __len__(self) -> int:
        n = self.shards.num_batches
        if n is None:
            raise TypeError("length unknown without a manifest")
        return n

    def __iter__(self) -> Iterator[tuple]:
        epoch = self._epoch_fn()
        epoch = self.position.epoch + 1 if epoch is None else epoch
        resume, slots = self.position.start(epoch, len(self), self.shards.rank, self.workers)
        self.shards.set_epoch(epoch)
        self.shards.set_resume(resume, slots)
        # Exact epochs are judged on their own planned samples; a resampled stream, which has no plan, on
        # everything read since the run began.
        planned = self.shards.planned_samples(resume)
        start = self.shards.progress_counts().clone()
        if planned is None:
            start = self._run_start if self._run_start is not None else start
            self._run_start = start
        every = self.shards.failures.check_every
        skips = self.position.skips
        skips.begin(self._skips_counted(), resume)
        for i, tallied in enumerate(self.loader, 1):
            batch, tally = tallied[:-1], tallied[-1]
            self.position.yielded += 1
            skips.batch(self.position.yielded, tally[: len(CAUSES)])
            self.position.slots.batch(self.position.yielded, int(tally[-2]), int(tally[-1]))
            if i % every == 0:
                self._check_failures(start, planned)
            yield batch
        skips.end(self.position.yielded, self._skips_counted())
        self._check_failures(start, planned)

    def _skips_counted(self) -> torch.Tensor:
        return self.shards.progress_counts()[: len(CAUSES)].clone()

    def _check_failures(self, start: torch.Tensor, planned: int | None) -> None:
        """Stop on too much bad input, on every rank at the same batch: the counts are summed over ranks
        first (a collective; all ranks fetch the same number of batches, so all come here together)."""
        world = self.shards.world_size
        counts = all_reduce_sum(self.shards.progress_counts() - start, enabled=world > 1)
        totals = dict(zip(COLUMNS, (int(n) for n in counts.tolist())))
        policy = self.shards.failures
        reason = policy.verdict(totals, planned)
        if reason is not None:
            raise policy.error(reason, totals, self.shards.worst_shards(), world)

    def fingerprint(self) -> dict:
        """What the position only lines up with when it is the same on resume."""
        ds = self.shards
        samples = sum(ds.counts[u] for u in ds.urls) if ds.counts is not None else None
        stream = (ds.stream.drop_last, ds.shuffle_buffer, ds.stream.resampled)
        values = (
            ds.world_size,
            self.workers,
            ds.batch_size,
            ds.seed,
            len(ds.urls),
            samples,
            shard_list(ds),
            *stream,
        )
        return dict(zip(FINGERPRINT_KEYS, values, strict=True))

    def state_dict(self) -> dict:
        return self.position.state_dict(self._progress_fn(), self.fingerprint())

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state, self.fingerprint())


def shard_list(ds: ShardDataset) -> str:
    """A short digest of the shards in plan order, by file name and sample count: a shard added, removed,
    reordered or recounted changes it; the same shards moved to another directory or bucket do not."""
    counts = ds.counts or {}
    names = "\n".join(f"{u.rsplit('/', 1)[-1]}:{counts.get(u, -1)}" for u in ds.urls)
    return hashlib.sha1(names.encode()).hexdigest()[:12]


def auto_num_workers(requested: int | None, cap: int = 8) -> int:
    """``requested`` if given, else the CPUs this process may use shared among the GPUs of the node
    (one training process per GPU), capped at ``cap``; at least 1."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"data.num_workers must be >= 0 or null (auto), got {requested}")
        return int(requested)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    procs = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return max(1, min(cap, cpus // procs))
