"""Shared fixtures: compose the real conf/ tree with small overrides, as users' runs do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

# Two cores are shared by the whole suite; more threads only add contention.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per session, so generated synthetic shards are written once and reused."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def compose_cfg(tmp_path: Path, shared_data_dir: Path) -> Callable[..., DictConfig]:
    """compose_cfg("loss=siglip", ...) -> the train config, outputs under tmp_path, shards shared."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        with open_dict(cfg):
            if "paths" in cfg:
                cfg.paths.output_dir = str(tmp_path / "out")
                cfg.paths.data_dir = str(shared_data_dir)
        return cfg

    return _compose
