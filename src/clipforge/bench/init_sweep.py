"""Which initialisation trains a model config fastest, at a CPU-sized batch and step count: the same short
run (synthetic captioned images, same seeds and steps) once per weight-init scheme of
:mod:`clipforge.models.weight_init` (timm: Dosovitskiy et al., 2021; jax: big_vision, Zhai et al., 2022;
openclip: CLIP's recipe, Radford et al., 2021; torch: open_clip's image tower), scored by the mean training
loss of the last steps (lower is better) and, with ``--heldout``, by held-out zero-shot top-1. How each model
config's default was chosen for the models too large to train to convergence on a CPU (the tiny one is
chosen by ``clipforge-benchmark learning``).

    clipforge-benchmark init --models vit_b32 --schemes timm openclip --image-size 64 --context-length 24 \
        --steps 300 --batch-size 32 --warmup 20 --lr 2e-4 --last 20 --seeds 0 1 --heldout 500
    clipforge-benchmark init --models siglip_b16 --image-size 112     # B/16 widths and depth, 49 patches
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from clipforge.bench.args import add_child_args, add_run_args, non_negative_int, positive_int
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
        f"data.source.num_heldout={args.heldout or 64}", "logger=csv", f"final_eval={bool(args.heldout)}",
        "callbacks=none", f"seed={args.seed}",
    ] + ([f"model.vision.img_size={args.image_size}"] if args.image_size else []) + (
        [f"model.text.context_length={args.context_length}"] if args.context_length else []) + list(args.override)  # fmt: skip


def logged(run_dir: Path, key: str) -> list[float]:
    """Every value of ``key`` the run's CSV logger wrote, in order."""
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with path.open() as f:
            rows += [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return rows


def mean_last_losses(run_dir: Path, last: int) -> float:
    rows = logged(run_dir, "train/loss")
    if len(rows) < last:
        raise RuntimeError(f"{run_dir}: {len(rows)} logged losses, fewer than {last}")
    return statistics.mean(rows[-last:])


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="clipforge-benchmark init", description=__doc__.split("\n\n")[0])
    add_run_args(p, out="outputs/bench_init", steps=40, batch_size=16, lr=5e-4, warmup=10, seeds=[0])
    p.add_argument("--models", nargs="+", default=["vit_b32", "vit_b16", "siglip_b16"])
    p.add_argument("--schemes", nargs="+", default=None, help="default: the candidates for each model")
    p.add_argument("--loss", default=None, help="default: siglip for siglip_b16, clip otherwise")
    p.add_argument(
        "--last", type=positive_int, default=10, help="losses of this many last steps are averaged"
    )
    p.add_argument(
        "--heldout",
        type=non_negative_int,
        default=0,
        help="zero-shot classify this many held-out images (unseen attribute tuples) after training; 0: "
        "score by the training loss only",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="default: the model's own; every scheme scales by width and depth only, so a smaller image "
        "(fewer patches) measures the same choice for less compute",
    )
    p.add_argument(
        "--context-length",
        type=positive_int,
        default=None,
        help="default: the model's own; the synthetic captions fit in 20 tokens, so a shorter text context "
        "measures the same choice for less compute",
    )
    add_child_args(
        p,
        "model.init_logit_bias=-3.43 (SigLIP's bias prior, -ln(B - 1), at a CPU-sized batch B instead of the "
        "-10 of a 32k batch)",
    )
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        loss = args.loss or ("siglip" if model.startswith("siglip") else "clip")
        for scheme in args.schemes or DEFAULT_SCHEMES.get(model, ["timm", "openclip"]):
            for seed in args.seeds:
                rows.append(one_run(args, model, loss, scheme, seed))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows), flush=True)
    return rows


def one_run(args: argparse.Namespace, model: str, loss: str, scheme: str, seed: int) -> dict:
    """Train one short run, or read back a finished one trained and scored with the same settings; its row."""
    size = f"-{args.image_size}px" if args.image_size else ""
    size += f"-ctx{args.context_length}" if args.context_length else ""
    size += f"-seed{seed}" if seed else ""
    run_dir = (args.out / f"{model}{size}-{loss}-{scheme}").resolve()
    done = run_dir / "loss.json"
    settings = {
        "model": model,
        "loss": loss,
        "scheme": scheme,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch_size,
        "warmup": args.warmup,
        "lr": args.lr,
        "image_size": args.image_size,
        "context_length": args.context_length,
        "last": args.last,
        "heldout": args.heldout,
        "override": list(args.override),
    }
    if done.is_file():
        saved = json.loads(done.read_text())
        if {k: saved.get(k) for k in settings} == settings:
            return saved
        print(f"[init] {run_dir.name}: trained with other settings, training again", flush=True)
    if run_dir.exists():  # unfinished or trained otherwise: its logs must not mix with the new run's
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"[init] {model} {loss} {scheme} seed {seed}: {args.steps} steps of {args.batch_size}", flush=True)
    run_args = argparse.Namespace(**{**vars(args), "loss": loss, "seed": seed})
    seconds = run_logged(command(run_dir, model, scheme, run_args), run_dir / "train.log", args.threads)
    row = settings | {"final_loss": mean_last_losses(run_dir, args.last), "train_s": round(seconds, 1)}
    if args.heldout:
        top1 = logged(run_dir, "final/zeroshot_top1")
        if not top1:
            raise RuntimeError(f"{run_dir}: no final/zeroshot_top1 logged; see {run_dir / 'train.log'}")
        row["zeroshot_top1"] = top1[-1]
    done.write_text(json.dumps(row))
    return row


def table(rows: list[dict]) -> str:
    """One line per model and scheme: means over seeds, then each seed's value."""
    lines = [
        "| model | loss | init | mean train loss, last steps | held-out zero-shot top-1 | train min |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["loss"], r["scheme"]), []).append(r)
    for (model, loss, scheme), rs in groups.items():
        cell = _mean_and_each([r["final_loss"] for r in rs], "{:.4f}")
        accs = [100 * r["zeroshot_top1"] for r in rs if "zeroshot_top1" in r]
        acc = _mean_and_each(accs, "{:.1f}", "%") if accs else "-"
        minutes = sum(r["train_s"] for r in rs) / 60 / len(rs)
        lines.append(f"| {model} | {loss} | {scheme} | {cell} | {acc} | {minutes:.1f} |")
    return "\n".join(lines)


def _mean_and_each(values: list[float], fmt: str, unit: str = "") -> str:
    """``mean`` alone for one value, ``mean (v1 / v2 ...)`` for several."""
    text = fmt.format(statistics.mean(values)) + unit
    return text + (f" ({' / '.join(fmt.format(v) for v in values)})" if len(values) > 1 else "")
