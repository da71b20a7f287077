"""The Hydra face of the console scripts (``clipforge-train``, ``clipforge-zeroshot``, ``clipforge-caption``):
one place that names the config tree, the Hydra version and what every run does before its work."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from clipforge.conf import CONF_DIR
from clipforge.fault.secrets import scrub_current_hydra_run


def hydra_entry(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console-script ``main`` that composes ``conf/<config_name>.yaml`` with the command line's overrides
    and calls ``run(cfg)``. Hydra names the job after ``run``'s module (``train``, ``cli``, ...)."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)
    def main(cfg: DictConfig) -> None:
        scrub_current_hydra_run()  # Hydra wrote .hydra/*.yaml with the command line as typed
        run(cfg)

    return main
