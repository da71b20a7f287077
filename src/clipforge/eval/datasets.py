"""Labelled image sets for zero-shot classification and linear probes of CLIP (Radford et al., 2021):
an image folder with one sub-folder per class, labelled WebDataset shards, and their eval transform.

Unreadable images never stop an evaluation: the sample gets label ``IGNORE_LABEL`` and a blank
image, a warning names the file, and ``evaluate_zero_shot`` drops and counts it (``num_skipped``).
Structural problems (a class folder with no images, a class-name list whose length disagrees
with the folders) raise at construction with a message that says what to fix.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from clipforge.data.decode import ClassIndex, read_label
from clipforge.data.shards import IMAGE_EXTS, ShardResult, expand_urls, read_shard
from clipforge.data.sources import files_under
from clipforge.data.transforms import to_rgb
from clipforge.distributed import world_info
from clipforge.eval.metadata import align_classnames
from clipforge.eval.zeroshot import IGNORE_LABEL

log = logging.getLogger(__name__)

IMG_EXTENSIONS = tuple(f".{e}" for e in IMAGE_EXTS)


def eval_transform(
    image_size: int,
    interpolation: str = "bicubic",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP's test-time preprocessing, the same code the training data module evaluates with:
    shorter side resized to ``image_size``, centre crop, normalised by ``mean``/``std`` (None: CLIP's)
    (``clipforge.data.transforms``; open_clip's Resize + CenterCrop, within one uint8 step). A checkpoint's
    own settings: ``eval_transform(size, **clipforge.data.config.stored_preprocessing(its config))``."""
    from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, to_tensor

    return partial(
        to_tensor,
        image_size=image_size,
        train=False,
        interpolation=interpolation,
        mean=CLIP_MEAN if mean is None else mean,
        std=CLIP_STD if std is None else std,
    )


def image_paths(paths: str | Sequence[str] | None) -> list[str]:
    """One image path or several (a command's ``image=``, a string or a list), as a list; none: empty."""
    return [] if not paths else [paths] if isinstance(paths, str) else [str(p) for p in paths]


def read_images(paths: str | Sequence[str]) -> list[Image.Image]:
    """One image path or several, decoded as RGB; an unreadable file is an error naming it (single-image
    commands: the user asked for exactly these images, so they read them before loading a model)."""
    images = []
    for p in image_paths(paths):
        try:
            images.append(load_image(p))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a missing, unknown or damaged file
            raise ValueError(f"cannot read image {p}: {type(e).__name__}: {e}") from e
    return images


def image_batch(
    images: Sequence[Image.Image], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Images read by :func:`read_images`, each transformed, as one batch."""
    return torch.stack([transform(img) for img in images])


def load_images(paths: str | Sequence[str], transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """One image path or several, read by :func:`read_images` and transformed into a batch."""
    return image_batch(read_images(paths), transform)


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image as RGB (``load()`` so a truncated file fails here, not later)."""
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
    return to_rgb(img)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``; classes are the sub-folders in sorted order (torchvision's rule), their
    samples the images anywhere below them, symlinked folders followed (a loop walked once, with a
    warning), hidden files and folders (a leading ``.``) left out.

    ``classnames`` overrides the folder names as the text used in prompts: names that match the
    folders (in any order) go to their own folder, others are applied to the sorted folders by position
    (:func:`~clipforge.eval.metadata.align_classnames`). By default a folder name with underscores becomes
    the class name with spaces.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        classnames: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise ValueError(
                f"{self.root} has no class sub-folders; expected {self.root}/<class name>/<images>"
            )
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, d in enumerate(class_dirs):
            # hidden files and whatever is under hidden folders (.ipynb_checkpoints copies) are not samples;
            # symlinked folders are followed (torchvision's ImageFolder does), a loop walked once
            files = [p for p in files_under(d, hidden=False) if p.suffix.lower() in IMG_EXTENSIONS]
            if not files:
                empty.append(d.name)
            self.samples += [(p, label) for p in files]
        if empty:
            raise ValueError(
                f"class folder(s) {empty} under {self.root} contain no images "
                f"(looked for {', '.join(IMG_EXTENSIONS)}); remove them or add images"
            )
        self.folder_names = [d.name for d in class_dirs]
        self.classnames = (
            align_classnames(self.folder_names, classnames, f"the class folders of {self.root}")
            if classnames is not None
            else [n.replace("_", " ") for n in self.folder_names]
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image | None, int]:
        path, label = self.samples[index]
        try:
            img = load_image(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
            log.warning("skipping unreadable image %s: %s: %s", path, type(e).__name__, e)
            return None, IGNORE_LABEL
        return (self.transform(img) if self.transform else img), label


def collate_skipping(batch: Sequence[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` samples; an unreadable one (``None``) becomes a blank image labelled
    ``IGNORE_LABEL`` so the batch keeps its length and the skip is counted downstream."""
    good = next((img for img, _ in batch if img is not None), None)
    blank = torch.zeros_like(good) if good is not None else torch.zeros(3, 1, 1)
    images = torch.stack([img if img is not None else blank for img, _ in batch])
    labels = torch.tensor([lab if img is not None else IGNORE_LABEL for img, lab in batch], dtype=torch.long)
    return images, labels


def _labelled_sample(
    sample: dict[str, Any],
    transform: Callable[[Image.Image], torch.Tensor] | None,
    class_index: dict[str, int] | None,
    label_key: str,
) -> tuple[torch.Tensor | None, int]:
    key = sample.get("__key__", "?")
    label = _label_of(sample, class_index, label_key)
    data = next((sample[k] for k in IMAGE_EXTS if k in sample), None)
    if data is None:
        log.warning("skipping sample %s of %s: it has no image", key, sample.get("__url__", "?"))
        return None, IGNORE_LABEL
    try:
        img = load_image(data)
    except Exception as e:
        log.warning(
            "skipping unreadable image %s in %s: %s: %s", key, sample.get("__url__", "?"), type(e).__name__, e
        )
        return None, IGNORE_LABEL
    return (transform(img) if transform else img), label


def _label_of(sample: dict[str, Any], class_index: dict[str, int] | None, label_key: str) -> int:
    try:
        return read_label(sample, class_index, label_key)
    except ValueError as e:
        raise ValueError(f"sample {sample.get('__key__')}: {e}") from None


class LabelledShards(IterableDataset):
    """``(image, label)`` samples of ``urls``' shards in order: this rank's shards (every ``world``-th from
    ``rank``), split again over DataLoader workers. Read by training's tar reader
    (:func:`clipforge.data.shards.read_shard`), so members group into samples as in training and a broken
    shard is a warning naming it, its samples before the break still evaluated."""

    def __init__(
        self,
        urls: list[str],
        rank: int,
        world: int,
        label: Callable[[dict[str, Any]], tuple[torch.Tensor | Image.Image | None, int]],
    ) -> None:
        super().__init__()
        self.urls, self.rank, self.world, self.label = urls, rank, world, label
        self.world_size = world  # it splits by rank itself: shard_dataloader leaves it whole

    def __iter__(self) -> Iterator[tuple[torch.Tensor | Image.Image | None, int]]:
        mine = self.urls[self.rank :: self.world]
        worker = torch.utils.data.get_worker_info()
        for url in mine if worker is None else mine[worker.id :: worker.num_workers]:
            for raw in read_shard(url, ShardResult()):  # a failure is logged there
                yield self.label({"__key__": raw.key, "__url__": url, **raw.members})


def labelled_wds_dataset(
    urls: str | Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    classnames: Sequence[str] | None = None,
    label_key: str = "label",
    distributed: bool = True,
) -> IterableDataset:
    """``(image, label)`` samples from WebDataset shards, in order, each rank reading its own shards
    (:class:`LabelledShards`).

    The label is a ``.cls`` file, or ``json[label_key]``: an int, or a class name looked up in
    ``classnames``. Unreadable images yield ``(None, IGNORE_LABEL)``; batch with ``collate_skipping``.
    """
    # the training reader's expansion: a pattern that matches no shard fails here naming it, and the
    # missing shards of one that matches some are named
    urls = [u for source in expand_urls(urls if isinstance(urls, str) else list(urls)) for u in source]
    rank, world = world_info(enabled=distributed)
    if world > len(urls):
        log.warning("%d shards for %d ranks: ranks beyond %d evaluate nothing", len(urls), world, len(urls))
    class_index = ClassIndex(classnames) if classnames is not None else None
    label = partial(_labelled_sample, transform=transform, class_index=class_index, label_key=label_key)
    return LabelledShards(urls, rank, world, label)


class SyntheticHeldoutDataset(Dataset):
    """The synthetic generator's held-out split (``clipforge.data.synthetic``): shapes in colour
    pairs never seen in training, labelled by shape, with their captions.

    ``target="label"`` gives ``(image, shape index)`` for zero-shot classification (``classnames``, if
    given, are matched to the shapes by name, else applied by position); ``"caption"``
    gives ``(image, tokens)`` for retrieval (``tokenizer`` required). ``render_size`` is the size the
    generator draws at (the training data's ``image_size``); ``transform`` then resizes for the model.
    ``holdout`` is the training data's scheme (``data.source.holdout``; ``None``: ``tuples``, its default):
    which combinations training never saw depends on it.
    """

    def __init__(
        self,
        num_samples: int = 600,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        render_size: int = 32,
        seed: int = 0,
        split: str = "heldout",
        target: str = "label",
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        classnames: Sequence[str] | None = None,
        holdout: str | None = None,
    ) -> None:
        from clipforge.data import synthetic

        holdout = synthetic.check_holdout(holdout or "tuples")
        if target not in ("label", "caption"):
            raise ValueError(f"target must be 'label' or 'caption', got {target!r}")
        if target == "caption" and tokenizer is None:
            raise ValueError("target='caption' needs a tokenizer")
        self._synthetic = synthetic
        self.num_samples, self.render_size, self.seed, self.split = num_samples, render_size, seed, split
        self.transform, self.target, self.tokenizer, self.holdout = transform, target, tokenizer, holdout
        shapes, self.templates = synthetic.zeroshot_task()
        # Labels index the generator's shapes: names for them are matched by name, as for folders.
        self.classnames = (
            align_classnames(shapes, classnames, "the synthetic set") if classnames is not None else shapes
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, Any]:
        s = self._synthetic.make_sample(index, self.split, self.render_size, self.seed, self.holdout)
        image = self.transform(s.image) if self.transform else s.image
        if self.target == "caption":
            return image, self.tokenizer([s.caption])[0]  # type: ignore[misc]
        return image, int(s.meta["label"])


def caption_shards(
    urls: str | list[str],
    image_size: int,
    context_length: int,
    batch_size: int = 64,
    num_workers: int = 0,
    manifest: str | None = None,
    interpolation: str = "bicubic",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> IterableDataset:
    """Held-out image-text WebDataset shards as ``(images, tokens)`` *batches*, read in order by the
    data module's own reader (``clipforge.data.dataset.ShardDataset``, eval mode); each rank reads only
    its block of the batches, which :func:`clipforge.eval.distributed.shard_dataloader` then leaves as
    it is. ``interpolation``, ``mean``, ``std``: as :func:`eval_transform`."""
    from clipforge.data.config import Augment
    from clipforge.data.dataset import ShardDataset
    from clipforge.data.manifest import find_manifest
    from clipforge.data.shards import expand_urls

    sources = expand_urls(urls)
    counts = find_manifest([u for s in sources for u in s], manifest)
    rank, world = world_info()
    ds = ShardDataset(
        sources,
        counts,
        batch_size=batch_size,
        train=False,
        augment=Augment(image_size=image_size, interpolation=interpolation, mean=mean, std=std),
        target="text",
        context_length=context_length,
        num_workers=num_workers,
        rank=rank,
        world_size=world,
    )
    ds.yields_batches = True  # type: ignore[attr-defined]
    return ds
