"""Single-device losses on hand-made inputs and against direct references: CLIP near zero on perfectly
aligned features, SigLIP equal to an elementwise loop, tiled kernels equal to dense ones (values and
gradients, odd tile sizes, extreme scales, bf16), memory saved for backward linear in the batch, and
parity with open_clip's ``ClipLoss`` / ``SigLipLoss``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.bench.losses import open_clip_loss_module, saved_bytes
from clipforge.distributed import world_info
from clipforge.losses import ClipLoss, SigLipLoss, clip_loss, logit_stats, siglip_loss
from clipforge.losses.tiled import use_tiled

LOSSES = {"clip": clip_loss, "siglip": siglip_loss}


def features(n: int, d: int, seed: int, dtype=torch.float64, normalize: bool = True) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return F.normalize(x, dim=-1) if normalize else x


def value_and_grads(fn, x, y, scale, bias, **kw) -> list[torch.Tensor]:
    x, y, scale, bias = (t.detach().clone().requires_grad_() for t in (x, y, scale, bias))
    loss = fn(x, y, scale, bias, **kw)
    grads = torch.autograd.grad(loss, [x, y, scale, bias], allow_unused=True)
    return [loss.detach(), *(torch.zeros_like(bias) if g is None else g for g in grads)]


def test_initial_scale_and_bias_are_the_papers() -> None:
    assert math.exp(ClipLoss.init_logit_scale) == pytest.approx(1 / 0.07)
    assert ClipLoss.init_logit_bias is None
    assert math.exp(SigLipLoss.init_logit_scale) == pytest.approx(10.0)
    assert SigLipLoss.init_logit_bias == -10.0


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_clip_near_zero_for_aligned_features(impl: str) -> None:
    x = torch.eye(6, 8, dtype=torch.float64)  # unit, mutually orthogonal
    scale = torch.tensor(100.0, dtype=torch.float64)
    assert clip_loss(x, x.clone(), scale, impl=impl, tile_size=4) < 1e-12
    # the same features paired wrongly: every target logit is 0 against one at 100
    loss = clip_loss(x, x.roll(1, dims=0), scale, impl=impl, tile_size=4)
    assert loss == pytest.approx(100.0, abs=1e-6)


@pytest.mark.parametrize("impl", ["dense", "tiled", "auto"])
def test_siglip_equals_elementwise_loop(impl: str) -> None:
    x, y = features(5, 3, seed=0), features(5, 3, seed=1)
    scale, bias = 7.0, -2.0
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = scale * float(x[i] @ y[j]) + bias
            total += math.log1p(math.exp(-z * logit))
    got = siglip_loss(x, y, torch.tensor(scale), torch.tensor(bias), impl=impl, tile_size=2)
    assert got.item() == pytest.approx(total / 5, rel=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("tile", [1, 3, 7, 64])
def test_tiled_matches_dense(loss: str, tile: int) -> None:
    # unnormalised features and a large scale: logits spread over hundreds
    x, y = features(13, 5, seed=2, normalize=False), features(13, 5, seed=3, normalize=False)
    scale, bias = torch.tensor(30.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    dense = value_and_grads(LOSSES[loss], x, y, scale, bias, impl="dense")
    tiled = value_and_grads(LOSSES[loss], x, y, scale, bias, impl="tiled", tile_size=tile)
    for a, b in zip(tiled, dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_gradcheck(loss: str) -> None:
    x, y = features(5, 3, seed=4), features(5, 3, seed=5)
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, y, scale, bias))
    assert torch.autograd.gradcheck(lambda *a: LOSSES[loss](*a, impl="tiled", tile_size=2), inputs)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_is_stable_at_extreme_scale(loss: str) -> None:
    # float32 logits up to +-1000: a naive exp overflows, the online log-sum-exp must not
    x, y = features(40, 8, seed=6, dtype=torch.float32), features(40, 8, seed=7, dtype=torch.float32)
    scale, bias = torch.tensor(1000.0), torch.tensor(-10.0)
    dense = value_and_grads(LOSSES[loss], x, y, scale, bias, impl="dense")
    tiled = value_and_grads(LOSSES[loss], x, y, scale, bias, impl="tiled", tile_size=16)
    for a, b in zip(tiled, dense):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_bf16_close_to_float32(loss: str) -> None:
    x, y = features(64, 16, seed=8, dtype=torch.float32), features(64, 16, seed=9, dtype=torch.float32)
    scale, bias = torch.tensor(20.0), torch.tensor(-10.0)
    ref = LOSSES[loss](x, y, scale, bias, impl="dense")
    got = LOSSES[loss](x.bfloat16(), y.bfloat16(), scale, bias, impl="tiled", tile_size=16)
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["tiled", "dense"])
def test_under_autocast_computes_in_the_features_dtype(loss: str, impl: str) -> None:
    # bf16-mixed runs the loss inside autocast, on float32 features (F.normalize gives float32), and the
    # backward pass, which recomputes the tiles, outside it: both passes must see the same logits. Before,
    # CLIP's gradient was ~20% off (bf16 log-sum-exps against float32 tiles) and SigLIP's raised. The dense
    # path (trainer=gpu's, one device, B <= tile_size) took bf16 logits and returned a bf16 SigLIP loss,
    # unlike the tiled and ring paths (trainer=ddp's) of the same run.
    x, y = features(48, 16, seed=20, dtype=torch.float32), features(48, 16, seed=21, dtype=torch.float32)
    scale, bias = torch.tensor(100.0), torch.tensor(-10.0)
    dense = value_and_grads(LOSSES[loss], x, y, scale, bias, impl="dense")
    leaves = [t.clone().requires_grad_() for t in (x, y, scale, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = LOSSES[loss](*leaves, impl=impl, tile_size=16)
        with torch.no_grad():
            no_grad_value = LOSSES[loss](x, y, scale, bias, impl=impl, tile_size=16)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    tiled = [value.detach(), *(torch.zeros_like(bias) if g is None else g for g in grads)]
    assert value.dtype == torch.float32
    for a, b in zip([*tiled, no_grad_value], [*dense, dense[0]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_matches_open_clip_single_device(loss: str) -> None:
    open_clip_loss = open_clip_loss_module()
    x, y = features(11, 6, seed=10), features(11, 6, seed=11)
    scale, bias = torch.tensor(14.0, dtype=torch.float64), torch.tensor(-6.0, dtype=torch.float64)
    if loss == "clip":
        oc = open_clip_loss.ClipLoss()
        theirs = value_and_grads(lambda x, y, s, b: oc(x, y, s), x, y, scale, bias)
    else:
        theirs = value_and_grads(open_clip_loss.SigLipLoss(), x, y, scale, bias)
    for impl in ("dense", "tiled"):
        ours = value_and_grads(LOSSES[loss], x, y, scale, bias, impl=impl, tile_size=4)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_saves_linear_memory(loss: str) -> None:
    n, d = 256, 8
    x, y = (features(n, d, seed=s).requires_grad_() for s in (12, 13))
    scale, bias = torch.tensor(10.0, dtype=torch.float64, requires_grad=True), torch.tensor(-10.0)
    dense = saved_bytes(lambda: LOSSES[loss](x, y, scale, bias, impl="dense"))
    tiled = saved_bytes(lambda: LOSSES[loss](x, y, scale, bias, impl="tiled", tile_size=32))
    assert dense >= n * n * 8  # the logits
    # features, per-row/column statistics and scalars: O(B d), nothing B x B
    assert tiled <= (2 * n * d + 2 * n + 4) * 8


def test_clip_ignores_bias_but_keeps_it_in_graph() -> None:
    x, y = features(6, 4, seed=14), features(6, 4, seed=15)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    with_bias = ClipLoss()(x, y, scale, bias)
    (g,) = torch.autograd.grad(with_bias, [bias])
    assert g.item() == 0.0
    assert with_bias.item() == pytest.approx(ClipLoss()(x, y, scale).item(), rel=1e-14)


def test_auto_tiles_beyond_one_tile_and_configs_fail_loudly() -> None:
    assert not use_tiled("auto", 64, 64, 64) and use_tiled("auto", 65, 64, 64)
    assert use_tiled("tiled", 2, 2, 64) and not use_tiled("dense", 10**6, 10**6, 64)
    with pytest.raises(ValueError, match="impl"):
        ClipLoss(impl="flash")
    for cls in (ClipLoss, SigLipLoss):
        with pytest.raises(ValueError, match="dist_impl"):
            cls(dist_impl="bidir")
    with pytest.raises(ValueError, match="tile_size"):
        siglip_loss(*(features(2, 2, seed=0),) * 2, torch.tensor(1.0), tile_size=0)
    assert world_info() == (0, 1)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_unpaired_features_fail_loudly(loss: str, impl: str) -> None:
    # 5 texts for 4 images: the tiled CLIP and dense SigLIP losses used to score the extra text as a
    # negative of every image and return a number
    x, y = features(4, 3, seed=22), features(5, 3, seed=23)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    for a, b in [(x, y), (x, y[:4, :2]), (x[None], y[None, :4])]:
        with pytest.raises(ValueError, match="same shape"):
            LOSSES[loss](a, b, scale, bias, impl=impl, tile_size=2)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_scale_and_bias_of_shape_one_or_numbers(loss: str, impl: str) -> None:
    # transformers' SigLIP and FSDP2 hold the scale and bias as (1,): the tiled CLIP backward raised
    # ("invalid gradient ... got [] but expected shape compatible with [1]"), CLIP returned a (1,) loss;
    # plain numbers raised in three of the four paths
    x, y = features(6, 4, seed=24), features(6, 4, seed=25)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    ref = value_and_grads(LOSSES[loss], x, y, scale, bias, impl=impl, tile_size=4)
    got = value_and_grads(LOSSES[loss], x, y, scale.reshape(1), bias.reshape(1), impl=impl, tile_size=4)
    assert got[0].shape == () and got[3].shape == got[4].shape == (1,)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-12, atol=1e-12)
    number = LOSSES[loss](x, y, 10.0, -5.0, impl=impl, tile_size=4)
    torch.testing.assert_close(number, ref[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one number"):
        LOSSES[loss](x, y, torch.ones(2), impl=impl, tile_size=4)


def test_logit_stats_match_direct_computation() -> None:
    x, y = features(9, 4, seed=16).requires_grad_(), features(9, 4, seed=17)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    stats = logit_stats(x, y, scale, bias, tile_size=4)
    logits = (scale * x @ y.T + bias).detach()
    pos, neg = logits.diagonal(), logits[~torch.eye(9, dtype=torch.bool)]
    expected = {"pos": pos, "neg": neg}
    assert set(stats) == {f"logit_{k}_{s}" for k in expected for s in ("mean", "min", "max")}
    for kind, values in expected.items():
        for stat in ("mean", "min", "max"):
            got = stats[f"logit_{kind}_{stat}"]
            assert got.ndim == 0 and not got.requires_grad
            torch.testing.assert_close(got, getattr(values, stat)(), rtol=1e-12, atol=1e-12)
    single = logit_stats(x[:1], y[:1], scale)
    assert torch.isnan(single["logit_neg_mean"]) and single["logit_pos_mean"] == (scale * x[0] @ y[0])


def test_siglip_tiled_without_grad_gives_the_same_value() -> None:
    # under no_grad the tiled SigLIP skips the gradient matmuls it otherwise does in forward
    x, y = features(10, 4, seed=18), features(10, 4, seed=19)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    with torch.no_grad():
        got = siglip_loss(x.requires_grad_(), y, scale, bias, impl="tiled", tile_size=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, siglip_loss(x, y, scale, bias, impl="dense").detach(), rtol=1e-12, atol=0)
