"""Deferred JPEG decoding (decode_device="cuda"): the same decoder code checked on CPU, and on CUDA
where there is one."""

import io

import numpy as np
import pytest
import torch
from datahelpers import data_module, pattern, sample_ids, write_sizes
from PIL import Image

from clipforge.data.gpu_decode import EncodedBatch, JpegDecoder


def photo_jpeg(seed: int, w: int = 96, h: int = 80) -> bytes:
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    chans = [np.sin(2 * np.pi * (f1 * x + f2 * y) + p) for f1, f2, p in rng.uniform(0.5, 3, (3, 3))]
    buf = io.BytesIO()
    Image.fromarray((127.5 * (1 + np.stack(chans, -1))).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path, monkeypatch):
    import datahelpers

    monkeypatch.setattr(datahelpers, "tiny_jpeg", lambda i, size=16: photo_jpeg(i))
    write_sizes(tmp_path, [6, 5])
    return pattern(tmp_path, 2)


def batches(shards, decode_device):
    dm = data_module(
        shards, 4, augment={"image_size": 32, "scale": (0.5, 1.0), "decode_device": decode_device}
    )
    dm.setup("fit")
    return dm, list(dm.train_dataloader())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_deferred_decoding_matches_worker_decoding(shards, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, plain = batches(shards, "cpu")
    dm, encoded = batches(shards, "cuda")
    assert isinstance(encoded[0][0], EncodedBatch)
    for (ref, ref_tok, ref_keys), raw in zip(plain, encoded):
        images, tokens, keys = dm.decode_batch(raw, device)
        assert images.device.type == device and images.shape == ref.shape
        assert keys == ref_keys and torch.equal(tokens, ref_tok)  # same crops drawn, same order
        diff = (images.cpu() - ref).abs()  # torch's antialiased bicubic vs PIL's, on the same crop box
        assert diff.mean() < 0.03 and diff.max() < 0.6


def test_corrupt_jpeg_body_is_replaced_with_its_caption_and_counted(shards):
    dm, encoded = batches(shards, "cuda")
    images, tokens, keys = encoded[0]
    bad = images.data[1].clone()
    bad[len(bad) // 2 :] = 0  # header intact, entropy-coded data destroyed
    images.data[1] = bad
    out, out_tokens, out_keys = dm.decode_batch((images, tokens, keys), "cpu")
    assert dm.skip_counts()["corrupt_image"] >= 1
    assert out_keys[1] != keys[1] and out_keys[1] in keys  # another pair of the batch, image and text
    j = keys.index(out_keys[1])
    assert torch.equal(out[1], out[j]) and torch.equal(out_tokens[1], out_tokens[j])
    assert sorted(sample_ids(out_keys)) != sorted(sample_ids(keys))


def test_decoder_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="bicubic"):
        JpegDecoder(32, "lanczos")


def test_a_batch_with_no_jpeg_left_to_decode_is_only_copied():
    # every image decoded by the worker (PNGs, EXIF-oriented JPEGs): decode_jpeg([]) raised ValueError
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    out, source = JpegDecoder(8)(EncodedBatch([image], torch.zeros(1, 4, dtype=torch.float64)), "cpu")
    assert out.shape == (1, 3, 8, 8) and source.tolist() == [0]


@pytest.mark.parametrize(("mode", "deferred"), [("RGB", True), ("L", True), ("CMYK", False)])
def test_only_ycbcr_and_grey_jpegs_are_left_for_the_gpu(mode, deferred):
    # nvJPEG's support for CMYK/YCCK JPEGs (a few in ImageNet) is not something to bet a sample on: the
    # worker decodes them on the CPU as it does oriented JPEGs and PNGs
    from clipforge.data.decode import Encoded, decode_sample
    from clipforge.data.failures import FailureMonitor, new_tables
    from clipforge.data.shards import RawSample
    from clipforge.data.transforms import ImageTransform

    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(0))).convert(mode).save(buf, "JPEG", quality=95)
    monitor = FailureMonitor(*new_tables(1, 1), 0, {"u": 0}, "test")
    raw = RawSample("k", "u", {"jpg": buf.getvalue(), "txt": b"a photo"})
    sample = decode_sample(raw, ImageTransform(16, train=False), None, monitor, defer=True)
    assert isinstance(sample.image, Encoded) is deferred
    if not deferred:
        assert sample.image.shape == (3, 16, 16)


def test_decoding_on_cuda_without_cuda_names_the_setting(shards, monkeypatch):
    # before: a deep traceback from torch ("Found no NVIDIA driver on your system") naming no setting
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dm, encoded = batches(shards, "cuda")
    with pytest.raises(
        RuntimeError, match=r"decode_device=cuda asks for a CUDA GPU, but torch sees none .*decode_device=cpu"
    ):
        dm.decode_batch(encoded[0], "cuda")


def test_a_run_on_the_cpu_with_cuda_decoding_fails_at_setup(shards):
    # before: trainer.accelerator=cpu with decode_device=cuda decoded every batch in the main process on
    # the CPU (trainer.strategy.root_device), silently; on a machine without CUDA that was the only outcome
    import lightning as L

    dm = data_module(shards, 4, augment={"image_size": 32, "decode_device": "cuda"})
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"decode_device=cuda .* this run trains on cpu"):
        dm.setup("fit")
