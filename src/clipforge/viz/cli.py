"""``clipforge-visualize`` (= ``python scripts/visualize.py``): write the ViT pictures (patch grid,
position-embedding similarity, attention per head, attention rollout after Abnar & Zuidema, 2020) for one
image and one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from clipforge.conf import CONF_DIR
from clipforge.console import console_script
from clipforge.entry import files_written, out_folder
from clipforge.eval.datasets import read_images
from clipforge.viz.attention import save_vit_pictures


def model_yaml(name: str) -> Path:
    """``conf/model/<name>.yaml`` (from the working directory, then the repository), or a YAML path."""
    candidates = [Path(name), Path("conf/model") / f"{name}.yaml", CONF_DIR / "model" / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no model config {name!r} (looked at {[str(p) for p in candidates]})")


def build_fresh(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised model from a ``conf/model`` YAML."""
    from omegaconf import OmegaConf

    from clipforge.checkpoint import build_model

    torch.manual_seed(seed)
    return build_model(OmegaConf.load(model_yaml(name))).eval()


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True, help="image file (any size; resized and centre-cropped)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="clipforge Lightning checkpoint (.ckpt)")
    source.add_argument("--open-clip", help="open_clip weights file or folder (see clipforge.models.convert)")
    source.add_argument(
        "--model", default="tiny", help="fresh model from conf/model/<name>.yaml (default: tiny)"
    )
    parser.add_argument(
        "--ema", action="store_true", help="draw the checkpoint's EMA weights (trained with ema=default)"
    )
    parser.add_argument(
        "--open-clip-model", default=None, help="open_clip model name for --open-clip, e.g. ViT-B-32"
    )
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    parser.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="block whose per-head attention to draw (default: last; an attention-pool tower has only its query's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh model")
    args = parser.parse_args(argv)
    if args.ema and not args.checkpoint:
        parser.error("--ema reads the EMA weights of a clipforge checkpoint: give --checkpoint")
    if args.open_clip_model and not args.open_clip:  # else a fresh --model was drawn in its place
        parser.error("--open-clip-model names the architecture of --open-clip weights: give --open-clip")
    out_folder(args.out)  # before the model loads, as the image
    (image,) = read_images(args.image)

    if args.checkpoint:
        from clipforge.checkpoint import load_model
        from clipforge.data.config import stored_preprocessing

        model, stored = load_model(args.checkpoint, use_ema=args.ema)
        preprocessing = stored_preprocessing(stored)
        if stored.get("ema") and not args.ema:  # two models in one file: say which one is drawn
            note = "also holds EMA weights: drawing the training weights (--ema draws the EMA)"
            print(f"{args.checkpoint} {note}", file=sys.stderr)
    elif args.open_clip:
        from clipforge.models.convert import load_open_clip_checkpoint, open_clip_preprocessing

        model = load_open_clip_checkpoint(args.open_clip, args.open_clip_model)
        preprocessing = open_clip_preprocessing(args.open_clip, args.open_clip_model)
    else:
        model, preprocessing = build_fresh(args.model, args.seed), None
    paths = save_vit_pictures(model, image, args.out, layer=args.layer, preprocessing=preprocessing)
    return files_written(paths)


cli = console_script("clipforge-visualize", main)  # the console script


if __name__ == "__main__":
    raise SystemExit(cli())
