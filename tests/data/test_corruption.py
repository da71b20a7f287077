"""Bad input is skipped, counted by cause and made up for, never silent; mostly-bad input stops at once."""

import os
import tarfile
import time
from pathlib import Path

import pytest
from datahelpers import add, data_module, pattern, sample_ids, tiny_jpeg, write_sizes

from clipforge.data import shards as shards_module
from clipforge.data.cli import count_shards
from clipforge.data.failures import FailureMonitor, FailurePolicy, new_tables
from clipforge.data.manifest import write_manifest
from clipforge.data.plan import Segment
from clipforge.data.read import read_segments
from clipforge.data.shards import DataError, ShardResult, read_shard

SIZES = [10, 10, 10, 10]


def rewrite(path, drop=(), corrupt=(), no_caption=(), no_image=()):
    """Rewrite a shard written by write_sizes, damaging the named sample ids."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            i, ext = int(name.split(".")[0]), name.split(".", 1)[1]
            if i in drop or (ext == "txt" and i in no_caption) or (ext == "jpg" and i in no_image):
                continue
            if ext == "jpg" and i in corrupt:
                data = data[:20] + b"\x00garbage" * 10
            add(tar, name, data)


def module(shards, **kw):
    dm = data_module(shards, 4, **kw)
    dm.setup("fit")
    return dm


def run_epoch(dm):
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)  # batch count kept, so DDP ranks stay in step
    return batches


@pytest.fixture
def shards(tmp_path):
    urls = write_sizes(tmp_path, SIZES)
    return tmp_path, urls, pattern(tmp_path, len(SIZES))


def test_clean_data_counts_nothing(shards):
    _, _, pat = shards
    dm = module(pat)
    run_epoch(dm)
    assert set(dm.skip_counts().values()) == {0}


@pytest.mark.parametrize(
    ("damage", "cause", "n"),
    [
        ({"corrupt": {3, 4}}, "corrupt_image", 2),
        ({"no_caption": {5}}, "missing_caption", 1),
        ({"no_image": {6, 7, 8}}, "missing_image", 3),
    ],
)
def test_bad_samples_are_skipped_counted_and_made_up_for(shards, damage, cause, n):
    _, urls, pat = shards
    rewrite(urls[0], **damage)
    dm = module(pat)
    batches = run_epoch(dm)
    counts = dm.skip_counts()
    assert counts[cause] == n
    assert counts["repeated_samples"] == n
    assert sum(v for k, v in counts.items() if k not in (cause, "repeated_samples")) == 0
    ids = sample_ids([k for b in batches for k in b[2]])
    assert len(ids) == sum(SIZES) and len(set(ids)) == sum(SIZES) - n  # n re-read, all the good ones once


def test_empty_truncated_and_unreadable_shards(shards):
    _, urls, pat = shards
    Path(urls[0]).write_bytes(b"")  # empty (the manifest still promises 10)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2])  # cut at a 512-byte boundary: looks like a shorter tar
    Path(urls[2]).write_bytes(os.urandom(3000))  # not a tar at all
    dm = module(pat, failures=FailurePolicy(0.9))
    batches = run_epoch(dm)
    counts = dm.skip_counts()
    assert counts["empty_shard"] == 1 and counts["truncated_shard"] == 1 and counts["unreadable_shard"] == 1
    delivered_from_truncated = len(
        {i for i in sample_ids([k for b in batches for k in b[2]]) if 10 <= i < 20}
    )
    assert 0 < delivered_from_truncated < 10
    assert counts["lost_samples"] == 30 - delivered_from_truncated
    assert counts["repeated_samples"] == counts["lost_samples"]


def test_truncated_mid_member(shards):
    _, urls, pat = shards
    data = Path(urls[3]).read_bytes()
    Path(urls[3]).write_bytes(data[: len(data) // 2 + 100])
    dm = module(pat)
    run_epoch(dm)
    assert dm.skip_counts()["truncated_shard"] == 1


def test_failing_pipe_command_is_an_unreadable_shard(shards):
    root, urls, _ = shards
    pipes = [f"pipe:cat {u}" for u in urls[:3]] + [f"pipe:cat {root}/gone/00003.tar"]
    dm = data_module(pipes, 4, manifest=str(root / "manifest.json"))
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == dm.steps_per_epoch
    assert dm.skip_counts()["unreadable_shard"] == 1


def test_a_stalled_pipe_command_is_a_broken_shard_not_a_hang(shards, monkeypatch):
    """A pipe: command that stops writing (a stalled download) held its worker, and the run, forever."""
    monkeypatch.setattr(shards_module, "PIPE_STALL_S", 0.5)
    root, urls, _ = shards
    head = len(Path(urls[1]).read_bytes()) // 2
    pipes = [
        f"pipe:cat {urls[0]}",
        f"pipe:head -c {head} {urls[1]}; sleep 5",
        f"pipe:sleep 5 # {urls[2]}",
        f"pipe:cat {urls[3]}",
    ]
    dm = data_module(pipes, 4, manifest=str(root / "manifest.json"), failures=FailurePolicy(0.9))
    dm.setup("fit")
    start = time.monotonic()
    assert len(list(dm.train_dataloader())) == dm.steps_per_epoch
    assert time.monotonic() - start < 4  # neither sleep was waited for
    counts = dm.skip_counts()
    assert counts["truncated_shard"] == 1 and counts["unreadable_shard"] == 1


def test_counts_reach_the_main_process_from_worker_processes(shards):
    _, urls, pat = shards
    rewrite(urls[1], corrupt={11, 12})
    rewrite(urls[3], no_caption={33})
    dm = data_module(pat, 4, num_workers=2)
    dm.setup("fit")
    run_epoch(dm)
    counts = dm.skip_counts()
    assert counts["corrupt_image"] == 2 and counts["missing_caption"] == 1


def test_mostly_bad_input_stops_at_once_naming_the_shards(shards):
    _, urls, pat = shards
    for u, base in zip(urls, range(0, 40, 10)):
        rewrite(u, corrupt=set(range(base, base + 8)))
    dm = module(pat)
    with pytest.raises(DataError, match=r"samples failed .*corrupt_image.*0000[0-3]\.tar \(\d+ failed\)"):
        run_epoch(dm)


def test_all_shards_unreadable_stops(shards):
    _, urls, pat = shards
    for u in urls:
        Path(u).write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match=r"unreadable_shard|lost_samples"):
        run_epoch(module(pat))


def test_a_shard_longer_than_its_manifest_says_is_named(shards, caplog):
    """A stale manifest that undercounts a shard left the rest of it unread every epoch, without a word.
    Not named: a shard cut inside the sample after its count (the manifest counted it after the cut),
    a shard read in parts (one segment per worker) for its first parts."""
    root, urls, pat = shards
    with tarfile.open(urls[1]) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000000016.jpg").offset_data + 10
    Path(urls[1]).write_bytes(Path(urls[1]).read_bytes()[:cut])
    write_manifest(root, {Path(u).name: 6 if u in urls[1:3] else 10 for u in urls})
    dm = module(pat)
    ids = sample_ids([k for b in run_epoch(dm) for k in b[2]])
    assert sorted(ids) == [i for i in range(40) if not (16 <= i < 20 or 26 <= i < 30)]  # as the manifest says
    named = [r.getMessage() for r in caplog.records if "its manifest says" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith(f"{urls[2]} holds more than the 6 samples")

    caplog.clear()
    parts = [Segment(urls[0], 0, 4), Segment(urls[0], 4, 6), Segment(urls[2], 0, 6)]
    monitor = FailureMonitor(*new_tables(1, 4), 0, {u: i for i, u in enumerate(urls)}, "test")
    assert len(list(read_segments(parts, monitor, {urls[0]: 10, urls[2]: 6}))) == 16
    assert monitor.short_shards == 1


def test_macos_tar_resource_forks_are_not_samples(shards):
    """A tar made on macOS holds ``._NAME`` before each file with extended attributes: every sample was split
    in two, counted as missing images and captions, and the run stopped as mostly bad input."""
    _, urls, pat = shards
    with tarfile.open(urls[0]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(urls[0], "w") as tar:
        for name, data in members:
            add(tar, "._" + name, b"\x00\x05\x16\x07 Mac OS X        ")
            add(tar, name, data)
    dm = module(pat)
    ids = sample_ids([k for b in run_epoch(dm) for k in b[2]])
    assert sorted(ids) == list(range(40))
    assert set(dm.skip_counts().values()) == {0}


def test_members_without_a_key_are_no_samples(shards):
    """``tar`` run on a folder packs what else lies there: a ``README``, macOS's ``.DS_Store``. WebDataset
    gives such names no key (a base name without a dot, or starting with one) and leaves them out; here each
    was a sample without an image, counted as missing_image, and the worker re-read others to make up."""
    root, urls, pat = shards
    with tarfile.open(urls[0]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = [("README", b"photos"), *members[:6], ("photos/.DS_Store", b"\x00" * 8), *members[6:]]
    with tarfile.open(urls[0], "w") as tar:
        for name, data in [*members, ("LICENSE", b"CC-BY")]:
            add(tar, name, data)
    assert count_shards(root)["00000.tar"] == 10
    dm = module(pat)
    ids = sample_ids([k for b in run_epoch(dm) for k in b[2]])
    assert sorted(ids) == list(range(40))
    assert set(dm.skip_counts().values()) == {0}


def test_a_key_twice_in_a_row_is_two_samples_not_one_with_mixed_members(shards):
    """A key's members twice in a row (a writer that retried a sample, tars joined by hand) were read as one
    sample, the later members replacing the earlier: a sample lost without a word, and where the second copy
    had no caption, its image trained on the first copy's caption. A repeated extension starts a new sample,
    as in open_clip's reader (webdataset's raises)."""
    root, urls, pat = shards
    with tarfile.open(urls[1]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    fifteen = [(name, data) for name, data in members if name.startswith("000000015.")]
    with tarfile.open(urls[1], "w") as tar:
        for name, data in members:
            add(tar, name, data)
            if name == "000000012.json":  # a second copy of 12: another image, no caption
                add(tar, "000000012.jpg", tiny_jpeg(99))
            if name == "000000015.json":  # 15 whole, twice
                for name15, data15 in fifteen:
                    add(tar, name15, data15)
    samples = list(read_shard(urls[1], ShardResult()))
    assert [(s.key, sorted(s.members)) for s in samples[2:4]] == [
        ("000000012", ["jpg", "json", "txt"]),
        ("000000012", ["jpg"]),
    ]
    assert samples[3].members["jpg"] == tiny_jpeg(99)
    assert [s.key for s in samples].count("000000015") == 2 and len(samples) == 12
    write_manifest(root, count_shards(root))
    dm = module(pat)
    ids = sample_ids([k for b in run_epoch(dm) for k in b[2]])
    assert dm.skip_counts()["missing_caption"] == 1  # the second 12, not paired with the first's caption
    assert ids.count(15) >= 2 and len(ids) == 42


def test_a_sample_skipped_for_its_caption_or_image_names_the_members_it_has(caplog):
    """Shards from other tools that keep captions in ``KEY.caption`` or images as ``KEY.avif`` had every
    sample skipped as "missing_caption" or "missing_image" and the run stopped as bad input, the log naming
    nothing the sample did hold: that the loader reads ``.txt`` (or the json's "caption") was left to guess."""
    from clipforge.data.decode import decode_sample
    from clipforge.data.failures import FailureMonitor, new_tables
    from clipforge.data.shards import RawSample
    from clipforge.data.transforms import ImageTransform

    monitor = FailureMonitor(*new_tables(1, 1), 0, {"u": 0}, "test")
    transform = ImageTransform(8, train=False)
    samples = {
        "a": {"jpg": tiny_jpeg(0), "caption": b"a cat", "json": b'{"key": "a"}'},
        "b": {"avif": b"\x00\x00\x00\x1cftypavif", "txt": b"a dog"},
        "c": {"jpg": tiny_jpeg(1), "txt": b" \n"},
    }
    for key, members in samples.items():
        assert decode_sample(RawSample(key, "u", members), transform, None, monitor) is None
    assert monitor.by_cause["missing_caption"] == 2 and monitor.by_cause["missing_image"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("skipped a (no .txt or json caption; it has .caption, .jpg, .json)") for m in messages
    )
    assert any(m.startswith("skipped b (no image; it has .avif, .txt)") for m in messages)
    assert any(m.startswith("skipped c (its .txt is empty)") for m in messages)


def test_a_corrupt_image_is_logged_with_what_the_decoder_said(caplog, monkeypatch):
    """A skipped image was logged as "skipped KEY: corrupt_image in URL", the decoder's reason dropped: a
    truncated file, bytes that are no image and a photo over PIL's decompression-bomb limit (which opens in
    any viewer) read the same, and the shard writer and zero-shot name the reason for the very same files."""
    import io

    from PIL import Image

    from clipforge.data.decode import decode_sample
    from clipforge.data.failures import FailureMonitor, new_tables
    from clipforge.data.shards import RawSample
    from clipforge.data.transforms import ImageTransform

    monitor = FailureMonitor(*new_tables(1, 1), 0, {"u": 0}, "test")
    big = Image.new("RGB", (32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 32 x 32 is over twice this: refused
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    samples = {"cut": tiny_jpeg(0)[:60], "text": b"not a picture", "big": buf.getvalue()}
    for key, data in samples.items():
        raw = RawSample(key, "u", {"jpg": data, "txt": b"a caption"})
        assert decode_sample(raw, ImageTransform(8, train=False), None, monitor) is None
    assert monitor.by_cause["corrupt_image"] == 3
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(messages) == 3 and all("corrupt_image in u" in m for m in messages)
    assert any(m.startswith("skipped big (DecompressionBombError: ") for m in messages), messages
    assert any(m.startswith("skipped text (UnidentifiedImageError: ") for m in messages), messages
    assert any(m.startswith("skipped cut (") for m in messages), messages
