"""Our CLIP <-> open_clip: equal parameter counts, encode_image, encode_text and logits (fp32, <= 1e-5);
export to a folder open_clip loads; import of open_clip checkpoint files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clipforge.conf import CONF_DIR
from hydra.utils import instantiate
from modelhelpers import perturb_, randomize_, small_text, small_vit, tokens
from omegaconf import OmegaConf
from open_clip.model import CLIP as OpenCLIP
from open_clip.model import CustomTextCLIP

from clipforge.models import CLIP
from clipforge.models.convert import (
    ParityError,
    check_parity,
    convert_state_dict,
    count_params,
    export_open_clip,
    from_open_clip,
    load_open_clip_checkpoint,
    model_config,
    model_config_from_open_clip,
    open_clip_key_map,
    open_clip_model_cfg,
    to_open_clip,
)
from clipforge.models.convert.keymap import Rule
from clipforge.models.vision import resample_pos_embed

CONF = CONF_DIR / "model"
SMALL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2},
}


def small_cfg(vision: dict | None = None, text: dict | None = None, **top: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(SMALL)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    cfg.update(top)
    return cfg


def open_clip_model(cfg: dict[str, Any]) -> torch.nn.Module:
    cfg = dict(cfg)
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else OpenCLIP
    return cls(**cfg)


def assert_same_clip(
    ours: CLIP, reference: torch.nn.Module, images: torch.Tensor, text: torch.Tensor
) -> None:
    with torch.no_grad():
        img, txt = ours.encode_image(images), ours.encode_text(text)
        check_parity(img, reference.encode_image(images), what="encode_image")
        check_parity(txt, reference.encode_text(text), what="encode_text")
        out = ours(images, text)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        if out["logit_bias"] is not None:
            logits = logits + out["logit_bias"]
        check_parity(
            logits,
            reference.get_logits(images, text)[0],
            atol=1e-4 * logits.abs().max().item(),
            what="logits",
        )
        assert torch.allclose(out["image_features"], F.normalize(img, dim=-1))


@pytest.fixture(scope="module")
def b32() -> SimpleNamespace:
    torch.manual_seed(0)
    with torch.device("meta"):  # random weights of our own: skips open_clip's slow init on 2 cores
        reference = OpenCLIP(**open_clip.get_model_config("ViT-B-32"))
    reference = reference.to_empty(device="cpu")
    reference.attn_mask = reference.attn_mask.new_full(reference.attn_mask.shape, float("-inf")).triu_(1)
    randomize_(reference).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(2.0)
    return SimpleNamespace(
        reference=reference, ours=from_open_clip(reference, open_clip.get_model_config("ViT-B-32"))
    )


def test_vit_b32_clip_matches_open_clip(b32: SimpleNamespace) -> None:
    assert count_params(b32.ours) == count_params(b32.reference) == 151_277_313
    images = torch.randn(2, 3, 224, 224)
    text = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog", "a diagram"])
    assert_same_clip(b32.ours.eval(), b32.reference, images, text)


VARIANTS = {
    "plain": small_cfg(),
    "quick_gelu": small_cfg(quick_gelu=True),
    "avg_pool_ln_after": small_cfg(vision={"pool_type": "avg", "final_ln_after_pool": True}),
    "tok_ln_after_no_ln_pre": small_cfg(vision={"final_ln_after_pool": True, "no_ln_pre": True}),
    "layer_scale": small_cfg(vision={"ls_init_value": 0.1}, text={"ls_init_value": 0.1}),
    "siglip_text": small_cfg(
        text={
            "no_causal_mask": True,
            "pool_type": "last",
            "proj_bias": True,
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
        vision={"norm_kwargs": {"eps": 1e-6}},
        custom_text=True,
        init_logit_bias=-10.0,
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_open_clip_variants_match_both_ways(name: str) -> None:
    torch.manual_seed(0)
    cfg = VARIANTS[name]
    reference = perturb_(open_clip_model(cfg)).eval()
    ours = from_open_clip(reference, cfg).eval()
    assert count_params(ours) == count_params(reference)
    images, text = torch.randn(3, 3, 32, 32), tokens(3, 12)
    assert_same_clip(ours, reference, images, text)
    assert_same_clip(ours, to_open_clip(ours).eval(), images, text)


def test_a_wrong_open_clip_key_map_fails_the_check() -> None:
    torch.manual_seed(0)
    reference = perturb_(open_clip_model(SMALL)).eval()
    ours = from_open_clip(reference, SMALL).eval()
    swap = {"transformer.resblocks.0.ln_1.weight": "transformer.resblocks.0.ln_2.weight"}
    swap |= {v: k for k, v in swap.items()}
    wrong = [Rule(r.ours, tuple(swap.get(k, k) for k in r.theirs), r.to_theirs, r.to_ours) for r in
             open_clip_key_map(ours, SMALL)]  # fmt: skip
    ours.load_state_dict(convert_state_dict(reference.state_dict(), wrong, to="ours"))
    with pytest.raises(ParityError):
        assert_same_clip(ours, reference, torch.randn(2, 3, 32, 32), tokens(2, 12))


def tiny_clip_from_conf(logit_bias: float | None = None) -> CLIP:
    torch.manual_seed(0)
    model = instantiate(OmegaConf.load(CONF / "tiny.yaml"), init_logit_bias=logit_bias)
    return perturb_(model).eval()


def test_export_is_loaded_by_open_clip_with_equal_embeddings(tmp_path: Path) -> None:
    model = tiny_clip_from_conf(logit_bias=-10.0)
    paths = export_open_clip(model, tmp_path / "export", name="clipforge-test-tiny")
    assert {p.name for p in (tmp_path / "export").iterdir()} == {
        "open_clip_config.json",
        "clipforge-test-tiny.json",
        "open_clip_model.safetensors",
    }
    assert json.loads(paths["config"].read_text())["preprocess_cfg"]["size"] == 32
    images, text = torch.randn(2, 3, 32, 32), tokens(2, model.text.context_length, vocab=49408)
    from_dir = open_clip.create_model(f"local-dir:{paths['config'].parent}").eval()
    assert_same_clip(model, from_dir, images, text)
    open_clip.add_model_config(paths["model_config"])
    by_name = open_clip.create_model("clipforge-test-tiny", pretrained=str(paths["weights"])).eval()
    assert_same_clip(model, by_name, images, text)
    assert by_name.logit_bias.item() == model.logit_bias.item()
    # ... and importing the folder gives our model back, config included.
    back = load_open_clip_checkpoint(paths["config"].parent)
    assert_same_clip(back, from_dir, images, text)
    assert model_config(back)["vision"] == model_config(model)["vision"]


def test_a_failed_re_export_leaves_the_previous_export_whole(tmp_path: Path, monkeypatch) -> None:
    """The config files were written in place before the weights: an export into the folder of an earlier
    one that failed while writing the weights (a crash, a full disk) paired the new config with the old
    weights. Every file is written aside first and swapped in once all are written."""
    import safetensors.torch

    out = tmp_path / "export"
    export_open_clip(tiny_clip_from_conf(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.manual_seed(1)
    other = instantiate(OmegaConf.load(CONF / "tiny.yaml"), vision={"depth": 1}).eval()

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_open_clip(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_logit_scale_above_the_cap_is_exported_as_the_scale_the_model_uses(tmp_path: Path) -> None:
    # Our forward caps the scale at max_logit_scale; open_clip's does not. The stored log-scale can lie
    # above the cap: the EMA copy of a 2-step run with +model.max_logit_scale=10 ema=default held 2.656
    # (CLIP's initial log(1/0.07) averaged with the clamped 2.303), and the export gave open_clip 14.2, not 10.
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF / "tiny.yaml")
    model = perturb_(instantiate(cfg, init_logit_scale=math.log(1 / 0.07), max_logit_scale=10.0)).eval()
    assert model.logit_scale.item() > math.log(model.max_logit_scale)
    images, text = torch.randn(2, 3, 32, 32), tokens(2, model.text.context_length, vocab=49408)
    export_open_clip(model, tmp_path / "export")
    assert_same_clip(model, open_clip.create_model(f"local-dir:{tmp_path / 'export'}").eval(), images, text)
    assert_same_clip(model, to_open_clip(model).eval(), images, text)
    assert model.logit_scale.item() > math.log(model.max_logit_scale)  # the model itself is left as it was


def test_an_imported_logit_scale_above_ln_100_gives_open_clips_logits(tmp_path: Path) -> None:
    # SigLIP models ported from big_vision carry exp(logit_scale) ~ 117 and more; open_clip's forward uses it
    # uncapped, so the import raises its cap to the stored scale (our default cap of 100 changed the logits).
    torch.manual_seed(0)
    cfg = VARIANTS["siglip_text"]
    reference = perturb_(open_clip_model(cfg)).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(math.log(117.33))
    images, text = torch.randn(3, 3, 32, 32), tokens(3, 12)
    ours = from_open_clip(reference, cfg).eval()
    assert ours.max_logit_scale > 117 and torch.equal(ours.scale_and_bias()[0], reference.logit_scale.exp())
    assert_same_clip(ours, reference, images, text)
    # the cap is part of its config: the clipforge-convert import rebuilds the same model from its files
    torch.save(reference.state_dict(), tmp_path / "weights.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    from clipforge.checkpoint import load_model
    from clipforge.convert_cli import main as convert_main

    paths = convert_main(
        ["import", "--open-clip", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "imp")]
    )
    rebuilt, stored = load_model(paths["checkpoint"])
    assert stored["model"]["max_logit_scale"] == ours.max_logit_scale
    assert_same_clip(rebuilt.eval(), reference, images, text)


def test_import_a_training_checkpoint_by_model_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = perturb_(open_clip_model(SMALL)).eval()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "clipforge-test-small.json").write_text(json.dumps(SMALL))
    open_clip.add_model_config(tmp_path / "cfg" / "clipforge-test-small.json")
    # open_clip's trainer saves {"state_dict": ...} with DDP's "module." prefix.
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    ours = load_open_clip_checkpoint(tmp_path / "epoch_3.pt", "clipforge-test-small")
    assert not ours.training
    assert_same_clip(ours, reference, torch.randn(2, 3, 32, 32), tokens(2, 12))


def test_import_infers_the_architecture_from_weight_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(vision={"width": 64, "head_width": 64}, text={"width": 64, "heads": 1}, embed_dim=24)
    reference = perturb_(open_clip_model(cfg)).eval()
    torch.save(reference.state_dict(), tmp_path / "weights.bin")
    with pytest.warns(UserWarning, match="inferring"):
        ours = load_open_clip_checkpoint(tmp_path / "weights.bin")
    assert ours.visual.blocks[0].attn.num_heads == 1 and ours.embed_dim == 24
    assert_same_clip(ours, reference, torch.randn(2, 3, 32, 32), tokens(2, 12))


def test_import_without_a_name_takes_the_heads_of_open_clips_config_of_that_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ViT-H-14's image heads are 80 wide, ViT-g-14's 88, ViT-bigG-14's 104 (their text heads 64): assuming 64
    # split them into other heads than they trained with, and the imported model computed other features,
    # with only a warning that it assumed 64. The weight shapes match one open_clip config: its heads apply.
    torch.manual_seed(0)
    cfg = small_cfg(vision={"width": 96, "head_width": 48}, text={"width": 64, "heads": 2}, embed_dim=24)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "clipforge-test-wide-heads", cfg)
    reference = perturb_(open_clip_model(cfg)).eval()
    torch.save(reference.state_dict(), tmp_path / "weights.bin")
    with pytest.warns(UserWarning, match=r"the shapes of open_clip's clipforge-test-wide-heads: its heads"):
        ours = load_open_clip_checkpoint(tmp_path / "weights.bin")
    assert ours.visual.blocks[0].attn.num_heads == 2 and ours.text.blocks[0].attn.num_heads == 2
    assert_same_clip(ours, reference, torch.randn(2, 3, 32, 32), tokens(2, 12))
    # two configs of these shapes with other heads: which is meant cannot be told, so nothing is picked
    other = small_cfg(vision={"width": 96, "head_width": 32}, text={"width": 64, "heads": 2}, embed_dim=24)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "clipforge-test-other-heads", other)
    with pytest.warns(
        UserWarning, match=r"clipforge-test-other-heads, clipforge-test-wide-heads.*other heads"
    ):
        guessed = load_open_clip_checkpoint(tmp_path / "weights.bin")
    assert guessed.visual.blocks[0].attn.num_heads == 1  # 64-wide, as said


def test_import_at_another_image_size_resamples_the_position_grid(tmp_path: Path) -> None:
    model = tiny_clip_from_conf()
    export_open_clip(model, tmp_path)
    bigger = load_open_clip_checkpoint(tmp_path, img_size=48)  # 8x8 -> 12x12 patches of 4 px
    width = model.visual.embed_dim
    assert bigger.visual.img_size == 48 and bigger.visual.pos_embed.shape == (1, 1 + 144, width)
    expected = resample_pos_embed(model.visual.pos_embed.detach(), 12, num_prefix_tokens=1)
    assert torch.allclose(bigger.visual.pos_embed, expected)
    assert torch.equal(bigger.visual.pos_embed[:, 0], model.visual.pos_embed[:, 0])  # CLS untouched
    with torch.no_grad():
        assert bigger.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, model.embed_dim)
        t = tokens(2, model.text.context_length, vocab=49408)
        assert torch.equal(bigger.encode_text(t), model.encode_text(t))


def test_unsupported_models_fail_loudly() -> None:
    with torch.device("meta"):
        siglip = instantiate(OmegaConf.load(CONF / "siglip_b16.yaml"))
    # timm's SigLIP B/16 (what open_clip builds) uses exact GELU; ours uses big_vision's tanh-GELU, and
    # open_clip's act_kwargs do not reach a timm tower: the error names the image tower's activation.
    with pytest.raises(
        ValueError, match=r"image tower's act='gelu_tanh' is what has no open_clip .*act_kwargs"
    ):
        open_clip_model_cfg(siglip)
    with pytest.raises(ValueError, match="patch_bias"):
        open_clip_model_cfg(CLIP(small_vit(patch_bias=True), small_text()))
    with pytest.raises(ValueError, match="attentional pooler"):
        from_open_clip(torch.nn.Linear(1, 1), small_cfg(vision={"attentional_pool": True}))


def test_an_avg_pooled_timm_tower_with_a_projection_is_checked_against_the_trunk_open_clip_builds() -> None:
    # With timm_proj="linear" open_clip builds vit_base_patch16_siglip_224 as registered (attention pooling,
    # final norm before the pool) and resets its pooling to avg, keeping that norm. Matched against a trunk
    # built with global_pool="avg" (final norm after the pool), the export of our default avg tower (fc_norm
    # after the pool) was written, and open_clip could not load it (missing trunk.norm, unexpected fc_norm).
    cfg = OmegaConf.load(CONF / "siglip_b16.yaml")
    cfg.vision.block.act = "gelu"
    cfg.vision.global_pool = "avg"
    cfg.vision.output_dim = cfg.text.output_dim = 512
    with torch.device("meta"):
        model = instantiate(cfg)
    with pytest.raises(ValueError, match=r"vit_base_patch16_siglip_224 differs .*'fc_norm': \(True, False\)"):
        open_clip_model_cfg(model)
    cfg.vision.layout.fc_norm = False  # the final norm before the pool: what open_clip's trunk has
    with torch.device("meta"):
        model = instantiate(cfg)
    vision_cfg = open_clip_model_cfg(model)["vision_cfg"]
    assert (vision_cfg["timm_model_name"], vision_cfg["timm_proj"]) == (
        "vit_base_patch16_siglip_224",
        "linear",
    )


def test_an_open_clip_model_of_another_tokenizer_is_named_on_import() -> None:
    # open_clip's SigLIP configs name a SentencePiece tokenizer; the import said nothing, and clipforge then
    # fed it CLIP BPE ids (out of its table, or other tokens)
    text = {"vocab_size": 32000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}
    with pytest.warns(UserWarning, match=r"'timm/ViT-B-16-SigLIP' .* 32000-token vocabulary; clipforge"):
        model_config_from_open_clip(small_cfg(text=text, custom_text=True))


@pytest.mark.slow
def test_siglip_b16_exports_through_timm_tower(tmp_path: Path) -> None:
    # open_clip builds SigLIP image towers as timm models; ours must have the exact timm architecture.
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF / "siglip_b16.yaml")
    cfg.vision.block.act = "gelu"
    cfg.text.depth = 2
    model = randomize_(instantiate(cfg, init_logit_bias=-10.0)).eval()
    paths = export_open_clip(model, tmp_path)
    assert json.loads(paths["config"].read_text())["model_cfg"]["vision_cfg"]["timm_model_name"] == (
        "vit_base_patch16_siglip_224"
    )
    reference = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    assert_same_clip(model, reference, torch.randn(1, 3, 224, 224), tokens(2, 64, vocab=49408))


def test_towers_match_open_clip_transformer_modules() -> None:
    from open_clip.transformer import TextTransformer as OpenTextTransformer
    from open_clip.transformer import VisionTransformer as OpenVisionTransformer

    from clipforge.models.convert.openclip import text_key_map, vision_key_map

    torch.manual_seed(0)
    ref_vit = OpenVisionTransformer(
        image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=4.0, output_dim=16
    )
    ref_text = OpenTextTransformer(
        context_length=12, vocab_size=100, width=32, heads=4, layers=2, output_dim=16
    )
    perturb_(ref_vit), perturb_(ref_text)
    vit = small_vit(pre_norm=True, patch_bias=False, norm_eps=1e-5).eval()
    text = small_text().eval()
    vit.load_state_dict(convert_state_dict(ref_vit.state_dict(), vision_key_map(vit, {}), to="ours"))
    text.load_state_dict(convert_state_dict(ref_text.state_dict(), text_key_map(text), to="ours"))
    x, t = torch.randn(2, 3, 32, 32), tokens(2, 12)
    with torch.no_grad():
        check_parity(vit(x), ref_vit.eval()(x))
        check_parity(text(t), ref_text.eval()(t))
