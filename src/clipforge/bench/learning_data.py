"""The data sets of the learning benchmark (:mod:`clipforge.bench.learning`): each is written once as image
files with a CSV for open_clip's trainer (OpenCLIP, Ilharco et al., 2021) and as WebDataset shards of the
very same files for clipforge, plus a held-out set of class folders for zero-shot classification (CLIP,
Radford et al., 2021); reused while its parameters match.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Data:
    """A prepared image-caption set: a CSV for open_clip, shards for clipforge, an image-folder test set."""

    name: str
    train_csv: Path
    train_shards: str
    num_train: int
    eval_root: Path
    classnames: list[str]
    templates: list[str] | str


def _write_csv(path: Path, rows: list[tuple[Path, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows((str(p.resolve()), c) for p, c in rows)


def _reuse(marker: Path, params: dict[str, Any]) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == params


def prepare_synthetic(
    out: Path, num_train: int, num_heldout: int, image_size: int, seed: int = 0, holdout: str = "tuples"
) -> Data:
    """The synthetic generator's train split as PNG files (+ CSV and shards of the same files) and its
    held-out split as one class folder per shape; reused while the parameters match."""
    from clipforge.data import synthetic
    from clipforge.data.sources import folder_records
    from clipforge.data.writer import write_shards

    params = {"num_train": num_train, "num_heldout": num_heldout, "image_size": image_size, "seed": seed}
    params |= {"holdout": holdout, "version": 1}
    classnames, templates = synthetic.zeroshot_task()
    data = Data(
        name="synthetic",
        train_csv=out / "train.csv",
        train_shards=_shard_pattern(out / "shards", num_train),
        num_train=num_train,
        eval_root=out / "heldout",
        classnames=classnames,
        templates=templates,
    )
    marker = out / "prepared.json"
    if _reuse(marker, params):
        return data
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in _progress(
        synthetic.generate("train", num_train, image_size, seed, holdout), num_train, "train images"
    ):
        path = images / f"{s.key}.png"
        s.image.save(path)
        rows.append((path, s.caption))
    _write_csv(data.train_csv, rows)
    write_shards(
        folder_records(images, data.train_csv), out / "shards", max_count=1000, progress=False, overwrite=True
    )
    for s in _progress(
        synthetic.generate("heldout", num_heldout, image_size, seed, holdout), num_heldout, "held-out"
    ):
        folder = data.eval_root / s.meta["shape"]
        folder.mkdir(parents=True, exist_ok=True)
        s.image.save(folder / f"{s.key}.png")
    marker.write_text(json.dumps(params))
    return data


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = ("a photo of the number {}.", "a handwritten {}.", "the digit {}.", "a picture of a {}.")


def prepare_digits(out: Path, image_size: int = 32, num_heldout: int = 400, seed: int = 0) -> Data:
    """Real images that ship with scikit-learn (no download): the 1,797 handwritten digits of UCI's
    optdigits (Alpaydin & Kaynak, 1998), 8x8 grey levels upsampled to ``image_size``, shuffled once and
    split into ``1797 - num_heldout`` training pairs (captions from four templates) and a held-out set."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from clipforge.data.sources import folder_records
    from clipforge.data.writer import write_shards

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    train, test = order[:-num_heldout], order[-num_heldout:]
    data = Data(
        name="digits",
        train_csv=out / "train.csv",
        train_shards=_shard_pattern(out / "shards", len(train)),
        num_train=len(train),
        eval_root=out / "heldout",
        classnames=list(DIGIT_NAMES),
        templates="openai",
    )
    params = {"image_size": image_size, "num_heldout": num_heldout, "seed": seed, "version": 1}
    marker = out / "prepared.json"
    if _reuse(marker, params):
        return data

    def image(i: int) -> Image.Image:
        grey = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
        return grey.resize((image_size, image_size), Image.BICUBIC).convert("RGB")

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, i in enumerate(train):
        path = out / "images" / f"{k:05d}.png"
        image(int(i)).save(path)
        name = DIGIT_NAMES[int(digits.target[i])]
        rows.append((path, DIGIT_CAPTIONS[k % len(DIGIT_CAPTIONS)].format(name)))
    _write_csv(data.train_csv, rows)
    write_shards(
        folder_records(out / "images", data.train_csv), out / "shards", max_count=1000, progress=False
    )
    for k, i in enumerate(test):
        folder = data.eval_root / DIGIT_NAMES[int(digits.target[i])]
        folder.mkdir(parents=True, exist_ok=True)
        image(int(i)).save(folder / f"{k:05d}.png")
    marker.write_text(json.dumps(params))
    return data


def prepare_folder(
    images: Path, captions: Path, eval_root: Path, out: Path, classnames: list[str] | None, templates: str
) -> Data:
    """A user's image folder and captions file (CSV/TSV/JSONL/JSON, as ``clipforge-shards folder``)."""
    from clipforge.data.sources import folder_records, read_captions
    from clipforge.data.writer import write_shards

    if not eval_root.is_dir():
        raise FileNotFoundError(f"--eval-dir {eval_root} is not a folder of class folders")
    caps = read_captions(captions)
    rows = [(images / name, text.strip()) for name, text in sorted(caps, key=lambda row: row[0])]
    rows = [(p, c) for p, c in rows if p.is_file() and c]
    if not rows:
        raise ValueError(f"none of the files listed in {captions} exists under {images} with a caption")
    names = classnames or sorted(d.name for d in eval_root.iterdir() if d.is_dir())
    data = Data(
        name=images.name,
        train_csv=out / "train.csv",
        train_shards=_shard_pattern(out / "shards", len(rows)),
        num_train=len(rows),
        eval_root=eval_root,
        classnames=names,
        templates=templates,
    )
    params = {
        "images": str(images.resolve()),
        "captions": str(captions.resolve()),
        "n": len(rows),
        "version": 1,
    }
    marker = out / "prepared.json"
    if _reuse(marker, params):
        return data
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(data.train_csv, rows)
    # the shards hold the same bytes as the files open_clip reads (the writer keeps JPEG/PNG/WebP as they are)
    write_shards(
        folder_records(images, captions), out / "shards", max_count=1000, progress=False, overwrite=True
    )
    marker.write_text(json.dumps(params))
    return data


def _shard_pattern(folder: Path, n: int, per_shard: int = 1000) -> str:
    return str(folder / f"{{00000..{max(0, math.ceil(n / per_shard) - 1):05d}}}.tar")


def _progress(items: Any, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", leave=False)
