"""``clipforge-shards``: write WebDataset shards (Breuel et al., 2020) in img2dataset's layout, with a
manifest of samples per shard, from an image folder plus captions, from img2dataset output, or from the
synthetic generator; or write the manifest for existing shards.

Examples::

    clipforge-shards folder photos/ captions.csv photo_shards/ --max-count 10000
    clipforge-shards img2dataset laion_part/ laion_shards/ --max-bytes 1GB
    clipforge-shards synthetic shapes/ --split train --num-samples 20000 --image-size 32
    clipforge-shards manifest existing_shards/

An output folder that already holds shards (NNNNN.tar) is refused: a brace pattern or glob over it would
mix the earlier run's extra shards into the new set. ``--overwrite`` deletes those shards and the old
manifest first (nothing else in the folder).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from clipforge.console import console_script
from clipforge.data.manifest import SHARD_GLOBS, write_manifest
from clipforge.data.shards import ShardResult, read_shard
from clipforge.data.sources import folder_records, img2dataset_records, synthetic_records
from clipforge.data.writer import claim_out_dir, write_shards

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20, ``"2e8"`` -> 200000000."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1GB, 512MiB, 2e8)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def count_shards(directory: str | Path, broken: Counter | None = None) -> dict[str, int]:
    """Samples per shard of every ``*.tar`` (``*.tar.gz``, ``*.tgz``) in ``directory``, by reading them; a
    broken shard counts the samples that could be read, and its cause is counted in ``broken`` (read_shard
    logs it)."""
    counts = {}
    paths = sorted({p for pattern in SHARD_GLOBS for p in Path(directory).glob(pattern)})
    for path in tqdm(paths, desc="counting", unit="shard"):
        result = ShardResult()
        counts[path.name] = sum(1 for _ in read_shard(str(path), result))
        if result.failure is not None and broken is not None:
            broken[result.failure] += 1
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge-shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def limits(p: argparse.ArgumentParser) -> None:
        p.add_argument("out", help="output directory for NNNNN.tar, manifest.json and sizes.json")
        p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (0: no limit)")
        p.add_argument("--max-bytes", type=parse_bytes, default=None, help="bytes per shard, e.g. 1GB")
        p.add_argument(
            "--reencode",
            choices=["jpeg"],
            default=None,
            help="re-encode images that are not JPEG as JPEG (default: keep JPEG/PNG/WebP bytes as they are, "
            "other formats become PNG: nothing is lost)",
        )
        p.add_argument("--quality", type=int, default=95, help="JPEG quality with --reencode jpeg")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="delete the shards (NNNNN.tar) and manifest already in the output folder first (default: "
            "refuse such a folder, whose old shards a pattern or glob would mix with the new ones)",
        )

    p = sub.add_parser("folder", help="an image folder and a CSV/TSV/JSONL file name -> caption")
    p.add_argument("images", help="folder the file names are relative to")
    p.add_argument("captions", help="CSV/TSV (header: file,caption), JSONL or JSON mapping")
    limits(p)
    p = sub.add_parser("img2dataset", help="re-shard img2dataset output (tar shards or files layout)")
    p.add_argument("source", help="img2dataset output folder")
    limits(p)
    p = sub.add_parser("synthetic", help="the procedural compositional data set")
    limits(p)
    p.add_argument("--split", choices=["train", "val", "heldout"], default="train")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", choices=["tuples", "pairs"], default="tuples", help="held-out combinations")
    p = sub.add_parser("manifest", help="count samples of existing shards and write manifest.json")
    p.add_argument("directory")
    return parser


def shards(argv: list[str] | None = None) -> int:
    """``clipforge-shards``: the exit status (1: no sample was written, or no shard to count)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "manifest" and (
        args.max_count < 0 or (args.max_count == 0 and args.max_bytes is None)
    ):
        parser.error(f"--max-count {args.max_count}: give a count >= 1, or 0 (no limit) with --max-bytes")
    folder = {"folder": "images", "img2dataset": "source"}.get(args.command)
    if folder is not None and not Path(getattr(args, folder)).is_dir():
        parser.error(f"{getattr(args, folder)} is not a folder")
    if args.command == "folder" and not Path(args.captions).is_file():
        parser.error(f"the captions file {args.captions} does not exist")
    if args.command == "img2dataset":
        source, out = Path(args.source).resolve(), Path(args.out).resolve()
        if out == source or source in out.parents:
            # the new shards would replace input shards not yet read, or be read back as input
            parser.error(
                f"the output folder {args.out} is inside the source {args.source}: write it elsewhere"
            )
    if args.command != "manifest":
        try:  # before reading any input: a refused folder fails at once
            claim_out_dir(args.out, args.overwrite)
        except FileExistsError as e:
            parser.error(str(e))
    if args.command == "manifest":
        broken: Counter = Counter()
        counts = count_shards(args.directory, broken)
        if not counts:
            print(f"no {', '.join(SHARD_GLOBS)} shards in {args.directory}", file=sys.stderr)
            return 1
        written = write_manifest(args.directory, counts, {"source": "counted"})
        print(f"{sum(counts.values())} samples in {len(counts)} shards; wrote {written}")
        if broken:  # counted as far as they read: training will not see their damage again
            causes = ", ".join(f"{k}={v}" for k, v in sorted(broken.items()))
            print(f"broken shards: {causes} (counted as far as they could be read; see the warnings above)")
        return 0
    skipped: Counter = Counter()
    total = None
    if args.command == "folder":
        try:  # the captions file is read here, before any shard is opened
            records = folder_records(args.images, args.captions, skipped)
        except ValueError as e:
            parser.error(str(e))
        params = {"source": "folder", "images": str(args.images), "captions": str(args.captions)}
    elif args.command == "img2dataset":
        records = img2dataset_records(args.source, skipped)
        params = {"source": "img2dataset", "path": str(args.source)}
    else:
        records = synthetic_records(args.split, args.num_samples, args.image_size, args.seed, args.holdout)
        params = {
            "generator": "clipforge.data.synthetic",
            "split": args.split,
            "num_samples": args.num_samples,
            "image_size": args.image_size,
            "seed": args.seed,
            "holdout": args.holdout,
        }
        total = args.num_samples
    if args.reencode:
        params |= {"reencode": args.reencode, "quality": args.quality}
    counts = write_shards(
        records,
        args.out,
        max_count=args.max_count or None,
        max_bytes=args.max_bytes,
        params=params,
        total=total,
        reencode=args.reencode,
        quality=args.quality,
        overwrite=args.overwrite,
        skipped=skipped,
    )
    print(f"{sum(counts.values())} samples in {len(counts)} shards under {args.out}")
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if not counts:
        print("no sample was written: see the skipped counts and warnings above", file=sys.stderr)
        return 1
    return 0


main = console_script("clipforge-shards", shards)  # the console script

if __name__ == "__main__":
    sys.exit(main())
