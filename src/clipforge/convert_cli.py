"""``clipforge-convert``: move weights between clipforge and open_clip (converters:
clipforge.models.convert). ``scripts/convert.py`` is a thin wrapper around :func:`main`.

Export a clipforge checkpoint (or a fresh conf/model config) to a folder open_clip loads:

    clipforge-convert export --checkpoint run.ckpt --out exported/ [--name my-clip] [--ema]
    >>> open_clip.create_model("local-dir:exported/")

Only the two towers (and scale/bias) are exported: what training added beside them (the LocCa decoder,
distillation heads, mask token, the EMA copy) stays in the checkpoint. ``--ema`` exports the EMA weights
of the towers instead of the trained ones. open_clip does not cap the logit scale as clipforge does
(``model.max_logit_scale``): the capped value the model uses is exported.

Import an open_clip checkpoint you have on disk, to fine-tune or zero-shot it with clipforge:

    clipforge-convert import --open-clip open_clip_pytorch_model.bin --model-name ViT-B-32 --out imported/

writes ``imported/model.yaml`` (a conf/model node) and ``imported/model.ckpt`` (with the weights' image
normalisation, from the folder's ``open_clip_config.json`` or ``--pretrained-tag``), which
``clipforge.checkpoint.load_model`` (zero-shot, visualize --checkpoint) reads. A stored logit scale above
the default cap of 100 (SigLIP ported from big_vision) raises ``max_logit_scale`` in that node to it, so the
imported model's logits are open_clip's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from clipforge.checkpoint import IMPORTED_CHECKPOINT, TOKENIZER_KEY, checkpoint_dict
from clipforge.console import console_script
from clipforge.entry import files_written, out_folder
from clipforge.fault.atomic_io import atomic_torch_save
from clipforge.models.convert import (
    export_open_clip,
    load_open_clip_checkpoint,
    model_config,
    open_clip_preprocessing,
    open_clip_tokenizer,
)


def export(args: argparse.Namespace) -> dict[str, Path]:
    if args.checkpoint:
        from clipforge.checkpoint import load_model
        from clipforge.data.config import stored_preprocessing

        model, stored = load_model(args.checkpoint, use_ema=args.ema)
        preprocessing = stored_preprocessing(stored)
    else:
        if args.ema:
            raise SystemExit("--ema reads the EMA weights of a checkpoint: give --checkpoint")
        from clipforge.viz.cli import build_fresh

        model, preprocessing = build_fresh(args.model, args.seed), None
    return export_open_clip(model, args.out, name=args.name, preprocessing=preprocessing)


def import_(args: argparse.Namespace) -> dict[str, Path]:
    model = load_open_clip_checkpoint(args.open_clip, args.model_name, img_size=args.img_size)
    preprocessing = open_clip_preprocessing(args.open_clip, args.model_name, args.pretrained_tag)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(model)
    paths = {"config": out / "model.yaml", "checkpoint": out / IMPORTED_CHECKPOINT}
    OmegaConf.save(OmegaConf.create(cfg), paths["config"])
    stored: dict[str, Any] = {"model": cfg}
    if preprocessing:  # it travels as a run's data.augment would: evaluation and init_from read it there
        stored["data"] = {"augment": preprocessing}
    # a model of another tokenizer is named on every load of the import, not only by this command's warning
    if tokenizer := open_clip_tokenizer(args.open_clip, args.model_name):
        stored[TOKENIZER_KEY] = tokenizer
    # atomic, as every checkpoint clipforge writes: a kill mid-write leaves a previous import whole
    atomic_torch_save(checkpoint_dict(model.state_dict(), stored), paths["checkpoint"])
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="clipforge-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="clipforge -> open_clip folder")
    source = ex.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="clipforge Lightning checkpoint (.ckpt)")
    source.add_argument("--model", help="fresh model from conf/model/<name>.yaml")
    ex.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (ema=default)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--name", default="clipforge", help="open_clip model name of the exported config")
    ex.add_argument("--out", required=True)
    ex.set_defaults(run=export)
    im = sub.add_parser("import", help="open_clip checkpoint -> clipforge config + checkpoint")
    im.add_argument(
        "--open-clip", required=True, help="open_clip weights file, or folder with open_clip_config.json"
    )
    im.add_argument(
        "--model-name", default=None, help="open_clip architecture, e.g. ViT-B-32 (else inferred)"
    )
    im.add_argument(
        "--img-size", type=int, default=None, help="rebuild at this image size (position grid resampled)"
    )
    im.add_argument(
        "--pretrained-tag",
        default=None,
        help="open_clip's tag of these weights (e.g. laion2b_s32b_b82k with --model-name ViT-L-14): their "
        "normalisation is read from open_clip's table when no open_clip_config.json says it",
    )
    im.add_argument("--out", required=True)
    im.set_defaults(run=import_)
    args = parser.parse_args(argv)
    out_folder(args.out)  # before the model loads
    paths = args.run(args)
    return files_written(paths)


cli = console_script("clipforge-convert", main)  # the console script

if __name__ == "__main__":
    raise SystemExit(cli())
