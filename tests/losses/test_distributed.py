"""The losses are exact under data parallelism: W = 2 and W = 4 gloo processes on CPU give, after DDP's
gradient averaging, the loss and gradients of one process holding the full batch (float64, 1e-10), also
for an uneven last batch; they agree with open_clip; and the SigLIP ring saves the same number of bytes
for backward whatever W, while the all-gather reference grows with it.

One spawn per world size runs every case (spawning costs seconds); the tests read its results.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lossdist import open_clip_loss_module, run_distributed, saved_bytes

from clipforge.losses import clip_loss, siglip_loss

SIZES = {4: {"even": [3, 3, 3, 3], "uneven": [2, 4, 1, 3]}, 2: {"even": [3, 3], "uneven": [2, 5]}}
DIM = 4
METHODS = {
    "clip_dense": partial(clip_loss, impl="dense"),
    "clip_tiled": partial(clip_loss, impl="tiled", tile_size=2),
    "siglip_ring": partial(siglip_loss, dist_impl="ring", tile_size=2),
    "siglip_ring_one_tile": partial(siglip_loss, dist_impl="ring", tile_size=64),
    "siglip_gather": partial(siglip_loss, dist_impl="gather"),
}
MEM_BATCH, MEM_DIM = 8, 16  # local batch held fixed while W grows


def make_inputs(sizes: list[int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return {
        "x": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1),
        "y": F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1),
        "log_scale": torch.tensor(math.log(10.0), dtype=torch.float64),
        "bias": torch.tensor(-2.5, dtype=torch.float64),
    }


def loss_and_grads(fn, x, y, log_scale, bias) -> dict[str, torch.Tensor]:
    x, y, log_scale, bias = (t.detach().clone().requires_grad_() for t in (x, y, log_scale, bias))
    loss = fn(x, y, log_scale.exp(), bias)
    gx, gy, gs, gb = torch.autograd.grad(loss, [x, y, log_scale, bias], allow_unused=True)
    gb = torch.zeros_like(bias) if gb is None else gb
    return {"loss": loss.detach(), "x": gx, "y": gy, "log_scale": gs, "bias": gb}


def _worker(rank: int, world: int, all_cases: dict) -> dict:
    out = {}
    for case, (sizes, inputs) in all_cases[world].items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        x, y = inputs["x"][rows], inputs["y"][rows]
        for name, fn in METHODS.items():
            out[case, name] = loss_and_grads(fn, x, y, inputs["log_scale"], inputs["bias"])
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
    for name in ("siglip_ring", "siglip_gather", "clip_dense"):
        out["saved", name] = saved_bytes(lambda fn=METHODS[name]: fn(x, y, scale, bias))
    return out


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
    results = run_distributed(_worker, list(SIZES), inputs)
    return {world: (inputs[world], results[world]) for world in SIZES}


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
    _check_ddp([r[case, method] for r in per_rank], reference(method, full), sizes)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("clip_dense", "open_clip_clip"),
        ("clip_tiled", "open_clip_clip"),
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


def test_ring_saved_bytes_flat_in_world_size(runs) -> None:
    saved = {w: [r["saved", name] for r in runs[w][1] for name in ["siglip_ring"]] for w in SIZES}
    gathered = {w: [r["saved", "siglip_gather"] for r in runs[w][1]] for w in SIZES}
    ring2, ring4 = set(saved[2]), set(saved[4])
    assert ring2 == ring4 and len(ring2) == 1, (saved, gathered)
    # the ring keeps its own images and texts (float64) plus two scalars, nothing per foreign block
    assert ring2 == {2 * MEM_BATCH * MEM_DIM * 8 + 2 * 4}
    assert min(gathered[4]) > max(gathered[2]) > ring2.pop()
    clip2, clip4 = (max(r["saved", "clip_dense"] for r in runs[w][1]) for w in (2, 4))
    assert clip4 > clip2  # gathered CLIP holds b x B logits, as documented
