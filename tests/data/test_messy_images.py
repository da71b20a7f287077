"""Images as users have them: every mode and format PIL opens is decoded by training (bytes through
``ImageTransform``) to the pixels evaluation gets (``load_image``), straight or after the shard writer; what
cannot be used is skipped with a message that says why."""

import io
import logging

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from clipforge.data.cli import main as shards_main
from clipforge.data.transforms import ImageTransform
from clipforge.data.writer import encode_image
from clipforge.eval.datasets import load_image


def _photo(size: int = 48) -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((size, size))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgba() -> Image.Image:
    a = np.array(_photo().convert("RGBA"))
    a[:, :24, 3], a[:, 24:, 3] = 0, 128  # transparent and half-transparent halves
    return Image.fromarray(a)


def _grey16() -> np.ndarray:
    return np.array(_photo().convert("L")).astype(np.uint16) * 257


def _animated_gif() -> bytes:
    first, second = _photo(), _photo().rotate(90)
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second])
    return buf.getvalue()


IMAGES = {
    "cmyk_jpeg": lambda: _encode(_photo().convert("CMYK"), "JPEG", quality=90),
    "grey_jpeg": lambda: _encode(_photo().convert("L"), "JPEG"),
    "rgba_png": lambda: _encode(_rgba(), "PNG"),
    "la_png": lambda: _encode(_rgba().convert("LA"), "PNG"),
    "palette_png_transparency": lambda: _encode(
        _photo().convert("P", palette=Image.ADAPTIVE), "PNG", transparency=0
    ),
    "one_bit_png": lambda: _encode(_photo().convert("1"), "PNG"),
    "16_bit_png": lambda: _encode(Image.fromarray(_grey16()), "PNG"),
    # Pillow opens these as modes I, I;16B and F: the writer crashed on the first (PNG cannot hold mode I)
    # and stored the others white and black (PIL's convert("RGB") clips them)
    "16_bit_pgm": lambda: _encode(Image.fromarray(_grey16()), "PPM"),
    "16_bit_big_endian_tiff": lambda: _encode(Image.fromarray(_grey16().astype(">u2")), "TIFF"),
    "float_tiff": lambda: _encode(Image.fromarray(_grey16().astype(np.float32) / 65535, mode="F"), "TIFF"),
    "animated_gif": _animated_gif,
    "rgba_webp": lambda: _encode(_rgba(), "WEBP", lossless=True),
    "cmyk_tiff": lambda: _encode(_photo().convert("CMYK"), "TIFF"),
    "1x1_png": lambda: _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "10000x10_png": lambda: _encode(
        Image.fromarray(np.tile(skdata.astronaut()[:10], (1, 20, 1))[:, :10000]), "PNG"
    ),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_training_decodes_the_pixels_evaluation_sees_before_and_after_the_writer(name):
    data = IMAGES[name]()
    transform = ImageTransform(16, train=False, draft=False)
    expected = transform(load_image(data))
    assert transform(data).equal(expected)
    stored, _ = encode_image(data)  # lossless by default: the same pixels out of the shard
    assert transform(stored).equal(expected)


def test_unusable_images_are_skipped_saying_why(tmp_path, capsys, caplog, monkeypatch):
    """A zero-byte file and a picture over PIL's decompression-bomb limit were both "not a readable image":
    the second opens in any viewer, so the message gave no clue that a PIL limit refused it."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    (tmp_path / "img" / "big.png").write_bytes(_encode(Image.new("RGB", (32, 32)), "PNG"))
    (tmp_path / "img" / "text.jpg").write_text("not a picture")
    (tmp_path / "img" / "ok.png").write_bytes(_encode(Image.new("RGB", (8, 8)), "PNG"))
    (tmp_path / "caps.csv").write_text("file,caption\nempty.jpg,a\nbig.png,b\ntext.jpg,c\nok.png,d\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 32 x 32 is over twice this: refused
    with caplog.at_level(logging.WARNING):
        assert (
            shards_main(["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "out")])
            == 0
        )
    assert "skipped: corrupt_image=3" in capsys.readouterr().out
    messages = [r.getMessage() for r in caplog.records]

    def why(name: str) -> str:
        return next(m for m in messages if f"/{name}: " in m)

    assert why("empty.jpg").endswith("an empty file (0 bytes)")
    assert "decompression bomb" in why("big.png") and "MAX_IMAGE_PIXELS" in why("big.png")
    assert "not a readable image (UnidentifiedImageError" in why("text.jpg")


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_a_truncated_file_to_reencode_is_skipped_and_counted_not_the_end_of_the_run(
    tmp_path, capsys, caplog, fmt
):
    """JPEG, PNG and WebP bytes are stored as they are (a cut one is skipped by the loader); other formats are
    decoded to become PNG, and one cut BMP, GIF or TIFF raised out of the writer: the whole run stopped with
    "image file is truncated", naming no file, and wrote nothing."""
    (tmp_path / "img").mkdir()
    whole = _encode(_photo(64).convert("P") if fmt == "GIF" else _photo(64), fmt)
    (tmp_path / "img" / "cut.img").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "img" / "ok.png").write_bytes(_encode(_photo(), "PNG"))
    (tmp_path / "caps.csv").write_text("file,caption\ncut.img,a cut file\nok.png,a photo\n")
    with caplog.at_level(logging.WARNING):
        argv = ["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "out")]
        assert shards_main(argv) == 0
    out = capsys.readouterr().out
    assert "1 samples in 1 shards" in out and "skipped: corrupt_image=1" in out
    assert any("cut.img: not a readable image" in r.getMessage() for r in caplog.records)
