"""Our SigLIP-style image tower (no CLS, attention-pool head) <-> transformers' SiglipVisionModel."""

from __future__ import annotations

import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra.utils import instantiate
from modelhelpers import perturb_
from omegaconf import OmegaConf
from transformers import SiglipVisionConfig, SiglipVisionModel

from clipforge.models.convert import (
    ParityError,
    check_parity,
    convert_state_dict,
    count_params,
    from_hf_siglip,
    siglip_key_map,
    siglip_vision_config,
    to_hf_siglip,
)
from clipforge.models.convert.keymap import fused

CONF = CONF_DIR / "model"


def small_siglip(seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return perturb_(SiglipVisionModel(config)).eval()


def test_siglip_vision_matches_transformers_both_ways() -> None:
    reference = small_siglip()
    ours = from_hf_siglip(reference).eval()
    assert ours.cls_token is None and ours.global_pool == "map" and ours.num_prefix_tokens == 0
    assert count_params(ours) == count_params(reference)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = reference(pixel_values=x)
        check_parity(ours.forward_features(x), out.last_hidden_state, what="tokens")  # (3, 16, 64), no CLS
        check_parity(ours(x), out.pooler_output, what="pooled")
        check_parity(to_hf_siglip(ours).eval()(pixel_values=x).pooler_output, out.pooler_output)


def test_a_wrong_siglip_key_map_fails_the_check() -> None:
    reference = small_siglip()
    ours = from_hf_siglip(reference).eval()
    layer = "encoder.layers.0.self_attn"
    swapped = fused(
        "transformer.blocks.0.attn.qkv.weight", [f"{layer}.{p}_proj.weight" for p in ("k", "q", "v")]
    )
    wrong = [swapped if r.ours == swapped.ours else r for r in siglip_key_map(ours)]  # q and k exchanged
    ours.load_state_dict(convert_state_dict(reference.state_dict(), wrong, to="ours"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), pytest.raises(ParityError):
        check_parity(ours(x), reference(pixel_values=x).pooler_output)


def test_siglip_b16_config_is_transformers_default_siglip_tower() -> None:
    with torch.device("meta"):
        visual = instantiate(OmegaConf.load(CONF / "siglip_b16.yaml")).visual
        reference = SiglipVisionModel(SiglipVisionConfig())  # SigLIP B/16 at 224
    ours, theirs = siglip_vision_config(visual).to_dict(), SiglipVisionConfig().to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert ours[key] == theirs[key], key
    for key in ("image_size", "patch_size", "hidden_act", "layer_norm_eps"):
        assert ours[key] == theirs[key], key
    assert count_params(visual) == count_params(reference)
