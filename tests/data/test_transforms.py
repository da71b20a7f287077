import io

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms as T
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from clipforge.data.transforms import ImageTransform, normalize_into, random_resized_crop_box
from clipforge.eval.datasets import load_image


def photo(w=256, h=192, seed=0) -> Image.Image:
    """A smooth, photo-like image (JPEG-friendly), not noise."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    chans = [np.sin(2 * np.pi * (f1 * x + f2 * y) + p) for f1, f2, p in rng.uniform(0.5, 3, (3, 3))]
    return Image.fromarray((127.5 * (1 + np.stack(chans, -1))).astype(np.uint8))


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy().astype(float)


def test_normalize_into_matches_totensor_normalize():
    imgs = [photo(seed=s).resize((32, 32)) for s in range(3)]
    ref = T.Compose([T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    expected = torch.stack([ref(img) for img in imgs])
    ours = normalize_into([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in imgs])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(256, 192), (150, 400)])
def test_eval_transform_matches_open_clip_resize_center_crop(size):
    img = photo(*size)
    ref = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)])
    theirs = np.asarray(ref(img)).astype(float)
    for source in (img, jpeg(img)):  # PIL input, and JPEG bytes through libjpeg-turbo
        expected = (
            theirs if isinstance(source, Image.Image) else np.asarray(ref(Image.open(io.BytesIO(source))))
        )
        ours = hwc(ImageTransform(64, train=False)(source))
        assert ours.shape == (64, 64, 3)
        diff = np.abs(ours - expected)  # PyTorch's uint8 kernel vs PIL's, libjpeg-turbo vs PIL's libjpeg
        assert diff.mean() < 0.3 and diff.max() <= 3


def test_train_transform_matches_torchvision_resized_crop_on_the_same_box():
    img = photo(256, 256)
    rng = np.random.default_rng(3)
    ours = hwc(ImageTransform(96, train=True, scale=(0.3, 1.0))(jpeg(img), rng))
    left, top, right, bottom = random_resized_crop_box(256, 256, np.random.default_rng(3), (0.3, 1.0))
    decoded = Image.open(io.BytesIO(jpeg(img))).convert("RGB")
    ref = np.asarray(
        T.functional.resized_crop(
            decoded, top, left, bottom - top, right - left, [96, 96], T.InterpolationMode.BICUBIC
        )
    ).astype(float)
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.3 and diff.max() <= 3


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop_box(300, 200, rng, (0.3, 0.6), (0.5, 2.0)) for _ in range(500)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (300 * 200)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    assert area.min() > 0.28 and area.max() < 0.62 and area.std() > 0.05
    assert (w / h).min() > 0.48 and (w / h).max() < 2.05


def test_train_transform_is_random_but_seeded():
    t = ImageTransform(32, train=True, scale=(0.2, 1.0))
    a = t(photo(), np.random.default_rng(1))
    b = t(photo(), np.random.default_rng(1))
    c = t(photo(), np.random.default_rng(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("train", [False, True])
def test_jpeg_draft_decoding_is_close_to_full_decoding(train, monkeypatch):
    data = jpeg(photo(512, 512))
    requested = []
    draft = JpegImageFile.draft

    def spy(self, mode, size):
        requested.append(size)
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    out = {
        d: hwc(ImageTransform(64, train=train, draft=d)(data, np.random.default_rng(0)))
        for d in (True, False)
    }
    # the crop (>= 90% of 512 px) covers >= 4x the 64-px output: decode at 1/2 or 1/4 scale, not 1/8
    assert len(requested) == 1 and 128 <= requested[0][0] <= 256
    assert np.abs(out[True] - out[False]).mean() < 3.0


def test_eval_decodes_a_large_jpeg_the_same_from_bytes_and_from_a_decoded_image():
    # Shards hand the transform bytes; an image folder hands it load_image's decoded picture. A DCT-domain
    # draft on the bytes route moved pixels by up to 12 grey levels (the cat photo at 3x): the same image
    # scored differently in training's zero-shot and in clipforge-zeroshot, and unlike open_clip's eval
    data = jpeg(Image.fromarray(skimage.data.chelsea()).resize((1353, 900)))
    t = ImageTransform(224, train=False)
    assert torch.equal(t(data), t(load_image(data)))


@pytest.mark.parametrize("train", [False, True])
def test_a_16_bit_greyscale_png_keeps_its_picture(train, tmp_path):
    # PIL opens it as I;16 and its convert("RGB") clips every value above 255: a 0..65535 ramp came out
    # 254.5 on average (nearly white) in the eval loader and the training decode alike
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    x = ImageTransform(64, train=train, scale=(1.0, 1.0), ratio=(1.0, 1.0))(
        buf.getvalue(), np.random.default_rng(0)
    )
    assert x.shape == (3, 64, 64) and torch.equal(x[0], x[2])
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8))
    assert (x[0].int() - expected.int()).abs().max() <= 1

    from clipforge.eval.datasets import load_image

    (tmp_path / "ramp.png").write_bytes(buf.getvalue())
    assert np.asarray(load_image(tmp_path / "ramp.png"))[..., 1].tolist() == (ramp >> 8).tolist()


@pytest.mark.parametrize("train", [False, True])
def test_16_bit_greyscale_png_keeps_its_high_byte(train):
    """A 16-bit greyscale PNG (PIL mode I;16) came out white: ``convert("RGB")`` clipped it at 255."""
    grey8 = np.asarray(photo(64, 48).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(grey8.astype(np.uint16) * 256 + 99).save(buf, format="PNG")  # low byte 99: dropped
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    transform = ImageTransform(32, train=train)
    ours = transform(buf.getvalue(), np.random.default_rng(0))
    expected = transform(Image.fromarray(grey8).convert("RGB"), np.random.default_rng(0))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    ("values", "mode", "expected"),
    [
        (np.linspace(0, 65535, 64).astype(np.int32), "I", (np.linspace(0, 65535, 64).astype(np.int32) >> 8)),
        (np.arange(64, dtype=np.int32) * 4, "I", np.arange(64) * 4),
        (
            np.linspace(0, 1, 64).astype(np.float32),
            "F",
            np.rint(np.linspace(0, 1, 64).astype(np.float32) * 255.0),
        ),
        (np.linspace(-3, 5, 64).astype(np.float32), "F", np.rint(np.linspace(0, 255, 64))),
        (np.linspace(-1000, 70000, 64).astype(np.int32), "I", np.rint(np.linspace(0, 255, 64))),
    ],
    ids=["int32-16-bit-range", "int32-8-bit-range", "float-unit", "float-hdr", "int32-wide"],
)
def test_32_bit_greyscale_tiffs_keep_their_picture(tmp_path, values, mode, expected) -> None:
    # PIL's convert("RGB") clips mode I and F at 0 and 255: a 32-bit integer ramp came out almost all white
    # and a float one in [0, 1] almost all black
    img = Image.fromarray(np.tile(values, (8, 1)))
    assert img.mode == mode
    img.save(tmp_path / "grey.tif")
    from clipforge.eval.datasets import load_image

    out = np.asarray(load_image(tmp_path / "grey.tif"))
    assert out.shape == (8, 64, 3) and (out[..., 0] == out[..., 2]).all()
    assert np.abs(out[0, :, 1].astype(int) - np.asarray(expected).astype(int)).max() <= 1
