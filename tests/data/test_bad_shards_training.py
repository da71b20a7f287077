"""The report that opened the bad-shards issue, end to end: seven shards of 200 pairs (1,397 in all), one
truncated to half its bytes, one with a corrupted JPEG, one that is not a tar at all; about a fifth of the
samples are lost. Training on them must run to the end for every seed, and log each cause."""

from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import pytest
from datahelpers import add, pattern, write_sizes

from clipforge.train import train
from runconf import towers

SIZES = [200] * 6 + [197]
SMALL = towers(32, 1, 2)  # a 2-layer, 32-wide model: the data path is under test, not the model


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("seven")
    urls = write_sizes(root, SIZES, size=8)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2])  # truncated to half its bytes
    Path(urls[4]).write_bytes(b"<html>503 Service Unavailable</html>" * 100)  # not a tar
    with tarfile.open(urls[5]) as tar:  # one corrupted JPEG
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(urls[5], "w") as tar:
        for name, blob in members:
            add(tar, name, blob[:40] + b"\x00" * 60 if name == "000001010.jpg" else blob)
    return pattern(root, len(SIZES))


@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_seven_shards_three_damaged_train_to_the_end(
    compose_cfg, damaged_shards: str, tmp_path: Path, seed: int, capsys
):
    cfg = compose_cfg(
        *SMALL,
        "data=wds",
        f"data.train_urls='{damaged_shards}'",
        "data.num_workers=1",
        "data.batch_size=128",
        "logger=csv",
        "trainer.max_steps=11",  # one epoch: 1397 // 128 full batches and a partial one
        "trainer.log_every_n_steps=1",
        "final_eval=false",
        f"seed={seed}",
    )
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 11
    with open(next(Path(cfg.paths.output_dir).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    # the last training step's row (the run's end adds a row of final/* and summary/* figures after it)
    step_rows = [r for r in rows if r.get("train/loss")]
    last = {k: float(v) for k, v in step_rows[-1].items() if k.startswith("data/skipped_") and v}
    assert last["data/skipped_truncated_shard"] == 1
    assert last["data/skipped_unreadable_shard"] == 1
    assert last["data/skipped_corrupt_image"] == 1
    # the non-tar shard's 200 and the truncated shard's tail (its last sample may be cut between members)
    assert 200 < last["data/skipped_lost_samples"] < 400
    sample_level = ("lost_samples", "corrupt_image", "missing_caption", "missing_image")
    lost = sum(last[f"data/skipped_{c}"] for c in sample_level)
    assert last["data/skipped_repeated_samples"] == lost  # every one made up for by a re-read
    # the run summary says so too (a run without a logger had no word of it)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("data skipped:")]
    assert "corrupt_image=1" in line and "truncated_shard=1" in line and "unreadable_shard=1" in line
