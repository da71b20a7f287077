"""The image normalisation is a setting (``data.augment.mean`` / ``std``; CLIP's by default): training batches,
the GPU decoder and the evaluation transform all apply it, as open_clip's ``image_transform`` does with the
same mean and std; slips (0-255 values, two channels) are named."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from datahelpers import data_module, pattern, write_sizes
from PIL import Image

from clipforge.data.config import Augment, stored_preprocessing
from clipforge.data.transforms import CLIP_MEAN, CLIP_STD
from clipforge.eval.datasets import eval_transform

HALF = (0.5, 0.5, 0.5)


def renormalized(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """CLIP-normalised pixels ``x`` (B, 3, H, W) normalised with ``mean``/``std`` instead."""

    def col(v: tuple) -> torch.Tensor:
        return torch.tensor(v).view(1, 3, 1, 1)

    return (x * col(CLIP_STD) + col(CLIP_MEAN) - col(mean)) / col(std)


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "coffee"])
def test_eval_transform_with_siglips_normalisation_is_open_clips(photo: str) -> None:
    img = Image.fromarray(getattr(skimage.data, photo)())  # 512x512, 451x300, 600x400
    theirs = open_clip.image_transform(64, is_train=False, mean=HALF, std=HALF)(img)
    ours = eval_transform(64, mean=HALF, std=HALF)(img)
    diff = (ours - theirs).abs()  # PyTorch's uint8 bicubic kernel vs PIL's: within a few grey levels
    assert diff.mean() < 0.3 / 127.5 and diff.max() <= 3 / 127.5 + 1e-6
    clip = eval_transform(64)(img)
    assert (clip - ours).abs().mean() > 0.1  # the setting changes the input: the check above can fail


def test_training_batches_and_the_gpu_decoder_use_the_configured_mean_and_std(tmp_path) -> None:
    write_sizes(tmp_path, [6, 5])
    urls = pattern(tmp_path, 2)
    out = {}
    for name, augment in {"clip": {}, "half": {"mean": HALF, "std": HALF}}.items():
        for device in ("cpu", "cuda"):  # "cuda": JPEGs stay encoded for JpegDecoder, run here on the CPU
            dm = data_module(urls, 4, augment={"image_size": 16, "decode_device": device, **augment})
            dm.setup("fit")
            batches = list(dm.train_dataloader())
            out[name, device] = torch.cat(
                [dm.decode_batch(b, "cpu")[0] if device == "cuda" else b[0] for b in batches]
            )
    for device in ("cpu", "cuda"):
        expected = renormalized(out["clip", device], HALF, HALF)
        torch.testing.assert_close(out["half", device], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"mean": [123.7, 116.3, 103.5]}, r"data.augment.mean must be 3 numbers \(R, G, B\) in \[0, 1\]"),
        ({"std": [0.5, 0.5]}, r"data.augment.std must be 3 numbers"),
        ({"std": [0.5, 0.0, 0.5]}, r"data.augment.std must be 3 numbers \(R, G, B\) in \(0, 1\]"),
        ({"mean": "half"}, r"data.augment.mean must be 3 numbers"),
    ],
)
def test_a_mean_or_std_that_cannot_be_right_is_named(augment: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Augment(**augment)


def test_a_checkpoint_is_evaluated_with_the_preprocessing_its_run_stored() -> None:
    clip = {"interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}
    assert stored_preprocessing(None) == clip  # an older checkpoint or a bare import: what runs used then
    assert stored_preprocessing({"model": {}, "data": {"augment": {"mean": None}}}) == clip
    run = {"data": {"augment": {"_target_": "x", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}}
    assert stored_preprocessing(run) == {"interpolation": "bicubic", "mean": HALF, "std": HALF}
    assert (
        stored_preprocessing({"data": {"augment": {"interpolation": "bilinear"}}})["interpolation"]
        == "bilinear"
    )
    assert np.allclose(Augment().mean, open_clip.OPENAI_DATASET_MEAN)
