"""The data layer's settings, each in one place: small typed groups that Hydra builds as nested nodes of
``conf/data/wds.yaml`` (``data.stream.*``, ``data.augment.*``; the failure policy is
:class:`clipforge.data.failures.FailurePolicy`, ``data.failures.*``), and what a shard source hands the
data module (:class:`ShardSet`). A misspelt key fails at once: a dataclass takes no unknown keyword.

The pipeline they configure is that of WebDataset (Breuel et al., 2020) for CLIP (Radford et al., 2021).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Urls = str | list[str]  # a brace pattern, sources separated by "::", or a list with one pattern per source


def _urls(urls: Urls | Sequence[str] | None) -> Urls | None:
    """A pattern string as it is; any other sequence (Hydra's ListConfig) as a plain list of strings."""
    return urls if urls is None or isinstance(urls, str) else [str(u) for u in urls]


def _pair(values: Sequence[float], name: str, most: float | None = None) -> tuple[float, float]:
    lo, hi = (float(v) for v in values)  # Hydra hands over a ListConfig: make it a plain, picklable tuple
    if not 0 < lo <= hi or (most is not None and hi > most):
        bound = "" if most is None else f" <= {most:g}"
        raise ValueError(f"data.augment.{name} must be two numbers 0 < low <= high{bound}, got {[lo, hi]}")
    return lo, hi


def check_at_least(low: int, where: str, **values: int | None) -> None:
    """Each given (not null) setting ``<where>.<name>`` is an integer ``>= low``, or a ValueError names it."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{where}.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Stream:
    """How the training samples flow: order, epochs, and what each batch carries (``data.stream``).

    ``seed`` drives shard order, shuffling and crops. ``resampled`` draws shards with replacement, mixing
    sources by ``weights`` (shares of samples), in epochs of ``epoch_samples`` global samples; otherwise
    every epoch reads every sample once (:mod:`clipforge.data.plan`). ``shuffle_buffer``: samples per
    shuffled block (:mod:`clipforge.data.shuffle`). ``drop_last`` drops the partial last step.
    ``return_keys`` adds each sample's ``<shard>/<key>`` to its batch; ``regions`` adds the box targets of
    LocCa's decoder tasks (:mod:`clipforge.data.regions`). The rest configures the DataLoaders:
    ``val_batch_size`` (null: ``batch_size``), ``pin_memory`` (null: when CUDA is available),
    ``persistent_workers``, ``prefetch_factor``.
    """

    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_samples: int | None = None
    weights: Sequence[float] | None = None
    drop_last: bool = False
    return_keys: bool = False
    regions: bool = False
    val_batch_size: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool = False
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if not self.resampled and len(set(self.weights)) > 1:
                raise ValueError(
                    "source weights need data.stream.resampled=true: an exact epoch reads every sample "
                    "once, so it cannot up- or down-weight a source"
                )
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"data.stream.weights must be >= 0 and not all 0, got {list(self.weights)}")
        if self.resampled and not self.epoch_samples:
            raise ValueError("resampled mode needs data.stream.epoch_samples (global samples per epoch)")
        check_at_least(1, "data.stream", epoch_samples=self.epoch_samples, val_batch_size=self.val_batch_size)
        check_at_least(1, "data.stream", prefetch_factor=self.prefetch_factor)
        check_at_least(0, "data.stream", shuffle_buffer=self.shuffle_buffer)


@dataclass(frozen=True)
class Augment:
    """The image transform (``data.augment``): CLIP's random resized crop of ``scale`` (area) and
    ``ratio`` (aspect) ranges to ``image_size`` pixels for training, resize + centre crop for evaluation
    (:mod:`clipforge.data.transforms`). ``decode_device``: ``cuda`` decodes training JPEGs on the GPU
    (:mod:`clipforge.data.gpu_decode`); the workers then only parse headers and draw the crops. ``mean`` and
    ``std`` normalise the pixels (in [0, 1]) per channel; ``None``: CLIP's (OpenAI's). A checkpoint's run
    records them, and its evaluation reads them back (:func:`stored_preprocessing`)."""

    image_size: int = 224
    scale: Sequence[float] = (0.9, 1.0)
    ratio: Sequence[float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    decode_device: str = "cpu"
    mean: Sequence[float] | None = None  # per channel, of pixels in [0, 1]; None: CLIP's (OpenAI's)
    std: Sequence[float] | None = None

    def __post_init__(self) -> None:
        from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, INTERPOLATIONS, check_mean_std

        # scale is a share of the image's area: above 1 no crop fits, and the sampler centre-cropped, silently
        object.__setattr__(self, "scale", _pair(self.scale, "scale", most=1.0))
        object.__setattr__(self, "ratio", _pair(self.ratio, "ratio"))
        check_at_least(1, "data.augment", image_size=self.image_size)
        mean, std = check_mean_std(
            CLIP_MEAN if self.mean is None else self.mean,
            CLIP_STD if self.std is None else self.std,
            "data.augment",
        )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.interpolation not in INTERPOLATIONS:  # the transform refused it at the first batch
            raise ValueError(
                f"data.augment.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.decode_device != "cpu" and not self.decode_device.startswith("cuda"):
            raise ValueError(f"decode_device must be 'cpu' or 'cuda[:N]', got {self.decode_device!r}")


def stored_preprocessing(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``interpolation``, ``mean`` and ``std`` of the images a checkpoint's model was trained on, from the
    run config stored in it (``data.augment``): what its evaluation must use. A checkpoint that stores none
    (written before these settings existed, or an import of weights without their preprocessing) has CLIP's
    and bicubic, what every run used until then."""
    node = ((config or {}).get("data") or {}).get("augment") or {}
    kept = {k: node[k] for k in ("interpolation", "mean", "std") if node.get(k) is not None}
    augment = Augment(**kept)
    return {"interpolation": augment.interpolation, "mean": augment.mean, "std": augment.std}


@dataclass(frozen=True)
class ZeroShotSet:
    """Labelled shards (json ``label``, an index into ``classnames``) for zero-shot classification with
    prompt ``templates`` (``data.zeroshot``; ``urls`` null: none). ``classnames``: a list, a built-in name
    (``imagenet``, ``cifar10``, ``cifar100``) or a file with one name per line; ``templates``: a list,
    ``openai``, ``simple`` or a file (as ``clipforge-zeroshot``, :mod:`clipforge.eval.metadata`)."""

    urls: Urls | None = None
    classnames: str | Sequence[str] | None = None
    templates: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        from clipforge.eval.metadata import load_classnames, load_templates

        object.__setattr__(self, "urls", _urls(self.urls))
        if self.urls is not None and self.classnames is None:
            raise ValueError(
                "data.zeroshot.urls needs data.zeroshot.classnames (a list in label order, imagenet, cifar10, "
                "cifar100 or a file with one name per line): without them nothing can be classified"
            )
        # a name or a path is read here, so a missing file fails at once (a bare string is no list of names)
        if self.classnames is not None:
            object.__setattr__(self, "classnames", load_classnames(self.classnames))
        if self.templates is not None:
            object.__setattr__(self, "templates", load_templates(self.templates))


@dataclass(frozen=True)
class ShardSet:
    """The shards a data module reads, per split: what a :class:`ShardSource` hands back."""

    train_urls: Urls
    val_urls: Urls | None = None
    zeroshot: ZeroShotSet = field(default_factory=ZeroShotSet)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_urls", _urls(self.train_urls))
        object.__setattr__(self, "val_urls", _urls(self.val_urls))


class ShardSource(Protocol):
    """Writes its shards once (``prepare``, on one process per node) and names them (``shards``, on every
    process): e.g. :class:`clipforge.data.synthetic_shards.SyntheticShards` (``data.source``)."""

    def prepare(self) -> None: ...

    def shards(self) -> ShardSet: ...
