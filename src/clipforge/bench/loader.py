"""Data-loader throughput: clipforge's WebDataset pipeline against open_clip's ``get_wds_dataset``
(Cherti et al., 2023, the pipeline of OpenCLIP's LAION training) on the same JPEG shards.

Both loaders read the same tar shards of natural 256-pixel photos (random crops of scikit-image's sample
pictures, JPEG quality 95 as img2dataset writes them) with alt-text-like captions, and produce
``(images (B, 3, S, S) float32 normalised, tokens (B, 77))`` with the same training transform: random
resized crop (scale 0.9-1, bicubic), CLIP mean/std, CLIP BPE tokenization. Throughput is reported per
worker, from wall time and from the workers' own CPU time (read from ``/proc``), which is steadier on a
shared machine.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import time
from argparse import Namespace
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.bench.args import non_negative_int, positive_int
from clipforge.data.manifest import MANIFEST_NAME, read_manifest
from clipforge.data.writer import Record, write_shards

_WORDS = {
    "adj": [
        "small",
        "large",
        "old",
        "red",
        "blue",
        "green",
        "bright",
        "dark",
        "wooden",
        "modern",
        "vintage",
        "quiet",
        "busy",
        "golden",
    ],
    "noun": [
        "cat",
        "dog",
        "astronaut",
        "rocket",
        "cup",
        "of",
        "coffee",
        "galaxy",
        "street",
        "house",
        "tree",
        "car",
        "bicycle",
        "mountain",
        "river",
    ],
    "place": [
        "in",
        "the",
        "city",
        "on",
        "a",
        "table",
        "near",
        "the",
        "sea",
        "under",
        "the",
        "sky",
        "in",
        "a",
        "garden",
        "at",
        "night",
        "in",
        "the",
        "snow",
    ],
    "tail": [
        "stock photo",
        "high resolution",
        "4k wallpaper",
        "free image",
        "photograph",
        "illustration",
        "close up",
    ],
}


def natural_photos() -> list[np.ndarray]:
    """RGB sample photos shipped with scikit-image (no download), plus grey textures tinted in colour."""
    from skimage import data

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
        try:
            photos.append(np.asarray(getattr(data, name)())[..., :3])
        except Exception:  # a picture that needs a download in this scikit-image version
            continue
    for i, name in enumerate(("brick", "grass", "gravel", "camera", "moon")):
        try:
            grey = np.asarray(getattr(data, name)(), dtype=np.float32)[..., None] / 255
            tint = np.array(
                [[1.0, 0.85, 0.7], [0.7, 1.0, 0.75], [0.8, 0.8, 1.0], [1, 1, 1], [0.95, 0.9, 0.8]]
            )[i]
            photos.append((grey * tint * 255).astype(np.uint8))
        except Exception:
            continue
    if len(photos) < 3:
        raise RuntimeError("scikit-image sample photos not found: pip install scikit-image")
    return photos


def make_image(photos: list[np.ndarray], rng: np.random.Generator, size: int = 256) -> Image.Image:
    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    side = int(rng.uniform(0.4, 1.0) * min(h, w))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img = Image.fromarray(src[top : top + side, left : left + side]).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.8, 1.2, 3)
    return Image.fromarray(np.clip(np.asarray(img, np.float32) * gain, 0, 255).astype(np.uint8))


def make_caption(rng: np.random.Generator) -> str:
    pick = lambda k: _WORDS[k][int(rng.integers(len(_WORDS[k])))]  # noqa: E731
    return f"a {pick('adj')} {pick('adj')} {pick('noun')} {pick('place')}, {pick('tail')} #{int(rng.integers(1e6))}"


def write_benchmark_shards(
    out: str | Path, num_samples: int, samples_per_shard: int = 500, seed: int = 0
) -> str:
    """Write (or reuse) the benchmark shards; returns their brace pattern."""
    out = Path(out)
    params = {
        "benchmark": 1,
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
    }
    manifest = out / MANIFEST_NAME
    if not (manifest.is_file() and read_manifest(manifest)["params"] == params):
        photos = natural_photos()
        rng = np.random.default_rng(seed)

        def records() -> Iterator[Record]:
            for i in range(num_samples):
                buf = io.BytesIO()
                make_image(photos, rng).save(buf, format="JPEG", quality=95)
                yield Record(f"{i:09d}", buf.getvalue(), make_caption(rng))

        write_shards(
            records(),
            out,
            max_count=samples_per_shard,
            params=params,
            total=num_samples,
            desc="bench shards",
            overwrite=True,  # the benchmark's own cache, rewritten when its parameters change
        )
    n = len(read_manifest(manifest)["shards"])
    return str(out / f"{{00000..{n - 1:05d}}}.tar")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(loader: Iterable[Any], num_workers: int, warmup: int = 2) -> dict[str, float]:
    """Images per second after ``warmup`` batches (worker start-up and shuffle-buffer fill excluded).
    Workers must be persistent, so their CPU time can still be read once the pass is over."""
    too_few = ValueError(  # a figure of 0 images/s would read as a loader that stalls
        f"no batch was left to time after the {warmup} warm-up batches: raise --num-samples "
        "(or lower --batch-size)"
    )
    it = iter(loader)
    for _ in range(warmup):
        if next(it, None) is None:
            raise too_few
    # DataLoader workers are this process's multiprocessing children (open_clip's WebLoader hides its
    # DataLoader iterator, so ask multiprocessing rather than the iterator)
    pids = [c.pid for c in multiprocessing.active_children()] if num_workers else []
    cpu0 = [_cpu_seconds(p) for p in pids] if pids else [time.process_time()]
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += batch[0].shape[0] if torch.is_tensor(batch[0]) else len(batch[0])
    wall = time.perf_counter() - t0
    if n == 0:
        raise too_few
    cpu = sum(_cpu_seconds(p) for p in pids) - sum(cpu0) if pids else time.process_time() - cpu0[0]
    workers = max(1, num_workers)
    return {"images": n, "wall_s": wall, "per_worker_wall": n / wall / workers, "per_worker_cpu": n / cpu}


def clipforge_loader(
    pattern: str, batch_size: int, num_workers: int, image_size: int, decode_device: str = "cpu"
) -> tuple[DataLoader, Any]:
    from clipforge.data.config import Augment, Stream
    from clipforge.data.datamodule import WebDataModule

    dm = WebDataModule(
        pattern,
        batch_size=batch_size,
        num_workers=num_workers,
        context_length=77,
        stream=Stream(drop_last=True, pin_memory=False),
        augment=Augment(image_size=image_size, decode_device=decode_device),
    )
    dm.setup("fit")
    ds = dm._dataset("train")
    ds.set_epoch(0)
    kwargs = (
        {"persistent_workers": True, "prefetch_factor": 2} if num_workers else {}
    )  # as open_clip's WebLoader
    return DataLoader(ds, batch_size=None, num_workers=num_workers, **kwargs), dm


def open_clip_loader(
    pattern: str, num_samples: int, batch_size: int, num_workers: int, image_size: int
) -> Iterable[Any]:
    import open_clip
    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    # open_clip_train pins webdataset<=0.2.86; webdataset 1.0 adds an empty end-of-shard marker that
    # its group_by_keys_nothrow cannot take (KeyError 'fname'). Dropping the marker restores the 0.2
    # behaviour without touching the per-sample work being measured.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    get_wds_dataset = oc_data.get_wds_dataset

    preprocess = open_clip.image_transform(
        image_size, is_train=True
    )  # RRC(0.9-1, bicubic), ToTensor, Normalize
    args = Namespace(
        train_data=pattern,
        val_data=None,
        train_num_samples=num_samples,
        dataset_resampled=False,
        seed=0,
        batch_size=batch_size,
        workers=num_workers,
        world_size=1,
        train_data_upsampling_factors=None,
    )
    info = get_wds_dataset(
        args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32")
    )
    return info.dataloader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/bench_shards", help="where the benchmark shards are written")
    p.add_argument("--num-samples", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=1,
        help="DataLoader workers (per-worker figures divide by it)",
    )
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument("--repeats", type=positive_int, default=2, help="passes per loader; the best is reported")
    p.add_argument("--gpu-decode", action="store_true", help="also time clipforge with JPEG decode on CUDA")
    p.add_argument("--skip-open-clip", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    pattern = write_benchmark_shards(args.root, args.num_samples)
    b, k, s = args.batch_size, args.workers, args.image_size
    runs = {"clipforge": lambda: clipforge_loader(pattern, b, k, s)[0]}
    if not args.skip_open_clip:
        runs["open_clip get_wds_dataset"] = lambda: open_clip_loader(pattern, args.num_samples, b, k, s)
    results = {}
    for name, build in runs.items():
        results[name] = max(
            (measure(build(), k) for _ in range(args.repeats)), key=lambda r: r["per_worker_cpu"]
        )
    if args.gpu_decode:
        if not torch.cuda.is_available():
            print("--gpu-decode: no CUDA device; skipped")
        else:
            loader, dm = clipforge_loader(pattern, b, k, s, decode_device="cuda")
            decoded = (dm.decode_batch(batch, "cuda") for batch in loader)

            class _Synced:  # the decode runs in this process: time it end to end, synchronised
                def __iter__(self) -> Iterator[Any]:
                    for batch in decoded:
                        torch.cuda.synchronize()
                        yield batch

            r = measure(_Synced(), k)
            r["per_worker_cpu"] = float("nan")  # the work is split between workers, this process and the GPU
            results["clipforge + nvJPEG decode (worker: read, header, tokenize)"] = r
    base = results.get("open_clip get_wds_dataset")
    for name, r in results.items():  # one JSON line each, for scripts that collect them
        row = {key: None if isinstance(v, float) and v != v else v for key, v in r.items()}  # NaN: null
        print(json.dumps({"kind": "loader", "loader": name, "batch": b, "workers": k, **row}), flush=True)
    print(f"\n{b=} workers={k} image_size={s} samples={args.num_samples} torch threads=1")
    print(f"{'loader':58s} {'img/s/worker (wall)':>20s} {'img/s/worker (CPU)':>19s} {'vs open_clip':>13s}")
    for name, r in results.items():
        ratio = f"{r['per_worker_wall'] / base['per_worker_wall']:.2f}x" if base else "-"
        cpu_ratio = (
            f" ({r['per_worker_cpu'] / base['per_worker_cpu']:.2f}x CPU)"
            if base and r["per_worker_cpu"] == r["per_worker_cpu"]
            else ""
        )
        print(f"{name:58s} {r['per_worker_wall']:20.1f} {r['per_worker_cpu']:19.1f} {ratio:>13s}{cpu_ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results
