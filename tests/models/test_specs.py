"""Settings groups of the towers (clipforge.models.specs): one YAML node per group, flat settings for
converters and for checkpoints written before the groups existed."""

from __future__ import annotations

import re

import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from clipforge.checkpoint import build_model
from clipforge.models import TextTransformer, VisionTransformer
from clipforge.models.convert.config import model_config
from clipforge.models.decoder import TextDecoder
from clipforge.models.specs import (
    BlockSpec,
    SettingError,
    VisionLayout,
    as_spec,
    flat_settings,
    group_settings,
)

FLAT_VISION = dict(
    img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, output_dim=8, mlp_ratio=2.0,
    norm_eps=1e-5, act="gelu_tanh", init_values=0.1, drop_path_rate=0.1, pre_norm=True, patch_bias=False,
)  # fmt: skip


def test_flat_and_grouped_settings_build_the_same_tower() -> None:
    torch.manual_seed(0)
    flat = VisionTransformer.from_settings(**FLAT_VISION)
    torch.manual_seed(0)
    grouped = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, output_dim=8,
        block=BlockSpec(mlp_ratio=2.0, norm_eps=1e-5, act="gelu_tanh", init_values=0.1, drop_path_rate=0.1),
        layout={"pre_norm": True, "patch_bias": False},
    )  # fmt: skip
    assert flat.init_kwargs == grouped.init_kwargs
    for (k, a), (_, b) in zip(flat.state_dict().items(), grouped.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    settings = flat.settings
    assert {k: settings[k] for k in FLAT_VISION} == FLAT_VISION  # every flat setting reads back by its name
    assert flat.patch_embed.bias is None and flat.blocks[0].mlp.fc1.out_features == 64
    assert isinstance(flat.blocks[0].drop_path, torch.nn.Identity)  # stochastic depth: 0 at the first block
    assert flat.blocks[1].drop_path.p == pytest.approx(0.1)  # drop_path_rate at the last


def test_group_and_flat_are_inverse() -> None:
    grouped = group_settings(VisionTransformer.groups, FLAT_VISION)
    assert grouped["block"] == {
        "mlp_ratio": 2.0, "norm_eps": 1e-5, "act": "gelu_tanh", "init_values": 0.1, "drop_path_rate": 0.1
    }  # fmt: skip
    assert grouped["layout"] == {"pre_norm": True, "patch_bias": False}
    specs = {
        k: as_spec(VisionTransformer.groups[k], v) if k in ("block", "layout") else v
        for k, v in grouped.items()
    }
    for given in (specs, grouped):  # the groups as specs or as their mappings
        flat = flat_settings(VisionTransformer.groups, given)
        assert {k: flat[k] for k in FLAT_VISION} == FLAT_VISION
    assert group_settings(VisionTransformer.groups, grouped) == grouped  # grouped input stays as it is


def test_a_setting_given_twice_or_unknown_fails_naming_it() -> None:
    with pytest.raises(ValueError, match="'norm_eps' is given both flat and in 'block'"):
        group_settings(VisionTransformer.groups, {"norm_eps": 1e-5, "block": {"norm_eps": 1e-6}})
    with pytest.raises(TypeError, match=r"unknown BlockSpec setting\(s\) \['mlp_ration'\].*mlp_ratio"):
        VisionTransformer(img_size=16, patch_size=4, block={"mlp_ration": 2.0})
    with pytest.raises(TypeError, match="VisionLayout"):
        VisionTransformer(img_size=16, patch_size=4, layout=[1, 2])
    with pytest.raises(ValueError, match="no LayerScale or stochastic depth"):
        TextDecoder(64, 8, image_dim=16, embed_dim=16, depth=1, num_heads=2, block={"init_values": 0.1})


def test_tower_defaults_keep_their_layer_norm_eps() -> None:
    assert VisionTransformer(img_size=16, patch_size=4, depth=1).blocks[0].norm1.eps == 1e-6  # timm/SigLIP
    assert TextTransformer(vocab_size=64, context_length=8, depth=1).norm.eps == 1e-5  # CLIP
    assert as_spec(VisionLayout, None) == VisionLayout()


def test_a_flat_model_node_from_an_older_checkpoint_still_builds() -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    node = model_config(model)
    assert node["vision"]["block"]["norm_eps"] == 1e-5 and node["vision"]["layout"]["pre_norm"] is True
    legacy = dict(node)
    legacy["vision"] = {k: v for k, v in node["vision"].items() if k not in ("block", "layout")}
    legacy["vision"] |= node["vision"]["block"] | node["vision"]["layout"]
    legacy["text"] = {k: v for k, v in node["text"].items() if k != "block"} | node["text"]["block"]
    assert "norm_eps" in legacy["vision"] and "block" not in legacy["text"]
    rebuilt = build_model(legacy)
    assert model_config(rebuilt) == node
    rebuilt.load_state_dict(model.state_dict())  # same parameter names and shapes


def test_a_flat_decoder_node_from_an_older_checkpoint_still_builds() -> None:
    from hydra.utils import instantiate

    flat = {
        "_target_": "clipforge.models.decoder.TextDecoder", "vocab_size": 64, "context_length": 8,
        "image_dim": 16, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_box_bins": 8, "mlp_ratio": 2.0,
        "qkv_bias": True, "norm_eps": 1e-5, "act": "gelu", "fused_attn": True,
    }  # fmt: skip
    node = group_settings(TextDecoder.groups, flat)  # as clipforge.checkpoint.load_captioner does
    assert node["block"] == {
        "mlp_ratio": 2.0,
        "qkv_bias": True,
        "norm_eps": 1e-5,
        "act": "gelu",
        "fused_attn": True,
    }
    decoder = instantiate(OmegaConf.create(node))
    assert decoder.blocks[0].mlp.fc1.out_features == 32 and decoder.norm.eps == 1e-5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"drop_path_rate": 1.5}, r"block\.drop_path_rate must be in \[0, 1\)"),
        ({"drop_path_rate": -0.1}, r"block\.drop_path_rate"),
        ({"mlp_ratio": 0}, r"block\.mlp_ratio and block\.norm_eps must be > 0"),
        ({"norm_eps": -1e-6}, r"block\.mlp_ratio and block\.norm_eps must be > 0"),
    ],
)
def test_block_settings_out_of_range_fail_when_the_tower_is_built(settings, message) -> None:
    """drop_path_rate=1.5 built, then failed at the first training step inside torch.bernoulli_."""
    with pytest.raises(ValueError, match=message):
        VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, block=settings)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        # these built silently: a non-empty string is true, so class_token='no' kept the class token
        ("vision.class_token", "no", "true or false"),
        ("text.causal", "maybe", "true or false"),
        ("vision.block.qkv_bias", "false", "true or false"),
        ("vision.layout.fc_norm", "yes", "true or false or null"),
        ("text.context_length", 0, "an integer >= 1"),
        # these failed deep in torch ("'<' not supported between 'str' and 'int'"), naming no key
        ("vision.depth", "two", "an integer >= 1"),
        ("vision.img_size", 32.0, "an integer >= 1"),
        ("vision.num_heads", 0, "an integer >= 1"),
        ("text.block.norm_eps", "1e-5", "a number"),
        ("vision.patch_dropout", "0.1", "a number"),
        ("vision.output_dim", "64", "an integer >= 1 or null"),
        ("init_logit_scale", "big", "a number or null"),
    ],
)
def test_a_model_setting_of_the_wrong_type_is_named_in_full(key: str, value, expected: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    OmegaConf.update(cfg, key, value)
    with pytest.raises(InstantiationException, match=rf"model\.{re.escape(key)} must be {expected}, got"):
        build_model(cfg)


def test_settings_of_the_right_type_still_build() -> None:
    # an int where a float is asked for is a number (YAML and Hydra read "0" and "4" as ints)
    tower = VisionTransformer.from_settings(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=4, patch_dropout=0
    )
    assert tower.settings["mlp_ratio"] == 4
    with pytest.raises(SettingError, match=r"^block\.act must be a string, got 1$"):
        BlockSpec(act=1)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # the towers' own checks named neither the tower nor the key: "dim 100 must be divisible by num_heads 3"
        ("vision.embed_dim", 100, r"^model\.vision: embed_dim=100 must be divisible by num_heads=3"),
        ("text.embed_dim", 100, r"^model\.text: embed_dim=100 must be divisible by num_heads=3"),
        ("vision.patch_size", 5, r"^model\.vision: patch_size=5 must divide img_size=32"),
        ("text.pool_type", "eos", r"^model\.text: pool_type must be 'eot' or 'last', got 'eos'"),
        ("text.weight_init", "xavier", r"^model\.text: unknown weight_init 'xavier'"),
        ("vision.output_dim", 64, r"^model\.vision\.output_dim=64 and model\.text\.output_dim=96 differ"),
        # built, then failed at the first step with math.log's bare "math domain error"
        ("max_logit_scale", 0, r"^model\.max_logit_scale must be > 0"),
        ("max_logit_scale", -100.0, r"^model\.max_logit_scale must be > 0"),
    ],
)
def test_a_model_setting_out_of_range_names_its_tower_and_key(key: str, value, message: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)
