"""ContrastiveModule: its forward pieces match CLIP.forward, feature-cache accumulation under Lightning's
manual optimization trains exactly like one full batch (float64, clipping, schedule and clamp included),
and the logged statistics are there."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from clipforge.losses import ClipLoss, SigLipLoss
from clipforge.models.clip import CLIP
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer
from clipforge.module import ContrastiveModule
from clipforge.optim import param_groups, warmup_cosine

STEPS, BATCH = 3, 8


def tiny_clip(bias: float | None = None) -> CLIP:
    torch.manual_seed(0)
    vision = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, output_dim=16)
    text = TextTransformer(vocab_size=64, context_length=8, embed_dim=32, depth=1, num_heads=2, output_dim=16)
    return CLIP(vision, text, init_logit_bias=bias)


def make_module(loss: str = "clip", **kwargs) -> ContrastiveModule:
    bias, loss_fn = (-10.0, SigLipLoss()) if loss == "siglip" else (None, ClipLoss())
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    scheduler = functools.partial(warmup_cosine, warmup_steps=1)
    return ContrastiveModule(tiny_clip(bias), loss_fn, optimizer, scheduler, **kwargs)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(STEPS * BATCH, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 63, (STEPS * BATCH, 8), generator=g)
    tokens[:, -1] = 63
    return DataLoader(TensorDataset(images, tokens), batch_size=BATCH)


def fit(module: ContrastiveModule, precision: str = "64-true", log_every: int = 50) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=log_every,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader())
    return trainer


def params(module: ContrastiveModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_embed_pieces_match_clip_forward() -> None:
    module = make_module("siglip")
    images, tokens = next(iter(loader()))
    out = module.model(images, tokens)
    img, txt = module.embed(images, tokens)
    scale, bias = module.logit_scale_and_bias()
    torch.testing.assert_close(F.normalize(img, dim=-1), out["image_features"])
    torch.testing.assert_close(F.normalize(txt, dim=-1), out["text_features"])
    torch.testing.assert_close(scale, out["logit_scale"])
    assert bias is out["logit_bias"]


def test_one_forward_gives_the_pieces_bitwise_also_with_fsdp2_vector_scalars() -> None:
    """``embed_all`` (one call of CLIP.forward, what the training and validation steps use, as FSDP2 needs)
    equals ``embed`` + ``logit_scale_and_bias`` bit for bit; with the scale and bias stored as (1,), as
    clipforge.sharding does before fully_shard, it still hands the loss 0-dim values and the same loss."""
    from clipforge.sharding import scalars_to_vectors

    module = make_module("siglip")
    images, tokens = next(iter(loader()))
    img, txt, scale, bias = module.embed_all(images, tokens)
    ref_img, ref_txt = module.embed(images, tokens)
    ref_scale, ref_bias = module.logit_scale_and_bias()
    for a, b in ((img, ref_img), (txt, ref_txt), (scale, ref_scale), (bias, ref_bias)):
        assert torch.equal(a, b)
    loss = module.contrastive_loss(img, txt, scale, bias)
    assert scalars_to_vectors(module.model) == ["logit_scale", "logit_bias"]
    assert module.model.logit_scale.shape == (1,) and module.model.logit_bias.shape == (1,)
    img, txt, scale, bias = module.embed_all(images, tokens)
    assert scale.shape == () and bias.shape == () and torch.equal(scale, ref_scale)
    assert torch.equal(module.contrastive_loss(img, txt, scale, bias), loss)


def test_configure_model_leaves_the_model_alone_outside_model_parallel() -> None:
    module = make_module()
    before = dict(module.model.named_parameters())
    fit(module)  # one device: configure_model runs and must not shard anything
    assert {n: type(p) for n, p in module.model.named_parameters()} == {n: type(p) for n, p in before.items()}
    assert module.model.logit_scale.shape == ()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_feature_cache_training_equals_full_batch_training(loss: str) -> None:
    """Three AdamW steps with accum_freq=3 (micro-batches 3+3+2) land on the same weights as accum_freq=1.
    The clip norm is small enough that clipping acts on every step, so the manual path's clipping counts."""
    ref = make_module(loss, grad_clip_norm=0.05)
    fit(ref)
    module = make_module(loss, grad_clip_norm=0.05, accum_freq=3)
    assert not module.automatic_optimization
    trainer = fit(module)
    assert trainer.global_step == STEPS
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS
    want, got = params(ref), params(module)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)
    unclipped = make_module(loss, grad_clip_norm=None, accum_freq=3)
    fit(unclipped)
    assert not torch.allclose(params(unclipped)["visual.proj.weight"], want["visual.proj.weight"])


def test_logit_scale_is_clamped_under_accumulation() -> None:
    module = make_module(accum_freq=2)
    with torch.no_grad():
        module.model.logit_scale.fill_(math.log(100) + 0.5)
    fit(module, precision="32-true")
    assert module.model.logit_scale.item() <= math.log(100) + 1e-6


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_logged_statistics(accum_freq: int) -> None:
    module = make_module("siglip", accum_freq=accum_freq)
    trainer = fit(module, precision="32-true", log_every=1)
    m = trainer.callback_metrics
    for key in ("loss", "lr", "logit_scale", "logit_bias", "image_feature_norm", "text_feature_norm"):
        assert torch.isfinite(m[f"train/{key}"]), key
    for kind in ("pos", "neg"):
        lo, mean, hi = (m[f"train/logit_{kind}_{s}"] for s in ("min", "mean", "max"))
        assert lo <= mean <= hi
    # SigLIP starts at scale 10, bias -10: every logit is 10 * cos - 10, in [-20, 0].
    assert m["train/logit_neg_min"] >= -20 and m["train/logit_pos_max"] <= 0
    assert m["train/image_feature_norm"] > 0 and not math.isclose(m["train/image_feature_norm"], 1.0)


def test_weight_decay_groups_survive_flattened_parameters() -> None:
    """FSDP (use_orig_params) shows 1-D shards to configure_optimizers: the groups are fixed by name."""
    module = make_module()
    want = {id(p) for p in param_groups(module.model, 0.1)[0]["params"]}
    with torch.no_grad():
        for p in module.model.parameters():
            p.data = p.data.flatten()
    module.trainer = None  # configure_optimizers only needs the trainer for the schedule length
    module.scheduler_factory = None
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == want and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0 and module.model.logit_scale in no_decay["params"]


def test_accum_freq_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"module\.accum_freq must be >= 1"):
        make_module(accum_freq=0)


# -- two ranks under Lightning's DDP -------------------------------------------------------------------
REDUCED_BUCKETS: list[int] = []  # in each spawned rank: the bucket indices its comm hook all-reduced


def counting_allreduce(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    REDUCED_BUCKETS.append(bucket.index())
    return allreduce_hook(state, bucket)


class AllReduceOncePerStep(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers DDP comm hooks on CUDA only; on gloo we do it ourselves.
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = {i: REDUCED_BUCKETS.count(i) for i in REDUCED_BUCKETS}
        REDUCED_BUCKETS.clear()
        assert counts and set(counts.values()) == {1}, f"buckets all-reduced per step: {counts}"


class RoundRobin(L.LightningDataModule):
    """Rank r's step-s batch holds samples r, r+2, ... of the one-process step-s batch (both losses are
    invariant to the order of the pairs). Built in each rank, where the process group exists."""

    def train_dataloader(self) -> DataLoader:
        dataset = loader().dataset
        return DataLoader(dataset, batch_size=BATCH // 2, sampler=DistributedSampler(dataset, shuffle=False))


@pytest.mark.slow  # two spawned ranks importing Lightning: ~20 s of CPU, more on a shared machine
def test_ddp_feature_cache_equals_one_full_batch_process() -> None:
    """Two gloo ranks with local batch 4 split into 2 micro-batches train (float64) to the weights of one
    process on the global batch of 8; each gradient bucket is all-reduced exactly once per step."""
    from lightning.pytorch.strategies import DDPStrategy

    ref = make_module("siglip")
    fit(ref)
    # Double in this process too: ddp_spawn loads rank 0's final weights back into this module.
    module = make_module("siglip", accum_freq=2).double()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn"),
        max_steps=STEPS, precision="64-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[AllReduceOncePerStep()],
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=RoundRobin())
    want, got = params(ref), params(module)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_the_logged_train_loss_under_ddp_is_the_full_batch_loss(loss: str) -> None:
    """Each rank's loss is its share of the full-batch loss times W (the losses' DDP convention); what is
    logged, shown and summed up as "final train loss" was rank 0's share alone, not the batch's loss."""
    ref = make_module(loss)
    fit(ref)
    module = make_module(loss).double()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=STEPS, precision="64-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=RoundRobin())  # rank 0's callback_metrics come back to this process
    want = float(ref.trainer.callback_metrics["train/loss"])
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(want, rel=1e-9)


def test_logged_learning_rate_is_the_steps_own_in_both_modes() -> None:
    class RecordLr(L.Callback):
        def __init__(self) -> None:
            self.logged, self.used = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.used.append(optimizer.param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.logged.append(float(trainer.callback_metrics["train/lr"]))

    for accum_freq in (1, 2):
        rec = RecordLr()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
        )  # fmt: skip
        trainer.fit(make_module(accum_freq=accum_freq), train_dataloaders=loader())
        assert rec.logged == pytest.approx(rec.used) and len(set(rec.used)) > 1, accum_freq


def test_settings_that_would_train_silently_wrong_fail_at_once() -> None:
    """A negative clip norm makes torch scale gradients by a negative factor (ascent), and so does a negative
    min_lr_ratio, by a negative lr; a negative warmup or a tower without blocks failed late or trained anyway."""
    from clipforge.models.layers import Transformer
    from clipforge.module import ContrastiveModule
    from clipforge.optim import constant_with_warmup, warmup_cosine

    opt = functools.partial(torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match=r"module\.grad_clip_norm must be >= 0"):
        ContrastiveModule(torch.nn.Linear(1, 1), ClipLoss(), opt, grad_clip_norm=-1.0)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for schedule in (warmup_cosine, constant_with_warmup):
        with pytest.raises(ValueError, match=r"scheduler\.warmup_steps must be >= 0"):
            schedule(sgd, warmup_steps=-1, total_steps=10)
    for ratio in (-0.1, 1.5):  # a negative end lr is gradient ascent; above 1 the "decay" climbs
        with pytest.raises(ValueError, match=r"scheduler\.min_lr_ratio must be in \[0, 1\]"):
            warmup_cosine(sgd, warmup_steps=1, total_steps=10, min_lr_ratio=ratio)
    with pytest.raises(ValueError, match="depth >= 1"):
        Transformer(0, lambda i: torch.nn.Identity())


class OwnLoss(torch.nn.Module):
    """A user's loss written before validation was split over ranks: no ``local`` argument."""

    def forward(self, img, txt, logit_scale, logit_bias=None):
        logits = logit_scale * img @ txt.T
        labels = torch.arange(len(img))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_a_loss_without_local_is_named_before_ddp_validation_starts(monkeypatch) -> None:
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    module = ContrastiveModule(tiny_clip(), OwnLoss(), optimizer)
    module.on_validation_epoch_start()  # one process: never called with local, so it is fine
    monkeypatch.setattr("clipforge.module.world_info", lambda *a, **k: (0, 2))
    with pytest.raises(TypeError, match=r"OwnLoss takes no `local` argument.*Add `local: bool = False`"):
        module.on_validation_epoch_start()
    module.loss = ClipLoss()  # the library's losses, and any taking **kwargs, pass
    module.on_validation_epoch_start()


def test_validation_sums_stay_in_the_devices_sum_dtype(monkeypatch) -> None:
    # MPS has no float64: there _sum_dtype is float32 and nothing may be converted to float64
    monkeypatch.setattr(ContrastiveModule, "_sum_dtype", property(lambda self: torch.float32))
    module = make_module()
    module.log = lambda *a, **k: None
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(next(iter(loader())), 0)
    assert module._val_sums.dtype == torch.float32


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_bf16_mixed_clips_with_the_fused_adamw_default(accum_freq: int) -> None:
    """conf/optimizer's fused AdamW under trainer=gpu's bf16-mixed: Lightning refuses to clip for an optimizer
    that unscales in its step, so every such run failed at its first step. The clipped steps equal the
    unfused optimizer's (Lightning's own clipping path), and a clip that small changes the weights."""

    def run(fused: bool, clip: float | None) -> dict[str, torch.Tensor]:
        bias, optimizer = None, functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, fused=fused)
        module = ContrastiveModule(tiny_clip(bias), ClipLoss(), optimizer, None, grad_clip_norm=clip,
                                   accum_freq=accum_freq)  # fmt: skip
        fit(module, precision="bf16-mixed")
        return params(module)

    fused, unfused = run(True, 1e-3), run(False, 1e-3)
    for n in unfused:
        torch.testing.assert_close(fused[n], unfused[n], rtol=1e-5, atol=1e-6, msg=n)
    unclipped = run(True, None)
    assert not torch.allclose(unclipped["visual.proj.weight"], fused["visual.proj.weight"], atol=1e-5)
