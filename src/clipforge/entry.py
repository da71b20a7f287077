"""What the console scripts share. The Hydra face of ``clipforge-train``, ``clipforge-zeroshot`` and
``clipforge-caption`` (one place that names the config tree, the Hydra version and what every run does before
its work, ended by :func:`clipforge.console.console_script` as every tool is), and what the tools that write
files check and print."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from clipforge.conf import CONF_DIR
from clipforge.console import console_script, is_user_error
from clipforge.fault.secrets import scrub_current_hydra_run

Paths = TypeVar("Paths", bound=Mapping[str, Any])


def hydra_entry(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console-script ``main`` that composes ``conf/<config_name>.yaml`` with the command line's overrides
    and calls ``run(cfg)``. Hydra names the job after ``run``'s module (``train``, ``cli``, ...)."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)  # Hydra's job name: run's module
    def hydra_main(cfg: DictConfig) -> None:
        scrub_current_hydra_run()  # Hydra wrote .hydra/*.yaml with the command line as typed
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:  # Hydra runs the sweep's other jobs, then names the failures
            run(cfg)
            return
        # an error raised out of here Hydra prints with its traceback: a mistake in the input is one line
        status = console_script(hydra_cfg.help.app_name, run)(cfg)
        if status:
            raise SystemExit(status)

    @functools.wraps(run)
    def main() -> None:
        try:
            sys.argv[1:] = checkpoint_overrides(config_name, sys.argv[1:])
        except Exception as e:
            if not is_user_error(e):
                raise
            raise SystemExit(str(e)) from e  # one line naming the keys, as Hydra's own composition errors
        try:
            hydra_main()
        finally:  # Hydra leaves its run config in a process-wide singleton; a later in-process call
            HydraConfig.instance().cfg = None  # (a test, a notebook) must not write into this run's dir

    return main


def _parsed_overrides(args: Sequence[str]) -> list[tuple[int, Any]]:
    """``(position, Hydra Override)`` of the overrides in ``args``; flags, their values and what does not
    parse (which Hydra reports itself) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, out = OverridesParser.create(), []
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            continue
        try:
            out.append((i, parser.parse_override(arg)))
        except HydraException:
            continue
    return out


def _setting(node: Any, path: str) -> Any:
    """The value at the dotted ``path`` of a nested mapping, ``"(none)"`` where there is none."""
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return "(none)"
        node = node[key]
    return node


def checkpoint_overrides(config_name: str, args: Sequence[str]) -> list[str]:
    """The command line ``args`` of the tool of ``conf/<config_name>.yaml``, checked before Hydra composes
    it where ``checkpoint=`` meets an override of the model (Hydra failed with "Key 'model' is not in
    struct", naming neither). A checkpoint's model is built from the settings stored in it
    (:func:`clipforge.checkpoint.load_model`): a ``model.*`` override equal to the stored setting changes
    nothing and is dropped; any other (or ``model=<name>``) is a ValueError naming the key and both values.
    A tool without ``checkpoint`` (``clipforge-train``) given one is told the keys it takes instead."""
    from omegaconf import OmegaConf

    parsed = _parsed_overrides(args)
    given = [o.value() for _, o in parsed if o.key_or_group == "checkpoint" and not o.is_delete()]
    if not given or not isinstance(given[-1], str) or not given[-1]:  # null, or a sweep (-m)
        return list(args)
    ckpt = given[-1]
    tool = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    app = OmegaConf.select(tool, "hydra.help.app_name") or config_name
    keys = set(tool)  # `in tool` says no for a key left at ??? (clipforge-caption's checkpoint)
    if "checkpoint" not in keys:
        if {"ckpt_path", "init_from"} <= keys:
            raise ValueError(
                f"{app} has no checkpoint= setting: resume a run with ckpt_path={ckpt}, or start from its "
                f"weights with init_from={ckpt}"
            )
        return list(args)
    model = [(i, o) for i, o in parsed if o.key_or_group.split(".")[0] == "model"]
    if not model:
        return list(args)
    from clipforge.checkpoint import checkpoint_config, config_differences

    stored = (checkpoint_config(ckpt) or {}).get("model")
    drop, conflicts = set(), []
    for i, o in model:
        key = o.key_or_group
        if key == "model" or o.is_delete() or o.is_sweep_override():
            conflicts.append(f"{args[i]} (the checkpoint has its own model)")
            continue
        changed = config_differences(_setting(stored, key.removeprefix("model.")), o.value(), key)
        if changed:
            conflicts += [c.replace(", config ", ", override ") for c in changed]
        else:
            drop.add(i)
    if conflicts:
        raise ValueError(
            f"{app}: checkpoint={ckpt} builds its model from the settings stored in it, and a model override "
            f"cannot change them: {'; '.join(conflicts)}. Leave the override out (the checkpoint's own value "
            "needs none); another model needs training (clipforge-train, init_from= to start from these "
            "weights)"
        )
    return [arg for i, arg in enumerate(args) if i not in drop]


def out_folder(path: str | Path, option: str = "--out") -> Path:
    """``path``, the folder a tool will write into, checked before the tool's work: a ``NotADirectoryError``
    naming it when it is a file, or when a file stands where one of its parents must be a folder. Found out
    by the writing, such a path failed once the model was loaded."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            what = "a file" if folder.is_file() else "not a folder"
            problem = f"it is {what}" if folder == path else f"it cannot be a folder: {folder} is {what}"
            raise NotADirectoryError(f"{option} {path}: {problem}")
    return path


def files_written(paths: Paths) -> Paths:
    """Print ``name: path`` for each file a tool wrote, and hand ``paths`` back to its caller."""
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths
