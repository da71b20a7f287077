"""Shapes, attention paths, patch dropout, checkpointing, context length, init schemes and configs."""

from __future__ import annotations

import math

import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra.utils import instantiate
from modelhelpers import perturb_, small_text, small_vit, tokens
from omegaconf import OmegaConf

from clipforge.models import CLIP, VisionTransformer
from clipforge.models.convert import count_params, open_clip_model_cfg
from clipforge.models.vision import patch_dropout

CONF = CONF_DIR / "model"


def set_fused(module: torch.nn.Module, fused: bool) -> None:
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = fused


def test_vit_b16_token_counts() -> None:
    # Shapes only, so build and run on the meta device: 224 / 16 = 14 -> 196 patches, +1 CLS = 197.
    with torch.device("meta"):
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
        feats = vit.forward_features(torch.empty(1, 3, 224, 224))
        siglip = VisionTransformer(patch_size=16, class_token=False, global_pool="map", output_dim=None)
        siglip_feats = siglip.forward_features(torch.empty(1, 3, 224, 224))
        pooled = siglip(torch.empty(2, 3, 224, 224))
    assert vit.grid_size == 14 and vit.num_patches == 196
    assert vit.pos_embed.shape == (1, 197, 768)
    assert feats.shape == (1, 197, 768)
    assert siglip_feats.shape == (1, 196, 768)
    assert pooled.shape == (2, 768)


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_fused_and_math_attention_agree_in_the_image_tower(pool: str) -> None:
    torch.manual_seed(0)
    vit = perturb_(small_vit(global_pool=pool, class_token=pool != "map")).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = vit(x)
        set_fused(vit, False)
        math_path = vit(x)
    assert (fused - math_path).abs().max() < 1e-5
    assert fused.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("causal", [True, False])
def test_fused_and_math_attention_agree_in_the_text_tower(causal: bool) -> None:
    torch.manual_seed(0)
    text = perturb_(small_text(causal=causal)).eval()
    t = tokens(3, 12)
    with torch.no_grad():
        fused = text.forward_features(t)
        set_fused(text, False)
        math_path = text.forward_features(t)
    assert (fused - math_path).abs().max() < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_causal_text_cannot_see_later_tokens(fused: bool) -> None:
    torch.manual_seed(0)
    text = perturb_(small_text(fused_attn=fused)).eval()
    a = tokens(2, 12)
    b = a.clone()
    b[:, 6:] = torch.randint(1, 99, (2, 6))
    with torch.no_grad():
        fa, fb = text.forward_features(a), text.forward_features(b)
    assert torch.allclose(fa[:, :6], fb[:, :6], atol=1e-6)
    assert not torch.allclose(fa[:, 6:], fb[:, 6:], atol=1e-3)
    # Without the mask, early positions do see the change.
    text.causal = False
    with torch.no_grad():
        assert not torch.allclose(text.forward_features(a)[:, :6], text.forward_features(b)[:, :6], atol=1e-3)


def test_text_pools_at_eot_or_last() -> None:
    torch.manual_seed(0)
    text = small_text(output_dim=None).eval()
    t = tokens(3, 12)
    with torch.no_grad():
        feats = text.forward_features(t)
        eot = text(t)
        text.pool_type = "last"
        last = text(t)
    assert torch.equal(eot, feats[torch.arange(3), t.argmax(dim=-1)])
    assert torch.equal(last, feats[:, -1])


def test_shorter_text_and_context_length_limit() -> None:
    torch.manual_seed(0)
    text = small_text(context_length=12).eval()
    t = tokens(2, 12)
    with torch.no_grad():
        # A causal tower's first 8 positions do not depend on what follows: a length-8 input gives them.
        torch.testing.assert_close(
            text.forward_features(t[:, :8]), text.forward_features(t)[:, :8], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="context_length"):
        text(torch.zeros(1, 13, dtype=torch.long))


def test_patch_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    vit = perturb_(small_vit(patch_size=4, patch_dropout=0.5))  # 64 patches
    ref = small_vit(patch_size=4)
    ref.load_state_dict(vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    vit.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(vit(x), ref(x))  # eval: nothing dropped
        vit.train()
        assert vit.forward_features(x).shape == (2, 1 + 32, 32)  # CLS + half of 64 patches
        assert not torch.allclose(vit(x), ref(x), atol=1e-4)


def test_patch_dropout_keeps_prefix_and_distinct_patches() -> None:
    x = torch.arange(2 * 11 * 1, dtype=torch.float32).reshape(2, 11, 1)  # 1 prefix + 10 patches, ids
    out = patch_dropout(x, keep=0.3, num_prefix=1)
    assert out.shape == (2, 1 + 3, 1)
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(2):
        kept = out[b, 1:, 0].tolist()
        assert len(set(kept)) == 3 and set(kept) <= set(x[b, 1:, 0].tolist())


def test_grad_checkpointing_gives_identical_grads() -> None:
    torch.manual_seed(0)
    model = CLIP(perturb_(small_vit(), seed=1), perturb_(small_text(), seed=2)).train()
    x, t = torch.randn(2, 3, 32, 32), tokens(2, 12)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(x, t)
        (out["image_features"] @ out["text_features"].T * out["logit_scale"]).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    mlp = model.visual.blocks[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # counts runs, recomputation included
    plain = grads()
    n_plain = len(calls)
    model.set_grad_checkpointing(True)
    ckpt = grads()
    assert len(calls) - n_plain == 2 * n_plain  # the block ran again during backward: checkpointing is on
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


def test_no_weight_decay_names_real_parameters() -> None:
    model = CLIP(small_vit(global_pool="map", class_token=True), small_text(), init_logit_bias=-10.0)
    params = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip <= params.keys()
    assert {"visual.pos_embed", "visual.cls_token", "visual.attn_pool.latent", "text.pos_embed"} <= skip
    assert {"text.token_embedding.weight", "logit_scale", "logit_bias"} <= skip
    assert not any(params[n].ndim >= 2 and "blocks" in n for n in skip)  # block matrices do decay


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_scale_at_its_maximum_keeps_its_gradient(dtype: torch.dtype) -> None:
    # clamp_logit_scale parks the log-scale at log(100) rounded to the dtype, whose exp is a hair above 100:
    # a clamp after exp zeroed the gradient there, so a scale that reached 100 could never come down.
    model = CLIP(small_vit(), small_text()).to(dtype)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    scale, _ = model.scale_and_bias()
    assert scale.item() == pytest.approx(100.0, rel=1e-6)
    (grad,) = torch.autograd.grad(scale, [model.logit_scale])
    assert grad.item() == pytest.approx(100.0, rel=1e-6)
    # above the bound (between two optimizer steps) the scale is still capped, and then has no gradient
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    scale, _ = model.scale_and_bias()
    assert scale.item() == pytest.approx(100.0, rel=1e-6)
    assert torch.autograd.grad(scale, [model.logit_scale])[0].item() == 0.0


def test_weight_init_schemes() -> None:
    width, depth = 64, 6
    towers = {s: small_vit(embed_dim=width, depth=depth, weight_init=s) for s in ("timm", "jax", "openclip")}
    blk = {s: t.blocks[0] for s, t in towers.items()}
    # timm: truncated normal std 0.02, zero biases.
    assert abs(blk["timm"].attn.qkv.weight.std().item() - 0.02) < 0.003
    assert blk["timm"].mlp.fc1.bias.abs().max() == 0
    # jax: Xavier-uniform (bound sqrt(6 / (fan_in + fan_out))), N(0, 1e-6) MLP biases, zero attention biases.
    w = blk["jax"].mlp.fc1.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0 < blk["jax"].mlp.fc1.bias.abs().max() < 1e-5
    assert blk["jax"].attn.qkv.bias.abs().max() == 0
    # openclip: std w^-1/2 for qkv, w^-1/2 (2L)^-1/2 for residual projections, (2w)^-1/2 for fc1.
    oc = blk["openclip"]
    assert abs(oc.attn.qkv.weight.std().item() / width**-0.5 - 1) < 0.05
    assert abs(oc.attn.proj.weight.std().item() / (width**-0.5 * (2 * depth) ** -0.5) - 1) < 0.1
    assert abs(oc.mlp.fc1.weight.std().item() / (2 * width) ** -0.5 - 1) < 0.05
    assert abs(towers["openclip"].pos_embed.std().item() / width**-0.5 - 1) < 0.05
    with pytest.raises(ValueError, match="weight_init"):
        small_vit(weight_init="xavier")


def test_torch_scheme_starts_like_open_clips_image_tower() -> None:
    """Layer by layer, the same init distribution (std, bias zero or not) as open_clip's VisionTransformer."""
    from open_clip.transformer import VisionTransformer as OpenClipViT

    width, depth = 96, 4
    torch.manual_seed(0)
    theirs = OpenClipViT(
        image_size=32, patch_size=4, width=width, layers=depth, heads=3, mlp_ratio=4, output_dim=32
    )
    ours = small_vit(
        img_size=32, patch_size=4, embed_dim=width, depth=depth, num_heads=3, output_dim=32, patch_bias=False,
        pre_norm=True, weight_init="torch",
    )  # fmt: skip
    pairs = {
        "patch_embed.weight": theirs.conv1.weight,
        "pos_embed": theirs.positional_embedding,
        "cls_token": theirs.class_embedding,
        "proj.weight": theirs.proj,
    }
    for i in range(depth):
        ob, tb = f"transformer.blocks.{i}.", theirs.transformer.resblocks[i]
        pairs |= {
            ob + "attn.qkv.weight": tb.attn.in_proj_weight,
            ob + "attn.qkv.bias": tb.attn.in_proj_bias,
            ob + "attn.proj.weight": tb.attn.out_proj.weight,
            ob + "attn.proj.bias": tb.attn.out_proj.bias,
            ob + "mlp.fc1.weight": tb.mlp.c_fc.weight,
            ob + "mlp.fc1.bias": tb.mlp.c_fc.bias,
            ob + "mlp.fc2.weight": tb.mlp.c_proj.weight,
            ob + "mlp.fc2.bias": tb.mlp.c_proj.bias,
        }
    params = dict(ours.named_parameters())
    for name, ref in pairs.items():
        mine, ref = params[name].detach(), ref.detach()
        if ref.abs().max() == 0:
            assert mine.abs().max() == 0, name
        else:
            assert abs(mine.std().item() / ref.std().item() - 1) < 0.25, (name, mine.std(), ref.std())


def load_yaml(name: str) -> CLIP:
    with torch.device("meta"):
        return instantiate(OmegaConf.load(CONF / f"{name}.yaml"))


def open_clip_count(name: str) -> int:
    import open_clip
    from open_clip.model import CLIP as OpenCLIP

    with torch.device("meta"):
        return count_params(OpenCLIP(**open_clip.get_model_config(name)))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("vit_b32", "ViT-B-32"), ("vit_b16", "ViT-B-16"), ("vit_l14", "ViT-L-14"), ("vit_h14", "ViT-H-14")],
)
def test_clip_configs_have_open_clip_shapes(ours: str, theirs: str) -> None:
    import open_clip

    model = load_yaml(ours)
    assert count_params(model) == open_clip_count(theirs)
    cfg, ref = open_clip_model_cfg(model), open_clip.get_model_config(theirs)
    assert cfg["embed_dim"] == ref["embed_dim"]
    assert {k: cfg["vision_cfg"][k] for k in ref["vision_cfg"]} == ref["vision_cfg"]
    assert {k: cfg["text_cfg"][k] for k in ref["text_cfg"]} == ref["text_cfg"]
    assert cfg["vision_cfg"]["norm_kwargs"] == {"eps": 1e-5} and not cfg["quick_gelu"]


def test_siglip_b16_config() -> None:
    import timm

    model = load_yaml("siglip_b16")
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_siglip_224", num_classes=0)
    assert count_params(model.visual) == count_params(ref)  # same tower as SigLIP B/16 (timm)
    assert model.visual.cls_token is None and model.visual.global_pool == "map"
    assert model.embed_dim == 768 and model.text.pool_type == "last" and not model.text.causal
    assert model.text.proj.bias is not None


def test_siglip_so400m_config_has_the_so400m_towers() -> None:
    """timm's So400m image tower, and open_clip's ViT-SO400M-14-SigLIP text tower at clipforge's vocabulary
    and context (its BPE tokenizer, not SigLIP's SentencePiece)."""
    import open_clip
    import timm
    from open_clip.model import _build_text_tower

    model = load_yaml("siglip_so400m")
    text_cfg = open_clip.get_model_config("ViT-SO400M-14-SigLIP")["text_cfg"]
    text_cfg = {k: v for k, v in text_cfg.items() if "tokenizer" not in k}
    with torch.device("meta"):
        vision = timm.create_model("vit_so400m_patch14_siglip_224", num_classes=0)
        text = _build_text_tower(1152, text_cfg | {"vocab_size": 49408, "context_length": 64})
    assert count_params(model.visual) == count_params(vision)
    assert model.visual.blocks[0].mlp.fc1.out_features == 4304 and model.visual.global_pool == "map"
    assert count_params(model.text) == count_params(text) and model.embed_dim == 1152
    assert model.text.pool_type == "last" and not model.text.causal


def test_tiny_config_is_small_and_runs() -> None:
    torch.manual_seed(0)
    model = instantiate(OmegaConf.load(CONF / "tiny.yaml")).eval()
    assert count_params(model) - model.text.token_embedding.weight.numel() < 2_000_000
    assert model.visual.img_size == 32 and model.text.context_length == 20
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), tokens(2, 20, vocab=49408))
    assert out["image_features"].shape == out["text_features"].shape == (2, 96)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))


def test_text_tower_names_its_width_embed_dim_and_old_configs_still_build() -> None:
    from clipforge.models.convert import instantiate_model, model_config

    model = load_yaml("tiny")
    cfg = model_config(model)
    assert cfg["text"]["embed_dim"] == 96 and "width" not in cfg["text"]
    legacy = {**cfg, "text": {("width" if k == "embed_dim" else k): v for k, v in cfg["text"].items()}}
    assert instantiate_model(legacy, device="meta").text.embed_dim == 96  # a checkpoint of an earlier version


def test_decay_embeddings_decays_exactly_what_open_clip_decays() -> None:
    """open_clip's rule on its own model: every parameter with >= 2 dims except norms, biases and the logit
    scale. With decay_embeddings the same parameters (by converted name) decay in clipforge."""
    import open_clip

    from clipforge.models.convert import open_clip_key_map, open_clip_model_cfg
    from clipforge.optim import param_groups

    ours = load_yaml("tiny").to_empty(device="cpu")
    theirs_names = {
        n
        for n, p in open_clip.model.CLIP(**open_clip_model_cfg(ours)).named_parameters()
        if not (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)
    }
    to_theirs = {o: r.theirs for r in open_clip_key_map(ours, open_clip_model_cfg(ours)) for o in r.ours}
    names = {id(p): n for n, p in ours.named_parameters()}
    for decay_embeddings in (False, True):
        decayed = {names[id(p)] for p in param_groups(ours, 0.2, decay_embeddings)[0]["params"]}
        theirs = {t for n in decayed for t in to_theirs[n]}
        if decay_embeddings:
            assert theirs == theirs_names
        else:
            assert theirs_names - theirs == {
                "positional_embedding",
                "token_embedding.weight",
                "visual.positional_embedding",
            }
