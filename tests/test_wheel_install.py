"""A user who installs clipforge as a wheel (not editable) and runs its commands from any directory.

The wheel is built from a copy of the source files and installed with ``--no-deps`` into a fresh virtual
environment that sees this test environment's packages (torch, lightning, ...) through a ``.pth`` line,
but not its editable clipforge: every file the commands need must come from the wheel itself.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "src", "conf")


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """``(bin dir, console script names)`` of a fresh venv with only the clipforge wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    # No build isolation: the test environment's setuptools builds it, so no network is needed.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            ".",
        ],
        cwd=src,
    )
    (wheel,) = dist.glob("clipforge-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    )
    # A plain path line: the test environment's packages become importable, but its .pth files (the
    # editable clipforge finder among them) are not run, so clipforge resolves to the wheel only.
    (site / "test_env_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp)
    entry_points = configparser.ConfigParser()
    info = next(site.glob("clipforge-*.dist-info"))
    entry_points.read(info / "entry_points.txt")
    return venv / "bin", sorted(entry_points["console_scripts"])


# Every entry point resolves to a callable in the wheel's own modules, in one interpreter (one import of
# torch, not one per script); the scripts themselves start in the test after it.
LOAD_ENTRY_POINTS = """
import importlib.metadata as md
eps = [e for e in md.distribution("clipforge").entry_points if e.group == "console_scripts"]
for e in eps:
    fn = e.load()
    assert callable(fn), e
    print(e.name, fn.__module__, getattr(__import__(fn.__module__, fromlist=["x"]), "__file__", "?"))
"""


def test_wheel_holds_the_config_tree_and_every_entry_point_loads(
    wheel_env: tuple[Path, list[str]], tmp_path: Path
) -> None:
    bin_dir, scripts = wheel_env
    assert {"clipforge-train", "clipforge-zeroshot", "clipforge-convert", "clipforge-shards"} <= set(scripts)
    where = _run([str(bin_dir / "python"), "-c", "import clipforge.conf as c; print(c.CONF_DIR)"], tmp_path)
    conf = Path(where.stdout.strip())
    assert REPO not in conf.parents, f"clipforge.conf resolved to the source tree: {conf}"
    assert (conf / "train.yaml").is_file() and (conf / "model" / "tiny.yaml").is_file()
    loaded = _run([str(bin_dir / "python"), "-c", LOAD_ENTRY_POINTS], tmp_path).stdout.splitlines()
    assert sorted(line.split()[0] for line in loaded) == scripts
    for line in loaded:
        assert str(REPO / "src") not in line, f"an entry point resolved to the source tree: {line}"
    out = _run([str(bin_dir / "clipforge-train"), "--help"], cwd=tmp_path, timeout=120)
    assert "clipforge-train" in out.stdout


@pytest.mark.slow  # ~8 s a script (a fresh interpreter each); the test above loads them all in one
def test_every_wheel_script_starts(wheel_env: tuple[Path, list[str]], tmp_path: Path) -> None:
    bin_dir, scripts = wheel_env
    for script in scripts:
        out = _run([str(bin_dir / script), "--help"], cwd=tmp_path, timeout=120)
        assert out.stdout.strip(), f"{script} --help printed nothing"


def test_wheel_trains_from_any_directory_and_takes_user_configs(
    wheel_env: tuple[Path, list[str]], tmp_path: Path
) -> None:
    bin_dir, _ = wheel_env
    env = {"CLIPFORGE_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "offline"}
    run = _run(
        [str(bin_dir / "clipforge-train"), "debug=fast", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        timeout=600,
        **env,
    )
    assert "clipforge run summary" in run.stdout and "steps:             5" in run.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()

    # A user's own experiment, from their own folder, through Hydra's search path (README: "Your own configs").
    user = tmp_path / "my_conf" / "experiment"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: siglip\ntags: [from-my-folder]\n"
    )
    job = _run(
        [
            str(bin_dir / "clipforge-train"),
            "--config-dir",
            str(tmp_path / "my_conf"),
            "experiment=mine",
            "--cfg",
            "job",
        ],
        cwd=tmp_path,
        timeout=120,
        **env,
    )
    assert "from-my-folder" in job.stdout and "clipforge.losses.SigLipLoss" in job.stdout
