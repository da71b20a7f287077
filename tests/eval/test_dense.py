"""The localisation measures: per-patch targets from the generator's coverage, mean IoU, the dense linear
probe (perfect on features that carry the class, chance-like on features that do not), box IoU and the
referring-box accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from clipforge.data import synthetic
from clipforge.eval import dense
from clipforge.eval.dense import box_iou, dense_probe, fit_linear, mean_iou, patch_features, patch_targets


def test_patch_targets_label_the_patches_a_shape_mostly_covers() -> None:
    coverage = np.zeros((8, 8))
    coverage[0:4, 0:4] = 1.0  # patch (0, 0) fully covered
    coverage[4:8, 4:6] = 1.0  # patch (1, 1) half covered: counts
    coverage[0:4, 4:5] = 1.0  # patch (0, 1) a quarter: background
    assert patch_targets(coverage, label=2, patch_size=4).tolist() == [3, 0, 0, 3]


def test_generated_coverage_gives_shape_patches_in_its_box() -> None:
    s = synthetic.make_sample(3, "heldout", image_size=32)
    targets = patch_targets(s.coverage, s.meta["label"], patch_size=4).reshape(8, 8)
    rows, cols = np.nonzero(targets)
    assert len(rows) > 0 and set(targets[rows, cols].tolist()) == {s.meta["label"] + 1}
    x0, y0, x1, y1 = s.meta["box"]
    assert cols.min() >= math.floor(x0 * 8) and cols.max() < math.ceil(x1 * 8)
    assert rows.min() >= math.floor(y0 * 8) and rows.max() < math.ceil(y1 * 8)


def test_mean_iou_by_hand() -> None:
    pred = torch.tensor([0, 0, 1, 1, 2])
    target = torch.tensor([0, 1, 1, 1, 0])
    miou, per_class = mean_iou(pred, target, num_classes=4)
    assert per_class[:3] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0] and math.isnan(per_class[3])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


class _PatchMeans(nn.Module):
    """A stand-in image tower: each 4x4 patch's token is its mean colour (plus noise dims when ``noise``)."""

    num_prefix_tokens = 0

    def __init__(self, informative: bool) -> None:
        super().__init__()
        self.informative = informative

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # (B, 3, g, g)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, N, 3)
        if not self.informative:
            tokens = torch.randn_like(tokens)
        return tokens


def _split(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images of 2x2 patches coloured by class (0 black, 1 red, 2 green), with their patch targets."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, 2, 2), generator=g)
    colours = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    images = colours[labels].permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return images, labels.reshape(n, -1).numpy()


def test_dense_probe_reads_what_the_patch_tokens_carry() -> None:
    train, test = _split(40, 0), _split(20, 1)
    model = nn.Module()
    model.visual = _PatchMeans(informative=True)
    good = dense_probe(model, train, test, num_classes=3)
    assert good["miou"] == pytest.approx(1.0) and good["patch_accuracy"] == 1.0
    model.visual = _PatchMeans(informative=False)
    torch.manual_seed(0)
    blind = dense_probe(model, train, test, num_classes=3)
    assert blind["miou"] < 0.5


def test_dense_probe_fits_on_the_patch_features_without_a_copy(monkeypatch) -> None:
    # the raw features of both splits stayed alive beside their standardised copies through the fit
    made, fitted = [], []
    monkeypatch.setattr(dense, "patch_features", lambda *a: made.append(patch_features(*a)) or made[-1])
    monkeypatch.setattr(dense, "fit_linear", lambda x, *a: fitted.append(x) or fit_linear(x, *a))
    model = nn.Module()
    model.visual = _PatchMeans(informative=True)
    train, test = _split(40, 0), _split(20, 1)
    raw = patch_features(model, train[0]).flatten(0, 1)
    assert dense_probe(model, train, test, num_classes=3)["miou"] == pytest.approx(1.0)
    assert fitted[0].data_ptr() == made[0].data_ptr()  # standardised in place
    assert torch.equal(fitted[0], (raw - raw.mean(0)) / raw.std(0).clamp(min=1e-6))  # as out of place


def test_box_iou_by_hand() -> None:
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert box_iou([0, 0, 0.5, 1], [0.25, 0, 0.75, 1]) == pytest.approx(0.25 / 0.75)
    assert box_iou([0, 0, 0.1, 0.1], [0.5, 0.5, 1, 1]) == 0.0


def test_referring_box_accuracy_decodes_each_expression_once(monkeypatch) -> None:
    calls = []

    def fake_decode(model, decoder, images, task, ref):
        calls.append((ref, images.shape[0]))
        return [[0.0, 0.0, 0.5, 0.5]] * images.shape[0]

    monkeypatch.setattr(dense, "decode", fake_decode)
    images = torch.zeros(3, 3, 8, 8)
    refs = ["the red circle", "the blue square", "the red circle"]
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.6, 0.5]]
    res = dense.referring_box_accuracy(nn.Module(), nn.Module(), images, refs, boxes)
    assert sorted(calls) == [("the blue square", 1), ("the red circle", 2)]
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["mean_iou"] == pytest.approx((1.0 + 0.0 + 0.25 / 0.3) / 3)


def test_referring_box_accuracy_decodes_a_batch_at_a_time(monkeypatch) -> None:
    # all images of one expression went through the towers and the decoder in one batch, however many
    calls = []

    def fake_decode(model, decoder, images, task, ref):
        calls.append((ref, images.shape[0]))
        return [[0.0, 0.0, float(v), 1.0] for v in images[:, 0, 0, 0]]  # each image's own box back

    monkeypatch.setattr(dense, "decode", fake_decode)
    n = 300
    images = torch.zeros(n, 3, 2, 2)
    images[:, 0, 0, 0] = torch.linspace(0.1, 1.0, n)
    refs = ["the red circle" if i % 5 else "the blue square" for i in range(n)]
    boxes = [[0.0, 0.0, float(v), 1.0] for v in images[:, 0, 0, 0]]
    dense.referring_box_accuracy(nn.Module(), nn.Module(), images, ["the red circle"] * n, boxes)
    assert calls == [("the red circle", 256), ("the red circle", 44)]  # the default batch
    calls.clear()
    res = dense.referring_box_accuracy(nn.Module(), nn.Module(), images, refs, boxes, batch_size=100)
    assert calls == [("the blue square", 60), *[("the red circle", 100)] * 2, ("the red circle", 40)]
    assert res == {"accuracy": 1.0, "mean_iou": 1.0}  # every image got its own box back


@pytest.mark.parametrize("num_box_bins", [16, 1024])
def test_a_decoder_that_writes_its_training_target_scores_perfectly(monkeypatch, num_box_bins: int) -> None:
    """Train-time target vs eval-time decode, end to end without training: the referring-task sequence the
    loss teaches (regions stage in the eval crop's frame, collated phrase tokens, ``TextDecoder.sequences``)
    is what an oracle ``generate`` writes after exactly the prompt that ``decode`` builds, under its allowed
    tokens; reading it back and scoring must give every image its box. A mismatch of crop frame, x/y order,
    prompt layout, teacher-forcing offset or (de)quantisation fails here."""
    from clipforge.data.decode import Sample
    from clipforge.data.regions import CollateRegions, region
    from clipforge.data.tokenizer import Tokenizer
    from clipforge.data.transforms import center_crop_box
    from clipforge.eval.datasets import eval_transform
    from clipforge.models.decoder import TextDecoder, bpe_words

    samples = list(synthetic.generate("heldout", 12, image_size=32))
    decoder = TextDecoder(
        context_length=20, image_dim=8, embed_dim=8, depth=1, num_heads=1, num_box_bins=num_box_bins
    )
    tokenizer = Tokenizer(decoder.context_length)
    # the training side: the regions stage with the crop of the eval transform, the loss's sequences
    items = [
        Sample(
            None, s.caption, s.key, center_crop_box(32, 32, 32), (32, 32), json.dumps(s.meta).encode(), 0.0
        )
        for s in samples
    ]
    for item in items:
        item.region = region(item)
    extras = CollateRegions(tokenizer)(items)
    seqs, is_target = decoder.sequences(
        ["ref"] * len(items), [[]] * len(items), bpe_words(extras["region_tokens"]), extras["boxes"]
    )
    taught = {s.meta["referring_expression"]: [] for s in samples}
    for s, seq, tgt in zip(samples, seqs.tolist(), is_target.tolist()):
        first = tgt.index(True)
        taught[s.meta["referring_expression"]].append((seq[:first], seq[first : first + 4]))

    def oracle(image_tokens, prompt, max_new_tokens, allowed=None, stop_token=None):
        rows = taught_for[tuple(prompt[0].tolist())]
        assert len(rows) == prompt.shape[0] and max_new_tokens == 4
        for taught_prompt, answer in rows:
            assert taught_prompt == prompt[0].tolist()  # decode prompts exactly as training did
            assert allowed is not None and all(bool(allowed[t]) for t in answer)
        return torch.cat([prompt, torch.tensor([answer for _, answer in rows])], dim=1)

    taught_for = {tuple(rows[0][0]): rows for rows in taught.values()}
    monkeypatch.setattr(decoder, "generate", oracle)

    class Tower(nn.Module):
        def forward_features(self, images: torch.Tensor) -> torch.Tensor:
            return torch.zeros(images.shape[0], 4, 8)

    model = nn.Module()
    model.visual = Tower()
    transform = eval_transform(32)
    images = torch.stack([transform(s.image) for s in samples])
    refs = [s.meta["referring_expression"] for s in samples]
    res = dense.referring_box_accuracy(model, decoder, images, refs, [s.meta["box"] for s in samples])
    assert res["accuracy"] == 1.0
    # the only loss is quantisation: each coordinate within half a bin
    assert res["mean_iou"] > 1 - 8 / num_box_bins
