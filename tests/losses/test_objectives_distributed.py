"""Under two gloo processes every SigLIP 2 objective gives, after DDP's gradient averaging, the loss and
gradients of one process holding the whole batch (float64, uneven split 2 + 3), the DINO centres included
(mean over the global batch); and the EMA of DDP-trained weights is bit-identical on every rank.

One spawn runs every case (spawning costs seconds); the tests read its results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from objhelpers import IMG, captions, locca, objective_batch, silc, teacher_of, tiny_clip, tips
from torch.nn.parallel import DistributedDataParallel

from clipforge.bench.losses import run_distributed
from clipforge.ema import ModelEMA
from clipforge.losses.silc import sample_crop_boxes
from clipforge.losses.tips import random_patch_mask

SPLITS = {1: [5], 2: [2, 3]}
OBJECTIVES = {"silc": silc, "tips": tips, "locca": locca}


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    boxes = torch.rand(5, 4, generator=g, dtype=torch.float64) * 0.5
    boxes[:, 2:] += 0.5  # valid boxes: x1 > x0, y1 > y0
    boxes[3] = float("nan")  # one sample without a box: always captioned
    return {
        "images": torch.randn(5, 3, IMG, IMG, generator=g, dtype=torch.float64),
        "tokens": captions(5),
        "regions": captions(5, seed=3),
        "boxes": boxes,
        "crops": sample_crop_boxes(5, 2, (0.2, 0.5)),
        "mask": random_patch_mask(5, (IMG // 4) ** 2, 0.5),
        "tasks": ["ref", "grounded", "caption", "ref", "grounded"],
    }


def _objective_case(name: str, rank: int, world: int, inputs: dict) -> dict:
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    model, obj = tiny_clip(), OBJECTIVES[name]()
    teacher = teacher_of(model, obj)
    # every sample's random draws are those of the whole batch, whichever rank holds it
    obj.sample_boxes = lambda b, device: inputs["crops"][rows]
    obj.sample_mask = lambda b, n, device: inputs["mask"][rows]
    obj.sample_tasks = lambda has: [t if ok else "caption" for t, ok in zip(inputs["tasks"][rows], has)]
    extras = {"boxes": inputs["boxes"][rows], "region_tokens": inputs["regions"][rows]}
    batch = objective_batch(model, inputs["images"][rows], inputs["tokens"][rows], extras)
    loss = obj(batch, model, teacher if obj.needs_teacher else None)
    loss.backward()
    named = {**{f"model.{k}": p for k, p in model.named_parameters()}, **dict(obj.named_parameters())}
    grads = {}
    for k, p in named.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if world > 1:
            dist.all_reduce(g)
            g = g / world  # what DDP does
        grads[k] = g
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value = value / world  # the logged mean over ranks
    centre = obj.centre.clone() if hasattr(obj, "centre") else None
    return {"loss": value, "grads": grads, "centre": centre}


def _ema_case(rank: int, world: int) -> dict:
    model = tiny_clip()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ModelEMA({"model": model}, decay=0.7)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        out = ddp(torch.randn(2, 3, IMG, IMG, generator=g, dtype=torch.float64), captions(2, seed=rank))
        loss = (out["image_features"] * out["text_features"]).sum() * out["logit_scale"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update({"model": model})
    return {"ema": {k: v.clone() for k, v in ema.state_dict().items()}, "init": tiny_clip().state_dict()}


def _worker(rank: int, world: int, inputs: dict) -> dict:
    out = {name: _objective_case(name, rank, world, inputs) for name in OBJECTIVES}
    if world > 1:
        out["ema"] = _ema_case(rank, world)
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    return run_distributed(_worker, [1, 2], make_inputs())


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_processes_give_the_full_batch_loss_and_gradient(results: dict, name: str) -> None:
    full = results[1][0][name]
    for rank in range(2):
        part = results[2][rank][name]
        torch.testing.assert_close(part["loss"], full["loss"], rtol=1e-10, atol=0)
        assert part["grads"].keys() == full["grads"].keys()
        moved = 0
        for k, g in full["grads"].items():
            torch.testing.assert_close(part["grads"][k], g, rtol=1e-8, atol=1e-13, msg=k)
            moved += bool(g.abs().max() > 0)
        assert moved >= 5  # the gradient reaches the tower and the objective's own parameters
        if full["centre"] is not None:  # the DINO centre: the global-batch mean, the same on both ranks
            assert full["centre"].abs().max() > 0
            torch.testing.assert_close(part["centre"], full["centre"], rtol=1e-10, atol=1e-15)


def test_ema_of_ddp_weights_is_bit_identical_on_every_rank(results: dict) -> None:
    a, b = results[2][0]["ema"]["ema"], results[2][1]["ema"]["ema"]
    assert a.keys() == b.keys() and int(a["steps"]) == 3
    assert all(torch.equal(a[k], b[k]) for k in a), "EMA differs between ranks"
    init = results[2][0]["ema"]["init"]
    assert not torch.equal(a["shadow.model.visual.patch_embed.weight"], init["visual.patch_embed.weight"])
