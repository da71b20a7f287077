"""Captions files as users have them (spreadsheet exports, hand-written TSV, JSONL from scripts): each is
read as written, or refused with a message naming the line; none is read wrong without a word."""

import json
import tarfile

import pytest
from datahelpers import tiny_jpeg

from clipforge.data.cli import main as shards_main
from clipforge.data.sources import read_captions


def test_a_file_that_is_not_utf8_is_an_error_naming_its_line_and_nothing_is_written(tmp_path, capsys):
    """A Windows-1252 export crashed with a bare UnicodeDecodeError (no file, no line) after the output
    folder was made; it is now a usage error naming the file and line, before anything is written."""
    path = tmp_path / "caps.csv"
    path.write_bytes("file,caption\na.jpg,a cat\nb.jpg,\u201ccaf\u00e9\u201d\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"caps\.csv, line 3: not UTF-8 text \(byte 0x93\)"):
        read_captions(path)
    (tmp_path / "img").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        shards_main(["folder", str(tmp_path / "img"), str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "line 3: not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_utf16_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "Unicode text" export is UTF-16 with a byte-order mark: unambiguous, so it is read."""
    path = tmp_path / "caps.tsv"
    path.write_bytes("file\tcaption\r\na.jpg\tcaf\u00e9\r\n".encode("utf-16"))
    assert read_captions(path) == [("a.jpg", "caf\u00e9")]


def test_an_unquoted_delimiter_in_a_caption_is_an_error_not_a_cut_caption(tmp_path):
    """``a.jpg,a cat, sitting`` became the caption "a cat": the rest was dropped without a word."""
    path = tmp_path / "caps.csv"
    path.write_text("file,caption\na.jpg,a cat\nb.jpg,a cat, sitting on a mat\n")
    with pytest.raises(ValueError, match=r"caps\.csv, line 3: 3 fields where the first row has 2"):
        read_captions(path)
    path.write_text("b.jpg,a dog\na.jpg,a cat, sitting\n")  # no header
    with pytest.raises(ValueError, match="line 2: 3 fields"):
        read_captions(path)
    path.write_text("file,caption\na.jpg,a cat,\nb.jpg,a dog,,\n")  # empty trailing fields: a spreadsheet's
    assert read_captions(path) == [("a.jpg", "a cat"), ("b.jpg", "a dog")]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('file\tcaption\na.jpg\t"Best" photo ever\nb.jpg\tsecond\n', 2),  # quotes dropped: Best photo ever
        ('file\tcaption\na.jpg\t"oops\nb.jpg\tsecond\nc.jpg\tthird\n', 2),  # three rows became one caption
    ],
)
def test_a_stray_quote_is_an_error_not_rows_merged(tmp_path, text, line):
    path = tmp_path / "caps.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"caps\.tsv, row starting at line {line}: .*quoted whole"):
        read_captions(path)
    path.write_text('file\tcaption\na.jpg\t"""Best"" photo"\nb.jpg\tsays "hi"\n')  # quoted as CSV writers do
    assert read_captions(path) == [("a.jpg", '"Best" photo'), ("b.jpg", 'says "hi"')]


def test_a_row_without_a_caption_is_kept_to_be_counted(tmp_path, capsys):
    """A headerless row holding only a file name was dropped here, so the writer never counted it."""
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(tiny_jpeg(0))
    path = tmp_path / "caps.csv"
    path.write_text("a.jpg,a cat\r\nb.jpg\r\n")
    assert read_captions(path) == [("a.jpg", "a cat"), ("b.jpg", "")]
    assert shards_main(["folder", str(tmp_path / "img"), str(path), str(tmp_path / "out")]) == 0
    assert "skipped: missing_caption=1" in capsys.readouterr().out


def test_jsonl_rows_are_read_row_by_row_and_a_bad_row_is_named(tmp_path):
    """The caption key was taken from the first row only (a later row's "caption" read as empty when the
    first said "text"), a row without a file name crashed with KeyError, a broken line's JSON error gave a
    line number of 1, a caption 0 became empty and an object became its repr as caption."""
    path = tmp_path / "caps.jsonl"
    rows = [{"file": "a.jpg", "text": "x"}, {"file": "b.jpg", "caption": "y"}, {"image": "c.jpg", "title": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_captions(path) == [("a.jpg", "x"), ("b.jpg", "y"), ("c.jpg", "0")]
    for bad, why in [
        ('{"caption": "y"}', r"line 2: no file name column"),
        ('{"file": "b.jpg", caption}', r"line 2: not JSON"),
        ('["b.jpg", "y"]', r"line 2: expected an object"),
        ('{"file": "b.jpg", "caption": {"en": "y"}}', r"line 2: a caption must be text"),
    ]:
        path.write_text('{"file": "a.jpg", "caption": "x"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=why):
            read_captions(path)
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"a.jpg": {"caption": "x"}}))
    with pytest.raises(ValueError, match=r"'a\.jpg': a caption must be text"):
        read_captions(path)


def test_crlf_and_quoted_line_breaks_end_up_as_plain_line_breaks(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a b.JPG").write_bytes(tiny_jpeg(0))
    path = tmp_path / "caps.csv"
    path.write_bytes('\ufefffile,caption\r\n"a b.JPG","two\r\nlines, one comma"\r\n'.encode())
    assert read_captions(path) == [("a b.JPG", "two\nlines, one comma")]
    assert shards_main(["folder", str(tmp_path / "img"), str(path), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.extractfile("000000000.txt").read() == b"two\nlines, one comma"


def _files_layout(root, samples: dict[str, dict[str, bytes]]) -> None:
    (root / "00000").mkdir(parents=True)
    for key, members in samples.items():
        for ext, data in members.items():
            (root / "00000" / f"{key}.{ext}").write_bytes(data)


def test_a_txt_that_is_not_utf8_is_counted_not_read_with_replacement_characters(tmp_path, capsys, caplog):
    """A Latin-1 "café" was kept as "caf\ufffd", by the shard writer and by the loader alike; a UTF-8
    byte-order mark stayed in the caption the writer stored."""
    from clipforge.data.decode import decode_sample
    from clipforge.data.failures import FailureMonitor, new_tables
    from clipforge.data.shards import RawSample
    from clipforge.data.transforms import ImageTransform

    latin1 = "caf\u00e9 au lait".encode("latin-1")
    _files_layout(
        tmp_path / "src",
        {
            "000000001": {"jpg": tiny_jpeg(0), "txt": latin1},
            "000000002": {"JPG": tiny_jpeg(1), "txt": "\ufeffcaf\u00e9\r\n".encode()},
        },
    )
    assert shards_main(["img2dataset", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "skipped: missing_caption=1" in capsys.readouterr().out
    assert any("000000001: its .txt is not UTF-8 text (byte 0xe9" in r.getMessage() for r in caplog.records)
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.getnames() == ["000000002.jpg", "000000002.txt", "000000002.json"]
        assert tar.extractfile("000000002.txt").read().decode() == "caf\u00e9"
        assert json.loads(tar.extractfile("000000002.json").read())["caption"] == "caf\u00e9"

    monitor = FailureMonitor(*new_tables(1, 1), 0, {"u": 0}, "test")
    transform = ImageTransform(8, train=False)
    assert (
        decode_sample(RawSample("k", "u", {"jpg": tiny_jpeg(0), "txt": latin1}), transform, None, monitor)
        is None
    )
    assert monitor.by_cause["missing_caption"] == 1
    assert any("k (its .txt is not UTF-8" in r.getMessage() for r in caplog.records)
    good = decode_sample(
        RawSample("k", "u", {"jpg": tiny_jpeg(0), "txt": b"\xef\xbb\xbfa cat"}), transform, None, monitor
    )
    assert good is not None and good.target == "a cat"


def test_macos_hidden_files_in_a_files_layout_are_no_samples(tmp_path, capsys):
    """A folder copied from a Mac holds ``._NAME`` beside each file and a ``.DS_Store``: each was taken
    for a sample of key ``00000/`` and counted ``missing_image``, with a warning about dots in keys."""
    _files_layout(tmp_path / "src", {"000000001": {"jpg": tiny_jpeg(0), "txt": b"a cat"}})
    (tmp_path / "src" / "00000" / "._000000001.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "src" / "00000" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "src" / "._00001.tar").write_bytes(b"\x00\x05\x16\x07")
    assert shards_main(["img2dataset", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 samples in 1 shards" in out and "skipped" not in out


def test_a_file_name_twice_in_a_json_object_is_an_error_not_a_caption_dropped(tmp_path):
    """json.loads keeps the last of two equal keys: {"a.jpg": "x", "a.jpg": "y"} lost "x" without a word."""
    path = tmp_path / "caps.json"
    path.write_text('{"a.jpg": "x", "b.jpg": "z", "a.jpg": "y"}')
    with pytest.raises(ValueError, match=r"caps\.json: 'a\.jpg' is a key twice in one object; .* as a list"):
        read_captions(path)
    path = tmp_path / "caps.jsonl"
    path.write_text('{"file": "a.jpg", "caption": "x"}\n{"file": "b.jpg", "caption": "y", "caption": "z"}\n')
    with pytest.raises(ValueError, match=r"caps\.jsonl, line 2: 'caption' is a key twice"):
        read_captions(path)


def test_a_name_in_another_unicode_normalisation_finds_its_file(tmp_path, capsys):
    """A folder from a Mac names "café.jpg" with a decomposed é (NFD), a spreadsheet writes it composed
    (NFC): the image was counted missing while a file of the very same look was there."""
    import unicodedata

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / unicodedata.normalize("NFD", "café.jpg")).write_bytes(tiny_jpeg(0))
    (tmp_path / "img" / unicodedata.normalize("NFC", "crème.jpg")).write_bytes(tiny_jpeg(1))
    rows = [("café.jpg", "NFC", "a cup"), ("crème.jpg", "NFD", "a dessert")]
    (tmp_path / "caps.csv").write_text(
        "file,caption\n" + "".join(f"{unicodedata.normalize(form, n)},{c}\n" for n, form, c in rows)
    )
    assert (
        shards_main(["folder", str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "out")]) == 0
    )
    assert "2 samples" in capsys.readouterr().out


def test_a_file_with_another_delimiter_is_named_with_the_one_it_was_read_with(tmp_path):
    """'file;caption' rows read comma-separated are one column: the error said only 'needs exactly two
    columns', not which separator was expected or what the first row held."""
    (tmp_path / "captions.csv").write_text("a.jpg;a red circle\nb.jpg;a blue square\n")
    with pytest.raises(
        ValueError, match=r"separated by a comma \(the first row has 1: \['a.jpg;a red circle'\]"
    ):
        read_captions(tmp_path / "captions.csv")
