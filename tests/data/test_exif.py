"""EXIF orientation: a photo tagged "rotate 90" (as phones write them) is decoded upright, the way every
viewer shows it and its caption describes it, in training (the shard decode, its JPEG draft and
libjpeg-turbo paths, the deferred-decode route), in evaluation and in the shard writer."""

import io
import struct

import numpy as np
import pytest
import torch
from datahelpers import data_module
from PIL import Image, ImageOps

from clipforge.data.transforms import ImageTransform, upright_size
from clipforge.data.writer import Record, encode_image, write_shards


def photo(w: int, h: int) -> Image.Image:
    """A smooth picture with no symmetry, so any turn or mirror changes it."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7.0) * (y / h)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def tagged(img: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    extra = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    img.save(buf, format=fmt, exif=exif, **extra)
    return buf.getvalue()


def upright_png(data: bytes) -> bytes:
    """The same pixels, turned upright by PIL and stored losslessly without a tag: the reference."""
    buf = io.BytesIO()
    ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1.0) -> bool:
    """Equal up to libjpeg-turbo vs PIL decoding of one JPEG, or up to a JPEG draft's DCT-domain
    downscale (``tol=3``, as in test_transforms); a turned image differs by tens of grey levels."""
    return a.shape == b.shape and (a.float() - b.float()).abs().mean().item() < tol


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(48, 32), (640, 400)])  # full decode (libjpeg-turbo) / JPEG draft
def test_an_oriented_jpeg_decodes_as_its_upright_image(orientation, train, size):
    data = tagged(photo(*size), orientation)
    with Image.open(io.BytesIO(data)) as img:
        w, h = size
        assert upright_size(img) == ((h, w) if orientation >= 5 else (w, h))
    transform = ImageTransform(16, train=train, scale=(0.5, 1.0))
    ours = transform(data, np.random.default_rng(0))
    ref = transform(upright_png(data), np.random.default_rng(0))  # same crop box: same upright size
    assert close(ours, ref, 1.0 if size[0] < 100 else 3.0)
    # an image already turned upright (the eval loader's load_image) is not turned again
    turned = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert torch.equal(
        transform(turned, np.random.default_rng(0)), transform(upright_png(data), np.random.default_rng(0))
    )


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_oriented_png_and_webp_decode_upright(fmt):
    data = tagged(photo(40, 24), 6, fmt)
    transform = ImageTransform(16, train=False)
    assert torch.equal(transform(data), transform(upright_png(data)))


def _shard(tmp_path, name: str, image: bytes) -> str:
    records = [Record(f"{i:09d}", image, f"photo {i}") for i in range(4)]
    write_shards(records, tmp_path / name, max_count=10, progress=False)
    return str(tmp_path / name / "00000.tar")


@pytest.mark.parametrize(
    ("decode_device", "device"),  # decode_device="cuda" on a CPU device: the deferred route's code on CPU
    [("cpu", "cpu"), ("cuda", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.gpu)],
)
def test_training_batches_of_an_oriented_jpeg_shard_are_upright(tmp_path, decode_device, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = tagged(photo(48, 32), 6)
    batches = {}
    for name, image in (("tagged", data), ("upright", upright_png(data))):
        augment = {"image_size": 16, "scale": (0.5, 1.0), "decode_device": decode_device}
        dm = data_module(_shard(tmp_path, name, image), 4, augment=augment)
        dm.setup("fit")
        raw = next(iter(dm.train_dataloader()))
        batches[name] = dm.decode_batch(raw, device)[0].cpu() if decode_device == "cuda" else raw[0]
    assert close(batches["tagged"] * 60, batches["upright"] * 60)  # normalised: ~1/60 per grey level


def test_eval_folder_and_shards_see_an_oriented_photo_upright(tmp_path):
    from clipforge.eval.datasets import ImageFolderDataset, eval_transform, labelled_wds_dataset, load_image

    data = tagged(photo(48, 32), 6)
    for name, image in (("tagged", data), ("upright", upright_png(data))):
        (tmp_path / name / "cat").mkdir(parents=True)
        (tmp_path / name / "cat" / "a.jpg").write_bytes(image)
    assert load_image(tmp_path / "tagged" / "cat" / "a.jpg").size == (32, 48)
    transform = eval_transform(16)
    tagged_img, _ = ImageFolderDataset(tmp_path / "tagged", transform)[0]
    upright_img, _ = ImageFolderDataset(tmp_path / "upright", transform)[0]
    assert close(tagged_img * 60, upright_img * 60)  # normalised: ~1/60 per grey level

    shard = tmp_path / "s.tar"
    import tarfile

    from datahelpers import add

    with tarfile.open(shard, "w") as tar:
        add(tar, "0.jpg", data)
        add(tar, "0.cls", b"0")
    (img, _label) = next(iter(labelled_wds_dataset(str(shard), transform, distributed=False)))
    assert close(img * 60, upright_img * 60)


@pytest.mark.parametrize("as_pil", [False, True])
def test_the_writer_stores_an_image_it_encodes_upright(as_pil):
    # PNG bytes re-encoded as JPEG, or an opened image (encoded as PNG): the new file has no tag
    data = tagged(photo(40, 24), 6, "PNG")
    image = Image.open(io.BytesIO(data)) if as_pil else data
    stored, ext = encode_image(image, None if as_pil else "jpeg")
    with Image.open(io.BytesIO(stored)) as img:
        assert (img.size, ext) == ((24, 40), "png" if as_pil else "jpg")


def raw_exif(order: str, typ: int, value: bytes, trailer: bytes = b"") -> bytes:
    """An APP1 EXIF block with one orientation entry of TIFF type ``typ`` (3 SHORT, 4 LONG, 2 ASCII,
    5 RATIONAL: its 4 bytes are the offset of ``trailer``), written by hand: PIL writes only valid ones."""
    e = "<" if order == "II" else ">"
    ifd = struct.pack(e + "H", 1) + struct.pack(e + "HHI", 0x0112, typ, 1) + value + struct.pack(e + "I", 0)
    return b"Exif\0\0" + order.encode() + struct.pack(e + "HI", 42, 8) + ifd + trailer


@pytest.mark.parametrize(
    ("exif", "turn"),
    [
        (raw_exif("II", 3, struct.pack("<HH", 0, 0)), 1),  # 0: no such orientation
        (raw_exif("II", 3, struct.pack("<HH", 9, 0)), 1),  # 9: no such orientation
        (raw_exif("II", 3, struct.pack("<HH", 6, 0))[:20], 1),  # cut short
        (raw_exif("II", 2, b"6\0\0\0"), 1),  # the string "6": ImageOps.exif_transpose turns nothing
        (raw_exif("MM", 4, struct.pack(">I", 6)), 6),  # big-endian LONG: libjpeg-turbo's reader saw 0
        (raw_exif("II", 5, struct.pack("<I", 26), struct.pack("<II", 6, 1)), 6),  # rational 6/1
    ],
    ids=["zero", "nine", "truncated", "ascii", "big-endian-long", "rational"],
)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(48, 32), (640, 400)])  # full decode (libjpeg-turbo) / JPEG draft
def test_a_malformed_orientation_tag_decodes_the_image_in_one_frame(exif, turn, train, size):
    # The crop box (drawn in the frame exif_orientation gives) and the pixels must agree: either the tag
    # counts and the image is turned, or it does not and the image is decoded as stored, never one of each
    buf = io.BytesIO()
    photo(*size).save(buf, format="JPEG", quality=100, subsampling=0, exif=exif)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        stored = img.convert("RGB")
    ref = io.BytesIO()
    (stored if turn == 1 else stored.transpose(Image.Transpose.ROTATE_270)).save(ref, format="PNG")
    transform = ImageTransform(16, train=train, scale=(0.5, 1.0))
    ours = transform(data, np.random.default_rng(0))
    assert close(ours, transform(ref.getvalue(), np.random.default_rng(0)), 1.0 if size[0] < 100 else 3.0)
