"""ViT pictures: what they show is checked on models whose attention and position embeddings are known."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from clipforge.conf import CONF_DIR
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from modelhelpers import perturb_, small_text, small_vit, tokens
from omegaconf import OmegaConf
from PIL import Image

from clipforge.callbacks.attention import AttentionMapCallback
from clipforge.models import CLIP, VisionTransformer
from clipforge.models.convert import export_open_clip, model_config
from clipforge.viz import cli as viz_cli
from clipforge.viz import (
    figure_to_array,
    pos_embed_similarity,
    record_attention,
    save_vit_pictures,
    vit_attention,
)
from clipforge.viz.attention import similarity_mosaic
from clipforge.viz.cli import main

CONF = CONF_DIR / "model"


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[8:24, 16:40] = (255, 40, 200)
    pixels[..., 1] = np.linspace(0, 255, 64, dtype=np.uint8)[None]
    Image.fromarray(pixels).save(tmp_path / "input.png")
    return tmp_path / "input.png"


def spotlight_vit(row: int, col: int) -> VisionTransformer:
    """One block whose CLS query (read from channel 0, set only on CLS) matches only the key of patch
    (row, col) (read from channel 1, set only there): the CLS token's attention in head 0 must be
    concentrated on that patch, whatever the image (the patch conv is zero)."""
    vit = small_vit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        vit.cls_token[0, 0, 0] = 10.0
        vit.pos_embed[0, 1 + row * 4 + col, 1] = 10.0
        vit.blocks[0].attn.qkv.weight[0, 0] = 1.0  # q channel 0 of head 0 reads channel 0
        vit.blocks[0].attn.qkv.weight[32, 1] = 1.0  # k channel 0 of head 0 reads channel 1
    return vit


def test_pos_embed_similarity_diagonal_is_one_and_mosaic_tiles_line_up() -> None:
    torch.manual_seed(0)
    vit = small_vit(img_size=32, patch_size=4)  # 8x8 grid
    sim = pos_embed_similarity(vit)
    assert sim.shape == (64, 64)
    assert torch.allclose(sim.diagonal(), torch.ones(64), atol=1e-6)
    assert torch.allclose(sim, sim.T, atol=1e-6) and sim.abs().max() <= 1 + 1e-6
    with torch.no_grad():  # patches (0, 0) and (5, 3) share a position embedding
        vit.pos_embed[0, 1 + 5 * 8 + 3] = vit.pos_embed[0, 1]
    mosaic = similarity_mosaic(pos_embed_similarity(vit))
    assert mosaic.shape == (8 * 9 - 1, 8 * 9 - 1)
    for r, c in [(0, 0), (2, 7), (5, 3)]:
        assert math.isclose(mosaic[r * 9 + r, c * 9 + c], 1.0, abs_tol=1e-5)  # tile (r, c), pixel (r, c)
    assert math.isclose(mosaic[0 * 9 + 5, 0 * 9 + 3], 1.0, abs_tol=1e-5)  # tile (0, 0) lights up (5, 3)
    assert np.isnan(mosaic[8, :]).all() and np.isnan(mosaic[:, 8]).all()  # separators


def test_record_attention_keeps_probabilities_and_restores_the_fast_path() -> None:
    torch.manual_seed(0)
    vit = perturb_(small_vit(global_pool="map", class_token=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        with record_attention(vit) as rec:
            recorded = vit(x)
    assert torch.allclose(plain, recorded, atol=1e-5)  # the math path computes the same thing
    assert [a.shape for a in rec["blocks"]] == [(2, 4, 16, 16)] * 2 and rec["pool"][0].shape == (2, 4, 1, 16)
    for a in [*rec["blocks"], *rec["pool"]]:
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5) and (a >= 0).all()
    assert not any(
        m.keep_attn or m.last_attn is not None for m in [*(b.attn for b in vit.blocks), vit.attn_pool]
    )


@pytest.mark.parametrize(("row", "col"), [(0, 3), (2, 1)])
def test_cls_attention_and_rollout_point_at_the_attended_patch(row: int, col: int) -> None:
    data = vit_attention(spotlight_vit(row, col), torch.randn(1, 3, 32, 32))
    heads, flow = data["heads"], data["rollout"]
    assert heads.shape == (4, 4, 4) and data["query"] == "CLS token, layer 0"
    assert divmod(int(heads[0].argmax()), 4) == (row, col) and heads[0, row, col] > 0.9
    assert torch.allclose(heads[1], torch.full((4, 4), 1 / 17))  # other heads: q = 0, uniform over 17 tokens
    assert divmod(int(flow.argmax()), 4) == (row, col)
    assert math.isclose(flow.sum().item(), 1.0, rel_tol=1e-5)


def test_attention_pool_query_is_drawn_for_map_towers() -> None:
    torch.manual_seed(0)
    vit = small_vit(global_pool="map", class_token=False).eval()
    with torch.no_grad():  # a zero query attends uniformly over the 16 patches
        vit.attn_pool.q.weight.zero_()
        vit.attn_pool.q.bias.zero_()
    data = vit_attention(vit, torch.randn(3, 3, 32, 32))
    assert data["query"] == "attention-pool query" and data["heads"].shape == (4, 4, 4)
    assert torch.allclose(data["heads"], torch.full((4, 4, 4), 1 / 16), atol=1e-6)
    assert math.isclose(data["rollout"].sum().item(), 1.0, rel_tol=1e-5)


def test_a_layer_other_than_the_last_is_refused_where_the_pool_query_is_drawn() -> None:
    # --layer 0 on an attention-pool (siglip_b16) tower drew the pool query, the picture of the default, as
    # if it were layer 0's attention
    vit = small_vit(global_pool="map", class_token=False).eval()
    with pytest.raises(ValueError, match=r"layer 0: this tower reads out with an attention-pool query"):
        vit_attention(vit, torch.randn(1, 3, 32, 32), layer=0)
    assert vit_attention(vit, torch.randn(1, 3, 32, 32), layer=len(vit.blocks) - 1)["query"] == (
        "attention-pool query"
    )  # the last block, by either index, is where the query reads


def test_a_layer_beyond_the_tower_is_named() -> None:
    # --layer 7 on a 2-block tower raised "IndexError: range object index out of range"
    vit = small_vit().eval()
    depth = len(vit.blocks)
    for layer in (depth, -depth - 1):
        with pytest.raises(
            ValueError, match=rf"layer {layer} is not a block of this {depth}-block image tower"
        ):
            vit_attention(vit, torch.randn(1, 3, 32, 32), layer=layer)
    assert vit_attention(vit, torch.randn(1, 3, 32, 32), layer=-depth)["layer"] == 0


def test_save_pictures_writes_small_non_blank_pngs(image_file: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CLIP(perturb_(small_vit(img_size=32, patch_size=4)), small_text()).train()
    paths = save_vit_pictures(model, image_file, tmp_path / "out", layer=0)
    assert set(paths) == {"patch_grid", "pos_embed_similarity", "attention_heads", "attention_rollout"}
    for path in paths.values():
        assert path.stat().st_size < 200_000
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert min(pixels.shape[:2]) > 100 and pixels.std() > 10, path.name
    assert model.training  # the pictures ran in eval mode and put the mode back


def test_cli_names_an_unreadable_image(image_file: Path, tmp_path: Path) -> None:
    """A truncated JPEG stopped clipforge-visualize with PIL's bare "image file is truncated", naming no file."""
    broken = tmp_path / "broken.jpg"
    Image.open(image_file).save(broken, quality=95)
    broken.write_bytes(broken.read_bytes()[:-300])
    with pytest.raises(
        ValueError, match=r"cannot read image .*broken\.jpg: OSError: image file is truncated"
    ):
        main(["--image", str(broken), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("out", "problem"),
    [("taken.png", "it is a file"), ("taken.png/viz", "it cannot be a folder: {taken} is a file")],
)
def test_an_out_path_that_cannot_be_a_folder_fails_before_the_model_loads(
    image_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out: str,
    problem: str,
) -> None:
    """--out naming a file (or a folder under one) failed with mkdir's traceback once the model was built
    (a checkpoint loaded)."""
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"a picture already")
    monkeypatch.setattr(viz_cli, "build_fresh", lambda *args: pytest.fail("the model was built"))
    argv = ["clipforge-visualize", "--image", str(image_file), "--out", str(tmp_path / out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert viz_cli.cli() == 1
    expected = f"clipforge-visualize: --out {tmp_path / out}: {problem.format(taken=taken)}"
    assert capsys.readouterr().err.splitlines() == [expected]
    assert taken.read_bytes() == b"a picture already"


@pytest.mark.parametrize("content", [None, b"not an image"], ids=["missing", "not_an_image"])
def test_an_image_that_cannot_be_read_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], content: bytes | None
) -> None:
    # --image was first opened once the model was loaded (minutes for a large checkpoint)
    image = tmp_path / "photo.jpg"
    if content is not None:
        image.write_bytes(content)
    monkeypatch.setattr(viz_cli, "build_fresh", lambda *args: pytest.fail("the model was built"))
    monkeypatch.setattr(
        sys, "argv", ["clipforge-visualize", "--image", str(image), "--out", str(tmp_path / "o")]
    )
    assert viz_cli.cli() == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"clipforge-visualize: cannot read image {image}: ")


def test_cli_with_fresh_model_checkpoint_and_open_clip_export(image_file: Path, tmp_path: Path) -> None:
    fresh = main(["--image", str(image_file), "--model", "tiny", "--out", str(tmp_path / "fresh")])
    assert all(p.is_file() for p in fresh.values())
    # A clipforge Lightning checkpoint carries its config; build one by hand from the tiny config.
    torch.manual_seed(1)
    model = perturb_(instantiate_tiny()).eval()
    cfg = {"model": OmegaConf.to_container(OmegaConf.load(CONF / "tiny.yaml"))}
    ckpt = {"clipforge_config": cfg, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "run.ckpt")
    out = main(
        ["--image", str(image_file), "--checkpoint", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "c")]
    )
    export_open_clip(model, tmp_path / "oc")
    out_oc = main(
        ["--image", str(image_file), "--open-clip", str(tmp_path / "oc"), "--out", str(tmp_path / "o")]
    )
    # The same weights through both loaders draw the same position-embedding picture.
    assert out["pos_embed_similarity"].read_bytes() == out_oc["pos_embed_similarity"].read_bytes()
    assert out["pos_embed_similarity"].read_bytes() != fresh["pos_embed_similarity"].read_bytes()


def test_cli_draws_the_ema_weights_of_a_checkpoint_when_asked(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint trained with ema=default holds two models; only the training weights could be drawn."""
    torch.manual_seed(1)
    trained = perturb_(CLIP(small_vit(img_size=32, patch_size=4, patch_bias=False), small_text()), seed=1)
    ema = perturb_(copy.deepcopy(trained), seed=2)
    cfg = {"model": model_config(trained), "ema": {"decay": 0.999}}
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    state |= {f"ema.shadow.model.{k}": v for k, v in ema.state_dict().items()}
    torch.save({"clipforge_config": cfg, "state_dict": state}, tmp_path / "run.ckpt")
    args = ["--image", str(image_file), "--checkpoint", str(tmp_path / "run.ckpt")]
    drawn = main([*args, "--ema", "--out", str(tmp_path / "ema")])
    assert "EMA" not in capsys.readouterr().err
    main([*args, "--out", str(tmp_path / "trained")])
    assert "also holds EMA weights: drawing the training weights" in capsys.readouterr().err
    expected = save_vit_pictures(ema.eval(), image_file, tmp_path / "o")
    picture = "pos_embed_similarity"
    assert drawn[picture].read_bytes() == expected[picture].read_bytes()
    assert (tmp_path / "trained" / f"{picture}.png").read_bytes() != expected[picture].read_bytes()
    with pytest.raises(SystemExit):  # --ema without a checkpoint: argparse's usage error
        main(["--image", str(image_file), "--ema", "--out", str(tmp_path / "x")])
    assert "--ema reads the EMA weights of a clipforge checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("source", [[], ["--model", "tiny"]])
def test_cli_refuses_an_open_clip_model_name_without_open_clip_weights(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], source: list[str]
) -> None:
    """--open-clip-model ViT-B-32 without --open-clip drew a fresh tiny model, named nowhere in the output."""
    with pytest.raises(SystemExit):
        main(
            [
                "--image",
                str(image_file),
                *source,
                "--open-clip-model",
                "ViT-B-32",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert "--open-clip-model names the architecture of --open-clip weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def instantiate_tiny() -> CLIP:
    from hydra.utils import instantiate

    return instantiate(OmegaConf.load(CONF / "tiny.yaml"))


class RecordingWandb(WandbLogger):
    """A WandbLogger that records images instead of starting a run."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.logged: list[tuple[str, int, tuple[int, ...]]] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: object) -> None:
        self.logged += [(key, step, np.asarray(img).shape) for img in images]


def test_callback_logs_every_n_steps_to_wandb_only() -> None:
    torch.manual_seed(0)
    model = CLIP(small_vit(), small_text()).train()
    batch = (torch.randn(4, 3, 32, 32), tokens(4, 12))
    wandb = RecordingWandb()
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[CSVLogger("unused"), wandb])
    callback = AttentionMapCallback(every_n_steps=2)
    # (global_step as the batch starts, as it ends): (2, 2) accumulated gradients without a step
    for start, end in [(1, 2), (2, 2), (2, 3), (3, 4), (4, 5)]:
        trainer.global_step = start  # Lightning's logger step for the batch (its scalars' row)
        callback.on_train_batch_start(trainer, SimpleNamespace(model=model), batch, 0)
        trainer.global_step = end
        callback.on_train_batch_end(trainer, SimpleNamespace(model=model), None, batch, 0)
    assert sorted({(k, s) for k, s, _ in wandb.logged}) == sorted(
        (f"viz/{n}", s)
        for n in ("patch_grid", "pos_embed_similarity", "attention_heads", "attention_rollout")
        for s in (1, 3)  # drawn after steps 2 and 4, in the rows of their scalars
    )
    assert len(wandb.logged) == 8 and all(len(shape) == 3 and shape[2] == 3 for _, _, shape in wandb.logged)
    assert model.training
    trainer.loggers = [CSVLogger("unused")]  # no W&B: nothing to do, no error
    trainer.global_step = 6
    callback.on_train_batch_end(trainer, SimpleNamespace(model=model), None, batch, 0)
    assert len(wandb.logged) == 8


def test_figure_to_array_is_rgb() -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([0, 1])
    assert figure_to_array(fig).shape == (50, 100, 3)


def test_model_config_round_trip_rebuilds_the_same_architecture() -> None:
    from clipforge.models.convert import instantiate_model

    model = CLIP(small_vit(global_pool="map", class_token=False), small_text(), init_logit_bias=-10.0)
    rebuilt = instantiate_model(model_config(model))
    assert model_config(rebuilt)["vision"] == model_config(model)["vision"]
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
