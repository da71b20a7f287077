"""The SigLIP 2 objectives against small independent references, value and gradients (float64): the DINO
loss and its centre, LocCa's token cross-entropy, SILC's on-device crops and TIPS's masks, and each
objective module wired end to end (student, teacher, head, mask token)."""

from __future__ import annotations

import pytest
import torch
from objhelpers import (
    IMG,
    captions,
    head,
    locca,
    objective_batch,
    ref_dino,
    ref_token_ce,
    silc,
    teacher_of,
    tiny_clip,
    tips,
)
from torchvision.ops import roi_align

from clipforge.losses.dino import dino_loss, updated_centre
from clipforge.losses.locca import caption_loss
from clipforge.losses.silc import crop_resize, sample_crop_boxes
from clipforge.losses.tips import random_patch_mask


def test_dino_loss_and_centre_match_the_written_out_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 12, generator=g, dtype=torch.float64)
    c = torch.randn(12, generator=g, dtype=torch.float64) * 0.1
    ours = dino_loss(s, t, c, 0.1, 0.04)
    (g_ours,) = torch.autograd.grad(ours, s)
    ref = ref_dino(s, t, c, 0.1, 0.04)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    # the closed form: d/ds = (softmax(s / ts) - q) / (ts * N)
    q = torch.softmax((t - c) / 0.04, dim=-1)
    torch.testing.assert_close(
        g_ours, (torch.softmax(s.detach() / 0.1, -1) - q) / (0.1 * 7), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(updated_centre(c, t, 0.9), 0.9 * c + 0.1 * t.mean(0), rtol=1e-12, atol=1e-15)


def test_a_non_finite_teacher_batch_leaves_the_centre_where_it_was() -> None:
    # The non-finite guard skips the update of a NaN batch; the running centre must not keep its NaN.
    c = torch.randn(12, dtype=torch.float64) * 0.1
    t = torch.randn(7, 12, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        poisoned = t.clone()
        poisoned[3, 5] = bad
        assert torch.equal(updated_centre(c, poisoned, 0.9), c)


def test_caption_loss_is_the_mean_over_target_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    is_target = torch.rand(3, 5, generator=g) > 0.4
    ours = caption_loss(logits, targets, is_target)
    ref = ref_token_ce(logits, targets, is_target)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0], rtol=1e-10, atol=1e-15
    )
    lib = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~is_target, -100))
    torch.testing.assert_close(ours, lib, rtol=1e-12, atol=0)


def test_local_crops_are_bilinear_roi_crops_inside_the_image() -> None:
    torch.manual_seed(0)
    boxes = sample_crop_boxes(4, 3, (0.05, 0.4))
    x0, y0, x1, y1 = boxes.unbind(-1)
    area = (x1 - x0) * (y1 - y0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()
    assert (area >= 0.05 - 1e-6).all() and (area <= 0.4 + 1e-6).all()
    ratio = (x1 - x0) / (y1 - y0)
    assert (ratio > 3 / 4 - 1e-5).all() and (ratio < 4 / 3 + 1e-5).all()
    images = torch.randn(4, 3, 20, 24, dtype=torch.float64)
    crops = crop_resize(images, boxes, 6)
    assert crops.shape == (12, 3, 6, 6)
    # torchvision's RoIAlign with one bilinear sample per output pixel at continuous coordinates
    scale = torch.tensor([24, 20, 24, 20], dtype=torch.float64)
    rois = torch.cat(
        [torch.arange(4).repeat_interleave(3)[:, None].double(), boxes.reshape(-1, 4).double() * scale], 1
    )
    ref = roi_align(images, rois, output_size=6, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(crops, ref, rtol=1e-10, atol=1e-10)
    full = crop_resize(images[:, :, :, :20], torch.tensor([[[0.0, 0.0, 1.0, 1.0]]] * 4), 20)
    torch.testing.assert_close(full, images[:, :, :, :20], rtol=0, atol=1e-12)  # the whole image: identity


def test_patch_mask_has_exactly_the_ratio_per_row() -> None:
    torch.manual_seed(0)
    mask = random_patch_mask(6, 16, 0.5)
    assert mask.sum(1).tolist() == [8] * 6 and len({tuple(r) for r in mask.tolist()}) == 6
    assert random_patch_mask(2, 16, 0.01).sum(1).tolist() == [1, 1]


def test_dino_head_scores_are_cosines() -> None:
    h = head()
    out = h(torch.randn(5, 16, dtype=torch.float64))
    assert out.shape == (5, 12) and out.abs().max() <= 1 + 1e-12


def _grads(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), got)}


def test_silc_module_distils_each_crop_towards_the_teachers_global_view() -> None:
    model, obj = tiny_clip(), silc()
    teacher = teacher_of(model, obj)
    images = torch.randn(3, 3, IMG, IMG, dtype=torch.float64)
    boxes = sample_crop_boxes(3, obj.num_local, obj.local_scale)
    obj.sample_boxes = lambda b, device: boxes
    params = {"head": obj.head.prototypes, "patch": model.visual.patch_embed.weight}
    loss = obj(objective_batch(model, images, captions(3)), model, teacher)
    ours = _grads(loss, params)
    # reference: crops by RoIAlign, features and heads called by hand
    scale = torch.tensor([IMG] * 4, dtype=torch.float64)
    rois = torch.cat(
        [torch.arange(3).repeat_interleave(2)[:, None].double(), boxes.reshape(-1, 4) * scale], 1
    )
    crops = roi_align(images, rois, output_size=8, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    vis = model.visual
    student = obj.head(vis.fc_norm(vis.forward_features(crops, interpolate_pos=True)[:, 0]))
    tv = teacher.model.visual
    target = teacher.objective.head(tv.fc_norm(tv.forward_features(images)[:, 0])).detach()
    ref = ref_dino(student, target.repeat_interleave(2, 0), torch.zeros(12, dtype=torch.float64))
    refg = _grads(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    for k in params:
        assert ours[k].abs().max() > 0
        torch.testing.assert_close(ours[k], refg[k], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(obj.centre, 0.1 * target.mean(0), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in teacher.model.parameters())  # nothing flows into the teacher


def test_tips_module_predicts_teacher_patches_at_masked_positions_only() -> None:
    model, obj = tiny_clip(), tips()
    teacher = teacher_of(model, obj)
    images = torch.randn(3, 3, IMG, IMG, dtype=torch.float64)
    torch.manual_seed(5)
    mask = random_patch_mask(3, model.visual.num_patches, 0.5)
    obj.sample_mask = lambda b, n, device: mask
    params = {"head": obj.head.prototypes, "mask_token": obj.mask_token, "pos": model.visual.pos_embed}
    loss = obj(objective_batch(model, images, captions(3)), model, teacher)
    ours = _grads(loss, params)
    # reference: substitute the token by hand in the patch embeddings, gather masked rows explicitly
    vis = model.visual
    x = vis.patch_embed(images).flatten(2).transpose(1, 2)
    x = torch.where(mask[..., None], obj.mask_token, x)
    x = torch.cat([vis.cls_token.expand(3, -1, -1), x], 1) + vis.pos_embed
    tokens = vis.norm(vis.transformer(vis.norm_pre(x)))[:, 1:]
    rows = [tokens[b, n] for b in range(3) for n in range(16) if mask[b, n]]
    student = obj.head(torch.stack(rows))
    t_tokens = teacher.model.visual.forward_features(images)[:, 1:]
    t_rows = [t_tokens[b, n] for b in range(3) for n in range(16) if mask[b, n]]
    target = teacher.objective.head(torch.stack(t_rows)).detach()
    ref = ref_dino(student, target, torch.zeros(12, dtype=torch.float64))
    refg = _grads(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    for k in params:
        assert ours[k].abs().max() > 0, k
        torch.testing.assert_close(ours[k], refg[k], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(obj.centre, 0.1 * target.mean(0), rtol=1e-10, atol=1e-14)  # masked patches


def _locca_batch(model: torch.nn.Module) -> tuple:
    """Three samples, the third without a box: (batch, images, captions, regions, boxes)."""
    images, caps = torch.randn(3, 3, IMG, IMG, dtype=torch.float64), captions(3)
    regions = captions(3, seed=7)
    boxes = torch.tensor(
        [[0.1, 0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0], [float("nan")] * 4], dtype=torch.float64
    )
    extras = {"boxes": boxes, "region_tokens": regions}
    return objective_batch(model, images, caps, extras), images, caps, regions, boxes


def _locca_reference(obj, model, images, caps, regions, boxes) -> torch.Tensor:
    """The loss written out from the drawn tasks (and parallel rows): sequences built by hand, the masked
    inputs of a parallel row are every position from its first answer token on."""
    dec, eot = obj.decoder, 59
    seqs, starts = [], []
    for i in range(3):
        words = [t for t in caps[i].tolist()[1:] if t not in (0, 59)]
        region = [t for t in regions[i].tolist()[1:] if t not in (0, 59)]
        bins = [min(int(c * 8), 7) + dec.loc_offset for c in boxes[i].tolist()] if i < 2 else []
        t = obj.last_tasks[i]
        prompt = {"caption": [dec.task_token["caption"]], "ref": [dec.task_token["ref"], *region]}.get(
            t, [dec.task_token["grounded"], *bins]
        )
        answer = {"caption": words, "ref": bins, "grounded": region}[t] + [eot]
        seqs.append(prompt + answer)
        starts.append(len(prompt))
    S = max(map(len, seqs))
    seq = torch.tensor([s + [0] * (S - len(s)) for s in seqs])
    is_target = torch.tensor([[starts[i] <= j < len(seqs[i]) for j in range(S)] for i in range(3)])
    masked = torch.tensor([[obj.last_parallel[i] and j >= starts[i] for j in range(S - 1)] for i in range(3)])
    hidden = dec.forward_features(
        seq[:, :-1], model.visual.forward_features(images), masked if masked.any() else None
    )
    return ref_token_ce(dec.head(hidden), seq[:, 1:], is_target[:, 1:])


@pytest.mark.parametrize("task", ["caption", "ref", "grounded"])
def test_locca_module_scores_the_answer_tokens_of_each_task(task: str) -> None:
    model = tiny_clip()
    obj = locca(task_probs=tuple(float(t == task) for t in ("caption", "ref", "grounded")))
    batch, *data = _locca_batch(model)
    params = {"decoder_embed": obj.decoder.token_embedding.weight, "patch": model.visual.patch_embed.weight}
    loss = obj(batch, model, None)
    ours = _grads(loss, params)
    # the third sample has no box: it is captioned whatever the task
    assert obj.last_tasks == [task, task, "caption"] and obj.last_parallel == [False] * 3
    ref = _locca_reference(obj, model, *data)
    refg = _grads(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    for k in params:
        assert ours[k].abs().max() > 0
        torch.testing.assert_close(ours[k], refg[k], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_locca_parallel_prediction_scores_each_answer_from_mask_tokens(prob: float) -> None:
    model = tiny_clip()
    obj = locca(parallel_prob=prob)
    batch, *data = _locca_batch(model)
    dec = obj.decoder
    params = {"mask_token": dec.mask_token, "decoder_embed": dec.token_embedding.weight}
    loss = obj(batch, model, None)
    ours = _grads(loss, params)
    # seeded: at 1.0 every sample, at 0.5 (this seed) some of them; both kinds of task prompt in the batch
    assert obj.last_parallel == ([True] * 3 if prob == 1.0 else [True, True, False])
    assert set(obj.last_tasks) - {"caption"}
    ref = _locca_reference(obj, model, *data)
    refg = _grads(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    for k in params:
        assert ours[k].abs().max() > 0, k  # the gradient reaches the mask token
        torch.testing.assert_close(ours[k], refg[k], rtol=1e-8, atol=1e-12)


def test_locca_draws_parallel_samples_with_the_probability_and_nothing_at_zero() -> None:
    obj = locca(parallel_prob=0.25)
    torch.manual_seed(3)
    drawn = obj.sample_parallel(20000)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(20000) < 0.25)  # per sample, torch's seeded generator
    assert abs(drawn.double().mean().item() - 0.25) < 0.015
    assert obj.eval().sample_parallel(4) is None  # training only, as big_vision's deterministic=False
    # at 0 nothing is drawn: the random stream after a step is the one without parallel prediction
    model, off = tiny_clip(), locca()
    batch, *_ = _locca_batch(model)
    torch.manual_seed(11)
    off(batch, model, None)
    after = torch.get_rng_state()
    torch.manual_seed(11)
    off.sample_tasks([True, True, False])
    assert torch.equal(after, torch.get_rng_state()) and off.last_parallel == [False] * 3


def test_locca_without_box_data_captions_every_sample() -> None:
    model, obj = tiny_clip(), locca()
    batch = objective_batch(model, torch.randn(4, 3, IMG, IMG, dtype=torch.float64), captions(4))
    assert torch.isfinite(obj(batch, model, None)) and obj.last_tasks == ["caption"] * 4


def test_distillation_objectives_need_a_teacher() -> None:
    model = tiny_clip()
    batch = objective_batch(model, torch.randn(2, 3, IMG, IMG, dtype=torch.float64), captions(2))
    for obj in (silc(), tips()):
        with pytest.raises(ValueError, match="EMA teacher"):
            obj(batch, model, None)
