"""A model is evaluated, exported, imported and fine-tuned with the image normalisation it was trained with
(``data.augment.mean``/``std``/``interpolation``), never silently with CLIP's: open_clip's ViT-L-14 laion2b
weights, for one, were trained on pixels mapped with mean = std = 0.5."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import checkpoint_config
from clipforge.convert_cli import main as convert
from clipforge.data.config import stored_preprocessing
from clipforge.eval import cli as eval_cli
from clipforge.models.convert import open_clip_preprocessing
from clipforge.train import train
from runconf import PERIODIC, SMALL

HALF = (0.5, 0.5, 0.5)
SIGLIP_PIXELS = ("data.augment.mean=[0.5,0.5,0.5]", "data.augment.std=[0.5,0.5,0.5]")


def test_a_runs_normalisation_follows_its_checkpoint_through_eval_export_import_and_init_from(
    compose_cfg, tmp_path: Path, monkeypatch, caplog
) -> None:
    cfg = compose_cfg(
        "trainer.max_steps=1", *SIGLIP_PIXELS, "data.augment.interpolation=bilinear", *SMALL, *PERIODIC
    )
    train(cfg)
    last = Path(cfg.paths.output_dir) / "last.ckpt"
    want = {"interpolation": "bilinear", "mean": HALF, "std": HALF}
    assert stored_preprocessing(checkpoint_config(last)) == want

    # clipforge-zeroshot builds its transform from the checkpoint, with no setting of its own
    seen = []
    real = eval_cli.eval_transform
    monkeypatch.setattr(eval_cli, "eval_transform", lambda size, **kw: seen.append(kw) or real(size, **kw))
    few = ("eval.dataset.num_samples=8", f"output_dir={tmp_path / 'zs'}")
    eval_cli.run(compose_cfg(f"checkpoint={last}", *few, config_name="zeroshot"))
    assert seen == [want]

    # export: open_clip's preprocess_cfg says it; import: the imported checkpoint keeps it
    convert(["export", "--checkpoint", str(last), "--out", str(tmp_path / "oc")])
    pre = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert (pre["mean"], pre["std"], pre["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bilinear")
    seen.clear()
    # the open_clip folder, read as open_clip reads it: its preprocess_cfg
    eval_cli.run(compose_cfg(f"open_clip_checkpoint={tmp_path / 'oc'}", *few, config_name="zeroshot"))
    assert seen == [want]
    convert(["import", "--open-clip", str(tmp_path / "oc"), "--out", str(tmp_path / "imported")])
    assert stored_preprocessing(checkpoint_config(tmp_path / "imported")) == want

    # init_from into a run that normalises with CLIP's: named, with both values
    with caplog.at_level("WARNING", logger="clipforge.train"):
        train(compose_cfg("trainer.max_steps=1", f"init_from={tmp_path / 'imported'}", *SMALL))
    assert "data.augment.mean: checkpoint (0.5, 0.5, 0.5), config (0.48145466" in caplog.text
    assert "data.augment.interpolation: checkpoint bilinear, config bicubic" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforge.train"):
        train(
            compose_cfg(
                "trainer.max_steps=1",
                f"init_from={tmp_path / 'imported'}",
                *SIGLIP_PIXELS,
                "data.augment.interpolation=bilinear",
                *SMALL,
            )
        )
    assert "prepared otherwise" not in caplog.text


def test_open_clip_weights_without_a_config_take_their_tags_normalisation(tmp_path: Path) -> None:
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({}, weights)  # only its folder is read: no config beside it
    got = open_clip_preprocessing(weights, "ViT-L-14", "laion2b_s32b_b82k")  # open_clip's table, no download
    assert got == {"interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match="open_clip lists no pretrained weights 'ViT-L-14' / 'nope'"):
        open_clip_preprocessing(weights, "ViT-L-14", "nope")
    with pytest.warns(
        UserWarning, match="nothing records the image normalisation these weights were trained"
    ):
        assert open_clip_preprocessing(weights, "ViT-L-14") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CLIPA tag's resize mode is said, not taken silently
        with pytest.raises(UserWarning, match="resize_mode='squash'"):
            open_clip_preprocessing(weights, "ViT-L-14-CLIPA", "datacomp1b")


def test_a_resume_that_prepares_images_otherwise_than_its_checkpoint_is_named(
    compose_cfg, tmp_path: Path, caplog
) -> None:
    """A resume trains the checkpoint's weights on, so a run that forgets its mean = std = 0.5 on the command
    line goes on with CLIP's (and records them in its next checkpoint, which evaluation then reads)."""
    cfg = compose_cfg("trainer.max_steps=1", *SIGLIP_PIXELS, *SMALL, *PERIODIC)
    train(cfg)
    last = tmp_path / "half.ckpt"  # aside: each resume below writes the run dir's last.ckpt anew
    shutil.copy(Path(cfg.paths.output_dir) / "last.ckpt", last)
    with caplog.at_level("WARNING", logger="clipforge.train"):
        train(compose_cfg("trainer.max_steps=2", f"ckpt_path={last}", *SMALL, *PERIODIC))
    assert f"ckpt_path={last}: its weights were trained on images prepared otherwise" in caplog.text
    assert "data.augment.mean: checkpoint (0.5, 0.5, 0.5), config (0.48145466" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforge.train"):
        train(compose_cfg("trainer.max_steps=3", f"ckpt_path={last}", *SIGLIP_PIXELS, *SMALL, *PERIODIC))
    assert "prepared otherwise" not in caplog.text
