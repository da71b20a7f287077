from __future__ import annotations

import io
import json
import logging
import tarfile
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.data.shards import DataError
from clipforge.eval.datasets import ImageFolderDataset, collate_skipping, eval_transform, labelled_wds_dataset
from clipforge.eval.distributed import shard_dataloader
from clipforge.eval.zeroshot import IGNORE_LABEL
from gloohelpers import free_port, init_gloo


def _png(color: tuple[int, int, int], size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, classes: dict[str, int], corrupt: dict[str, int] | None = None) -> Path:
    for i, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(n):
            (root / name / f"{j}.png").write_bytes(_png((40 * i, 10 * j, 0)))
    for name, n in (corrupt or {}).items():
        for j in range(n):
            (root / name / f"bad{j}.jpg").write_bytes(b"not an image at all")
    return root


def test_image_folder_labels_and_names(tmp_path):
    root = make_folder(tmp_path / "ds", {"golden_retriever": 2, "apple": 3})
    ds = ImageFolderDataset(root, eval_transform(8))
    assert ds.classnames == ["apple", "golden retriever"]  # sorted folders, underscores to spaces
    assert [lab for _, lab in ds.samples] == [0, 0, 0, 1, 1]
    img, lab = ds[3]
    assert img.shape == (3, 8, 8) and lab == 1


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 2, "dog": 0})
    (root / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"\['dog'\].*contain no images"):
        ImageFolderDataset(root)


def test_classname_count_must_match_folders(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"3 class names were given but .* has 2 classes"):
        ImageFolderDataset(root, classnames=["a", "b", "c"])


def test_classnames_matching_the_folders_map_by_name_in_any_order(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"golden_retriever": 1, "apple": 1, "Zebra": 1})
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, classnames=["zebra", "golden retriever", "apple"])
    # label order is the sorted folders: Zebra, apple, golden_retriever (upper case sorts first)
    assert ds.folder_names == ["Zebra", "apple", "golden_retriever"]
    assert ds.classnames == ["zebra", "apple", "golden retriever"]
    assert not caplog.records


def test_classnames_match_folders_whatever_their_unicode_normal_form(tmp_path, caplog):
    # macOS stores "café" decomposed (e + combining accent); a names file typed elsewhere holds it composed
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    assert nfd != nfc
    root = make_folder(tmp_path / "ds", {nfd: 1, "bar": 1, "Ölmühle": 1})
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, classnames=["ölmühle", nfc, "bar"])
    assert ds.classnames == ["bar", nfc, "ölmühle"] and not caplog.records


def test_classnames_unlike_the_folders_apply_by_position_with_a_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"n01": 1, "n02": 1})
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, classnames=["tench", "goldfish"])
    assert ds.classnames == ["tench", "goldfish"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "by position" in warning and "'n01' -> 'tench'" in warning and "'n02' -> 'goldfish'" in warning


def test_classnames_that_name_other_folders_are_an_error_not_a_positional_pairing(tmp_path):
    # a list in its own order with one name misspelt: by position "dog" would name the folder "cat"
    root = make_folder(tmp_path / "ds", {"cat": 1, "dog": 1, "pickup_truck": 1})
    with pytest.raises(ValueError, match=r"'dog' would name 'cat', 'cat' would name 'dog'") as info:
        ImageFolderDataset(root, classnames=["dog", "cat", "pickup trcuk"])
    assert "names matching no class: ['pickup trcuk']" in str(info.value)
    assert "classes without their name: ['pickup_truck']" in str(info.value)
    with pytest.raises(ValueError, match=r"'cat' would name 'dog'"):  # a name given twice
        ImageFolderDataset(root, classnames=["cat", "cat", "truck"])
    # names that agree with the folders wherever they match still apply by position
    assert ImageFolderDataset(root, classnames=["cat", "hound", "truck"]).classnames == [
        "cat",
        "hound",
        "truck",
    ]


def test_files_under_hidden_folders_of_a_class_are_not_samples(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 2, "dog": 1})
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    (root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(_png((1, 2, 3)))
    (root / "cat" / ".hidden.png").write_bytes(_png((1, 2, 3)))
    (root / "dog" / "more").mkdir()
    (root / "dog" / "more" / "1.PNG").write_bytes(_png((1, 2, 3)))  # nested folders and upper case count
    ds = ImageFolderDataset(root)
    assert sorted(p.relative_to(root).as_posix() for p, _ in ds.samples) == [
        "cat/0.png",
        "cat/1.png",
        "dog/0.png",
        "dog/more/1.PNG",
    ]


def test_symlinked_folders_in_a_class_are_followed_and_a_loop_is_walked_once(tmp_path, caplog):
    # torchvision's ImageFolder follows them; rglob did not, so a class of linked folders looked empty
    root = make_folder(tmp_path / "ds", {"cat": 1, "dog": 1})
    shared = make_folder(tmp_path / "elsewhere", {"photos": 2}) / "photos"
    (root / "cat" / "linked").symlink_to(shared, target_is_directory=True)
    (root / "dog" / "loop").symlink_to(root / "dog", target_is_directory=True)  # dog/loop/loop/... forever
    (root / "bird").symlink_to(shared, target_is_directory=True)  # a class that is only a link
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root)
    assert ds.classnames == ["bird", "cat", "dog"]
    assert sorted((p.relative_to(root).as_posix(), lab) for p, lab in ds.samples) == [
        ("bird/0.png", 0),
        ("bird/1.png", 0),
        ("cat/0.png", 1),
        ("cat/linked/0.png", 1),
        ("cat/linked/1.png", 1),
        ("dog/0.png", 2),
    ]
    assert "dog/loop" in caplog.text and "already walked" in caplog.text


def test_synthetic_heldout_matches_given_shape_names_by_name():
    from clipforge.data import synthetic
    from clipforge.eval.datasets import SyntheticHeldoutDataset

    shapes = list(synthetic.SHAPES)
    ds = SyntheticHeldoutDataset(num_samples=4, classnames=list(reversed(shapes)))
    assert ds.classnames == shapes
    with pytest.raises(ValueError, match=r"2 class names were given but the synthetic set has 6 classes"):
        SyntheticHeldoutDataset(num_samples=4, classnames=["a", "b"])


def test_unreadable_images_are_skipped_and_marked(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"cat": 2, "dog": 1}, corrupt={"dog": 2})
    ds = ImageFolderDataset(root, eval_transform(8))
    with caplog.at_level(logging.WARNING):
        images, labels = next(iter(DataLoader(ds, batch_size=16, collate_fn=collate_skipping)))
    assert images.shape == (5, 3, 8, 8)
    assert labels.tolist() == [0, 0, 1, IGNORE_LABEL, IGNORE_LABEL]  # "0.png" sorts before "bad*.jpg"
    assert torch.count_nonzero(images[3:]) == 0
    assert sum("skipping unreadable image" in r.message and "bad" in r.message for r in caplog.records) == 2


def test_batch_of_only_unreadable_images(tmp_path):
    batch = collate_skipping([(None, IGNORE_LABEL), (None, IGNORE_LABEL)])
    assert batch[0].shape[0] == 2 and batch[1].tolist() == [IGNORE_LABEL, IGNORE_LABEL]


def write_labelled_shard(path: Path, samples: list[tuple[bytes, dict | int]]) -> str:
    with tarfile.open(path, "w") as tar:
        for i, (img, label) in enumerate(samples):
            members = {"png": img}
            if isinstance(label, int):
                members["cls"] = str(label).encode()
            else:
                members["json"] = json.dumps(label).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_labelled_wds_cls_json_and_names(tmp_path, caplog):
    s0 = write_labelled_shard(tmp_path / "a.tar", [(_png((255, 0, 0)), 1), (_png((0, 255, 0)), {"label": 0})])
    s1 = write_labelled_shard(
        tmp_path / "b.tar", [(_png((0, 0, 255)), {"label": "dog"}), (b"broken", {"label": "cat"})]
    )
    ds = labelled_wds_dataset([s0, s1], eval_transform(8), classnames=["cat", "dog"])
    with caplog.at_level(logging.WARNING):
        images, labels = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_skipping)))
    assert labels.tolist() == [1, 0, 1, IGNORE_LABEL]
    assert images.shape == (4, 3, 8, 8)
    assert any("skipping unreadable image" in r.message for r in caplog.records)


def test_labelled_shards_group_members_as_training_reads_them(tmp_path, caplog):
    """clipforge-zeroshot read shards with webdataset's grouping, training with its own: a key twice in a
    row lost the second sample with a warning (webdataset raises, its handler went on without the sample)
    where training reads two samples; a README is no sample either way; a shard cut short keeps its samples
    before the cut, with a warning naming it."""
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("README", b"made by hand"),
            ("x.png", _png((255, 0, 0))),
            ("x.cls", b"0"),
            ("x.png", _png((0, 0, 255))),  # the same key again: the next sample
            ("x.cls", b"1"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [label for _, label in labelled_wds_dataset(str(path), eval_transform(8))] == [0, 1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: 512 * 7])  # README, x.png and x.cls whole, then cut in the second png
    with caplog.at_level(logging.WARNING):
        assert [label for _, label in labelled_wds_dataset(str(cut), eval_transform(8))] == [0]
    assert any("cut.tar: truncated_shard" in r.message for r in caplog.records)


def test_labelled_wds_unknown_class_name(tmp_path):
    s = write_labelled_shard(tmp_path / "a.tar", [(_png((255, 0, 0)), {"label": "zebra"})])
    ds = labelled_wds_dataset(s, eval_transform(8), classnames=["cat", "dog"])
    with pytest.raises(ValueError, match=r"sample 000000: .*'zebra' is not among the 2 class names"):
        next(iter(ds))


def test_labelled_wds_class_names_match_as_the_class_folders_do(tmp_path):
    """A json label is matched to the class names as a class folder is (case, underscores, spaces): the
    folder route took "Golden_Retriever" for "golden retriever", the shard route stopped on it."""
    labels = ["Golden_Retriever", "APPLE", " golden  retriever", "apple"]
    s = write_labelled_shard(tmp_path / "a.tar", [(_png((9, 9, 9)), {"label": n}) for n in labels])
    ds = labelled_wds_dataset(s, eval_transform(8), classnames=["apple", "golden retriever"])
    assert [label for _, label in ds] == [1, 0, 1, 0]


def test_labelled_wds_unknown_class_name_names_the_closest_classes(tmp_path):
    samples = [
        (_png((9, 9, 9)), {"label": "golden retriever"}),
        (_png((9, 9, 9)), {"label": "Golden Retreiver"}),
    ]
    s = write_labelled_shard(tmp_path / "a.tar", samples)
    ds = labelled_wds_dataset(
        s, eval_transform(8), classnames=["apple", "golden retriever", "labrador retriever"]
    )
    with pytest.raises(ValueError, match=r"sample 000001: .*'Golden Retreiver'.*closest: 'golden retriever'"):
        list(ds)


def test_labelled_wds_classes_that_differ_only_by_case_stay_distinct(tmp_path):
    """Two classes whose names differ only by case are two classes: each exact name finds its own, and a
    name that matches both only loosely is an error naming both (never the one or the other)."""
    s = write_labelled_shard(
        tmp_path / "a.tar", [(_png((9, 9, 9)), {"label": n}) for n in ["apple", "Apple"]]
    )
    assert [
        label for _, label in labelled_wds_dataset(s, eval_transform(8), classnames=["Apple", "apple"])
    ] == [1, 0]
    s = write_labelled_shard(tmp_path / "b.tar", [(_png((9, 9, 9)), {"label": "APPLE"})])
    with pytest.raises(
        ValueError, match=r"sample 000000: .*'APPLE' matches 2 classes: 'Apple' \(0\), 'apple' \(1\)"
    ):
        list(labelled_wds_dataset(s, eval_transform(8), classnames=["Apple", "apple"]))
    # a name given twice is two classes too: its label names both rather than silently taking the last
    s = write_labelled_shard(tmp_path / "c.tar", [(_png((9, 9, 9)), {"label": "crane"})])
    with pytest.raises(ValueError, match=r"'crane' matches 2 classes: 'crane' \(0\), 'crane' \(2\)"):
        list(labelled_wds_dataset(s, eval_transform(8), classnames=["crane", "kite", "crane"]))


def test_labelled_wds_names_missing_shards_and_fails_on_none(tmp_path, caplog):
    """A shard missing from a brace pattern was skipped with webdataset's "FileNotFoundError(2, 'No such
    file or directory')", naming no file; a pattern matching nothing evaluated nothing."""
    write_labelled_shard(tmp_path / "00000.tar", [(_png((255, 0, 0)), 1)])
    with caplog.at_level(logging.WARNING):
        ds = labelled_wds_dataset(str(tmp_path / "{00000..00001}.tar"), eval_transform(8), distributed=False)
    assert any("00001.tar" in r.getMessage() for r in caplog.records)
    assert next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_skipping)))[1].tolist() == [1]
    with pytest.raises(DataError, match="matches no shard"):
        labelled_wds_dataset(str(tmp_path / "test-{000..009}.tar"), eval_transform(8))


def _wds_rank_labels(rank: int, world: int, port: int, shards: list[str], out: str) -> None:
    init_gloo(rank, world, port)
    try:
        ds = labelled_wds_dataset(shards, eval_transform(8))  # built under the group, as the CLI does
        loader = shard_dataloader(DataLoader(ds, batch_size=2, collate_fn=collate_skipping))
        labels = [int(y) for _, ys in loader for y in ys]
        Path(out, f"{rank}.json").write_text(json.dumps(labels))
    finally:
        dist.destroy_process_group()


def test_labelled_wds_under_two_ranks_scores_every_sample_once(tmp_path):
    """The dataset gives each rank its own shards; shard_dataloader took it for a stream every rank reads in
    full and kept every other batch of those, so clipforge-zeroshot eval/dataset=wds under torchrun scored
    half the set (12 of 24 samples here) and reported that as the whole."""
    shards = [
        write_labelled_shard(
            tmp_path / f"{s}.tar", [(_png((40 * s, 40 * j, 0)), 6 * s + j) for j in range(6)]
        )
        for s in range(4)
    ]
    # fork: the children reuse the parent's imports, which spawn would redo (seconds each on 2 cores)
    args = (2, free_port(), shards, str(tmp_path))
    mp.start_processes(_wds_rank_labels, args=args, nprocs=2, join=True, start_method="fork")
    per_rank = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(24))
