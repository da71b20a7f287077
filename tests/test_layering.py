"""Imports run one way: the models and losses need neither Lightning nor Hydra, the LightningModule needs no
Hydra, and only the benchmarks import the benchmarks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import clipforge

SRC = Path(clipforge.__file__).parent


def _loaded_after_import(module: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("clipforge.models", {"lightning", "hydra", "omegaconf"}),
        ("clipforge.losses", {"lightning", "hydra", "omegaconf"}),
        ("clipforge.module", {"hydra", "omegaconf"}),
    ],
)
def test_a_layer_loads_nothing_above_it(module: str, forbidden: set[str]) -> None:
    assert not _loaded_after_import(module) & forbidden


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_only_the_benchmarks_import_the_benchmarks() -> None:
    offenders = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "bench" not in p.relative_to(SRC).parts
        and any(name == "clipforge.bench" or name.startswith("clipforge.bench.") for name in _imports(p))
    ]
    assert not offenders, f"library modules import clipforge.bench: {offenders}"


def test_no_module_reads_lightning_private_trainer_state() -> None:
    offenders = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id == "trainer"
            ):
                offenders.append(f"{p.relative_to(SRC)}:{node.lineno} trainer.{node.attr}")
    assert not offenders, offenders


def test_the_checkpoint_callbacks_lightning_internals_exist_in_the_installed_lightning() -> None:
    """PeriodicCheckpoint extends Lightning's ModelCheckpoint through its private members (pyproject caps
    lightning below the next minor release for this): each it reads or calls must exist, and its override of
    ``_should_remove_checkpoint`` must still override one, else it would silently stop applying."""
    import re

    from lightning.pytorch.callbacks import ModelCheckpoint

    from clipforge.callbacks.periodic import PeriodicCheckpoint

    base = ModelCheckpoint()
    used = set(re.findall(r"self\.(_[a-z][a-z_]*)", (SRC / "callbacks" / "periodic.py").read_text()))
    inherited = used - set(vars(PeriodicCheckpoint))
    missing = sorted(name for name in inherited | {"_should_remove_checkpoint"} if not hasattr(base, name))
    assert not missing, f"ModelCheckpoint no longer has {missing}"
    assert {"_every_n_train_steps", "_save_topk_checkpoint", "_should_skip_saving_checkpoint"} <= inherited
