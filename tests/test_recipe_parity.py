"""The recipe around the towers equals open_clip_train's where the learning benchmark (README, "Learning
parity") found no reason to differ: the learning-rate schedule step by step, AdamW's settings, and the
initial logit scale and bias of both losses. A change to any of them must come with a new measurement."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from clipforge.checkpoint import build_model

open_clip = pytest.importorskip("open_clip")
scheduler_ref = pytest.importorskip("open_clip_train.scheduler")
params_ref = pytest.importorskip("open_clip_train.params")


def test_schedule_equals_open_clip_cosine_lr_at_every_step(compose_cfg) -> None:
    cfg = compose_cfg()
    total, lr = 600, cfg.optimizer.lr
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = instantiate(cfg.scheduler)(ours_opt, total_steps=total)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = scheduler_ref.cosine_lr(ref_opt, lr, cfg.scheduler.warmup_steps, total)
    for step in range(total):
        ref(step)  # open_clip sets the rate before each optimizer step
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(
            ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15
        )
        ours_opt.step()
        ours.step()


def test_adamw_settings_are_open_clips_vit_defaults(compose_cfg) -> None:
    cfg = compose_cfg()
    ref = params_ref.get_default_params("ViT-B-32")
    assert cfg.optimizer.lr == ref["lr"]
    assert tuple(cfg.optimizer.betas) == (ref["beta1"], ref["beta2"])
    assert cfg.optimizer.eps == ref["eps"]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_initial_logit_scale_and_bias_are_open_clips(compose_cfg, loss: str) -> None:
    cfg = compose_cfg(f"loss={loss}")
    ours = build_model(cfg.model, cfg.loss)
    # open_clip's CLIP: scale log(1/0.07), no bias; open_clip_train --siglip passes scale log 10, bias -10
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss == "siglip" else {}
    ref = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=1, width=32, head_width=16, image_size=16, patch_size=8
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        **kwargs,
    )
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item(), rel=1e-6)
    if loss == "siglip":
        assert ours.logit_bias.item() == pytest.approx(ref.logit_bias.item())
    else:
        assert getattr(ours, "logit_bias", None) is None and ref.logit_bias is None


@pytest.mark.parametrize(("cooldown_frac", "power", "floor"), [(0.2, 1.0, 0.0), (0.5, 2.0, 0.1)])
def test_wsd_schedule_equals_open_clips_const_cooldown_at_every_step(
    compose_cfg, cooldown_frac: float, power: float, floor: float
) -> None:
    cfg = compose_cfg(
        "scheduler=wsd",
        f"scheduler.cooldown_frac={cooldown_frac}",
        f"scheduler.cooldown_power={power}",
        f"scheduler.min_lr_ratio={floor}",
    )
    total, lr = 600, cfg.optimizer.lr
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = instantiate(cfg.scheduler)(ours_opt, total_steps=total)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cooldown = round(cooldown_frac * total)
    ref = scheduler_ref.const_lr_cooldown(
        ref_opt, lr, cfg.scheduler.warmup_steps, total, cooldown, power, floor * lr
    )
    seen = set()
    for step in range(total):
        ref(step)
        got = ours_opt.param_groups[0]["lr"]
        assert got == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        seen.add(round(got / lr, 6))
        ours_opt.step()
        ours.step()
    assert 1.0 in seen and len(seen) > cfg.scheduler.warmup_steps + cooldown // 2  # warmup, plateau, cooldown


def test_wsd_schedule_refuses_settings_that_cannot_be_meant() -> None:
    from clipforge.optim import warmup_stable_decay

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for kwargs, message in [
        ({"cooldown_frac": 0.0}, r"scheduler.cooldown_frac must be in \(0, 1\]"),
        ({"cooldown_power": -1.0}, "scheduler.cooldown_power must be > 0"),
        ({"min_lr_ratio": 1.5}, r"scheduler.min_lr_ratio must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            warmup_stable_decay(opt, 10, 100, **kwargs)
    # a warmup past the cooldown's start (a 5-step smoke run) delays the cooldown instead of failing
    sched = warmup_stable_decay(opt, warmup_steps=8, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:8] == pytest.approx([(i + 1) / 8 for i in range(8)]) and lrs[8:] == pytest.approx([1.0, 0.5])
