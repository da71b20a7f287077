"""The decode stage of the WebDataset stream (Breuel et al., 2020): raw tar members -> :class:`Sample`,
the image cropped and resized by CLIP's transform (Radford et al., 2021;
:mod:`clipforge.data.transforms`) and the caption (or zero-shot label) read, in the DataLoader workers.

Crop randomness is a function of the output position: every sample slot takes exactly ``CROP_DRAWS``
uniforms from the worker's crop generator, a lost or bad sample too, so a resume at position ``p``
advances the generator by ``p * CROP_DRAWS`` and draws the crops of the uninterrupted run.

A sample that cannot be used is counted by cause (``missing_image``, ``missing_caption``,
``missing_label``, ``corrupt_image``) and skipped; the batch stage makes up for it.
"""

from __future__ import annotations

import difflib
import io
import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clipforge.data.failures import FailureMonitor
from clipforge.data.shards import IMAGE_EXTS, RawSample, dotted_key_hint
from clipforge.data.transforms import CROP_DRAWS, Box, ImageTransform, exif_orientation, upright_size

# What PIL and torchvision raise for bad image bytes; anything else is a bug and propagates.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, RuntimeError, EOFError, Image.DecompressionBombError)


class Encoded:
    """A JPEG kept encoded for :class:`~clipforge.data.gpu_decode.JpegDecoder`, with its crop box (only
    YCbCr or grey JPEGs stored upright: nvJPEG applies no EXIF orientation and may not take CMYK, so the
    others are decoded here)."""

    __slots__ = ("box", "data")

    def __init__(self, data: bytes, box: Box) -> None:
        self.data, self.box = data, box


@dataclass(slots=True)
class Sample:
    """One decoded sample and what later stages may need of it."""

    image: torch.Tensor | Encoded  # uint8 (3, S, S), or the encoded JPEG (decode_device="cuda")
    target: str | int  # the caption, or the zero-shot label
    key: str  # "<shard url>/<sample key>"
    crop: Box  # the crop box in source pixels (left, top, right, bottom)
    size: tuple[int, int]  # the source image's upright (width, height): its EXIF orientation applied
    meta: bytes | None  # the json member, undecoded
    pick: float  # a uniform of the sample's own crop draws, for stages that choose (0.0 in evaluation)
    region: tuple[Box, str] | None = None  # box in the crop's frame and its phrase (clipforge.data.regions)


def read_caption(members: Mapping[str, bytes]) -> str:
    """The caption of one sample: its ``.txt`` (UTF-8; a byte-order mark dropped), else the json's
    ``caption`` (img2dataset keeps it there too); ``""`` when it has none. A ``.txt`` that is not UTF-8 is a
    ``ValueError`` saying so: read with replacement characters, a Latin-1 "café" would train as "caf\ufffd"
    (the one caption reader, the loader's and ``clipforge-shards``')."""
    data = members.get("txt", b"")
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"its .txt is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None
    if not text and "json" in members:  # img2dataset also keeps the caption in the json
        try:
            text = str(json.loads(members["json"]).get("caption") or "").strip()
        except (ValueError, AttributeError):
            text = ""
    return text


def class_key(name: str) -> str:
    """What two class names must share to name the same class: the one rule for class folders
    (:func:`clipforge.eval.metadata.align_classnames`) and labels that are names (:class:`ClassIndex`).
    A folder "pickup_truck" and a name "Pickup truck" are the same class, and so are a folder "café"
    named on macOS (decomposed, NFD) and "café" typed in a names file (composed, NFC)."""
    return " ".join(unicodedata.normalize("NFC", name).replace("_", " ").split()).casefold()


class ClassNameError(ValueError):
    """A label that is a class name matches no class, or several: the class names do not fit the data,
    so this stops the pass instead of skipping the sample (which would leave its class out of the score)."""


class ClassIndex(dict[str, int]):
    """``{class name: label}`` of ``classnames`` (label ``i`` is ``classnames[i]``; a name given twice is
    left out, being two classes), and :meth:`label`, the lookup of a label that is a name."""

    def __init__(self, classnames: Sequence[str]) -> None:
        self.names = [str(c) for c in classnames]
        self.by_key: dict[str, list[int]] = {}
        exact: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            exact.setdefault(name, []).append(i)
            self.by_key.setdefault(class_key(name), []).append(i)
        super().__init__({name: ids[0] for name, ids in exact.items() if len(ids) == 1})

    def label(self, name: str) -> int:
        """The label of the class ``name`` names exactly, else of the one class it names by
        :func:`class_key`; :class:`ClassNameError` when it names several (classes that differ only by
        case or underscores stay distinct) or none (naming the closest class names)."""
        if name in self:
            return self[name]
        ids = self.by_key.get(class_key(name), [])
        if len(ids) == 1:
            return ids[0]
        if ids:
            both = ", ".join(f"{self.names[i]!r} ({i})" for i in ids[:4])
            raise ClassNameError(
                f"label {name!r} matches {len(ids)} classes: {both}; write one of them exactly"
            )
        close = difflib.get_close_matches(class_key(name), list(self.by_key), n=3, cutoff=0.6)
        hint = ", ".join(repr(self.names[self.by_key[k][0]]) for k in close) or "none"
        raise ClassNameError(
            f"label {name!r} is not among the {len(self.names)} class names (compared ignoring case, "
            f"underscores and spaces; closest: {hint}): give the class names of these shards"
        )


# What a sample's target is: "text" (its caption), "label" (an integer class label) or a class index for
# labels that may also be class names.
Target = str | ClassIndex


def read_label(members: Mapping[str, bytes], class_index: ClassIndex | None, label_key: str = "label") -> int:
    """The class index of one labelled sample, from its ``.cls`` member (an integer) or its json's
    ``label_key``: an integer, or a class name looked up in ``class_index`` (:meth:`ClassIndex.label`).
    ``ValueError`` says what is missing, :class:`ClassNameError` which name fits no class (the one reader
    of labels, for training-time zero-shot shards and ``clipforge-zeroshot``)."""
    if "cls" in members:
        try:
            return int(members["cls"].decode().strip())
        except ValueError:
            raise ValueError(f".cls holds {members['cls'][:40]!r}, not a class index") from None
    if "json" not in members:
        raise ValueError("it has neither a .cls nor a .json label")
    try:
        meta = json.loads(members["json"])
    except ValueError as e:
        raise ValueError(f"its json does not parse ({e})") from None
    if not isinstance(meta, dict) or label_key not in meta:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"json has no {label_key!r} key (keys: {keys})")
    value = meta[label_key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"label {value!r} is neither a class index nor a class name")
    if class_index is None:
        raise ValueError(f"label {value!r} is a class name; pass classnames to map names to indices")
    return class_index.label(value)


def _has(raw: RawSample) -> str:
    """The members of a skipped sample, for its log line: a caption in ``.caption`` or an image in ``.avif``
    is then seen at once."""
    return "it has " + ", ".join(f".{e}" for e in sorted(raw.members))


def decode_sample(
    raw: RawSample,
    transform: ImageTransform,
    draws: np.ndarray | None,
    monitor: FailureMonitor,
    target: Target = "text",
    defer: bool = False,
) -> Sample | None:
    """``raw`` decoded with the crop ``draws`` (None: the evaluation crop), or None when it is unusable
    (counted). ``target``: ``"text"`` (the caption), ``"label"`` (an integer label, :func:`read_label`) or
    a class index (labels that are class names too). ``defer`` keeps JPEGs encoded for the GPU decoder."""
    ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if ext is None:
        hint = dotted_key_hint(raw.key, raw.members) or f"no image; {_has(raw)}"
        monitor.sample_failed("missing_image", raw.url, f"{raw.key} ({hint})")
        return None
    why = ""  # what read_label found wrong, for the log
    try:
        if target == "text":
            label: str | int | None = read_caption(raw.members)
        else:
            label = read_label(raw.members, None if target == "label" else target)
    except ClassNameError as e:  # the class names do not fit the shards: no sample is bad, the config is
        raise ClassNameError(f"sample {raw.url}/{raw.key}: {e}") from None
    except ValueError as e:
        label, why = None, str(e)
    if label is None or label == "":
        cause = "missing_caption" if target == "text" else "missing_label"
        if not why and target == "text":  # what the caption reader looked for, beside what the sample has
            why = "its .txt is empty" if "txt" in raw.members else f"no .txt or json caption; {_has(raw)}"
        monitor.sample_failed(cause, raw.url, f"{raw.key} ({why})" if why else raw.key)
        return None
    data = raw.members[ext]
    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            orientation = exif_orientation(img)  # read once: the size, the route and the decode use it
            size = upright_size(img, orientation)
            box = transform.box(*size, draws)
            # nvJPEG decodes YCbCr and grey JPEGs; CMYK/YCCK ones (a few in ImageNet) are decoded here
            gpu = defer and img.format == "JPEG" and orientation == 1 and img.mode in ("RGB", "L")
            image = Encoded(data, box) if gpu else transform.apply(img, data, box, orientation)
    except IMAGE_ERRORS as e:  # the decoder's words: a cut file, no image at all, PIL's pixel limit
        monitor.sample_failed("corrupt_image", raw.url, f"{raw.key} ({type(e).__name__}: {e})")
        return None
    pick = float(draws[-1]) if draws is not None else 0.0
    return Sample(image, label, f"{raw.url}/{raw.key}", box, size, raw.members.get("json"), pick)


def decode(
    stream: Iterable[RawSample | None],
    transform: ImageTransform,
    rng: np.random.Generator,
    monitor: FailureMonitor,
    target: Target = "text",
    defer: bool = False,
) -> Iterator[Sample]:
    """The usable samples of ``stream``; every slot, a lost one (``None``) too, takes its crop draws."""
    for raw in stream:
        draws = rng.random(CROP_DRAWS) if transform.train else None
        if raw is None:  # lost with its shard; already counted
            continue
        sample = decode_sample(raw, transform, draws, monitor, target, defer)
        if sample is not None:
            yield sample
