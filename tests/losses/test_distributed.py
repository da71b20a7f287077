"""The losses are exact under data parallelism: W = 2, 3 and 4 gloo processes on CPU give, after DDP's
gradient averaging, the loss and gradients of one process holding the full batch (float64, 1e-10), also
for an uneven last batch (a rank with one row, a rank with none, ranks with odd rows), and with float32
features under autocast; they agree with open_clip; and the
rings of both losses save the same number of bytes for backward whatever W (2, 4, 8), while the
all-gather references grow with it.

One spawn serves every world size (spawning costs seconds); the tests read its results.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from clipforge.bench.losses import open_clip_loss_module, run_distributed, saved_bytes
from clipforge.losses import clip_loss, siglip_loss

SIZES = {
    4: {"even": [3, 3, 3, 3], "uneven": [2, 4, 1, 3]},
    3: {"even": [2, 2, 2], "uneven": [3, 0, 2]},  # an odd ring, and a rank without rows
    2: {"even": [3, 3], "uneven": [2, 5]},
}
DIM = 4
METHODS = {
    "clip_gather_dense": partial(clip_loss, dist_impl="gather", impl="dense"),
    "clip_gather_tiled": partial(clip_loss, dist_impl="gather", impl="tiled", tile_size=2),
    # ring blocks are the halves of the local batches: tiles of 2 and 3 leave partial tiles at the edges
    "clip_ring_tiled": partial(clip_loss, dist_impl="ring", impl="tiled", tile_size=2),
    "clip_ring_tile3": partial(clip_loss, dist_impl="ring", impl="tiled", tile_size=3),
    "clip_ring_dense": partial(clip_loss, dist_impl="ring", impl="dense"),
    "siglip_ring": partial(siglip_loss, dist_impl="ring", tile_size=2),
    "siglip_ring_one_tile": partial(siglip_loss, dist_impl="ring", tile_size=64),
    "siglip_gather": partial(siglip_loss, dist_impl="gather"),
}
MEM_BATCH, MEM_DIM = 8, 16  # local batch held fixed while W grows
MEM_WORLDS = [2, 4, 8]  # W = 8 measures memory only
MEM_METHODS = ["clip_ring_tiled", "clip_gather_dense", "siglip_ring", "siglip_gather"]


def make_inputs(sizes: list[int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return {
        "x": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1),
        "y": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1),
        "log_scale": torch.tensor(math.log(10.0), dtype=torch.float64),
        "bias": torch.tensor(-2.5, dtype=torch.float64),
    }


def loss_and_grads(fn, x, y, log_scale, bias, autocast: bool = False) -> dict[str, torch.Tensor]:
    """With ``autocast``, forward runs under CPU bf16 autocast and backward outside it, as with bf16-mixed."""
    x, y, log_scale, bias = (t.detach().clone().requires_grad_() for t in (x, y, log_scale, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, y, log_scale.exp(), bias)
    gx, gy, gs, gb = torch.autograd.grad(loss, [x, y, log_scale, bias], allow_unused=True)
    out = {"loss": loss.detach(), "x": gx, "y": gy, "log_scale": gs, "bias_in_graph": gb is not None}
    return out | {"bias": torch.zeros_like(bias) if gb is None else gb}


def _worker(rank: int, world: int, all_cases: dict) -> dict:
    out = {}
    for case, (sizes, inputs) in all_cases.get(world, {}).items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        x, y = inputs["x"][rows], inputs["y"][rows]
        for name, fn in METHODS.items():
            out[case, name] = loss_and_grads(fn, x, y, inputs["log_scale"], inputs["bias"])
        # Ranks that scale their loss differently (rank 0 by zero): the ring weights the column terms of
        # a visiting block by its owner's upstream gradient, as autograd through the gather does.
        for name in ("clip_ring_tiled", "clip_gather_dense"):
            weighted = partial(_times, METHODS[name], float(rank))
            out[case, name, "weighted"] = loss_and_grads(weighted, x, y, inputs["log_scale"], inputs["bias"])
        # bf16 features: float32 statistics travel beside bf16 texts
        low = [t.to(torch.bfloat16) for t in (x, y, inputs["log_scale"], inputs["bias"])]
        out[case, "clip_ring_tiled", "bf16"] = loss_and_grads(METHODS["clip_ring_tiled"], *low)
        # float32 features under autocast (bf16-mixed): the rings must not compute their tiles in bf16
        single = [t.float() for t in (x, y, inputs["log_scale"], inputs["bias"])]
        for name in ("clip_ring_tiled", "siglip_ring"):
            out[case, name, "autocast"] = loss_and_grads(METHODS[name], *single, autocast=True)
        if case == "even":
            open_clip_loss = open_clip_loss_module()
            clip = open_clip_loss.ClipLoss(
                local_loss=True, gather_with_grad=True, rank=rank, world_size=world
            )
            out[case, "open_clip_clip"] = loss_and_grads(_drop_bias(clip), x, y, *_scalars(inputs))
            siglip = open_clip_loss.SigLipLoss(rank=rank, world_size=world)
            out[case, "open_clip_siglip"] = loss_and_grads(siglip, x, y, *_scalars(inputs))
    # bytes saved for backward at a fixed local batch
    g = torch.Generator().manual_seed(100 + rank)
    x, y = (
        torch.randn(MEM_BATCH, MEM_DIM, generator=g, dtype=torch.float64, requires_grad=True) for _ in "xy"
    )
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    for name in MEM_METHODS:
        out["saved", name] = saved_bytes(lambda fn=METHODS[name]: fn(x, y, scale, bias))
    return out


def _times(fn, factor: float, *args):
    return fn(*args) * factor


def _drop_bias(loss):
    return lambda x, y, scale, bias: loss(x, y, scale)


def _scalars(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs["log_scale"], inputs["bias"]


def reference(method: str, inputs: dict) -> dict[str, torch.Tensor]:
    """Full batch in one process, written out directly (no clipforge code)."""

    def clip_ref(x, y, scale, bias):
        logits = scale * x @ y.T
        labels = torch.arange(x.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def siglip_ref(x, y, scale, bias):
        z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
        return -F.logsigmoid(z * (scale * x @ y.T + bias)).sum() / x.shape[0]

    fn = clip_ref if "clip_" in method and "siglip" not in method else siglip_ref
    return loss_and_grads(fn, inputs["x"], inputs["y"], inputs["log_scale"], inputs["bias"])


@pytest.fixture(scope="module")
def runs() -> dict[int, tuple[dict, list[dict]]]:
    inputs = {
        world: {case: (sizes, make_inputs(sizes, seed=world)) for case, sizes in cases.items()}
        for world, cases in SIZES.items()
    }
    results = run_distributed(_worker, sorted(set(SIZES) | set(MEM_WORLDS)), inputs)
    return {world: (inputs.get(world), per_rank) for world, per_rank in results.items()}


def _check_ddp(per_rank: list[dict], ref: dict, sizes: list[int]) -> None:
    world = len(sizes)
    # The logged value (mean over ranks) is the full-batch loss.
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in per_rank]).mean(), ref["loss"], rtol=0, atol=1e-10
    )
    # DDP averages gradients: (1/W) * sum over ranks is the full-batch gradient. Feature gradients stay on
    # the rank that owns the rows, whose encoder sees W times them before the averaging.
    for key in ("x", "y"):
        got = torch.cat([r[key] for r in per_rank]) / world
        torch.testing.assert_close(got, ref[key], rtol=0, atol=1e-10)
    for key in ("log_scale", "bias"):
        got = torch.stack([r[key] for r in per_rank]).sum() / world
        torch.testing.assert_close(got, ref[key], rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", ["even", "uneven"])
@pytest.mark.parametrize("world", list(SIZES))
def test_matches_full_batch(runs, world: int, case: str, method: str) -> None:
    inputs, per_rank = runs[world]
    sizes, full = inputs[case]
    assert [r[case, method]["x"].shape[0] for r in per_rank] == sizes
    # the bias is in the graph of every loss (CLIP: zero gradient), so DDP sees no unused parameter
    assert all(r[case, method]["bias_in_graph"] for r in per_rank)
    _check_ddp([r[case, method] for r in per_rank], reference(method, full), sizes)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("clip_gather_dense", "open_clip_clip"),
        ("clip_gather_tiled", "open_clip_clip"),
        ("clip_ring_tiled", "open_clip_clip"),
        ("clip_ring_dense", "open_clip_clip"),
        ("siglip_ring", "open_clip_siglip"),
        ("siglip_gather", "open_clip_siglip"),
    ],
)
@pytest.mark.parametrize("world", list(SIZES))
def test_matches_open_clip_per_rank(runs, world: int, ours: str, theirs: str) -> None:
    _, per_rank = runs[world]
    for r in per_rank:
        for key in ("loss", "x", "y", "log_scale"):
            torch.testing.assert_close(r["even", ours][key], r["even", theirs][key], rtol=0, atol=1e-10)
    if theirs == "open_clip_siglip":
        for r in per_rank:
            torch.testing.assert_close(r["even", ours]["bias"], r["even", theirs]["bias"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["even", "uneven"])
@pytest.mark.parametrize("world", list(SIZES))
def test_clip_ring_takes_each_ranks_upstream_gradient(runs, world: int, case: str) -> None:
    for r in runs[world][1]:
        ring, gather = r[case, "clip_ring_tiled", "weighted"], r[case, "clip_gather_dense", "weighted"]
        for key in ("loss", "x", "y", "log_scale", "bias"):
            torch.testing.assert_close(ring[key], gather[key], rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["even", "uneven"])
@pytest.mark.parametrize("world", list(SIZES))
def test_clip_ring_bf16_near_float64(runs, world: int, case: str) -> None:
    for r in runs[world][1]:
        low, exact = r[case, "clip_ring_tiled", "bf16"], r[case, "clip_ring_tiled"]
        assert low["x"].dtype == torch.bfloat16
        for key in ("loss", "x", "y", "log_scale"):
            torch.testing.assert_close(low[key].double(), exact[key], rtol=0.03, atol=0.03)


@pytest.mark.parametrize("method", ["clip_ring_tiled", "siglip_ring"])
@pytest.mark.parametrize("case", ["even", "uneven"])
@pytest.mark.parametrize("world", list(SIZES))
def test_ring_under_autocast_computes_in_float32(runs, world: int, case: str, method: str) -> None:
    # forward inside autocast, backward outside: both passes of the ring must see the same float32 logits
    # (before, CLIP's backward took float32 tiles against log-sum-exps of bf16 ones)
    for r in runs[world][1]:
        got, exact = r[case, method, "autocast"], r[case, method]
        assert got["loss"].dtype == torch.float32
        for key in ("loss", "x", "y", "log_scale", "bias"):
            torch.testing.assert_close(got[key].double(), exact[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("ring", "gather"), [("siglip_ring", "siglip_gather"), ("clip_ring_tiled", "clip_gather_dense")]
)
def test_ring_saved_bytes_flat_in_world_size(runs, ring: str, gather: str) -> None:
    saved = {w: {r["saved", ring] for r in runs[w][1]} for w in MEM_WORLDS}
    gathered = {w: max(r["saved", gather] for r in runs[w][1]) for w in MEM_WORLDS}
    assert all(len(s) == 1 for s in saved.values()), saved  # the same on every rank
    flat = {w: s.pop() for w, s in saved.items()}
    assert max(flat.values()) <= 1.1 * min(flat.values()), flat
    # The ring keeps its own images and texts (float64) and the scalars (float32; SigLIP: scale and bias),
    # CLIP also the row and column log-sum-exps (float64): nothing per foreign block.
    own = 2 * MEM_BATCH * MEM_DIM * 8
    expect = own + 2 * 4 if ring == "siglip_ring" else own + 4 + 2 * MEM_BATCH * 8
    assert set(flat.values()) == {expect}
    # the references grow with W (b x B logits, gathered features)
    assert gathered[2] < gathered[4] < gathered[8] and gathered[2] > expect, gathered
