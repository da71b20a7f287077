"""Lightning data modules over WebDataset shards (Breuel et al., 2020) for CLIP pretraining
(Radford et al., 2021): :class:`WebDataModule` for user shards and :class:`SyntheticShardsDataModule`,
which first writes the procedural data set to shards and then trains from them the same way.

Epochs and resume. ``train_dataloader()`` returns an :class:`EpochLoader`, an iterable over a
DataLoader that, each time Lightning starts an epoch, tells the dataset which epoch it is (from
``trainer.current_epoch``; from :meth:`WebDataModule.set_epoch` or a counter without a trainer) and
where to resume. The position is ``{"epoch", "batches"}``: batches of this rank's epoch already
trained, read from Lightning's own progress counter when saving. All ranks step in lockstep, so rank
0's number is every rank's. Lightning stores ``WebDataModule.state_dict()`` in every checkpoint and calls
``load_state_dict`` on restore; the same state also travels through the loader's own ``state_dict``
(Lightning's resumable-loader protocol). On resume the dataset skips those batches: whole shards
without opening them, and at most one shuffle block re-read (see :mod:`clipforge.data.dataset`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from clipforge.data import synthetic
from clipforge.data.dataset import ShardDataset
from clipforge.data.failures import COLUMNS, FailurePolicy
from clipforge.data.gpu_decode import EncodedBatch, JpegDecoder
from clipforge.data.manifest import MANIFEST_NAME, find_manifest, read_manifest
from clipforge.data.shards import CAUSES, DataError, expand_urls, missing_local
from clipforge.data.sources import synthetic_records
from clipforge.data.writer import write_shards

log = logging.getLogger(__name__)


class EpochLoader:
    """Train loader: before each pass, sets the dataset's epoch and resume point; counts what it yields."""

    def __init__(
        self,
        dataset: ShardDataset,
        loader: DataLoader,
        epoch_fn: Callable[[], int | None],
        progress_fn: Callable[[], int | None],
    ) -> None:
        # not called `dataset`: Lightning would then warn that an IterableDataset has a length
        self.shards, self.loader = dataset, loader
        self._epoch_fn, self._progress_fn = epoch_fn, progress_fn
        self.epoch = -1
        self.yielded = 0  # batches of the current epoch handed out, resumed ones included
        self._pending: dict | None = None
        self._run_start: torch.Tensor | None = None  # counts when a resampled stream began

    def __len__(self) -> int:
        n = self.shards.num_batches
        if n is None:
            raise TypeError("length unknown without a manifest")
        return n

    def __iter__(self) -> Iterator[tuple]:
        epoch = self._epoch_fn()
        epoch = self.epoch + 1 if epoch is None else epoch
        resume = 0
        if self._pending is not None and int(self._pending["epoch"]) == epoch:
            resume = min(int(self._pending["batches"]), len(self))
            log.info("resuming epoch %d of the data stream after %d batches", epoch, resume)
        elif self._pending is not None:
            log.info(
                "checkpoint's data position is for epoch %s; starting epoch %d fresh",
                self._pending["epoch"],
                epoch,
            )
        self._pending = None
        self.shards.set_epoch(epoch)
        self.shards.set_resume(resume)
        self.epoch, self.yielded = epoch, resume
        # Exact epochs are judged on their own planned samples; a resampled stream, which has no plan, on
        # everything read since the run began.
        planned = self.shards.planned_samples(resume)
        start = self.shards.progress_counts().clone()
        if planned is None:
            start = self._run_start if self._run_start is not None else start
            self._run_start = start
        every = self.shards.failure_policy.check_every
        for i, batch in enumerate(self.loader, 1):
            self.yielded += 1
            if i % every == 0:
                self._check_failures(start, planned)
            yield batch
        self._check_failures(start, planned)

    def _check_failures(self, start: torch.Tensor, planned: int | None) -> None:
        """Stop on too much bad input, on every rank at the same batch: the counts are summed over ranks
        first (a collective; all ranks fetch the same number of batches, so all come here together)."""
        counts = self.shards.progress_counts() - start
        world = self.shards.world_size
        if world > 1 and dist.is_available() and dist.is_initialized():
            device = (
                torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            )
            counts = counts.to(device) if device is not None else counts.clone()
            dist.all_reduce(counts)
        totals = dict(zip(COLUMNS, (int(n) for n in counts.tolist())))
        policy = self.shards.failure_policy
        reason = policy.verdict(totals, planned)
        if reason is not None:
            raise policy.error(reason, totals, self.shards.worst_shards(), world)

    def state_dict(self) -> dict:
        if self._pending is not None:  # restored but not iterated yet: keep the restored position
            return dict(self._pending)
        consumed = self._progress_fn()
        return {
            "epoch": self.epoch,
            "batches": self.yielded if consumed is None else consumed,
            "world_size": self.shards.world_size,
            "num_workers": max(1, self.loader.num_workers),
            "batch_size": self.shards.batch_size,
            "seed": self.shards.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        now = {"world_size": self.shards.world_size, "num_workers": max(1, self.loader.num_workers)}
        now |= {"batch_size": self.shards.batch_size, "seed": self.shards.seed}
        changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        if changed:
            log.warning(
                "data position restored with a different %s: the rest of epoch %s will not line up exactly "
                "with what was already seen (some samples may repeat or be skipped)",
                changed,
                state.get("epoch"),
            )
        self._pending = {k: state[k] for k in ("epoch", "batches") if k in state}


def _listify(x):
    if x is None or isinstance(x, str):
        return x
    return [str(u) for u in x]


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


class WebDataModule(L.LightningDataModule):
    """Image-text WebDataset shards -> ``(images, tokens)`` batches, with zero-shot and validation sets.

    ``train_urls``: brace pattern(s); a string with ``::`` between sources or a list (one per source).
    ``resampled``: draw shards with replacement (multi-node, source ``weights``), epochs of
    ``epoch_samples``; otherwise exact epochs from the manifest (see :mod:`clipforge.data.plan`).
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        zeroshot_urls: str | list[str] | None = None,
        zeroshot_classnames: list[str] | None = None,
        zeroshot_templates: list[str] | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        image_size: int = 224,
        context_length: int = 77,
        resampled: bool = False,
        epoch_samples: int | None = None,
        weights: list[float] | None = None,
        seed: int = 0,
        manifest: str | None = None,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        interpolation: str = "bicubic",
        val_batch_size: int | None = None,
        max_skip_fraction: float = 0.5,
        persistent_workers: bool = False,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        return_keys: bool = False,
        decode_device: str = "cpu",
    ) -> None:
        super().__init__()
        self.train_urls, self.val_urls = _listify(train_urls), _listify(val_urls)
        self.zeroshot_urls = _listify(zeroshot_urls)
        self.zeroshot_classnames = list(zeroshot_classnames) if zeroshot_classnames is not None else None
        self.zeroshot_templates = list(zeroshot_templates) if zeroshot_templates is not None else None
        self.batch_size, self.num_workers = batch_size, auto_num_workers(num_workers)
        self.image_size, self.context_length = image_size, context_length
        self.resampled, self.epoch_samples = resampled, epoch_samples
        self.weights = [float(w) for w in weights] if weights is not None else None
        self.seed, self.manifest = seed, manifest
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.scale, self.interpolation = tuple(scale), interpolation
        self.val_batch_size = val_batch_size or batch_size
        self.max_skip_fraction = max_skip_fraction
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.return_keys = return_keys
        if decode_device != "cpu" and not decode_device.startswith("cuda"):
            raise ValueError(f"decode_device must be 'cpu' or 'cuda[:N]', got {decode_device!r}")
        self.decode_device = decode_device
        self._decoder = JpegDecoder(image_size, interpolation) if decode_device != "cpu" else None
        self._datasets: dict[str, ShardDataset] = {}
        self._train_loader: EpochLoader | None = None
        self._pending_state: dict | None = None
        self._explicit_epoch: int | None = None

    # --------------------------------------------------------------------------------- construction
    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _trainer_or_none(self) -> L.Trainer | None:
        return getattr(self, "trainer", None)

    def _dataset(self, split: str) -> ShardDataset:
        ds = self._datasets.get(split)
        if ds is not None and (split != "train" or (ds.rank, ds.world_size) == self._rank_world()):
            return ds
        urls = {"train": self.train_urls, "val": self.val_urls, "zeroshot": self.zeroshot_urls}[split]
        sources = expand_urls(urls)
        flat = [u for s in sources for u in s]
        counts = find_manifest(flat, self.manifest)
        self._check_missing(split, flat, counts)
        rank, world = self._rank_world()
        train = split == "train"
        mode = ("resampled" if self.resampled else "exact") if train else "eval"
        ds = ShardDataset(
            sources,
            batch_size=self.batch_size if train else self.val_batch_size,
            image_size=self.image_size,
            context_length=self.context_length,
            counts=counts,
            mode=mode,
            epoch_samples=self.epoch_samples,
            weights=self.weights if train else None,
            seed=self.seed,
            rank=rank if train else 0,
            world_size=world if train else 1,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            drop_last=self.drop_last,
            train_transform=train,
            scale=self.scale,
            interpolation=self.interpolation,
            target="label" if split == "zeroshot" else "text",
            failure_policy=FailurePolicy(self.max_skip_fraction),
            return_keys=self.return_keys,
            decode_device=self.decode_device if train else "cpu",  # zero-shot/val batches stay plain tensors
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
        if lost > self.max_skip_fraction * total:
            raise DataError(
                f"{len(missing)} of {len(urls)} {split} shards ({lost} of {total} "
                f"{'samples' if counts is not None else 'shards'}) are missing, more than "
                f"data.max_skip_fraction={self.max_skip_fraction}: {shown}"
            )

    def setup(self, stage: str | None = None) -> None:
        self._dataset("train")  # fail at once on a bad pattern or a missing manifest
        for split, urls in (("val", self.val_urls), ("zeroshot", self.zeroshot_urls)):
            if urls is not None:
                self._dataset(split)

    def _loader_kwargs(self) -> dict:
        kwargs: dict = {"batch_size": None, "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs |= {"persistent_workers": self.persistent_workers, "prefetch_factor": self.prefetch_factor}
        return kwargs

    # ------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> EpochLoader:
        ds = self._dataset("train")
        loader = EpochLoader(ds, DataLoader(ds, **self._loader_kwargs()), self._current_epoch, self._consumed)
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Held-out image-text pairs as ``(images, tokens)``; ``[]`` (Lightning: no validation) if none."""
        if self.val_urls is None:
            return []
        return DataLoader(self._dataset("val"), **self._loader_kwargs())

    @property
    def has_validation(self) -> bool:
        """Whether held-out image-text pairs were given (``train`` skips the validation loop if not)."""
        return self.val_urls is not None

    def zeroshot_dataloader(self) -> DataLoader | None:
        """``(images, labels)`` with labels from each sample's json ``label``; None without zero-shot data."""
        if self.zeroshot_urls is None:
            return None
        return DataLoader(self._dataset("zeroshot"), **self._loader_kwargs())

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per rank per epoch (what the LR schedule needs)."""
        n = self._dataset("train").num_batches
        assert n is not None  # exact mode requires a manifest, resampled mode epoch_samples
        return n

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped so far on this rank, by cause (cumulative over the run)."""
        total = dict.fromkeys(CAUSES, 0)
        for ds in self._datasets.values():
            for cause, n in ds.skip_counts().items():
                total[cause] += n
        if self._decoder is not None:
            total["corrupt_image"] += self._decoder.corrupt
        return total

    # -------------------------------------------------------------------------------- GPU decoding
    def decode_batch(self, batch: tuple, device: torch.device | str | None = None) -> tuple:
        """Decode a batch whose images are still JPEG (``decode_device="cuda"``) on ``device``; other
        batches pass through. Lightning calls this via :meth:`on_before_batch_transfer`."""
        if not (isinstance(batch, tuple | list) and batch and isinstance(batch[0], EncodedBatch)):
            return batch
        assert self._decoder is not None
        images, source = self._decoder(batch[0], device or self.decode_device)
        tokens = batch[1][source]
        rest = [[batch[2][int(i)] for i in source]] if len(batch) > 2 else []
        return (images, tokens, *rest)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
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
        if self._train_loader is None:
            return dict(self._pending_state or {})
        return self._train_loader.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


class SyntheticShardsDataModule(WebDataModule):
    """The procedural data set of :mod:`clipforge.data.synthetic`, written once to WebDataset shards
    under ``root`` (with a progress bar) and then read like any other shards.

    Validation pairs and zero-shot images both come from the held-out split, whose attribute combinations
    (``holdout``: see :mod:`clipforge.data.synthetic`) never occur in training;
    ``zeroshot_classnames``/``zeroshot_templates`` classify the shape.
    ``data_seed`` fixes the generated images (the same data set for every training ``seed``); ``seed``
    drives shuffling and augmentation.
    """

    def __init__(
        self,
        root: str,
        num_train: int = 20_000,
        num_heldout: int = 1_000,
        image_size: int = 32,
        samples_per_shard: int = 1_000,
        batch_size: int = 128,
        num_workers: int = 1,
        context_length: int = 32,
        seed: int = 0,
        data_seed: int = 0,
        holdout: str = "tuples",
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        scale: tuple[float, float] = (0.8, 1.0),
        val_batch_size: int | None = None,
        persistent_workers: bool = False,
        pin_memory: bool | None = None,
        return_keys: bool = False,
    ) -> None:
        if holdout not in synthetic.HOLDOUTS:
            raise ValueError(f"holdout must be one of {synthetic.HOLDOUTS}, got {holdout!r}")
        self.root = Path(root) / f"synthetic-{holdout}-{image_size}px-seed{data_seed}"
        self.data_seed, self.holdout = data_seed, holdout
        self.num_train, self.num_heldout, self.samples_per_shard = num_train, num_heldout, samples_per_shard
        classnames, templates = synthetic.zeroshot_task()
        super().__init__(
            train_urls=self._pattern("train", num_train),
            val_urls=self._pattern("heldout", num_heldout),
            zeroshot_urls=self._pattern("heldout", num_heldout),
            zeroshot_classnames=classnames,
            zeroshot_templates=templates,
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            context_length=context_length,
            resampled=resampled,
            epoch_samples=epoch_samples,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            drop_last=drop_last,
            scale=scale,
            val_batch_size=val_batch_size,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            return_keys=return_keys,
        )

    def _pattern(self, split: str, n: int) -> str:
        last = max(0, -(-n // self.samples_per_shard) - 1)
        return str(self.root / split / f"{{00000..{last:05d}}}.tar")

    def _params(self, split: str, n: int) -> dict:
        return {
            "generator": "clipforge.data.synthetic",
            "version": 2,  # 2: images stored as PNG (lossless); 1 wrote JPEG at quality 95
            "split": split,
            "num_samples": n,
            "image_size": self.image_size,
            "seed": self.data_seed,
            "holdout": self.holdout,
            "samples_per_shard": self.samples_per_shard,
        }

    def prepare_data(self) -> None:
        """Write the shards unless a manifest with the same parameters is already there."""
        for split, n in (("train", self.num_train), ("heldout", self.num_heldout)):
            out = self.root / split
            params = self._params(split, n)
            manifest = out / MANIFEST_NAME
            if manifest.is_file() and read_manifest(manifest)["params"] == params:
                log.info("reusing %d synthetic %s samples in %s", n, split, out)
                continue
            if out.exists():
                shutil.rmtree(out)
            write_shards(
                synthetic_records(split, n, self.image_size, self.data_seed, self.holdout),
                out,
                max_count=self.samples_per_shard,
                params=params,
                total=n,
                desc=f"synthetic {split} shards",
            )
