"""A resumed run goes on logging where the checkpoint's run logged: one CSV version directory, whose
metrics.csv keeps the earlier rows and columns (docs/resuming.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from clipforge.train import train
from runconf import PERIODIC, SMALL

# the tiny model, 4 steps an epoch, a step checkpoint in the output dir, the CSV logger: seconds on 2 cores
RUN = (*SMALL, *PERIODIC)


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _loss_steps(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["step"]) for r in rows if r.get("train/loss")]


def test_a_resumed_run_appends_to_the_checkpoints_csv_version(compose_cfg, caplog) -> None:
    cfg = compose_cfg("trainer.max_steps=3", *RUN)
    train(cfg)
    csv_dir = Path(cfg.paths.output_dir) / "csv"
    header, before = _rows(csv_dir / "version_0" / "metrics.csv")
    assert _loss_steps(before) == [0, 1, 2]
    # final_eval adds columns (final/zeroshot_*) the file's header lacks: Lightning rewrites the file then
    with caplog.at_level("INFO", logger="clipforge.loggers"):
        with_final = (*(o for o in RUN if o != "final_eval=false"), "final_eval=true")
        train(compose_cfg("trainer.max_steps=6", "ckpt_path=auto", *with_final))
    assert sorted(p.name for p in csv_dir.iterdir()) == ["version_0"]  # no version_1 beside it
    assert f"continuing {csv_dir / 'version_0' / 'metrics.csv'}" in caplog.text
    header2, after = _rows(csv_dir / "version_0" / "metrics.csv")
    assert set(header) < set(header2) and any(k.startswith("final/") for k in header2)
    # the earlier rows, whole, then the resumed run's from the checkpoint's step on
    assert [{k: r[k] for k in header} for r in after[: len(before)]] == before
    assert _loss_steps(after) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("why", ["old_checkpoint", "another_run_dir"])
def test_a_resume_that_cannot_continue_the_csv_version_says_where_the_metrics_go(
    compose_cfg, caplog, tmp_path: Path, why: str
) -> None:
    cfg = compose_cfg("trainer.max_steps=3", *RUN)
    train(cfg)
    last = (Path(cfg.paths.output_dir) / "last.ckpt").resolve()
    cfg2 = compose_cfg("trainer.max_steps=4", f"ckpt_path={last}", *RUN)
    if why == "old_checkpoint":  # written before checkpoints named their CSV version
        ckpt = torch.load(last, weights_only=True)
        del ckpt["clipforge_logger_version"]
        torch.save(ckpt, last)
    else:
        with open_dict(cfg2):
            cfg2.paths.output_dir = str(tmp_path / "elsewhere")
    with caplog.at_level("INFO", logger="clipforge.loggers"):
        train(cfg2)
    new = Path(cfg2.paths.output_dir) / "csv" / ("version_1" if why == "old_checkpoint" else "version_0")
    assert f"this run's metrics go to {new / 'metrics.csv'}" in caplog.text
    assert _loss_steps(_rows(new / "metrics.csv")[1]) == [3]
    assert _loss_steps(_rows(Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv")[1]) == [
        0,
        1,
        2,
    ]


@pytest.mark.parametrize("logger", ["none", "wandb"])
def test_a_resume_of_a_run_that_logged_no_csv_says_so(compose_cfg, caplog, logger: str) -> None:
    # Such a checkpoint names no CSV version either; the message blamed its age ("a checkpoint from before it
    # did"), which sent the user looking for a version problem.
    cfg = compose_cfg("trainer.max_steps=3", *RUN, f"logger={logger}")
    train(cfg)
    last = (Path(cfg.paths.output_dir) / "last.ckpt").resolve()
    with caplog.at_level("INFO", logger="clipforge.loggers"):
        train(compose_cfg("trainer.max_steps=4", f"ckpt_path={last}", *RUN))
    assert "before it did" not in caplog.text
    said = "logged to no CSV file (logger: none)" if logger == "none" else "logged to W&B, not to a CSV file"
    assert f"{last} {said}" in caplog.text


def test_a_resumed_csv_run_shows_its_version_number_in_the_progress_bar(compose_cfg) -> None:
    # The stored version directory was handed back as the string "version_0", which Lightning's progress bar
    # cuts to its last four characters: v_num=on_0 where the first run showed v_num=0.
    from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics

    train(compose_cfg("trainer.max_steps=3", *RUN))
    _, objs = train(compose_cfg("trainer.max_steps=4", "ckpt_path=auto", *RUN))
    assert Path(objs["logger"].log_dir).name == "version_0"
    assert get_standard_metrics(objs["trainer"])["v_num"] == 0
