"""SigLIP 2 through the real config tree: one short run with every objective and the EMA (box targets from
the data module's regions stage), then what reads its checkpoint: zero-shot of the EMA weights, export to
open_clip and timm without the added towers, and clipforge-caption's three tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from timm.models.vision_transformer import VisionTransformer as TimmViT

from clipforge.caption_cli import run_caption
from clipforge.checkpoint import (
    EMA_PREFIX,
    MODEL_PREFIX,
    build_model,
    load_captioner,
    load_checkpoint,
    load_model,
)
from clipforge.convert_cli import main as convert_main
from clipforge.data import synthetic
from clipforge.data.regions import in_crop
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import CROP_DRAWS
from clipforge.eval.cli import run_zeroshot
from clipforge.models.convert import (
    check_parity,
    convert_state_dict,
    export_open_clip,
    timm_key_map,
    timm_kwargs,
)
from clipforge.train import train
from runconf import QUIET, towers

RUN = (
    "loss=siglip",
    "objectives=[locca,silc,tips]",
    "objectives.silc.start_frac=0.5",
    "objectives.tips.start_frac=0.5",
    "objectives.silc.num_local=2",
    "objectives.silc.local_grid=2",
    "decoder.num_box_bins=32",
    "callbacks.zeroshot.use_ema=true",
    *towers(32, 1, 2),
    "logger=none",
    "final_eval=false",
    *QUIET,
    "trainer.max_steps=4",
    "scheduler.warmup_steps=1",
    "data.source.num_train=64",
    "data.source.num_heldout=32",
    "data.batch_size=16",
    "data.source.samples_per_shard=32",
    "data.num_workers=0",
)


def _compose(name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("siglip2")
    cfg = _compose("train", *RUN)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / "run")
        cfg.paths.data_dir = str(out / "data")
    metrics, objs = train(cfg)
    return {"metrics": metrics, "objs": objs, "ckpt": out / "run" / "checkpoints" / "last.ckpt", "dir": out}


def test_every_objective_trains_and_the_ema_is_evaluated(trained: dict) -> None:
    m = trained["metrics"]
    for name in (
        "train/loss",
        "train/contrastive_loss",
        "train/locca_loss",
        "train/silc_loss",
        "train/tips_loss",
    ):
        assert np.isfinite(m[name]), name
    assert 0.0 <= m["val/ema_zeroshot_top1"] <= 1.0 and "val/zeroshot_top1" in m
    module = trained["objs"]["module"]
    assert set(module.objectives) == {"locca", "silc", "tips"} and int(module.ema.steps) == 4
    assert trained["objs"]["datamodule"].stream.regions  # objectives=locca asks the data for boxes
    assert {"ref", "grounded"} & set(module.objectives["locca"].last_tasks)  # box tasks ran


def test_zeroshot_cli_reads_the_ema_weights(trained: dict, tmp_path: Path) -> None:
    ckpt = trained["ckpt"]
    live, _ = load_model(ckpt)
    ema, _ = load_model(ckpt, use_ema=True)
    state = load_checkpoint(ckpt)["state_dict"]
    for k, v in ema.state_dict().items():
        assert torch.equal(v, state[EMA_PREFIX + MODEL_PREFIX + k])
    assert not torch.equal(ema.visual.proj.weight, live.visual.proj.weight)
    common = (f"checkpoint={ckpt}", "eval.dataset.num_samples=12", "num_workers=0", "progress=false")
    res = run_zeroshot(_compose("zeroshot", *common, "use_ema=true", f"output_dir={tmp_path}"))
    assert res["num_samples"] == 12 and "EMA" in res["model"]
    with pytest.raises(ValueError, match="no EMA weights"):
        load_model(_without_ema(ckpt, tmp_path), use_ema=True)


def _without_ema(ckpt: Path, tmp_path: Path) -> Path:
    state = load_checkpoint(ckpt)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("ema.")}
    torch.save(state, tmp_path / "plain.ckpt")
    return tmp_path / "plain.ckpt"


@pytest.mark.parametrize("ema", [False, True])
def test_export_drops_the_added_towers_and_still_loads_in_open_clip_and_timm(
    trained: dict, tmp_path: Path, ema: bool
) -> None:
    ckpt = trained["ckpt"]
    paths = convert_main(
        ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path), *(["--ema"] if ema else [])]
    )
    from safetensors.torch import load_file

    exported = load_file(paths["weights"])
    assert not any("decoder" in k or "head" in k or "mask_token" in k or "ema" in k for k in exported)
    ours, cfg = load_model(ckpt, use_ema=ema)
    plain = export_open_clip(build_model(cfg["model"], cfg["loss"]), tmp_path / "plain")
    reference = open_clip.create_model(f"local-dir:{paths['config'].parent}").eval()
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 49000, (2, 20))
    text[:, -1] = 49407
    with torch.no_grad():
        check_parity(ours.encode_image(images), reference.encode_image(images))
        check_parity(ours.encode_text(text), reference.encode_text(text))
        # timm: the image trunk (the tiny model's bias-free projection has no timm head to go to)
        kwargs = {**timm_kwargs(ours.visual), "num_classes": 0}
        timm_vit = TimmViT(**kwargs, weight_init="skip").eval()
        keymap = timm_key_map(ours.visual, with_head=False)
        trunk = {k: v for k, v in ours.visual.state_dict().items() if not k.startswith("proj.")}
        timm_vit.load_state_dict(convert_state_dict(trunk, keymap, to="theirs"))
        check_parity(ours.visual.forward_features(images), timm_vit.forward_features(images))
    assert exported.keys() == load_file(plain["weights"]).keys()  # the tensors of a plain CLIP, no more


def test_caption_cli_decodes_all_three_tasks(trained: dict, tmp_path: Path) -> None:
    image = tmp_path / "shape.png"
    synthetic.make_sample(1, "heldout", 32).image.save(image)
    base = (f"checkpoint={trained['ckpt']}", f"image={image}", "device=cpu")
    caption = run_caption(_compose("caption", *base))[str(image)]
    assert isinstance(caption, str)
    box = run_caption(_compose("caption", *base, "task=box", "ref='the large yellow triangle'"))[str(image)]
    assert len(box) == 4 and all(0.0 <= c <= 1.0 for c in box)
    grounded = run_caption(
        _compose("caption", *base, "task=grounded", "box=[0.1,0.4,0.6,0.9]", "use_ema=true")
    )
    assert isinstance(grounded[str(image)], str)
    _, decoder, _ = load_captioner(trained["ckpt"])
    assert decoder.num_box_bins == 32 and not decoder.training


def test_caption_cli_reads_the_images_before_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    # an unreadable image failed only once the captioner (a SigLIP 2 checkpoint: gigabytes) was loaded
    import clipforge.caption_cli as caption_cli

    monkeypatch.setattr(
        caption_cli, "load_captioner", lambda *a, **k: pytest.fail("the checkpoint was loaded")
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        run_caption(_compose("caption", f"checkpoint={tmp_path / 'any.ckpt'}", f"image={broken}"))


def test_caption_cli_names_a_device_it_cannot_use_before_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import clipforge.caption_cli as caption_cli

    monkeypatch.setattr(
        caption_cli, "load_captioner", lambda *a, **k: pytest.fail("the checkpoint was loaded")
    )
    cfg = _compose(
        "caption", f"checkpoint={tmp_path / 'any.ckpt'}", f"image={tmp_path / 'a.png'}", "device=gpu"
    )
    with pytest.raises(ValueError, match=r"device='gpu' is not a device"):
        run_caption(cfg)


def test_training_batches_carry_the_generators_boxes_in_the_frame_of_each_crop(trained: dict) -> None:
    dm = trained["objs"]["datamodule"]
    ds = dm._dataset("train")
    dm.set_epoch(0)
    _, tokens, regions = next(iter(dm.train_dataloader()))  # objectives=locca: a third element, no keys
    assert regions["boxes"].shape == (16, 4) and regions["region_tokens"].shape == tokens.shape == (16, 20)
    # One worker, so the first batch's slot i is the epoch's i-th position: redo its crop from the same draws
    # and find which generated sample it is by its phrase (their boxes all differ: positions are jittered).
    rng = np.random.default_rng([0, 0, 0, 0, 0xC20])
    tok = Tokenizer(20)
    samples = [synthetic.make_sample(i, "train", 32).meta for i in range(64)]
    for i in range(16):
        draws = rng.random(CROP_DRAWS)
        phrase = tok.decode(regions["region_tokens"][i])
        box = regions["boxes"][i]
        if torch.isnan(box).all():
            assert phrase == ""
            continue
        matches = [m for m in samples if m["referring_expression"] == phrase]
        crop = ds.transform.box(32, 32, draws)
        assert any(box.tolist() == pytest.approx(in_crop(tuple(m["box"]), crop, (32, 32))) for m in matches)


def _locca_run(tmp_path: Path, steps: int, *overrides: str) -> tuple[dict, dict]:
    """A short run of RUN with objectives=locca alone, writing under tmp_path."""
    cfg = _compose(
        "train",
        *(o for o in RUN if not o.startswith(("objectives", "callbacks.zeroshot"))),
        "objectives=locca",
        *overrides,
    )
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(tmp_path / "data")
    return train(cfg)


def test_a_short_locca_run_trains_the_box_tasks_on_the_data_modules_boxes(tmp_path: Path) -> None:
    metrics, objs = _locca_run(tmp_path, 3)
    assert np.isfinite(metrics["train/locca_loss"]) and objs["trainer"].global_step == 3
    assert {"ref", "grounded"} & set(objs["module"].objectives["locca"].last_tasks)  # box tasks ran
    assert objs["datamodule"].stream.regions and "ema" not in objs["module"]._modules  # locca alone


def test_a_locca_run_with_parallel_prediction_trains_the_mask_token_and_still_captions(
    tmp_path: Path,
) -> None:
    metrics, objs = _locca_run(tmp_path, 2, "decoder.parallel_prob=0.5")
    assert np.isfinite(metrics["train/locca_loss"]) and objs["trainer"].global_step == 2
    locca = objs["module"].objectives["locca"]
    assert True in locca.last_parallel and False in locca.last_parallel  # seeded: a mixed batch
    token = locca.decoder.mask_token
    group = next(
        g for g in objs["trainer"].optimizers[0].param_groups if any(p is token for p in g["params"])
    )
    assert group["weight_decay"] == 0.0  # an embedding: no weight decay
    assert objs["trainer"].optimizers[0].state[token]["exp_avg"].abs().max() > 0  # it got gradients
    # the checkpoint's decoder, mask token included, loads strictly; decoding stays autoregressive
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _, decoder, _ = load_captioner(ckpt)
    assert torch.equal(decoder.mask_token, token.detach().cpu())
    image = tmp_path / "shape.png"
    synthetic.make_sample(1, "heldout", 32).image.save(image)
    out = run_caption(_compose("caption", f"checkpoint={ckpt}", f"image={image}", "device=cpu"))
    assert isinstance(out[str(image)], str)
