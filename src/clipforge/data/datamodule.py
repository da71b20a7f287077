"""The Lightning data module over WebDataset shards (Breuel et al., 2020) for CLIP pretraining (Radford et
al., 2021): one class for user shards (``data=wds``) and for shards a source writes first (``data=synthetic``
sets ``data.source`` to :class:`~clipforge.data.synthetic_shards.SyntheticShards`).

Settings come in groups (:mod:`clipforge.data.config`): the common ones at the top (``train_urls``,
``batch_size``, ``num_workers``, ...), then ``stream``, ``augment`` and ``failures``, each one YAML node of
``conf/data/wds.yaml``. Every split reads through :class:`~clipforge.data.dataset.ShardDataset`; training
through an :class:`~clipforge.data.loader.EpochLoader`, which sets epochs and resume points and judges bad
input. The resume position, ``{"epoch", "batches", ...}``, lives in one
:class:`~clipforge.data.loader.Position`: Lightning stores ``state_dict()`` in every checkpoint (under the
key ``WebDataModule``) and restores it with ``load_state_dict``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from clipforge.data.config import Augment, ShardSet, ShardSource, Stream, Urls, ZeroShotSet, check_at_least
from clipforge.data.dataset import ShardDataset
from clipforge.data.failures import FailurePolicy
from clipforge.data.gpu_decode import EncodedBatch, JpegDecoder, check_decode_device
from clipforge.data.loader import EpochLoader, Position, auto_num_workers
from clipforge.data.manifest import find_manifest
from clipforge.data.shards import CAUSES, DataError, expand_urls, missing_local, same_shard
from clipforge.distributed import EvenSteps, all_gather_cat, world_info

if TYPE_CHECKING:
    from clipforge.eval.metadata import Template

log = logging.getLogger(__name__)


class WebDataModule(L.LightningDataModule):
    """Image-text WebDataset shards -> ``(images, tokens)`` batches, with zero-shot and validation sets.

    ``train_urls``: brace pattern(s); a string with ``::`` between sources or a list (one per source).
    ``zeroshot``: labelled shards and their class names and prompts. ``manifest``: samples per shard when
    no ``manifest.json`` sits beside the shards. ``source``: writes shards and names them (then leave the
    URLs and ``zeroshot`` unset). ``batch_size`` is per rank; ``num_workers`` null: the CPUs per GPU process.
    """

    def __init__(
        self,
        train_urls: Urls | None = None,
        val_urls: Urls | None = None,
        zeroshot: ZeroShotSet | None = None,
        manifest: str | None = None,
        source: ShardSource | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        context_length: int = 77,
        stream: Stream | None = None,
        augment: Augment | None = None,
        failures: FailurePolicy | None = None,
    ) -> None:
        super().__init__()
        check_at_least(1, "data", batch_size=batch_size, context_length=context_length)
        if context_length < 2:  # the tokenizer refused it at the first batch, after the shards were written
            raise ValueError(
                f"data.context_length must be an integer >= 2 (SOT + EOT), got {context_length} (it follows "
                "model.text.context_length unless set)"
            )
        zeroshot = zeroshot or ZeroShotSet()
        if source is not None:
            if train_urls is not None or val_urls is not None or zeroshot != ZeroShotSet():
                raise ValueError(
                    "data.source writes and names its own shards: leave data.train_urls, data.val_urls and "
                    "data.zeroshot unset (or drop data.source to read your own)"
                )
            self.shards = source.shards()
        elif train_urls is None:
            raise ValueError("data.train_urls is required (or a data.source that writes the shards)")
        else:
            self.shards = ShardSet(train_urls, val_urls, zeroshot)
        self.source, self.manifest = source, manifest
        self.batch_size, self.num_workers = batch_size, auto_num_workers(num_workers)
        self.context_length = context_length
        self.stream, self.augment = stream or Stream(), augment or Augment()
        self.failures = failures or FailurePolicy()
        self.pin_memory = (
            torch.cuda.is_available() if self.stream.pin_memory is None else self.stream.pin_memory
        )
        gpu = self.augment.decode_device != "cpu"
        self._decoder = (
            JpegDecoder(
                self.augment.image_size, self.augment.interpolation, self.augment.mean, self.augment.std
            )
            if gpu
            else None
        )
        self._datasets: dict[str, ShardDataset] = {}
        self._train_loader: EpochLoader | None = None
        self.position = Position()
        self._explicit_epoch: int | None = None

    # ------------------------------------------------------------------------------------- the splits
    @property
    def train_urls(self) -> Urls:
        return self.shards.train_urls

    @property
    def val_urls(self) -> Urls | None:
        return self.shards.val_urls

    @property
    def zeroshot_urls(self) -> Urls | None:
        return self.shards.zeroshot.urls

    @property
    def zeroshot_classnames(self) -> list[str] | None:
        names = self.shards.zeroshot.classnames
        return list(names) if names is not None else None

    @property
    def zeroshot_templates(self) -> list[Template] | None:
        templates = self.shards.zeroshot.templates
        return list(templates) if templates is not None else None

    @property
    def has_validation(self) -> bool:
        """Whether held-out image-text pairs were given (``train`` skips the validation loop if not)."""
        return self.val_urls is not None

    # --------------------------------------------------------------------------------- construction
    def prepare_data(self) -> None:
        """Write the source's shards (Lightning calls this on one process per node)."""
        if self.source is not None:
            self.source.prepare()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return world_info()

    def _trainer_or_none(self) -> L.Trainer | None:
        return getattr(self, "trainer", None)

    def _dataset(self, split: str) -> ShardDataset:
        ds = self._datasets.get(split)
        if ds is not None and (ds.rank, ds.world_size) == self._rank_world():
            return ds
        urls = {"train": self.train_urls, "val": self.val_urls, "zeroshot": self.zeroshot_urls}[split]
        sources = expand_urls(urls)
        flat = [u for s in sources for u in s]
        counts = find_manifest(flat, self.manifest)
        self._check_missing(split, flat, counts)
        rank, world = self._rank_world()
        train = split == "train"
        ds = ShardDataset(
            sources,
            counts,
            batch_size=self.batch_size if train else (self.stream.val_batch_size or self.batch_size),
            train=train,
            stream=self.stream,
            augment=self.augment,
            target=(self.shards.zeroshot.classnames or "label") if split == "zeroshot" else "text",
            context_length=self.context_length,
            rank=rank,  # evaluation sets too: each rank reads only its block of the batches
            world_size=world,
            num_workers=self.num_workers,
            failures=self.failures,
        )
        self._datasets[split] = ds
        return ds

    def _check_missing(self, split: str, urls: list[str], counts: dict[str, int] | None) -> None:
        """Shards missing from disk are skipped as unreadable, but fail at once when they are not shards
        the manifest knows (the pattern asks for more than exists) or when they alone exceed the limit."""
        missing = missing_local(urls)
        if not missing:
            return
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        if counts is None and find_manifest(missing, self.manifest) is None and split == "train":
            raise DataError(
                f"{len(missing)} of {len(urls)} {split} shards do not exist and no manifest lists them: {shown}; "
                "does the pattern ask for more shards than were written?"
            )
        lost = sum(counts[u] for u in missing) if counts is not None else len(missing)
        total = sum(counts.values()) if counts is not None else len(urls)
        if lost > self.failures.max_fraction * total:
            raise DataError(
                f"{len(missing)} of {len(urls)} {split} shards ({lost} of {total} "
                f"{'samples' if counts is not None else 'shards'}) are missing, more than "
                f"data.failures.max_fraction={self.failures.max_fraction}: {shown}"
            )

    def setup(self, stage: str | None = None) -> None:
        trainer = self._trainer_or_none()
        if self._decoder is not None and trainer is not None:
            check_decode_device(
                trainer.strategy.root_device
            )  # batches decode there (on_before_batch_transfer)
        self._dataset("train")  # fail at once on a bad pattern or a missing manifest
        for split, urls in (("val", self.val_urls), ("zeroshot", self.zeroshot_urls)):
            if urls is not None:
                self._dataset(split)
        if self.val_urls is not None and self._rank_world()[0] == 0:  # said once, not by every rank
            self._warn_trained_validation()

    def _warn_trained_validation(self) -> None:
        """Validation shards that are training shards too give a val loss and held-out figures measured on
        pairs the model trains on: said, with the shards (a deliberate check of memorisation may want it)."""
        train = {same_shard(u) for u in self._dataset("train").urls}
        val = self._dataset("val").urls
        shared = [u for u in val if same_shard(u) in train]
        if shared:
            shown = ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else "")
            log.warning(
                "%d of the %d data.val_urls shards are training shards too (%s): the val loss and held-out "
                "figures measure pairs the model trains on, not held-out ones",
                len(shared),
                len(val),
                shown,
            )

    def _loader(self, ds: ShardDataset) -> DataLoader:
        kwargs: dict = {"batch_size": None, "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs |= {
                "persistent_workers": self.stream.persistent_workers,
                "prefetch_factor": self.stream.prefetch_factor,
                "worker_init_fn": partial(leave_outside_sigterms_to_the_trainer, trainer_pid=os.getpid()),
            }
        return DataLoader(ds, **kwargs)

    # ------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> EpochLoader:
        ds = self._dataset("train")
        loader = EpochLoader(ds, self._loader(ds), self._current_epoch, self._consumed, self.position)
        if (
            self.position.restored is not None
        ):  # restored before the loader existed: check it against this run
            loader.load_state_dict(self.position.restored)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> EvenSteps | list:
        """Held-out image-text pairs as ``(images, tokens)``; ``[]`` (Lightning: no validation) if none.

        Each rank reads its own block of the batches one process would make; ranks with one batch fewer
        then take a padding step (a one-pair blank batch, :class:`~clipforge.distributed.EvenSteps`) so
        that every rank runs the validation step equally often."""
        if self.val_urls is None:
            return []
        return EvenSteps(self._loader(self._dataset("val")), self._blank_pair)

    def _blank_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.augment.image_size
        return torch.zeros(1, 3, size, size), torch.zeros(1, self.context_length, dtype=torch.long)

    def zeroshot_dataloader(self) -> DataLoader | None:
        """``(images, labels)`` with labels from each sample's json ``label``, this rank's block of the
        batches (:func:`~clipforge.data.plan.plan_eval`); None without zero-shot data."""
        if self.zeroshot_urls is None:
            return None
        return self._loader(self._dataset("zeroshot"))

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per rank per epoch (what the LR schedule needs)."""
        n = self._dataset("train").num_batches
        assert n is not None  # exact mode requires a manifest, resampled mode epoch_samples
        return n

    def skip_counts(self, split: str = "train") -> dict[str, int]:
        """Samples and shards skipped on this rank, by cause: of the training stream, cumulative over the run
        (resumes included); of an evaluation split (``val``, ``zeroshot``), in its last pass."""
        ds = self._datasets.get(split)
        total = ds.skip_counts() if ds is not None else dict.fromkeys(CAUSES, 0)
        if split != "train":
            return total
        for cause, n in zip(CAUSES, self.position.skips.carried.tolist()):
            total[cause] += n  # counted before a resume
        if self._decoder is not None:
            total["corrupt_image"] += self._decoder.corrupt
        return total

    # -------------------------------------------------------------------------------- GPU decoding
    def decode_batch(self, batch: tuple, device: torch.device | str | None = None) -> tuple:
        """Decode a batch whose images are still JPEG (``augment.decode_device="cuda"``) on ``device``;
        other batches pass through. Lightning calls this via :meth:`on_before_batch_transfer`. An image
        that fails to decode is replaced by another of the batch, and so is the rest of its row."""
        if not (isinstance(batch, tuple | list) and batch and isinstance(batch[0], EncodedBatch)):
            return batch
        assert self._decoder is not None
        images, source = self._decoder(batch[0], device or self.augment.decode_device)
        rows = [int(i) for i in source]
        rest = [_take(x, source, rows) for x in batch[1:]]
        return (images, *rest)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._decoder is None:
            return batch
        trainer = self._trainer_or_none()
        device = trainer.strategy.root_device if trainer is not None else None
        return self.decode_batch(batch, device)

    # --------------------------------------------------------------------------- epochs and resume
    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next training pass (only needed without a Lightning trainer)."""
        self._explicit_epoch = epoch

    def _current_epoch(self) -> int | None:
        if self._explicit_epoch is not None:
            epoch, self._explicit_epoch = self._explicit_epoch, None
            return epoch
        trainer = self._trainer_or_none()
        return trainer.current_epoch if trainer is not None else None

    def _consumed(self) -> int | None:
        """Batches of this epoch that training has finished, from Lightning's progress counter (at a
        checkpoint in ``on_train_batch_end`` it already counts the current batch); None without a trainer."""
        trainer = self._trainer_or_none()
        if trainer is None or trainer.state.fn != "fit":
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def state_dict(self) -> dict:
        """The data position, and ``skipped``: every rank's skip counts behind it (``[{cause: n}]`` by rank).

        Gathering them is a collective: Lightning saves a checkpoint on every rank (``dump_checkpoint``
        calls this on each; rank 0 writes), so every rank comes here together."""
        if self._train_loader is None:
            state = dict(self.position.restored or {})
        else:
            state = self._train_loader.state_dict()
        skips = self.position.skips
        consumed = skips.carried if self.position.restored is not None else skips.consumed(self._consumed())
        if self._decoder is not None:
            consumed = consumed + torch.tensor(
                [self._decoder.corrupt * (c == "corrupt_image") for c in CAUSES]
            )
        rows = all_gather_cat(consumed[None])
        state["skipped"] = [dict(zip(CAUSES, (int(n) for n in row))) for row in rows.tolist()]
        if self.position.restored is None and self._train_loader is not None:  # exact mode: see SlotTally
            row = torch.tensor(self.position.slots.at(self._consumed()), dtype=torch.int64)
            state["slots"] = all_gather_cat(row[None]).tolist()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "skipped" in state_dict:  # a checkpoint written before the counts were kept has none
            self.position.skips.restore(state_dict["skipped"], *self._rank_world())
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        elif state_dict:  # checked against this run's settings when the loader is built
            self.position.restored = {k: v for k, v in state_dict.items() if k != "skipped"}


def _take(x: object, source: torch.Tensor, rows: list[int]) -> object:
    """Rows ``source`` of a batch element: a tensor, a list (keys) or a mapping of tensors (regions)."""
    if isinstance(x, torch.Tensor):
        return x[source]
    if isinstance(x, dict):
        return {k: _take(v, source, rows) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [x[i] for i in rows]
    return x


def leave_outside_sigterms_to_the_trainer(worker_id: int, trainer_pid: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: a worker ends on a SIGTERM from its training process only. SLURM
    (scancel, the time limit), ``timeout`` and ``kill -- -PGID`` signal every process of a job, and torch's
    workers died of it at once, so the training process, which got the same signal to finish its step and
    save (callbacks.preemption), failed instead with "DataLoader worker ... is killed by signal: Terminated".
    The training process stops its workers itself once saved. A SIGTERM it sends (the loader's ``terminate``,
    ``multiprocessing``'s at exit) ends the worker as torch's own handler does; a worker whose training
    process is gone ends on its own (torch's watchdog). Python handlers do not see the sender, so SIGTERM is
    blocked and a thread waits for it. ``trainer_pid``: the process that made the loader (not the worker's
    parent, which under forkserver, Python 3.14's default on Linux, is the fork server). Where the platform
    cannot tell the sender (no ``sigwaitinfo``: macOS, Windows), torch's own handling stays."""
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        return
    trainer = trainer_pid if trainer_pid is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_await_sigterm, args=(trainer,), name="sigterm", daemon=True).start()


def _await_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # from outside the training process, which got it too and decides
    os._exit(0)  # as torch's worker handler answers its parent's SIGTERM
