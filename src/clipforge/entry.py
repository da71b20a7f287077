"""What the console scripts share. The Hydra face of ``clipforge-train``, ``clipforge-zeroshot`` and
``clipforge-caption`` (one place that names the config tree, the Hydra version and what every run does before
its work), and the ending of the argparse tools that write files (``clipforge-convert``,
``clipforge-visualize``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from clipforge.conf import CONF_DIR
from clipforge.fault.secrets import scrub_current_hydra_run

Paths = TypeVar("Paths", bound=Mapping[str, Any])


def hydra_entry(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console-script ``main`` that composes ``conf/<config_name>.yaml`` with the command line's overrides
    and calls ``run(cfg)``. Hydra names the job after ``run``'s module (``train``, ``cli``, ...)."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)
    def main(cfg: DictConfig) -> None:
        scrub_current_hydra_run()  # Hydra wrote .hydra/*.yaml with the command line as typed
        run(cfg)

    return main


def files_written(paths: Paths) -> Paths:
    """Print ``name: path`` for each file a tool wrote, and hand ``paths`` back to its caller."""
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def exit_zero(main: Callable[[], Any]) -> Callable[[], int]:
    """The console script of a tool whose ``main`` returns what it wrote: a console script hands its
    function's return value to ``sys.exit``, which would print that dict and exit 1; this one exits 0 once
    ``main`` has returned (an error still raises)."""

    @functools.wraps(main)
    def cli() -> int:
        main()
        return 0

    return cli
