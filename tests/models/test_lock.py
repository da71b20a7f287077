"""Locked-tower tuning (LiT): the groups a lock keeps trainable are open_clip's, parameter for parameter;
bad settings are named."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from open_clip.model import CLIP as OpenCLIP
from open_clip.model import CustomTextCLIP

from clipforge.models.convert import from_open_clip, open_clip_key_map
from clipforge.models.convert.keymap import convert_state_dict
from clipforge.models.lock import Lock, lock_groups

SMALL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4, "layers": 3},
}
VARIANTS = {
    "plain": {},
    "no_ln_pre_avg_pool": {"vision_cfg": {"no_ln_pre": True, "pool_type": "avg"}},
    "text_proj_bias_custom": {"text_cfg": {"proj_bias": True}, "custom_text": True},
}


def build(variant: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    cfg = copy.deepcopy(SMALL)
    for key, value in VARIANTS[variant].items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    reference = (CustomTextCLIP if cfg.get("custom_text") else OpenCLIP)(**kwargs)
    return reference, from_open_clip(reference, cfg), cfg


def trainable_as_theirs(ours: torch.nn.Module, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our requires_grad flags, each spread over its parameter's shape, carried to open_clip's keys by the
    converter's own key map (fused or transposed weights keep their flags)."""
    flags = {n: torch.full_like(p, float(p.requires_grad)) for n, p in ours.named_parameters()}
    return convert_state_dict(flags, open_clip_key_map(ours, cfg), to="theirs")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("unlocked", [0, 1, 2, 4])
def test_a_lock_keeps_open_clips_groups_trainable(variant: str, unlocked: int) -> None:
    reference, ours, cfg = build(variant)
    reference.lock_image_tower(unlocked_groups=unlocked)
    reference.lock_text_tower(unlocked_layers=unlocked)
    message = Lock(True, unlocked, True, unlocked).apply(ours)
    theirs = {n: p.requires_grad for n, p in reference.named_parameters()}
    flags = trainable_as_theirs(ours, cfg)
    assert set(flags) == set(theirs)
    for name, flag in flags.items():
        assert flag.min() == flag.max(), name  # a parameter is locked whole
        assert bool(flag.max()) == theirs[name], name
    assert ours.logit_scale.requires_grad  # the temperature always trains, as in LiT
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert message is not None and f"{trainable:,} parameters train" in message


def test_groups_cover_every_parameter_once() -> None:
    _, ours, _ = build("plain")
    for tower in (ours.visual, ours.text):
        groups = lock_groups(tower)
        assert len(groups) == len(tower.blocks) + 2  # embeddings, each block, projection
        seen = [id(p) for g in groups for p in g]
        assert sorted(seen) == sorted(id(p) for p in tower.parameters())


def test_locking_one_tower_leaves_the_other_whole() -> None:
    _, ours, _ = build("plain")
    Lock(vision=True).apply(ours)
    assert not any(p.requires_grad for p in ours.visual.parameters())
    assert all(p.requires_grad for p in ours.text.parameters())
    assert Lock().apply(ours) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision": "yes"}, "lock.vision must be true or false"),
        ({"text": True, "text_unlocked_groups": -1}, "lock.text_unlocked_groups must be an integer >= 0"),
        ({"vision_unlocked_groups": 2}, "has no effect while lock.vision is false"),
    ],
)
def test_bad_lock_settings_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Lock(**kwargs)


def test_unlocking_every_group_is_refused() -> None:
    _, ours, _ = build("plain")
    with pytest.raises(
        ValueError,
        match=r"lock.vision_unlocked_groups=5, but the tower has 5 groups .* nothing would be locked",
    ):
        Lock(vision=True, vision_unlocked_groups=5).apply(ours)
