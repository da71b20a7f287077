"""The WebDataset loader: exact epochs, equal batches per rank, shuffling, modes, URL handling."""

import collections
import json
import logging
import multiprocessing
import subprocess
import sys
import tarfile

import pytest
import torch
from datahelpers import add, data_module, pattern, sample_ids, tiny_jpeg, write_sizes

from clipforge.data.config import Augment, Stream, ZeroShotSet
from clipforge.data.datamodule import WebDataModule
from clipforge.data.dataset import ShardDataset
from clipforge.data.failures import FailurePolicy
from clipforge.data.manifest import find_manifest, write_manifest
from clipforge.data.shards import DataError, expand_urls
from clipforge.data.tokenizer import Tokenizer

SIZES = [13, 2, 40, 7, 21, 9]  # unequal shards, 92 samples


@pytest.fixture
def shards(tmp_path):
    write_sizes(tmp_path, SIZES)
    return pattern(tmp_path, len(SIZES))


STRICT = FailurePolicy(max_fraction=0.25)  # a quarter of the samples failing stops a pass


def epoch(ds, epoch=0, resume=0):
    ds.set_epoch(epoch)
    ds.set_resume(resume)
    return list(ds)


def make(shards, stream=None, **kw):
    sources = expand_urls(shards)
    kw = {"batch_size": 8, "augment": Augment(image_size=16), "context_length": 16} | kw
    stream = Stream(**{"shuffle_buffer": 10, "return_keys": True} | (stream or {}))
    return ShardDataset(sources, find_manifest(sources[0]), stream=stream, **kw)


def test_exact_epoch_sees_every_sample_once(shards):
    batches = epoch(make(shards), epoch=3)
    ids = sample_ids([k for b in batches for k in b[2]])
    assert sorted(ids) == list(range(sum(SIZES)))
    assert [len(b[2]) for b in batches] == [8] * 11 + [4]
    images, tokens, keys = batches[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert tokens.shape == (8, 16) and tokens.dtype == torch.long
    tok = Tokenizer(16)
    decoded = [tok.decode(t).replace(" ", "") for t in tokens]  # the BPE splits digits: "8 6"
    assert decoded == [f"sample{i}" for i in sample_ids(keys)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_get_equal_batches_from_unequal_shards_and_disjoint_samples(shards, world):
    per_rank = [epoch(make(shards, rank=r, world_size=world), epoch=1) for r in range(world)]
    sizes = [[len(b[2]) for b in batches] for batches in per_rank]
    assert all(s == sizes[0] for s in sizes)  # same count and same size at every step
    ids = [i for batches in per_rank for b in batches for i in sample_ids(b[2])]
    assert len(ids) == len(set(ids))
    assert sum(SIZES) - len(ids) < world  # only the final partial global batch is short
    assert make(shards, rank=0, world_size=world).num_batches == len(sizes[0])


def test_shuffle_is_seeded_by_epoch(shards):
    ds = make(shards)
    first = [sample_ids(b[2]) for b in epoch(ds, 0)]
    again = [sample_ids(b[2]) for b in epoch(ds, 0)]
    other = [sample_ids(b[2]) for b in epoch(ds, 1)]
    assert first == again and first != other
    flat = [i for b in first for i in b]
    assert flat != sorted(flat)


def test_drop_last_gives_full_batches_only(shards):
    batches = epoch(make(shards, world_size=2, stream={"drop_last": True}))
    assert [len(b[2]) for b in batches] == [8] * 5


def test_resampled_mode_has_fixed_epoch_length_and_mixes_sources_by_weight(tmp_path):
    a = write_sizes(tmp_path / "a", [20, 20], start=0)
    b = write_sizes(tmp_path / "b", [5, 5, 5, 5, 5, 5, 5, 5], start=1000)
    ds = ShardDataset(
        [a, b],
        find_manifest(a + b),
        batch_size=10,
        augment=Augment(image_size=16),
        context_length=8,
        stream=Stream(
            resampled=True, epoch_samples=600, weights=[3.0, 1.0], shuffle_buffer=20, return_keys=True
        ),
    )
    batches = epoch(ds, 0)
    assert len(batches) == ds.num_batches == 60 and all(len(x[2]) == 10 for x in batches)
    ids = [i for x in batches for i in sample_ids(x[2])]
    share_a = sum(i < 1000 for i in ids) / len(ids)
    assert 0.6 < share_a < 0.9  # weights are shares of samples (3:1), even though b's shards are small


def test_weights_are_per_training_source_and_leave_evaluation_sets_alone(tmp_path):
    a, b = write_sizes(tmp_path / "a", [10]), write_sizes(tmp_path / "b", [10], start=100)
    stream = {"resampled": True, "epoch_samples": 40, "weights": [3, 1]}
    dm = data_module([a[0], b[0]], 4, val_urls=a[0], stream=stream)
    dm.setup("fit")  # the one val source takes no weight
    assert len(list(dm.val_dataloader())) == 3
    with pytest.raises(ValueError, match=r"data\.stream\.weights: 2 weights for 1 sources"):
        data_module(a[0], 4, stream=stream).setup("fit")


def test_weights_without_resampling_are_refused(shards):
    with pytest.raises(ValueError, match="resampled"):
        make(shards, stream={"weights": [1.0, 2.0]})


def test_eval_mode_is_ordered_and_complete(shards):
    batches = epoch(make(shards, train=False, batch_size=10))
    assert sample_ids([k for b in batches for k in b[2]]) == list(range(sum(SIZES)))


def test_eval_with_a_manifest_skips_bad_samples_without_repeating_others(tmp_path):
    """An evaluation set (val, zero-shot) with a manifest reads each readable sample once: bad samples are
    skipped, not replaced by re-read ones (which counted some images twice in val/loss and zero-shot)."""
    write_sizes(tmp_path, [6, 5])
    with tarfile.open(tmp_path / "00000.tar", "a") as tar:  # two more samples whose image is not one
        for n in (100, 101):
            add(tar, f"{n:09d}.jpg", b"not a jpeg")
            add(tar, f"{n:09d}.txt", f"sample {n}".encode())
    write_manifest(tmp_path, {"00000.tar": 8, "00001.tar": 5})
    for workers in (1, 2):
        dm = data_module(pattern(tmp_path, 2), 4, workers, val_urls=pattern(tmp_path, 2))
        dm.setup("fit")
        ids = sample_ids([k for b in dm.val_dataloader() for k in b[2]])
        assert sorted(ids) == list(range(11)), workers
        counts = dm.skip_counts("val")
        assert counts["corrupt_image"] == 2 and counts["repeated_samples"] == 0


def test_skip_counts_keep_the_training_stream_apart_from_each_evaluation_pass(tmp_path):
    """Every evaluation pass added its skips to the training counts behind data/skipped_* and the summary:
    a val set read twice per validation (val loss, then retrieval) counted its bad images twice per
    validation, and a resumed run, which carries only the training counts, reported other totals than
    the uninterrupted run. Training counts are the training stream's; an evaluation split's, its last pass."""
    write_sizes(tmp_path / "train", [6, 5])
    write_sizes(tmp_path / "val", [6, 5])
    with tarfile.open(tmp_path / "val" / "00000.tar", "a") as tar:
        for n in (100, 101):
            add(tar, f"{n:09d}.jpg", b"not a jpeg")
            add(tar, f"{n:09d}.txt", f"sample {n}".encode())
    write_manifest(tmp_path / "val", {"00000.tar": 8, "00001.tar": 5})
    for workers in (0, 2):
        dm = data_module(pattern(tmp_path / "train", 2), 4, workers, val_urls=pattern(tmp_path / "val", 2))
        dm.setup("fit")
        for _ in range(3):
            assert len([k for b in dm.val_dataloader() for k in b[2]]) == 11
            assert dm.skip_counts("val")["corrupt_image"] == 2, workers
        list(dm.train_dataloader())
        assert set(dm.skip_counts().values()) == {0}, workers
        assert set(dm.skip_counts("zeroshot").values()) == {0}  # a split never read: nothing skipped


def test_labels_for_zero_shot(tmp_path):
    write_sizes(tmp_path, [5, 6], labels=True)
    ds = make(pattern(tmp_path, 2), train=False, target="label")
    batches = epoch(ds)
    ids = sample_ids([k for b in batches for k in b[2]])
    assert torch.cat([b[1] for b in batches]).tolist() == [i % 3 for i in ids]


def test_labels_as_cls_files_or_class_names_for_zero_shot(tmp_path, caplog):
    """One label reader for training-time zero-shot shards and clipforge-zeroshot: ``.cls`` integers (as in
    ImageNet's WebDataset shards) and json labels that are class names, looked up in the class names."""
    names = ["cat", "dog", "fox"]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for n in range(6):
            key = f"{n:09d}"
            add(tar, f"{key}.jpg", tiny_jpeg(n))
            if n % 2:
                add(tar, f"{key}.cls", f"{n % 3}\n".encode())
            else:
                add(tar, f"{key}.json", json.dumps({"label": names[n % 3]}).encode())
    ds = make(str(tmp_path / "00000.tar"), train=False, target=names)
    batches = epoch(ds)
    ids = sample_ids([k for b in batches for k in b[2]])
    assert torch.cat([b[1] for b in batches]).tolist() == [i % 3 for i in ids] and len(ids) == 6
    # a name that is not among the class names stops the pass at the first such sample, naming it: the
    # class names do not fit the shards (it was a missing label, skipped, its class left out of the score)
    with pytest.raises(ValueError, match=r"00000\.tar/000000000: label 'cat' is not among the 3 class names"):
        epoch(make(str(tmp_path / "00000.tar"), train=False, target=["ant", "bee", "cow"], failures=STRICT))


def zero_shot_shard(path, labels: list) -> str:
    with tarfile.open(path, "w") as tar:
        for n, label in enumerate(labels):
            add(tar, f"{n:09d}.jpg", tiny_jpeg(n))
            add(tar, f"{n:09d}.json", json.dumps({"label": label}).encode())
    return str(path)


def test_zero_shot_class_names_match_as_in_clipforge_zeroshot(tmp_path):
    """data.zeroshot reads labels that are class names by the rule clipforge-zeroshot and its class folders
    use (case, underscores, spaces): "Golden_Retriever" is "golden retriever" (it was a missing label)."""
    train = write_sizes(tmp_path / "train", [4])
    zs = zero_shot_shard(tmp_path / "zs.tar", ["Golden_Retriever", "APPLE", "golden retriever", "Apple"])
    names = ["apple", "golden retriever"]
    dm = data_module(train[0], 4, zeroshot=ZeroShotSet(urls=zs, classnames=names, templates="simple"))
    assert torch.cat([b[1] for b in dm.zeroshot_dataloader()]).tolist() == [1, 0, 1, 0]
    # a name of no class stops the pass naming the sample and the closest classes
    bad = zero_shot_shard(tmp_path / "bad.tar", ["apple", "golden retreiver"])
    dm = data_module(train[0], 4, zeroshot=ZeroShotSet(urls=bad, classnames=names, templates="simple"))
    with pytest.raises(
        ValueError, match=r"bad\.tar/000000001: .*'golden retreiver'.*closest: 'golden retriever'"
    ):
        list(dm.zeroshot_dataloader())


def test_pipe_urls_read_like_files(shards, tmp_path):
    urls = [f"pipe:cat {u}" for u in expand_urls(shards)[0]]
    ds = ShardDataset(
        [urls],
        find_manifest(urls, manifest=str(tmp_path / "manifest.json")),
        batch_size=8,
        augment=Augment(image_size=16),
        context_length=8,
        stream=Stream(return_keys=True),
    )
    assert sorted(sample_ids([k for b in epoch(ds) for k in b[2]])) == list(range(sum(SIZES)))


def test_dataloader_with_two_workers_sees_every_sample_once(shards):
    dm = data_module(shards, 8, 2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == dm.steps_per_epoch == 12
    assert sorted(sample_ids([k for b in batches for k in b[2]])) == list(range(sum(SIZES)))


def test_a_sigterm_to_every_process_of_the_job_leaves_the_workers_running(shards):
    """SLURM (scancel, the time limit), ``timeout`` and ``kill -- -PGID`` signal every process of the job,
    the DataLoader workers too. torch's workers died of SIGTERM at once, so the training process failed with
    "DataLoader worker ... is killed by signal: Terminated" instead of finishing its step and saving
    (callbacks.preemption); the training process decides, and then shuts its workers down itself."""
    before = set(multiprocessing.active_children())  # an earlier test's loader may not be collected yet
    dm = data_module(shards, 8, 2)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    seen = [i for _ in range(2) for i in sample_ids(next(batches)[2])]  # one batch from each worker
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)  # from outside
    seen += [i for b in batches for i in sample_ids(b[2])]
    assert sorted(seen) == list(range(sum(SIZES)))
    assert not workers & set(multiprocessing.active_children())  # the epoch's end still stopped them


@pytest.mark.parametrize(
    "start_method", ["fork", pytest.param("forkserver", marks=pytest.mark.slow)]
)  # ~20 s
def test_a_process_with_persistent_workers_still_exits(shards, start_method):
    """At exit, ``multiprocessing`` stops a persistent loader's workers with SIGTERM from the training
    process: that one must end them, or the process waits for them for ever (a worker that let every first
    SIGTERM pass hung every run with persistent workers, data=wds's default, after its summary). Under
    forkserver (Python 3.14's default on Linux) a worker's parent is the fork server, not the trainer."""
    script = (
        "import multiprocessing\n"
        f"multiprocessing.set_start_method({start_method!r})\n"
        "from clipforge.data.config import Augment, Stream\n"
        "from clipforge.data.datamodule import WebDataModule\n"
        f"dm = WebDataModule({shards!r}, batch_size=8, num_workers=2, context_length=8, "
        "augment=Augment(image_size=16), stream=Stream(persistent_workers=True))\n"
        "dm.setup('fit')\n"
        "batches = iter(dm.train_dataloader())\n"
        "next(batches), next(batches)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )  # seconds alone; minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pattern_matching_nothing_fails_at_once_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nothing-here/\{00000\.\.00003\}\.tar.*matches no shard"):
        WebDataModule(str(tmp_path / "nothing-here/{00000..00003}.tar")).setup("fit")
    with pytest.raises(DataError, match="matches no shard"):
        expand_urls(str(tmp_path / "*.tar"))


def test_a_comma_separated_list_of_shards_is_refused_saying_how_to_list_them(shards, tmp_path):
    # "a.tar,b.tar" (webdataset's and open_clip's own list separator is "::") read as one missing path
    urls = ",".join(str(tmp_path / f"{i:05d}.tar") for i in range(2))
    with pytest.raises(
        DataError, match=r"matches no shard.*list shards with '::'.*or a brace list '\{a,b\}\.tar'"
    ):
        expand_urls(urls)


def test_a_glob_over_a_shard_folder_leaves_out_the_files_beside_the_shards(shards, tmp_path, caplog):
    # img2dataset's folder holds _stats.json and .parquet files beside the tars, clipforge's a manifest:
    # `dir/*` read them as shards and stopped with "exact-epoch mode needs samples per shard"
    (tmp_path / "00000_stats.json").write_text("{}")
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    with caplog.at_level(logging.WARNING):
        (urls,) = expand_urls(str(tmp_path / "*"))
    assert urls == [str(tmp_path / f"{i:05d}.tar") for i in range(len(SIZES))]
    said = " ".join(r.message for r in caplog.records)
    assert "also matches 4 files that are not shards" in said and "00000.parquet" in said
    dm = WebDataModule(str(tmp_path / "*"), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert sum(len(b[0]) for b in dm.train_dataloader()) == sum(SIZES) // 4 * 4
    gz = tmp_path / "only"
    gz.mkdir()
    (gz / "a.shard").write_bytes(b"x")  # no file with a shard's name: all are kept, as before
    assert expand_urls(str(gz / "*")) == [[str(gz / "a.shard")]]


def test_a_folder_given_as_shards_fails_at_once_naming_it(shards, tmp_path):
    """The shards' folder as data.train_urls failed with "exact-epoch mode needs samples per shard" (the
    manifest beside it was not found), or in resampled mode as 16 unreadable shards in a row."""
    for stream in (Stream(), Stream(resampled=True, epoch_samples=40)):
        with pytest.raises(DataError, match=r"is a folder, not a shard: name its shards, e\.g\. '.*\*\.tar'"):
            WebDataModule(str(tmp_path) + "/", num_workers=0, stream=stream).setup("fit")


def test_shards_beyond_the_manifest_fail_naming_them(shards, tmp_path, caplog):
    bad = shards.replace("00005}", "00007}")
    with caplog.at_level(logging.WARNING):
        assert len(expand_urls(bad)[0]) == 8  # expanding only warns: a few lost shards are bad input
    assert "2 of 8 shards are missing" in caplog.text and "00006.tar" in caplog.text
    with pytest.raises(
        DataError, match=r"2 of 8 train shards do not exist and no manifest lists them: .*00006\.tar"
    ):
        WebDataModule(bad, num_workers=0).setup("fit")


def test_exact_mode_without_manifest_says_how_to_fix(shards, tmp_path):
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(DataError, match="clipforge-shards manifest"):
        WebDataModule(shards, num_workers=0).setup("fit")


def test_sources_separated_by_double_colon(tmp_path):
    write_sizes(tmp_path / "a", [3])
    write_sizes(tmp_path / "b", [4, 4])
    sources = expand_urls(f"{pattern(tmp_path / 'a', 1)}::{pattern(tmp_path / 'b', 2)}")
    assert [len(s) for s in sources] == [1, 2]
    counter = collections.Counter(u.split("/")[-2] for s in sources for u in s)
    assert counter == {"a": 1, "b": 2}


def test_persistent_workers_follow_the_epoch(shards):
    dm = data_module(shards, 8, 2, stream={"persistent_workers": True})
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[i for b in loader for i in sample_ids(b[2])] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(sum(SIZES)))
    assert epochs[0] != epochs[1] and loader.epoch == 1


def test_eval_without_manifest_reads_whole_shards_in_order(shards, tmp_path):
    urls = [f"pipe:cat {u}" for u in expand_urls(shards)[0]]  # pipe: URLs, no manifest given
    ds = ShardDataset(
        [urls],
        None,
        batch_size=10,
        augment=Augment(image_size=16),
        context_length=8,
        train=False,
        stream=Stream(return_keys=True),
    )
    assert ds.num_batches is None
    batches = epoch(ds)
    assert sample_ids([k for b in batches for k in b[2]]) == list(range(sum(SIZES)))
    # each shard is cut into its own batches (none spans two), so that they do not depend on how the
    # shards are dealt to ranks and workers: a contrastive loss depends on who shares the batch
    assert [len(b[2]) for b in batches] == [10, 3, 2, 10, 10, 10, 10, 7, 10, 10, 1, 9]
    dm = data_module(shards, 10, 2, val_urls=urls)
    two_workers = [sample_ids(b[2]) for b in dm.val_dataloader()]
    assert sorted(two_workers) == sorted(sample_ids(b[2]) for b in batches)  # whole shards in turn


def test_other_image_formats_and_modes_decode(tmp_path):
    """Shards written by other tools: PNG with alpha, grayscale BMP, 16-bit TIFF, palette GIF, CMYK JPEG."""
    import io
    import tarfile

    import numpy as np
    from datahelpers import add
    from PIL import Image

    from clipforge.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    images = {
        "png": rgb.convert("RGBA"),
        "bmp": rgb.convert("L"),
        "tiff": Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)),
        "gif": rgb.convert("P"),
        "jpg": rgb.convert("CMYK"),
        "webp": rgb,
    }
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, (ext, im) in enumerate(images.items()):
            buf = io.BytesIO()
            im.save(buf, format={"jpg": "JPEG", "tiff": "TIFF"}.get(ext, ext.upper()))
            add(tar, f"{i:09d}.{ext}", buf.getvalue())
            add(tar, f"{i:09d}.txt", f"a {ext} picture".encode())
    write_manifest(tmp_path, {"00000.tar": len(images)})
    ds = make(str(tmp_path / "00000.tar"), train=False, batch_size=len(images))
    (batch,) = epoch(ds)
    assert batch[0].shape == (len(images), 3, 16, 16)
    assert sorted(sample_ids(batch[2])) == list(range(len(images)))  # none skipped (and refilled)
    assert torch.isfinite(batch[0]).all()


def test_where_the_sender_of_a_sigterm_cannot_be_told_workers_keep_torchs_handling(monkeypatch):
    """macOS and Windows have no ``sigwaitinfo``: the worker_init_fn failed there, and every DataLoader
    worker with it."""
    import signal

    from clipforge.data.datamodule import leave_outside_sigterms_to_the_trainer

    monkeypatch.delattr(signal, "sigwaitinfo")
    leave_outside_sigterms_to_the_trainer(0, trainer_pid=1)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
