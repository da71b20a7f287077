"""Feature-cache accumulation gives the gradient of one full batch (float64), for both losses, on one
process and on two gloo ranks, and replays patch dropout / drop path exactly."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.accumulate import feature_cache_backward
from clipforge.losses import ClipLoss, SigLipLoss
from clipforge.models.clip import CLIP
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer
from gloohelpers import free_port, init_gloo

LOSSES = {"clip": (ClipLoss, None), "siglip": (SigLipLoss, -10.0)}


def tiny_clip(init_logit_bias: float | None, patch_dropout: float = 0.0, drop_path: float = 0.0) -> CLIP:
    torch.manual_seed(0)
    vision = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, output_dim=16,
        patch_dropout=patch_dropout, block={"drop_path_rate": drop_path},
    )  # fmt: skip
    text = TextTransformer(vocab_size=64, context_length=8, embed_dim=32, depth=2, num_heads=2, output_dim=16)
    return CLIP(vision, text, init_logit_bias=init_logit_bias).double()


def make_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 63, (n, 8), generator=g)
    tokens[:, -1] = 63  # the EOT token (highest id) ends each caption
    return images, tokens


def parts(model: CLIP, loss: torch.nn.Module):
    def embed(images, tokens):
        return model.encode_image(images), model.encode_text(tokens)

    def scale_bias():
        return model.logit_scale.exp(), model.logit_bias

    def loss_fn(img, txt, scale, bias):
        return loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias)

    return embed, scale_bias, loss_fn


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def full_batch_grads(name: str, images, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_cls, bias = LOSSES[name]
    model = tiny_clip(bias)
    embed, scale_bias, loss_fn = parts(model, loss_cls())
    loss = loss_fn(*embed(images, tokens), *scale_bias())
    loss.backward()
    return loss.detach(), grads(model)


def cached_grads(name: str, images, tokens, accum_freq: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_cls, bias = LOSSES[name]
    model = tiny_clip(bias)
    step = feature_cache_backward(*parts(model, loss_cls()), images, tokens, accum_freq)
    return step.loss, grads(model)


def assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("accum_freq", [2, 3])
def test_feature_cache_equals_full_batch(name: str, accum_freq: int) -> None:
    images, tokens = make_batch(8)  # accum_freq=3 splits 8 into 3 + 3 + 2
    ref_loss, ref = full_batch_grads(name, images, tokens)
    loss, got = cached_grads(name, images, tokens, accum_freq)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert_grads_equal(got, ref)
    assert ref["logit_scale"].abs() > 0
    if name == "siglip":
        assert ref["logit_bias"].abs() > 0


def test_plain_accumulation_is_not_the_full_batch() -> None:
    """The reason for the cache: summing per-micro-batch losses loses the cross-micro-batch negatives."""
    images, tokens = make_batch(8)
    _, ref = full_batch_grads("clip", images, tokens)
    model = tiny_clip(None)
    embed, scale_bias, loss_fn = parts(model, ClipLoss())
    for im, tok in zip(images.chunk(2), tokens.chunk(2)):
        (loss_fn(*embed(im, tok), *scale_bias()) / 2).backward()
    assert not torch.allclose(model.visual.proj.weight.grad, ref["visual.proj.weight"], rtol=1e-3)


def test_random_layers_are_replayed() -> None:
    """With patch dropout and drop path the re-forward must draw what the cached forward drew: the result
    equals an accumulation that keeps every micro-batch's graph (same draws, same order)."""
    images, tokens = make_batch(8)

    def with_graph(seed: int) -> dict[str, torch.Tensor]:
        model = tiny_clip(None, patch_dropout=0.5, drop_path=0.3)
        embed, scale_bias, loss_fn = parts(model, ClipLoss())
        torch.manual_seed(seed)
        feats = [embed(im, tok) for im, tok in zip(images.tensor_split(2), tokens.tensor_split(2))]
        img, txt = (torch.cat(f) for f in zip(*feats))
        loss_fn(img, txt, *scale_bias()).backward()
        return grads(model)

    ref = with_graph(seed=5)
    after_ref = torch.get_rng_state()
    model = tiny_clip(None, patch_dropout=0.5, drop_path=0.3)
    torch.manual_seed(5)
    feature_cache_backward(*parts(model, ClipLoss()), images, tokens, 2)
    assert_grads_equal(grads(model), ref)
    # The generator ends where one pass over the batch leaves it, so later steps are unchanged too.
    assert torch.equal(torch.get_rng_state(), after_ref)
    # The random layers are live: another seed gives another gradient.
    other = with_graph(seed=6)
    assert not torch.allclose(other["visual.proj.weight"], ref["visual.proj.weight"])


# -- two ranks -------------------------------------------------------------------------------------------
def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        images, tokens = make_batch(12)
        local = slice(rank * 6, (rank + 1) * 6)  # each rank holds half of the global batch
        out = {}
        for name in LOSSES:
            loss, g = cached_grads(name, images[local], tokens[local], accum_freq=2)
            for t in g.values():  # what DDP does once after the last micro-batch: average over ranks
                dist.all_reduce(t)
                t /= world
            dist.all_reduce(loss)
            out[name] = (loss / world, g)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_feature_cache_on_two_ranks_equals_full_batch() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_worker, args=(2, free_port(), out_dir), nprocs=2, start_method="spawn")
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    images, tokens = make_batch(12)
    for name in LOSSES:
        ref_loss, ref = full_batch_grads(name, images, tokens)
        for per_rank in results:
            loss, got = per_rank[name]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
            assert_grads_equal(got, ref)
