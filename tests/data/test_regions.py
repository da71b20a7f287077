"""The regions stage: box targets for LocCa's decoder tasks, in the frame of the crop the model sees."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datahelpers import add
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from clipforge.data import synthetic
from clipforge.data.config import Augment, Stream
from clipforge.data.datamodule import WebDataModule
from clipforge.data.manifest import write_manifest
from clipforge.data.regions import NO_BOX, candidates, in_crop
from clipforge.data.synthetic_shards import SyntheticShards
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import CROP_DRAWS, random_resized_crop_box


def test_a_box_in_the_frame_of_its_crop_by_hand() -> None:
    # a 100 x 80 image cropped to x 10..60, y 20..60 (50 x 40 pixels); the box covers x 20..50, y 40..80
    box = in_crop((0.2, 0.5, 0.5, 1.0), crop=(10, 20, 60, 60), size=(100, 80))
    assert box == pytest.approx(
        (10 / 50, 20 / 40, 40 / 50, 1.0)
    )  # its bottom (y 80) clipped at the crop's (60)
    assert in_crop((0.0, 0.0, 1.0, 1.0), (10, 20, 60, 60), (100, 80)) == (
        0.0,
        0.0,
        1.0,
        1.0,
    )  # holds the crop
    assert in_crop((0.7, 0.0, 0.9, 0.2), (10, 20, 60, 60), (100, 80)) is NO_BOX  # right of the crop
    assert in_crop((0.2, 0.0, 0.5, 0.25), (10, 20, 60, 60), (100, 80)) is NO_BOX  # touches its top edge only


def test_candidates_of_both_json_layouts() -> None:
    synthetic_meta = {"box": [0.1, 0.2, 0.3, 0.4], "referring_expression": "the small red circle"}
    assert candidates(synthetic_meta) == [((0.1, 0.2, 0.3, 0.4), "the small red circle")]
    img2dataset = {
        "boxes": [[0, 0, 0.5, 0.5], [0.5, 0.5, 0.2, 1], "bad", [0.5, 0.5, 1, 1]],
        "phrases": ["a", "b"],
    }
    # empty and malformed boxes are left out; phrases pair by position, "" where there is none
    assert candidates(img2dataset) == [((0.0, 0.0, 0.5, 0.5), "a"), ((0.5, 0.5, 1.0, 1.0), "")]
    assert candidates({"caption": "x"}) == candidates([1, 2]) == []


def _jpeg(width: int, height: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


METAS = [
    {"box": [0.1, 0.1, 0.6, 0.9], "referring_expression": "the left thing"},
    {
        "boxes": [[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]],
        "phrases": ["one", "two", "three"],
    },
    {"caption": "no box here"},
    {"box": [0.2, 0.2, 0.8, 0.8], "referring_expression": "the middle"},
]


@pytest.fixture
def box_shards(tmp_path: Path) -> str:
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, meta in enumerate(METAS):
            add(tar, f"{i:09d}.jpg", _jpeg(40, 20, i))
            add(tar, f"{i:09d}.txt", f"sample {i}".encode())
            add(tar, f"{i:09d}.json", json.dumps(meta).encode())
    write_manifest(tmp_path, {"00000.tar": len(METAS)})
    return str(tmp_path / "00000.tar")


def _module(urls: str, regions: bool = True, **augment) -> WebDataModule:
    dm = WebDataModule(
        urls,
        batch_size=len(METAS),
        num_workers=0,
        context_length=12,
        stream=Stream(seed=5, shuffle_buffer=1, return_keys=True, regions=regions),
        augment=Augment(image_size=8, scale=(0.3, 1.0), **augment),
    )
    dm.setup("fit")
    dm.set_epoch(0)
    return dm


def test_training_batches_carry_the_boxes_of_their_own_crops(box_shards: str) -> None:
    (batch,) = list(_module(box_shards).train_dataloader())
    _, tokens, keys, regions = batch
    assert regions["boxes"].dtype == torch.float32 and regions["boxes"].shape == (4, 4)
    assert regions["region_tokens"].shape == tokens.shape == (4, 12)
    # The same crops, drawn independently: one worker, one shard, no shuffle, so slot i is sample i and takes
    # the i-th CROP_DRAWS uniforms of the worker's crop generator; its last uniform picks among several boxes.
    rng = np.random.default_rng([5, 0, 0, 0, 0xC20])
    tok = Tokenizer(12)
    for i, key in enumerate(keys):
        draws = rng.random(CROP_DRAWS)
        assert key.endswith(f"{i:09d}")
        crop = random_resized_crop_box(40, 20, draws, (0.3, 1.0))
        found = candidates(METAS[i])
        if not found:
            assert torch.isnan(regions["boxes"][i]).all() and tok.decode(regions["region_tokens"][i]) == ""
            continue
        box, phrase = found[int(draws[-1] * len(found))]
        want = in_crop(box, crop, (40, 20))
        if math.isnan(want[0]):
            assert torch.isnan(regions["boxes"][i]).all()
            continue
        assert regions["boxes"][i].tolist() == pytest.approx(want)
        assert tok.decode(regions["region_tokens"][i]) == phrase  # tokenized like the captions
        assert torch.equal(regions["region_tokens"][i], tok(phrase)[0])


def test_regions_are_off_by_default_and_leave_batches_unchanged(box_shards: str) -> None:
    (plain,) = list(_module(box_shards, regions=False).train_dataloader())
    (with_regions,) = list(_module(box_shards).train_dataloader())
    assert len(plain) == 3 and len(with_regions) == 4
    for a, b in zip(plain, with_regions[:3]):
        assert a == b if isinstance(a, list) else torch.equal(a, b)  # same images, tokens and keys
    assert not Stream().regions


def test_gpu_decoding_keeps_each_region_with_its_image(box_shards: str) -> None:
    dm = _module(box_shards, decode_device="cuda")
    (raw,) = list(dm.train_dataloader())
    images, tokens, keys, regions = raw
    images.data[1] = images.data[1][:40].clone()  # a JPEG cut after its header: fails to decode
    out = dm.decode_batch((images, tokens, keys, regions), "cpu")
    j = keys.index(out[2][1])
    assert j != 1 and torch.equal(out[3]["region_tokens"][1], regions["region_tokens"][j])
    assert torch.equal(out[3]["boxes"][1].nan_to_num(-1), regions["boxes"][j].nan_to_num(-1))


def test_synthetic_boxes_hold_the_drawn_shape_in_the_cropped_image(tmp_path: Path) -> None:
    """Pixels, not arithmetic: the shape's bright pixels in the image the model sees lie inside the box."""
    source = SyntheticShards(str(tmp_path), num_train=48, num_heldout=8, image_size=48, samples_per_shard=48)
    source.prepare()
    dm = WebDataModule(
        source=source,
        batch_size=48,
        num_workers=0,
        context_length=20,
        stream=Stream(return_keys=True, regions=True),
        augment=Augment(image_size=48, scale=(0.04, 0.3)),
    )
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    images, _, keys, regions = batch
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1) * 255
    tok, seen = Tokenizer(20), {"box": 0, "nan": 0}
    for image, key, box, tokens in zip(images, keys, regions["boxes"], regions["region_tokens"]):
        pixels = image * std + mean  # (3, S, S) back in 0..255
        bright = pixels.amax(0) > 130  # the shapes are bright colours, the background at most ~95
        if torch.isnan(box).all():
            seen["nan"] += 1
            assert bright.sum() <= 4  # nothing of the shape in this crop but resampling bleed
            continue
        meta = synthetic.make_sample(int(key.rsplit("/", 1)[-1]), "train", 48).meta
        assert tok.decode(tokens) == meta["referring_expression"]
        ys, xs = torch.nonzero(bright, as_tuple=True)
        if len(xs) == 0:  # the crop holds a corner of the box but none of the shape (a circle's corner)
            continue
        seen["box"] += 1
        x0, y0, x1, y1 = (box * 48).tolist()
        assert xs.min() >= x0 - 1.5 and xs.max() + 1 <= x1 + 1.5
        assert ys.min() >= y0 - 1.5 and ys.max() + 1 <= y1 + 1.5
    assert seen["box"] > 5 and seen["nan"] > 0, seen  # both cases occur with these small crops
