"""``scripts/device/measure_all.sh``, the one device-tool call of issue 20: its dry run writes every file
and table it promises, a part past its budget is cut while the rest still run, the budgets fit the call,
and the GPU commands (which only a GPU runs) parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clipforge.conf import CONF_DIR
from hydra import compose, initialize_config_dir

from clipforge.bench import device
from clipforge.bench.summary import FILES, read_rows

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "## Training step",
    "## Loss forward + backward alone",
    "## GPU tests",
    "## Lightning loop against the bare step",
    "## Token reduction",
    "## Loader with GPU JPEG decode",
    "## Gradient checkpointing",
    "## Profile",
]


@pytest.mark.slow  # ~45 s alone on 2 CPU cores: every part of the script runs, tiny; the cheap checks below stay
def test_dry_run_writes_every_file_and_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("MEASURE_T0", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/device/measure_all.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert len(FILES) <= 8  # what the device tool brings back
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed at the end, where the device tool's output tail shows it
    for section in SECTIONS:
        assert section in summary, section
    statuses = {
        line.split(" | ")[0].strip("| "): line for line in summary.splitlines() if line.count("|") == 7
    }
    for name in ("step_b16", "step_b32", "loss", "profile", "lightning", "token_reduction", "memory"):
        assert "| ok |" in statuses[name], statuses[name]
    for name in ("gpu_tests", "gpu_decode", "fsdp2"):
        assert "skipped: no CUDA" in statuses[name]
    assert "skipped: no CUDA" in (out / "gpu_tests.txt").read_text()

    rows = read_rows(out)
    steps = {
        (r["impl"], r["loss"], r["compile"])
        for r in rows
        if r.get("part") == "step_b16" and r.get("kind") == "step"
    }
    for loss in ("clip", "siglip"):
        assert {("open_clip", loss, False), ("clipforge", loss, False), ("clipforge", loss, True)} <= steps
    # the step table has a row per (model, loss, batch) with open_clip, eager and compiled filled in
    assert "| tiny | siglip | 8 |" in summary and "| tiny | clip | 4 |" in summary
    losses = [r for r in rows if r.get("part") == "loss"]
    pairs = {(impl, loss) for impl in ("clipforge", "open_clip") for loss in ("clip", "siglip")}
    assert {(r["impl"], r["loss"]) for r in losses} == pairs
    assert any(r.get("kind") == "lightning" for r in rows)
    assert any(r.get("kind") == "ratio" and r.get("vs_bare_step") for r in rows)
    assert {r["note"] for r in rows if r.get("part") == "token_reduction"} == {
        "",
        "model.vision.patch_dropout=0.5",
        "model.text.context_length=32",
        "model.vision.patch_dropout=0.5 model.text.context_length=32",
    }
    profile = next(r for r in rows if r.get("kind") == "profile")
    assert len(profile["top"]) >= 5 and 0 < sum(k["share"] for k in profile["top"]) <= 1.0001
    assert "| operator | calls/step | ms/step | share |" in summary
    assert {(r["impl"], r["grad_checkpointing"]) for r in rows if r.get("kind") == "memory"} == {
        ("clipforge", False),
        ("clipforge", True),
    }
    assert "| clipforge | tiny | clip | 4 | on |" in summary
    # the .jsonl files hold nothing but JSON, each row tagged with its part
    for name in ("step.jsonl", "loss.jsonl", "extras.jsonl"):
        for line in (out / name).read_text().splitlines():
            assert "part" in json.loads(line)
    print(f"dry run: {took:.1f} s")


def _part(name: str, budget: int, code: str) -> device.Part:
    return device.Part(name, budget, f"{name}.jsonl", name, (sys.executable, "-c", code), None)


def test_a_part_past_its_budget_is_cut_and_the_next_still_runs(tmp_path: Path) -> None:
    slow = _part("slow", 2, 'import time; print(\'{"kind": "early"}\', flush=True); time.sleep(60)')
    fast = _part("fast", 30, "print('{\"kind\": \"done\"}'); print('not json')")
    t0 = time.monotonic()
    results = device.run_parts([slow, fast], tmp_path, False, time.time() + 200, dict(os.environ), "test")
    assert time.monotonic() - t0 < 20
    assert results[0].status == "TIMED OUT after 2 s" and results[1].status == "ok"
    # what the slow part printed before its kill is kept; a line that is not JSON goes to the log
    assert json.loads((tmp_path / "slow.jsonl").read_text()) == {"part": "slow", "kind": "early"}
    assert json.loads((tmp_path / "fast.jsonl").read_text()) == {"part": "fast", "kind": "done"}
    assert "not json" in (tmp_path / "log.txt").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "| slow | slow | 2 |" in summary and "TIMED OUT after 2 s" in summary


def test_a_part_gets_what_is_left_of_the_call_and_none_when_too_little_is(tmp_path: Path) -> None:
    part, env = _part("p", 60, "pass"), dict(os.environ)
    deadline = time.time() + device.RESERVE_S + device.MIN_PART_S + 10
    assert device.run_parts([part], tmp_path, False, deadline, env, "test")[0].status == "ok"
    assert "(timeout 24 s)" in (tmp_path / "log.txt").read_text()  # not its own 60 s
    deadline = time.time() + device.RESERVE_S + device.MIN_PART_S - 1
    status = device.run_parts([part], tmp_path, False, deadline, env, "test")[0].status
    assert status == "skipped: out of time (13 s left)"


def test_budgets_fit_one_call_and_the_files_the_tool_brings_back() -> None:
    parts = device.parts()
    assert [p.name for p in parts][:4] == ["step_b16", "step_b32", "loss", "gpu_tests"]
    install_s = 30  # copy, 8 wheels into a folder, torch imported once: seconds on the GPU machine
    must = sum(p.budget_s for p in parts[:4])
    assert install_s + must + device.RESERVE_S <= device.TOTAL_S <= 8 * 60
    assert {p.out for p in parts} <= set(FILES)


def test_gpu_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-sized commands never run in the dry run: each benchmark parses its own arguments here."""
    from clipforge.bench import loader, losses, memory, profile, step

    monkeypatch.chdir(ROOT)
    parsers = {"step": step.parse_args, "loss": losses.parse_args, "profile": profile.parse_args}
    parsers["loader"], parsers["memory"] = loader.parse_args, memory.parse_args
    seen = set()
    for part in device.parts():
        argv = list(part.gpu)
        if argv[1:3] == ["-m", "clipforge.bench.cli"]:
            args = parsers[argv[3]](argv[4:])
            seen.add(argv[3])
            if argv[3] == "step":
                assert args.steps >= 10 and args.warmup >= 1
        elif argv[1:3] == ["-m", "pytest"]:
            files = [a for a in argv if a.endswith(".py")]
            assert "tests/losses/test_gpu.py" in files and "tests/data/test_gpu_decode.py" in files
    assert seen == {"step", "loss", "profile", "loader", "memory"}


def test_fsdp2_overrides_compose() -> None:
    """The fsdp2 part's training overrides name keys that exist (the dry run skips the part)."""
    part = next(p for p in device.parts() if p.name == "fsdp2")
    train_cmd = part.gpu[-1].split(" && ")[0].split()
    overrides = train_cmd[train_cmd.index("clipforge.train") + 1 :]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
    assert cfg.trainer.max_steps == 20 and "ModelParallel" in cfg.trainer.strategy._target_


def test_every_module_a_part_runs_with_python_m_does_something() -> None:
    """``python -m X`` of a module without a ``__main__`` block imports it and exits 0: the fsdp2 part's
    consolidation ran ``python -m clipforge.checkpoint``, which consolidated nothing and passed."""
    import importlib.util
    import shlex

    for part in device.parts():
        words = [w for item in part.gpu for w in (shlex.split(item) if " " in item else [item])]
        for i, word in enumerate(words[:-1]):
            if word == "-m" and words[i + 1].startswith("clipforge"):
                source = Path(importlib.util.find_spec(words[i + 1]).origin).read_text()
                assert 'if __name__ == "__main__"' in source, f"{part.name}: python -m {words[i + 1]}"


def test_no_wheels_to_install_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """measure_all.sh reads --missing-wheels with mapfile: a lone blank line became one empty wheel name,
    and the script ran `pip install ''` (ERROR: Invalid requirement) whenever .whl/ was absent or complete."""
    assert device.main(["--missing-wheels", str(tmp_path / "absent")]) == 0
    assert device.main(["--missing-wheels", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
