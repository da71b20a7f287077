"""What the SigLIP 2 objectives (Tschannen et al., 2025) add, measured on the synthetic task with the tiny
model: SigLIP alone (Zhai et al., 2023) against SigLIP plus each objective, LocCa's decoder (Wan et al.,
2024), SILC's self-distillation (Naeem et al., 2023) and TIPS' masked prediction (Maninis et al., 2024), and
all three, same data, steps and seed. Each model is scored on

* held-out zero-shot top-1 (unseen attribute combinations, as the default run);
* a dense probe: mean IoU of a linear classifier on frozen patch tokens that names the shape covering each
  patch (:func:`clipforge.eval.dense.dense_probe`, trained on generator train images, scored on held-out);
* referring-box accuracy (IoU >= 0.5) of the decoder, for the runs that train one.

    clipforge-benchmark siglip2                       # base, locca, silc, tips, all; 600 steps, seed 0
    clipforge-benchmark siglip2 --variants base tips --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.bench.args import add_child_args, positive_int
from clipforge.bench.learning import resolved_config
from clipforge.bench.learning_trainers import run_logged

VARIANTS: dict[str, list[str]] = {
    "base": [],
    "locca": ["objectives=locca"],
    "silc": ["objectives=silc"],
    "tips": ["objectives=tips"],
    "all": ["objectives=siglip2"],
}


@dataclass
class Scores:
    variant: str
    seed: int
    steps: int
    zeroshot_top1: float
    dense_miou: float
    patch_accuracy: float
    box_accuracy: float | None
    box_mean_iou: float | None
    train_s: float


def command(
    run_dir: Path,
    variant: str,
    steps: int,
    batch_size: int,
    seed: int,
    data_dir: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable, "-m", "clipforge.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}",
        "loss=siglip", f"trainer.max_steps={steps}", f"data.batch_size={batch_size}", f"seed={seed}",
        "logger=none", "final_eval=false", "~callbacks.similarity_heatmap", "~callbacks.attention_maps",
        *VARIANTS[variant], *extra,
    ]  # fmt: skip


def _images(split: str, n: int, image_size: int) -> tuple[torch.Tensor, list[Any]]:
    from clipforge.data import synthetic
    from clipforge.eval.datasets import eval_transform

    samples = list(synthetic.generate(split, n, image_size))
    transform = eval_transform(image_size)
    return torch.stack([transform(s.image) for s in samples]), samples


def score(ckpt: Path, variant: str, n_probe: int = 500) -> dict[str, Any]:
    """Zero-shot top-1, dense-probe mIoU and (with a decoder) referring-box accuracy of one checkpoint."""
    from torch.utils.data import DataLoader

    from clipforge.checkpoint import load_captioner, load_model
    from clipforge.data import synthetic
    from clipforge.eval.datasets import SyntheticHeldoutDataset, eval_transform
    from clipforge.eval.dense import dense_probe, patch_targets, referring_box_accuracy
    from clipforge.eval.zeroshot import zero_shot_eval

    has_decoder = "locca" in variant or variant == "all"
    model, decoder = load_captioner(ckpt)[:2] if has_decoder else (load_model(ckpt)[0], None)
    size, patch = model.visual.img_size, model.visual.patch_size
    held = SyntheticHeldoutDataset(num_samples=1000, transform=eval_transform(size), render_size=size)
    zs = zero_shot_eval(model, held.classnames, held.templates, DataLoader(held, batch_size=250))
    splits = {}
    for split in ("train", "heldout"):
        images, samples = _images(split, n_probe, size)
        targets = np.stack([patch_targets(s.coverage, s.meta["label"], patch) for s in samples])
        splits[split] = (images, targets, samples)
    probe = dense_probe(
        model, splits["train"][:2], splits["heldout"][:2], num_classes=len(synthetic.SHAPES) + 1
    )
    out = {
        "zeroshot_top1": float(zs["top1"]),
        "dense_miou": probe["miou"],
        "patch_accuracy": probe["patch_accuracy"],
    }
    out |= {"box_accuracy": None, "box_mean_iou": None}
    if decoder is not None:
        images, _, samples = splits["heldout"]
        refs = [s.meta["referring_expression"] for s in samples]
        boxes = [s.meta["box"] for s in samples]
        box = referring_box_accuracy(model, decoder, images, refs, boxes)
        out |= {"box_accuracy": box["accuracy"], "box_mean_iou": box["mean_iou"]}
    return out


def run_variant(variant: str, args: argparse.Namespace) -> Scores:
    run_dir = (args.out / f"{variant}-seed{args.seed}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = args.out.resolve() / "data"
    cmd = command(run_dir, variant, args.steps, args.batch_size, args.seed, data_dir, args.override)
    key = {"command": cmd[1:], "config": resolved_config(cmd)}
    done = run_dir / "scores.json"
    saved = json.loads(done.read_text()) if done.is_file() else {}
    if saved and {k: v for k, v in saved.items() if k != "scores"} == key:
        print(f"[siglip2] reuse {variant}", flush=True)
        return Scores(**saved["scores"])
    print(f"[siglip2] train {variant}: {' '.join(cmd[3:])}", flush=True)
    seconds = run_logged(cmd, run_dir / "train.log", threads=args.threads)
    print(f"[siglip2] score {variant}", flush=True)
    result = Scores(
        variant,
        args.seed,
        args.steps,
        **score(run_dir / "checkpoints" / "last.ckpt", variant),
        train_s=round(seconds, 1),
    )
    done.write_text(json.dumps({**key, "scores": asdict(result)}))
    return result


def table(rows: list[Scores]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        "| objectives | zero-shot top-1 | dense probe mIoU | patch accuracy | referring box acc (IoU >= 0.5) | box mean IoU | train min |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {pct(r.zeroshot_top1)} | {pct(r.dense_miou)} | {pct(r.patch_accuracy)} | "
            f"{pct(r.box_accuracy)} | {pct(r.box_mean_iou)} | {r.train_s / 60:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Scores]:
    p = argparse.ArgumentParser(prog="clipforge-benchmark siglip2", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/bench_siglip2"))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_child_args(p)
    args = p.parse_args(argv)
    rows = [run_variant(v, args) for v in args.variants]
    for r in rows:
        print(json.dumps(asdict(r)))
    print(table(rows), flush=True)
    return rows
