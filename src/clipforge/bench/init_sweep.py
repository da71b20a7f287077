"""Which initialisation trains a model config fastest, at a CPU-sized batch and step count: the same short
run (synthetic captioned images, the model's own image size, same seed and steps) once per weight-init
scheme of :mod:`clipforge.models.weight_init` (timm: Dosovitskiy et al., 2021; jax: big_vision, Zhai et al.,
2022; openclip: CLIP's text-tower recipe, Radford et al., 2021; torch: open_clip's image tower), scored by
the mean training loss of the last steps. Lower is better; how each model config's default was chosen for
the models too large to train to convergence on a CPU (the tiny one is chosen by
``clipforge-benchmark learning``).

    clipforge-benchmark init --models vit_b32 --schemes timm openclip torch --steps 40 --batch-size 16
    clipforge-benchmark init --models siglip_b16 --image-size 112     # B/16 widths and depth, 49 patches
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from clipforge.bench.learning_trainers import run_logged

DEFAULT_SCHEMES = {
    "tiny": ["timm", "openclip", "torch"],
    "vit_b32": ["timm", "openclip", "torch"],
    "vit_b16": ["timm", "openclip", "torch"],
    "siglip_b16": ["timm", "jax", "openclip"],
}


def command(run_dir: Path, model: str, scheme: str, args: argparse.Namespace) -> list[str]:
    """One short run; the text tower takes ``openclip`` under ``torch`` (open_clip's own pairing)."""
    text_scheme = "openclip" if scheme == "torch" else scheme
    return [
        sys.executable, "-m", "clipforge.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={args.out.resolve() / 'data'}",
        f"model={model}", f"loss={args.loss}", f"model.vision.weight_init={scheme}", f"model.text.weight_init={text_scheme}",
        f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1", f"data.batch_size={args.batch_size}",
        f"scheduler.warmup_steps={args.warmup}", f"optimizer.lr={args.lr}", "data.source.num_train=4096",
        "data.source.num_heldout=64", "logger=csv", "final_eval=false", "callbacks=none", f"seed={args.seed}",
    ] + ([f"model.vision.img_size={args.image_size}"] if args.image_size else []) + (
        [f"model.text.context_length={args.context_length}"] if args.context_length else [])  # fmt: skip


def mean_last_losses(run_dir: Path, last: int) -> float:
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with path.open() as f:
            rows += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    if len(rows) < last:
        raise RuntimeError(f"{run_dir}: {len(rows)} logged losses, fewer than {last}")
    return statistics.mean(rows[-last:])


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="clipforge-benchmark init", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/bench_init"))
    p.add_argument("--models", nargs="+", default=["vit_b32", "vit_b16", "siglip_b16"])
    p.add_argument("--schemes", nargs="+", default=None, help="default: the candidates for each model")
    p.add_argument("--loss", default=None, help="default: siglip for siglip_b16, clip otherwise")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--last", type=int, default=10, help="losses of this many last steps are averaged")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default: the model's own; every scheme scales by width and depth only, so a smaller image "
        "(fewer patches) measures the same choice for less compute",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="default: the model's own; the synthetic captions fit in 20 tokens, so a shorter text context "
        "measures the same choice for less compute",
    )
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        loss = args.loss or ("siglip" if model.startswith("siglip") else "clip")
        for scheme in args.schemes or DEFAULT_SCHEMES.get(model, ["timm", "openclip"]):
            size = f"-{args.image_size}px" if args.image_size else ""
            size += f"-ctx{args.context_length}" if args.context_length else ""
            run_dir = (args.out / f"{model}{size}-{loss}-{scheme}").resolve()
            done = run_dir / "loss.json"
            run_dir.mkdir(parents=True, exist_ok=True)
            if not done.is_file():
                print(f"[init] {model} {loss} {scheme}: {args.steps} steps of {args.batch_size}", flush=True)
                run_args = argparse.Namespace(**{**vars(args), "loss": loss})
                seconds = run_logged(
                    command(run_dir, model, scheme, run_args), run_dir / "train.log", args.threads
                )
                row = {
                    "model": model,
                    "loss": loss,
                    "scheme": scheme,
                    "steps": args.steps,
                    "batch": args.batch_size,
                    "image_size": args.image_size,
                    "context_length": args.context_length,
                    "lr": args.lr,
                }
                row |= {"final_loss": mean_last_losses(run_dir, args.last), "train_s": round(seconds, 1)}
                done.write_text(json.dumps(row))
            rows.append(json.loads(done.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    print(
        "| model | loss | init | mean train loss, last steps | train min |\n| --- | --- | --- | ---: | ---: |"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['loss']} | {r['scheme']} | {r['final_loss']:.4f} | {r['train_s'] / 60:.1f} |"
        )
    return rows
