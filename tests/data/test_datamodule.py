"""The synthetic shard source: writes shards once, then the WebDataset module reads them like any others."""

import json
import threading
import time

import pytest
import torch

from clipforge.data import synthetic, synthetic_shards
from clipforge.data.config import Augment, Stream, ZeroShotSet
from clipforge.data.datamodule import WebDataModule
from clipforge.data.manifest import read_manifest
from clipforge.data.synthetic_shards import SyntheticShards
from clipforge.data.tokenizer import Tokenizer


def make(root, train_seed=0, return_keys=False, **source):
    """The data module over a synthetic source; ``source`` overrides the source's settings."""
    source = SyntheticShards(
        str(root), **{"num_train": 60, "num_heldout": 20, "image_size": 16, "samples_per_shard": 25} | source
    )
    return WebDataModule(
        source=source,
        batch_size=16,
        num_workers=0,
        context_length=24,
        stream=Stream(seed=train_seed, return_keys=return_keys),
        augment=Augment(image_size=16, scale=(0.8, 1.0)),
    )


def test_prepare_data_writes_once_and_rewrites_when_parameters_change(tmp_path):
    dm = make(tmp_path)
    dm.prepare_data()
    train = dm.source.folder / "train"
    assert read_manifest(train / "manifest.json")["shards"] == {
        "00000.tar": 25,
        "00001.tar": 25,
        "00002.tar": 10,
    }
    stamp = (train / "00000.tar").stat().st_mtime_ns
    make(tmp_path).prepare_data()
    assert (train / "00000.tar").stat().st_mtime_ns == stamp  # reused
    # other counts are another folder: a run reading these shards never sees them rewritten under it
    fewer = make(tmp_path, num_train=30)
    fewer.prepare_data()
    assert fewer.source.folder != dm.source.folder
    assert read_manifest(fewer.source.folder / "train" / "manifest.json")["shards"] == {
        "00000.tar": 25,
        "00001.tar": 5,
    }
    assert (train / "00000.tar").stat().st_mtime_ns == stamp
    # shards whose manifest differs (an older generator, a write cut short) are rewritten in place
    (train / "notes.txt").write_text("not the writer's")
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["params"]["version"] = 1
    (train / "manifest.json").write_text(json.dumps(manifest))
    (train / "00003.tar").write_bytes(b"an earlier run's extra shard")
    make(tmp_path).prepare_data()
    assert read_manifest(train / "manifest.json")["params"]["version"] == synthetic_shards.GENERATOR_VERSION
    assert not (train / "00003.tar").exists()  # no stale shard for a pattern or glob to pick up
    assert (train / "notes.txt").exists()  # only the writer's own files are deleted


def test_a_second_process_waits_for_the_first_to_write_and_then_reuses(tmp_path, caplog):
    source = make(tmp_path).source
    done = threading.Event()
    with synthetic_shards.folder_lock(source.folder):  # another process writing these shards
        with caplog.at_level("WARNING", logger="clipforge.data.synthetic_shards"):
            waiter = threading.Thread(target=lambda: (source.prepare(), done.set()))
            waiter.start()
            for _ in range(600):  # until it says it waits (at most a minute)
                if "waiting for another process" in caplog.text:
                    break
                time.sleep(0.1)
        assert "waiting for another process to finish writing" in caplog.text
        assert not done.is_set() and not (source.folder / "train" / "manifest.json").exists()
    waiter.join(timeout=120)
    assert done.is_set() and (source.folder / "train" / "manifest.json").is_file()


def test_loaders_shapes_labels_and_heldout_split(tmp_path):
    dm = make(tmp_path, return_keys=True)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.steps_per_epoch == 4
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and sum(len(b[2]) for b in batches) == 60
    images, tokens, _ = batches[0]
    assert images.shape == (16, 3, 16, 16) and tokens.shape == (16, 24)
    val = list(dm.val_dataloader())
    assert sum(len(b[2]) for b in val) == 20
    tok = Tokenizer(24)
    held = synthetic.heldout_combos("tuples")
    for text in (tok.decode(t) for b in val for t in b[1]):
        shape = next(s for s in synthetic.SHAPES if s in text)
        assert any(t[0] == shape for t in held)
    metas = [synthetic.make_sample(i, "heldout", 16).meta for i in range(20)]
    assert all((m["shape"], m["color"], m["size"], m["position"]) in held for m in metas)
    zs = list(dm.zeroshot_dataloader())
    labels = torch.cat([b[1] for b in zs])
    expected = [m["label"] for m in metas]
    assert labels.tolist() == expected  # eval order is shard order
    assert dm.zeroshot_classnames == list(synthetic.SHAPES) and dm.zeroshot_templates


def test_same_data_for_any_training_seed(tmp_path):
    a, b = make(tmp_path, train_seed=0), make(tmp_path, train_seed=5)
    assert a.source.folder == b.source.folder
    assert make(tmp_path, seed=1).source.folder != a.source.folder
    assert make(tmp_path, holdout="pairs").source.folder != a.source.folder


def test_zeroshot_classnames_and_templates_take_a_file_or_a_builtin_name(tmp_path):
    """As clipforge-zeroshot: a string names a file or a built-in list (it was split into characters)."""
    names = tmp_path / "shapes.txt"
    names.write_text("# one per line\ncircle\nsquare\n")
    zs = ZeroShotSet(urls=None, classnames=str(names), templates="simple")
    assert zs.classnames == ["circle", "square"] and len(zs.templates) == 7
    assert ZeroShotSet(classnames="cifar10").classnames[:2] == ["airplane", "automobile"]
    assert ZeroShotSet(classnames=["a", "b"], templates=["a {}."]).templates == ["a {}."]
    with pytest.raises(FileNotFoundError, match=r"nofile\.txt"):
        ZeroShotSet(classnames=str(tmp_path / "nofile.txt"))
    with pytest.raises(ValueError, match="has no"):
        ZeroShotSet(classnames=["a"], templates=["no slot"])


def test_zeroshot_shards_without_class_names_fail_at_once():
    with pytest.raises(ValueError, match=r"data\.zeroshot\.urls needs data\.zeroshot\.classnames"):
        ZeroShotSet(urls="/data/val/{000..009}.tar")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (lambda: {"batch_size": 0}, r"data\.batch_size must be an integer >= 1, got 0"),
        (lambda: {"stream": Stream(shuffle_buffer=-1)}, r"data\.stream\.shuffle_buffer"),
        (lambda: {"stream": Stream(prefetch_factor=0)}, r"data\.stream\.prefetch_factor"),
        (lambda: {"stream": Stream(val_batch_size=0)}, r"data\.stream\.val_batch_size"),
        (lambda: {"stream": Stream(resampled=True, epoch_samples=-5)}, r"data\.stream\.epoch_samples"),
        (
            lambda: {"stream": Stream(resampled=True, epoch_samples=8, weights=[1, -1])},
            r"data\.stream\.weights",
        ),
        (lambda: {"augment": Augment(image_size=0)}, r"data\.augment\.image_size"),
        # these two failed only at the first batch, after the shards were written, without the key
        (
            lambda: {"augment": Augment(interpolation="bicubc")},
            r"data\.augment\.interpolation must be one of",
        ),
        (lambda: {"context_length": 1}, r"data\.context_length must be an integer >= 2 \(SOT \+ EOT\)"),
        # a crop larger than the image: torchvision's sampler gave up and centre-cropped, silently
        (lambda: {"augment": Augment(scale=(0.9, 1.5))}, r"data\.augment\.scale .* <= 1, got \[0\.9, 1\.5\]"),
    ],
)
def test_a_setting_out_of_range_fails_at_once_naming_its_key(settings, message):
    """It failed deep in the loader (ZeroDivisionError for batch_size=0) or not at all."""
    with pytest.raises(ValueError, match=message):
        WebDataModule(train_urls="/data/{00000..00009}.tar", **settings())


def test_validation_shards_that_are_also_training_shards_are_named(tmp_path, monkeypatch, caplog):
    # val_urls pointing into the training shards (a range typed one digit off, the same folder's glob) gave
    # a val loss and held-out figures measured on trained-on pairs, and nothing said so
    dm = make(tmp_path)
    dm.prepare_data()
    train = dm.source.folder / "train"
    monkeypatch.chdir(train.parent)
    for val_urls in ("train/{00001..00002}.tar", [str(train / "00002.tar"), "./train/00001.tar"]):
        overlapping = WebDataModule(
            str(train / "{00000..00002}.tar"), val_urls=val_urls, batch_size=16, num_workers=0
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="clipforge.data.datamodule"):
            overlapping.setup("fit")
        assert "2 of the 2 data.val_urls shards are training shards too" in caplog.text
        assert "00001.tar" in caplog.text and "00002.tar" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforge.data.datamodule"):
        dm.setup("fit")  # the source's own held-out shards: apart
    assert "training shards too" not in caplog.text
