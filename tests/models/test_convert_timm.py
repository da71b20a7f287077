"""Our ViT <-> timm's VisionTransformer: equal parameter counts and equal outputs (fp32, <= 1e-5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
from modelhelpers import perturb_, randomize_, small_vit
from timm.models.vision_transformer import VisionTransformer as TimmViT

from clipforge.models.convert import (
    ParityError,
    check_parity,
    convert_state_dict,
    count_params,
    from_timm,
    timm_key_map,
    to_timm,
)
from clipforge.models.convert.keymap import rename


@pytest.fixture(scope="module")
def b16() -> SimpleNamespace:
    torch.manual_seed(0)
    # Random weights, no download; "skip" + randomize_ is much faster than timm's own init on 2 cores.
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, weight_init="skip")
    reference = randomize_(reference).eval()
    ours = from_timm(reference).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = ours.forward_features(x)
        return SimpleNamespace(
            reference=reference, ours=ours, feats=feats, out=ours.forward_head(feats), ref_out=reference(x)
        )


def test_vit_b16_classifier_matches_timm(b16: SimpleNamespace) -> None:
    assert count_params(b16.reference) == count_params(b16.ours) == 86_567_656
    assert b16.feats.shape == (1, 197, 768)  # 196 patches + CLS, before the readout
    assert b16.out.shape == (1, 1000)
    check_parity(b16.out, b16.ref_out, atol=1e-5)


@pytest.mark.parametrize(
    ("pool", "class_token"), [("avg", True), ("avg", False), ("map", True), ("map", False), ("token", True)]
)
def test_pooling_variants_match_timm_both_ways(pool: str, class_token: bool) -> None:
    torch.manual_seed(0)
    reference = TimmViT(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
        global_pool=pool, class_token=class_token,
    )  # fmt: skip
    reference = perturb_(reference).eval()
    ours = from_timm(reference).eval()
    assert count_params(ours) == count_params(reference)
    assert ours.global_pool == pool and (ours.cls_token is not None) == class_token
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_out = reference(x)
        check_parity(ours(x), ref_out)
        check_parity(to_timm(ours).eval()(x), ref_out)


def test_clip_style_vit_matches_timm() -> None:
    # CLIP's layout (pre-norm, bias-free patch conv), layer scale, tanh-GELU, eps 1e-5.
    torch.manual_seed(0)
    ours = small_vit(
        pre_norm=True, patch_bias=False, init_values=0.1, act="gelu_tanh", norm_eps=1e-5, proj_bias=True
    )
    ours = perturb_(ours).eval()
    reference = to_timm(ours).eval()
    assert count_params(reference) == count_params(ours)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        check_parity(ours(x), reference(x))
        check_parity(from_timm(reference).eval()(x), reference(x))


def test_a_wrong_key_map_fails_the_check() -> None:
    torch.manual_seed(0)
    reference = perturb_(TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)).eval()
    ours = small_vit(embed_dim=64, num_heads=4, output_dim=1000, proj_bias=True).eval()
    key_map = timm_key_map(ours)
    # Swap the two LayerNorms of block 0: names and shapes still line up, the network does not.
    swap = {"blocks.0.norm1": "blocks.0.norm2", "blocks.0.norm2": "blocks.0.norm1"}
    wrong = []
    for rule in key_map:
        theirs = rule.theirs[0]
        prefix = theirs.rsplit(".", 1)[0]
        wrong.append(rename(rule.ours[0], swap[prefix] + theirs[len(prefix) :]) if prefix in swap else rule)
    x = torch.randn(2, 3, 32, 32)
    ours.load_state_dict(convert_state_dict(reference.state_dict(), wrong, to="ours"))
    with torch.no_grad(), pytest.raises(ParityError):
        check_parity(ours(x), reference(x))
    ours.load_state_dict(convert_state_dict(reference.state_dict(), key_map, to="ours"))
    with torch.no_grad():
        check_parity(ours(x), reference(x))  # the right map passes on the same models


def test_key_maps_are_strict() -> None:
    ours = small_vit(embed_dim=64, num_heads=4, output_dim=1000, proj_bias=True)
    key_map = timm_key_map(ours)
    state = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4).state_dict()
    with pytest.raises(KeyError, match="does not consume"):
        convert_state_dict(state, key_map[1:], to="ours")
    with pytest.raises(KeyError, match="lacks"):
        convert_state_dict({k: v for k, v in state.items() if k != "norm.weight"}, key_map, to="ours")
    with pytest.raises(ValueError, match="patch_bias"):
        timm_key_map(small_vit(pre_norm=True))  # timm drops the patch bias exactly when pre_norm is on


SMALL_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_a_timm_vit_that_pools_its_class_token_too_is_refused(pool: str) -> None:
    # timm's pool_include_prefix=True pools the class token with the patches; ours pools the patches only,
    # and from_timm ported such a model to one whose outputs differed by 0.2 without a word
    reference = TimmViT(**SMALL_TIMM, global_pool=pool, pool_include_prefix=True)
    with pytest.raises(ValueError, match="pool_include_prefix"):
        from_timm(reference)


def test_a_timm_vit_without_a_final_norm_is_refused() -> None:
    # every tower of ours ends in a LayerNorm: a timm ViT with none failed with "'Identity' object has no
    # attribute 'eps'"
    reference = TimmViT(**SMALL_TIMM, final_norm=False)
    with pytest.raises(ValueError, match="no final norm"):
        from_timm(reference)
