"""clipforge-benchmark learning end to end at toy size: both trainers really train on the same files, the
open_clip model comes back through the converter, and one evaluator scores both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.bench.learning import Recipe, main, steps_per_epoch, whole_epochs
from clipforge.bench.learning_data import prepare_synthetic


def test_steps_are_whole_open_clip_epochs(tmp_path: Path) -> None:
    data = prepare_synthetic(tmp_path / "d", num_train=300, num_heldout=12, image_size=16)
    recipe = Recipe(steps=10, batch_size=64)
    assert steps_per_epoch(data, recipe) == 4  # open_clip drops the last partial batch
    assert whole_epochs(data, recipe) == (3, 12)
    # the shards hold exactly the files of the CSV that open_clip reads
    rows = (tmp_path / "d" / "train.csv").read_text().splitlines()
    assert rows[0] == "filepath,title" and len(rows) == 301


@pytest.mark.slow  # ~20 s: both trainers train
def test_both_trainers_train_and_are_scored_by_one_evaluator(tmp_path: Path, capsys) -> None:
    argv = ["--out", str(tmp_path), "--num-train", "128", "--num-heldout", "24", "--steps", "2"]
    argv += ["--batch-size", "64", "--warmup", "1", "--seeds", "0", "--losses", "siglip"]
    results = main(argv)
    assert {r.trainer for r in results} == {"open_clip", "clipforge"}
    for r in results:
        assert r.steps == 2 and r.num_eval == 24 and 0.0 <= r.top1 <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["recipe"]["batch_size"] == 64
    assert "| synthetic | open_clip | siglip | 1 |" in capsys.readouterr().out
    assert (tmp_path / "learning.png").stat().st_size > 0  # the same table, as a picture
    # a second call reuses the finished runs instead of training again
    again = main(argv)
    assert [r.train_s for r in again] == [r.train_s for r in results]


def test_the_learning_picture_shows_each_trainers_mean_and_every_seed() -> None:
    from clipforge.bench.learning import RunResult
    from clipforge.bench.learning_plot import learning_figure

    def run(trainer: str, loss: str, seed: int, top1: float, data: str = "synthetic") -> RunResult:
        return RunResult(trainer, loss, seed, data, 300, top1, 1.0, 1000, 1.0)

    results = [run("open_clip", "clip", s, t) for s, t in enumerate((0.4, 0.5, 0.6))]
    results += [run("clipforge", "clip", s, t) for s, t in enumerate((0.7, 0.8, 0.9))]
    results += [run("clipforge", "siglip", 0, 0.3), run("open_clip", "clip", 0, 0.97, data="digits")]
    fig = learning_figure(results, chance={"synthetic": 1 / 6, "digits": 0.1})
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["digits", "synthetic"]
    heights = sorted(round(b.get_height(), 6) for b in axes[1].patches)
    assert heights == [30.0, 50.0, 80.0]  # one bar a (trainer, loss): the mean over seeds, in %
    seeds = sorted(round(y, 6) for c in axes[1].collections for _, y in c.get_offsets())
    assert seeds == [30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]  # and a dot a seed
    assert any(round(line.get_ydata()[0], 4) == 16.6667 for line in axes[1].get_lines())  # chance


@pytest.mark.slow
def test_siglip2_benchmark_scores_every_variant(tmp_path: Path) -> None:
    from clipforge.bench.siglip2 import main as siglip2

    small = ["data.source.num_train=256", "data.source.num_heldout=64", "data.source.samples_per_shard=128"]
    rows = siglip2(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--batch-size",
            "32",
            "--variants",
            "base",
            "all",
            "--override",
            *small,
        ]
    )
    base, everything = rows
    assert base.box_accuracy is None and everything.box_accuracy is not None
    for r in rows:
        assert 0 <= r.zeroshot_top1 <= 1 and 0 <= r.dense_miou <= 1


@pytest.mark.slow
def test_init_sweep_trains_each_scheme_and_reuses_finished_runs(tmp_path: Path) -> None:
    from clipforge.bench.init_sweep import main as init_sweep

    argv = ["--out", str(tmp_path), "--models", "tiny", "--schemes", "timm", "openclip", "--steps", "3"]
    argv += ["--last", "2", "--batch-size", "8", "--warmup", "1", "--image-size", "16"]
    rows = init_sweep(argv)
    assert [(r["scheme"], r["image_size"]) for r in rows] == [("timm", 16), ("openclip", 16)]
    assert all(r["final_loss"] > 0 and r["train_s"] > 0 for r in rows)
    # the schemes really differ: the same seed and data give different losses
    assert rows[0]["final_loss"] != rows[1]["final_loss"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "data") == [
        "tiny-16px-clip-openclip",
        "tiny-16px-clip-timm",
    ]
    assert init_sweep(argv) == rows  # finished runs are read back, not retrained
    # scored by held-out zero-shot too, one row per seed
    scored = init_sweep([*argv[:5], "openclip", *argv[7:], "--seeds", "1", "--heldout", "12"])
    assert [(r["scheme"], r["seed"], r["heldout"]) for r in scored] == [("openclip", 1, 12)]
    assert 0.0 <= scored[0]["zeroshot_top1"] <= 1.0
    assert (tmp_path / "tiny-16px-seed1-clip-openclip" / "loss.json").is_file()
    # a finished run trained with other settings is trained again, never read back as this one
    longer = init_sweep([*argv[:5], "openclip", "--steps", "4", *argv[9:]])
    assert [(r["scheme"], r["steps"]) for r in longer] == [("openclip", 4)]
    assert longer[0]["final_loss"] != rows[1]["final_loss"]
    assert len(list((tmp_path / "tiny-16px-clip-openclip").rglob("metrics.csv"))) == 1  # old logs cleared
    # extra overrides reach every run and count as a setting
    lr = init_sweep([*argv[:5], "openclip", *argv[7:], "--override", "optimizer.lr=0.01"])
    assert [(r["scheme"], r["override"]) for r in lr] == [("openclip", ["optimizer.lr=0.01"])]
    assert lr[0]["final_loss"] != rows[1]["final_loss"]


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (
            "learning",
            ["--jobs", "-1"],
        ),  # ThreadPoolExecutor's "max_workers must be greater than 0", after data prep
        ("learning", ["--num-train", "0"]),
        ("init", ["--last", "0"]),  # rows[-0:] averaged every logged loss instead of the last ones
        ("init", ["--heldout", "-5"]),  # bool(-5) asked for a final zero-shot of -5 images
        ("init", ["--image-size", "0"]),
    ],
)
def test_benchmark_counts_out_of_range_fail_at_parse_time(command, argv, tmp_path: Path, capsys) -> None:
    from clipforge.bench import init_sweep, learning

    parse = learning.parse_args if command == "learning" else init_sweep.main
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path / "out"), *argv])
    assert "expected" in capsys.readouterr().err and not (tmp_path / "out").exists()
