import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datahelpers import add, data_module, sample_ids, tiny_jpeg, write_sizes
from PIL import Image

from clipforge.data.cli import main as shards_main
from clipforge.data.cli import parse_bytes
from clipforge.data.manifest import find_manifest, read_manifest, shard_name, write_manifest
from clipforge.data.shards import DataError
from clipforge.data.sources import read_captions
from clipforge.data.writer import Record, ShardWriter, encode_image, image_format, write_shards


def members(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


def test_img2dataset_layout_count_limit_and_manifest(tmp_path):
    with ShardWriter(tmp_path, max_count=4) as w:
        for i in range(10):
            w.write(Record(f"{i:09d}", tiny_jpeg(i), f"caption {i}", {"label": i}))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(tmp_path.glob(".*.tmp"))  # temporary names were renamed away
    names = members(tmp_path / "00000.tar")
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    with tarfile.open(tmp_path / "00002.tar") as tar:
        assert tar.extractfile("000000009.txt").read() == b"caption 9"
        meta = json.loads(tar.extractfile("000000009.json").read())
        assert tar.extractfile("000000009.jpg").read() == tiny_jpeg(9)  # JPEG bytes pass through
    assert meta["label"] == 9 and meta["caption"] == "caption 9"
    manifest = read_manifest(tmp_path / "manifest.json")
    assert manifest["shards"] == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    assert manifest["num_samples"] == 10
    assert json.loads((tmp_path / "sizes.json").read_text()) == manifest["shards"]


def test_byte_limit_splits_shards_below_the_limit(tmp_path):
    with ShardWriter(tmp_path, max_count=None, max_bytes=6000) as w:
        for i in range(12):
            w.write(Record(f"{i:09d}", tiny_jpeg(i), "c" * 10))
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("*.tar"))]
    counts = read_manifest(tmp_path / "manifest.json")["shards"]
    assert len(sizes) > 2 and sum(counts.values()) == 12
    # a tar adds 1024 zero bytes of end marker (and pads to 10 KiB records) beyond the members
    for p in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(p) as tar:
            payload = sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers())
        assert payload <= 6000


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(size: int = 32, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def test_png_goes_into_a_shard_byte_identical_and_out_of_the_loader_pixel_identical(tmp_path):
    from clipforge.data.config import Augment
    from clipforge.data.dataset import ShardDataset
    from clipforge.data.shards import expand_urls
    from clipforge.data.transforms import normalize_into

    png = _encoded(_noise(32), "PNG")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "noise.png").write_bytes(png)
    (tmp_path / "caps.csv").write_text("file,caption\nnoise.png,coloured noise\n")
    assert (
        shards_main(["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "out")]) == 0
    )
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.extractfile("000000000.png").read() == png
        assert not [n for n in tar.getnames() if n.endswith(".jpg")]

    sources = expand_urls(str(tmp_path / "out" / "00000.tar"))
    ds = ShardDataset(
        sources,
        find_manifest(sources[0]),
        batch_size=1,
        train=False,
        augment=Augment(image_size=32),
        context_length=8,
    )
    ds.set_epoch(0)
    (batch,) = list(ds)
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(batch[0], normalize_into([decoded]))


def test_jpeg_png_webp_bytes_are_kept_other_formats_become_png_losslessly():
    img = _noise(16)
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        data = _encoded(img, fmt)
        assert encode_image(data) == (data, ext)
    for src in (_encoded(img, "BMP"), _encoded(img, "TIFF"), img, _noise(16, "CMYK")):
        data, ext = encode_image(src)
        assert ext == "png" and image_format(data) == "png"
        expected = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src))
        assert np.array_equal(
            np.array(Image.open(io.BytesIO(data)).convert("RGB")), np.array(expected.convert("RGB"))
        )


def test_reencode_jpeg_is_explicit_and_keeps_jpeg_bytes(tmp_path):
    jpeg, png = _encoded(_noise(16), "JPEG"), _encoded(_noise(16), "PNG")
    assert encode_image(jpeg, reencode="jpeg") == (jpeg, "jpg")
    data, ext = encode_image(png, reencode="jpeg", quality=80)
    assert ext == "jpg" and image_format(data) == "jpg"
    with pytest.raises(ValueError, match="reencode must be one of"):
        encode_image(png, reencode="webp")
    grey = np.asarray(_noise(16, "L"))  # 16-bit greyscale became white JPEG (PIL clips I;16 at 255)
    data, _ = encode_image(_encoded(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"), reencode="jpeg")
    assert np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("L"), float) - grey).mean() < 8
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png)
    (tmp_path / "caps.csv").write_text("file,caption\na.png,a picture\n")
    argv = ["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "out")]
    assert shards_main([*argv, "--reencode", "jpeg", "--quality", "90"]) == 0
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert image_format(tar.extractfile("000000000.jpg").read()) == "jpg"
    assert read_manifest(tmp_path / "out" / "manifest.json")["params"]["reencode"] == "jpeg"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "csv_noheader"])
def test_read_captions_formats(tmp_path, fmt):
    rows = {"a.jpg": "a cat, sitting", "b.png": "a dog"}
    if fmt == "csv":
        text = 'filename,caption\na.jpg,"a cat, sitting"\nb.png,a dog\n'
    elif fmt == "csv_noheader":
        text = '"a.jpg","a cat, sitting"\nb.png,a dog\n'
    elif fmt == "tsv":
        text = "image\ttext\na.jpg\ta cat, sitting\nb.png\ta dog\n"
    elif fmt == "jsonl":
        text = "\n".join(json.dumps({"file": k, "caption": v}) for k, v in rows.items())
    else:
        text = json.dumps(rows)
    suffix = {"csv_noheader": "csv"}.get(fmt, fmt)
    path = tmp_path / f"captions.{suffix}"
    path.write_text(text)
    assert read_captions(path) == list(rows.items())


def test_read_captions_of_real_files(tmp_path):
    """A byte-order mark (Excel's "CSV UTF-8") hid the header, a quoted caption lost its line breaks
    (its words ran together) and a raw U+2028 in a JSONL caption broke its line in two."""
    path = tmp_path / "captions.csv"
    path.write_text('file,caption,source\na.jpg,"two\nlines",x\nb.png,"p\u2028q",y\n', encoding="utf-8-sig")
    assert read_captions(path) == [("a.jpg", "two\nlines"), ("b.png", "p\u2028q")]
    path = tmp_path / "captions.jsonl"
    lines = [
        json.dumps({"file": "a.jpg", "caption": "p\u2028q"}, ensure_ascii=False),
        '{"file": "b.png", "caption": "c"}',
    ]
    path.write_text("\r\n".join(lines), encoding="utf-8-sig")
    assert read_captions(path) == [("a.jpg", "p\u2028q"), ("b.png", "c")]


def test_every_caption_of_an_image_is_a_sample(tmp_path):
    """COCO-style files give an image several captions (rows, or a list); all but the last were dropped
    without a word, and a JSON list of captions became one caption "['a', 'b']"."""
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(tiny_jpeg(0))
    (tmp_path / "caps.csv").write_text("file,caption\nb.jpg,b one\na.jpg,a one\nb.jpg,b two\n")
    (tmp_path / "caps.json").write_text(json.dumps({"b.jpg": ["b one", "b two"], "a.jpg": "a one"}))
    for caps in ("caps.csv", "caps.json"):
        out = tmp_path / caps.replace(".", "_")
        assert shards_main(["folder", str(tmp_path / "img"), str(tmp_path / caps), str(out)]) == 0
        with tarfile.open(out / "00000.tar") as tar:
            texts = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
        assert texts == ["a one", "b one", "b two"]


def test_cli_folder_skips_missing_images_and_writes_manifest(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(tiny_jpeg(i))
    Image.new("RGB", (10, 10)).save(images / "p.png")
    (tmp_path / "caps.tsv").write_text(
        "file\tcaption\n"
        + "".join(f"{i}.jpg\tphoto {i}\n" for i in range(5))
        + "p.png\ta png\nmissing.jpg\tgone\n"
    )
    assert (
        shards_main(
            ["folder", str(images), str(tmp_path / "caps.tsv"), str(tmp_path / "out"), "--max-count", "4"]
        )
        == 0
    )
    counts = read_manifest(tmp_path / "out" / "manifest.json")["shards"]
    assert counts == {"00000.tar": 4, "00001.tar": 2}
    assert "missing_image=1" in capsys.readouterr().out


def test_a_listed_file_whose_name_differs_only_in_case_is_named_in_the_warning(tmp_path, capsys, caplog):
    """A captions list written on macOS or Windows (file systems that ignore case) says IMG_1.jpg for the
    file IMG_1.JPG: it works there; here every such image was "listed but not found", with no clue why."""
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "img" / "sub" / "IMG_1.JPG").write_bytes(tiny_jpeg(0))
    (tmp_path / "img" / "ok.jpg").write_bytes(tiny_jpeg(1))
    (tmp_path / "caps.csv").write_text("file,caption\nsub/img_1.jpg,a photo\nok.jpg,fine\ngone.jpg,gone\n")
    assert (
        shards_main(["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "o")]) == 0
    )
    assert "missing_image=2" in capsys.readouterr().out
    messages = [r.getMessage() for r in caplog.records if "but not found" in r.getMessage()]
    assert any(
        "img_1.jpg" in m and m.endswith("(a file named IMG_1.JPG differs only in case)") for m in messages
    )
    assert any("gone.jpg" in m and m.endswith("but not found") for m in messages)


def test_cli_reshards_img2dataset_tars_and_files_layout(tmp_path, capsys):
    write_sizes(tmp_path / "i2d", [3, 4])
    assert shards_main(["img2dataset", str(tmp_path / "i2d"), str(tmp_path / "a"), "--max-count", "5"]) == 0
    assert read_manifest(tmp_path / "a" / "manifest.json")["shards"] == {"00000.tar": 5, "00001.tar": 2}
    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    for i in range(3):
        (files / f"{i:09d}.jpg").write_bytes(tiny_jpeg(i))
        (files / f"{i:09d}.txt").write_text(f"file caption {i}" if i != 1 else "")
        (files / f"{i:09d}.json").write_text(json.dumps({"url": f"http://x/{i}"}))
    # img2dataset's own files beside each shard folder (they were counted as samples missing their image)
    (tmp_path / "files" / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    (tmp_path / "files" / "00000.parquet").write_bytes(b"PAR1")
    assert shards_main(["img2dataset", str(tmp_path / "files"), str(tmp_path / "b")]) == 0
    with tarfile.open(tmp_path / "b" / "00000.tar") as tar:
        assert tar.extractfile("000000002.txt").read() == b"file caption 2"
        assert json.loads(tar.extractfile("000000002.json").read())["url"] == "http://x/2"
    assert read_manifest(tmp_path / "b" / "manifest.json")["num_samples"] == 2  # the empty caption is skipped
    assert capsys.readouterr().out.endswith("skipped: missing_caption=1\n")


def test_cli_reshards_gzipped_img2dataset_tars(tmp_path):
    # training and the manifest command read .tar.gz / .tgz shards; re-sharding took them for loose files
    # of the files layout, found no image among them and wrote nothing
    write_sizes(tmp_path / "plain", [3, 4])
    (tmp_path / "i2d").mkdir()
    for name, gz in (("00000.tar", "00000.tar.gz"), ("00001.tar", "00001.tgz")):
        (tmp_path / "i2d" / gz).write_bytes(gzip.compress((tmp_path / "plain" / name).read_bytes()))
    assert shards_main(["img2dataset", str(tmp_path / "i2d"), str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out" / "manifest.json")["num_samples"] == 7


def test_cli_reshard_follows_symlinked_folders_of_the_source(tmp_path):
    write_sizes(tmp_path / "part1", [3])
    (tmp_path / "i2d").mkdir()
    (tmp_path / "i2d" / "part1").symlink_to(tmp_path / "part1", target_is_directory=True)
    (tmp_path / "i2d" / "loop").symlink_to(tmp_path / "i2d", target_is_directory=True)
    assert shards_main(["img2dataset", str(tmp_path / "i2d"), str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out" / "manifest.json")["num_samples"] == 3


@pytest.mark.parametrize("out", [".", "resharded"])
def test_cli_reshard_into_its_own_source_fails_at_once(tmp_path, out, capsys):
    """Re-sharding into the source folder overwrote input shards before they were read (20 samples in,
    14 out, the input gone); a folder inside the source would be read back as input on the next run."""
    write_sizes(tmp_path / "i2d", [10, 10])
    before = {p.name: p.read_bytes() for p in (tmp_path / "i2d").glob("*.tar")}
    with pytest.raises(SystemExit):
        shards_main(["img2dataset", str(tmp_path / "i2d"), str(tmp_path / "i2d" / out), "--max-count", "4"])
    assert "is inside the source" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "i2d").glob("*.tar")} == before


def test_cli_wrong_paths_fail_at_once_and_nothing_written_is_a_failure(tmp_path, capsys):
    """A misspelt image folder or source gave "0 samples in 0 shards", an empty manifest and status 0;
    --max-count 0 or below, a traceback."""
    (tmp_path / "img").mkdir()
    (tmp_path / "caps.csv").write_text("file,caption\na.jpg,a photo\n")
    for argv, message in (
        (["folder", str(tmp_path / "imgs"), str(tmp_path / "caps.csv")], "imgs is not a folder"),
        (["folder", str(tmp_path / "img"), str(tmp_path / "caps.tsv")], "caps.tsv does not exist"),
        (["img2dataset", str(tmp_path / "laion")], "laion is not a folder"),
    ):
        with pytest.raises(SystemExit):
            shards_main([*argv, str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for limit in ("0", "-3"):  # the help's "0: no limit" needs a byte limit; both were tracebacks
        with pytest.raises(SystemExit):
            shards_main(
                ["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), "x", "--max-count", limit]
            )
        assert "give a count >= 1, or 0 (no limit) with --max-bytes" in capsys.readouterr().err
    assert (
        shards_main(["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "out")]) == 1
    )
    assert "no sample was written" in capsys.readouterr().err


def test_a_dot_in_a_key_is_counted_and_explained(tmp_path, capsys, caplog):
    """Files named ``photo.2021.jpg``: WebDataset's key is ``photo``, so the sample has no ``jpg``. The loader
    logged only "skipped photo: missing_image"; re-sharding dropped such samples without counting them."""
    from clipforge.data.decode import decode_sample
    from clipforge.data.failures import FailureMonitor, new_tables
    from clipforge.data.shards import RawSample
    from clipforge.data.transforms import ImageTransform

    (tmp_path / "src").mkdir()
    with tarfile.open(tmp_path / "src" / "00000.tar", "w") as tar:
        for name, data in (
            ("photo.2021.jpg", tiny_jpeg(0)),
            ("photo.2021.txt", b"a photo"),
            ("ok.jpg", tiny_jpeg(1)),
        ):
            add(tar, name, data)
        add(tar, "ok.txt", b"fine")
    assert shards_main(["img2dataset", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "missing_image=1" in capsys.readouterr().out
    monitor = FailureMonitor(*new_tables(1, 1), 0, {"u": 0}, "test")
    raw = RawSample("photo", "u", {"2021.jpg": tiny_jpeg(0), "2021.txt": b"a photo"})
    assert decode_sample(raw, ImageTransform(8, train=False), None, monitor) is None
    assert monitor.by_cause["missing_image"] == 1
    hints = [r.getMessage() for r in caplog.records if "photo.2021.jpg is an image" in r.getMessage()]
    assert len(hints) == 2 and all("no dot in the keys" in h for h in hints)


def test_cli_reshard_keeps_every_complete_sample_of_a_truncated_tar(tmp_path, capsys, caplog):
    """A tar cut inside sample 3's image lost sample 2 too (the last complete one), and the warning
    named the folder, not the shard."""
    (shard,) = write_sizes(tmp_path / "i2d", [5])
    with tarfile.open(shard) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000000003.jpg").offset_data + 10
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[:cut])
    assert shards_main(["img2dataset", str(tmp_path / "i2d"), str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out" / "manifest.json")["num_samples"] == 3
    assert "truncated_shard=1" in capsys.readouterr().out
    assert any("00000.tar" in r.getMessage() and "truncated_shard" in r.getMessage() for r in caplog.records)


def test_cli_skips_and_counts_bytes_that_are_no_image_and_json_that_does_not_parse(tmp_path, capsys):
    """A corrupt file is skipped and counted (it stopped the whole write with a traceback); a sample whose
    json does not parse keeps its image and caption."""
    images = tmp_path / "img"
    images.mkdir()
    (images / "good.jpg").write_bytes(tiny_jpeg(0))
    (images / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "caps.csv").write_text("file,caption\ngood.jpg,a photo\nbad.jpg,broken\n")
    assert shards_main(["folder", str(images), str(tmp_path / "caps.csv"), str(tmp_path / "a")]) == 0
    assert read_manifest(tmp_path / "a" / "manifest.json")["num_samples"] == 1
    assert "corrupt_image=1" in capsys.readouterr().out

    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    for i, image in enumerate([tiny_jpeg(1), b"\xff\xd8\xff garbage", tiny_jpeg(2)]):
        (files / f"{i:09d}.jpg").write_bytes(image)
        (files / f"{i:09d}.txt").write_text(f"caption {i}")
        (files / f"{i:09d}.json").write_text("{not json" if i == 2 else "{}")
    assert shards_main(["img2dataset", str(tmp_path / "files"), str(tmp_path / "b")]) == 0
    assert read_manifest(tmp_path / "b" / "manifest.json")["num_samples"] == 2
    assert "corrupt_image=1" in capsys.readouterr().out


def _synthetic(out, n: int, *extra: str) -> int:
    return shards_main(
        ["synthetic", str(out), "--num-samples", str(n), "--max-count", "4", "--image-size", "8", *extra]
    )


def test_cli_refuses_a_folder_holding_shards_and_overwrite_deletes_only_its_own_files(tmp_path, capsys):
    # a smaller second run left 00002.tar behind: '{00000..00002}.tar' or '*.tar' trained on a mix
    out = tmp_path / "out"
    assert _synthetic(out, 12) == 0
    (out / "notes.txt").write_text("mine")
    (out / "laion-000.tar").write_bytes(b"")  # not a name the writer gives: not its to delete
    (out / ".00007.tar.tmp").write_bytes(b"")  # what an interrupted run leaves
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        _synthetic(out, 4)
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and "already holds 3 shard(s)" in err
        and "00000.tar" in err
        and "--overwrite" in err
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    assert _synthetic(out, 4, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.tar",
        "laion-000.tar",
        "manifest.json",
        "notes.txt",
        "sizes.json",
    ]
    assert read_manifest(out / "manifest.json")["shards"] == {"00000.tar": 4}


def test_the_writer_refuses_shards_of_an_earlier_run_and_accepts_other_files(tmp_path):
    records = [Record(f"{i:09d}", tiny_jpeg(i), f"caption {i}") for i in range(3)]
    (tmp_path / "readme.txt").write_text("a folder with other files is fine")
    write_shards(records, tmp_path, max_count=2, progress=False)
    with pytest.raises(FileExistsError, match=r"2 shard\(s\) of an earlier run \(00000.tar, 00001.tar\)"):
        ShardWriter(tmp_path, max_count=2)
    assert write_shards(records[:1], tmp_path, max_count=2, progress=False, overwrite=True) == {
        "00000.tar": 1
    }
    assert not (tmp_path / "00001.tar").exists() and (tmp_path / "readme.txt").exists()


def test_cli_synthetic_and_manifest_recount(tmp_path, capsys):
    out = tmp_path / "syn"
    assert (
        shards_main(["synthetic", str(out), "--num-samples", "30", "--max-count", "8", "--image-size", "16"])
        == 0
    )
    before = read_manifest(out / "manifest.json")["shards"]
    (out / "manifest.json").unlink()
    capsys.readouterr()
    assert shards_main(["manifest", f"{out}/"]) == 0  # a folder given with its slash, as shells complete it
    assert f"wrote {out / 'manifest.json'}\n" in capsys.readouterr().out
    assert (
        read_manifest(out / "manifest.json")["shards"]
        == before
        == {
            "00000.tar": 8,
            "00001.tar": 8,
            "00002.tar": 8,
            "00003.tar": 6,
        }
    )


def test_cli_manifest_says_which_shards_are_broken(tmp_path, capsys, caplog):
    """Counting a folder with broken shards ended in "N samples in M shards" alone, and logged each broken
    shard twice."""
    urls = write_sizes(tmp_path, [4, 4, 4])
    Path(urls[1]).write_bytes(b"")
    with tarfile.open(urls[2]) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000000009.jpg").offset_data + 10
    Path(urls[2]).write_bytes(Path(urls[2]).read_bytes()[:cut])
    assert shards_main(["manifest", str(tmp_path)]) == 0
    assert "broken shards: empty_shard=1, truncated_shard=1" in capsys.readouterr().out
    assert sum("00001.tar" in r.getMessage() for r in caplog.records) == 1


def test_manifest_lookup_by_directory_and_for_pipe_urls(tmp_path):
    a = write_sizes(tmp_path / "a", [2, 3])
    b = write_sizes(tmp_path / "b", [5])
    assert find_manifest(a + b) == {a[0]: 2, a[1]: 3, b[0]: 5}  # same base name, separate counts
    pipe = f"pipe:cat {a[1]}"
    assert shard_name(pipe) == "00001.tar"
    assert find_manifest([pipe]) is None
    assert find_manifest([pipe], manifest=str(tmp_path / "a" / "manifest.json")) == {pipe: 3}


def test_gzipped_shards_are_counted_for_exact_epochs(tmp_path, capsys):
    """Shards gzipped by other tools (``00000.tar.gz``, ``00001.tgz``) are read as they are, but exact epochs
    need their counts, and ``clipforge-shards manifest``, the command the loader's error names, counted only
    ``*.tar``: "no *.tar shards". A ``pipe:`` URL of one was looked up as ``00000.tar``."""
    plain = write_sizes(tmp_path / "plain", [2, 3])
    gz = tmp_path / "gz"
    gz.mkdir()
    for url, name in zip(plain, ["00000.tar.gz", "00001.tgz"], strict=True):
        (gz / name).write_bytes(gzip.compress(Path(url).read_bytes()))
    assert shards_main(["manifest", str(gz)]) == 0
    assert read_manifest(gz / "manifest.json")["shards"] == {"00000.tar.gz": 2, "00001.tgz": 3}
    assert shard_name(f"pipe:curl -s http://x/{gz.name}/00000.tar.gz") == "00000.tar.gz"
    assert shard_name("pipe:curl -s http://x/00001.tgz") == "00001.tgz"
    dm = data_module(f"{gz}/{{00000.tar.gz,00001.tgz}}", batch_size=2)
    dm.setup("fit")
    assert sorted(sample_ids([k for b in dm.train_dataloader() for k in b[2]])) == [0, 1, 2, 3, 4]


def test_parse_bytes():
    assert parse_bytes("1GB") == 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2e3") == 2000


def test_cli_reshard_keeps_boxes_of_img2dataset_json(tmp_path):
    # img2dataset keeps whatever the input's extra columns hold in KEY.json: boxes must come through.
    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    metas = [
        {"url": "http://x/0", "box": [0.1, 0.2, 0.5, 0.6], "referring_expression": "the red circle"},
        {"url": "http://x/1", "boxes": [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], "labels": ["a", "b"]},
    ]
    for i, meta in enumerate(metas):
        (files / f"{i:09d}.jpg").write_bytes(tiny_jpeg(i))
        (files / f"{i:09d}.txt").write_text(f"caption {i}")
        (files / f"{i:09d}.json").write_text(json.dumps(meta))
    assert shards_main(["img2dataset", str(tmp_path / "files"), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        out = [json.loads(tar.extractfile(f"{i:09d}.json").read()) for i in range(2)]
    for got, meta in zip(out, metas):
        assert {k: got[k] for k in meta} == meta


def test_manifest_given_but_missing_fails_and_uncounted_shards_are_named(tmp_path, caplog):
    """data.manifest=<a path that does not exist> was ignored: the error then asked for data.manifest=...;
    a shard added after its manifest was written left only that error, naming no shard."""
    a = write_sizes(tmp_path / "a", [2, 3])
    with pytest.raises(DataError, match=r"gone\.json does not exist"):
        find_manifest(a, manifest=str(tmp_path / "gone.json"))
    (tmp_path / "a" / "00002.tar").write_bytes(Path(a[0]).read_bytes())
    assert find_manifest([*a, str(tmp_path / "a" / "00002.tar")]) is None
    assert any(
        "1 of 3 shards are in no manifest" in r.getMessage() and "00002.tar" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "Expecting value"), ("[1, 2]", "a JSON list"), ('{"shards": {"00000.tar": "ten"}}', "'ten'")],
)
def test_a_broken_manifest_is_an_error_naming_it(tmp_path, text, why):
    """An empty or mangled manifest.json beside the shards failed with a bare JSONDecodeError, ValueError or
    AttributeError that named no file."""
    (url,) = write_sizes(tmp_path, [2])
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=rf"manifest\.json is not a manifest \(.*{why}"):
        find_manifest([url])


def test_the_warning_for_uncounted_pipe_shards_names_only_where_it_looked(tmp_path, caplog):
    """pipe: URLs are looked up in data.manifest alone; the warning said it looked beside each shard too."""
    write_manifest(tmp_path, {"00000.tar": 2})
    urls = [f"pipe:cat {tmp_path}/0000{i}.tar" for i in range(2)]
    assert find_manifest(urls, manifest=str(tmp_path / "manifest.json")) is None
    (message,) = [r.getMessage() for r in caplog.records if "in no manifest" in r.getMessage()]
    assert f"(looked in {tmp_path / 'manifest.json'}): pipe:cat {tmp_path}/00001.tar" in message
