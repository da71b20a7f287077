"""Each W&B logger gets its own mode, in the call to wandb.init, and the process environment is left alone.

wandb.init is replaced by a recorder: no run is made and nothing can reach the network.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import wandb

from clipforge.loggers import instantiate_logger


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []

    def fake_init(**kwargs):
        # the mode wandb would run in: init's mode= outranks WANDB_MODE (read at its first setup only)
        kwargs["effective_mode"] = kwargs.get("mode") or os.environ.get("WANDB_MODE", "online")
        calls.append(kwargs)
        return SimpleNamespace(offline=kwargs["effective_mode"] == "offline")

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb, "run", None)
    for var in ("WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    return calls


def wandb_env() -> dict[str, str]:
    """The W&B part of the environment (torch sets variables of its own, e.g. inductor's cache, on first use)."""
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB")}


def _start(compose_cfg, *overrides: str) -> dict:
    """Build the logger as train() does and start its run, as Lightning does at the first log call."""
    logger = instantiate_logger(compose_cfg("logger=wandb", *overrides).logger)
    _ = logger.experiment  # the property calls wandb.init
    return logger


def test_each_logger_gets_its_own_mode_and_the_environment_is_untouched(compose_cfg, init_calls) -> None:
    env = wandb_env()
    for overrides in [(), ("logger.offline=false",), ("logger.offline=true",), ("logger.offline=false",)]:
        _start(compose_cfg, *overrides)
    assert [c["effective_mode"] for c in init_calls] == ["offline", "online", "offline", "online"]
    assert all(c.get("settings", {}).get("silent") is True for c in init_calls)
    assert wandb_env() == env  # no WANDB_MODE (nor Lightning's "dryrun") left for the next run
    assert not any("anonymous" in c for c in init_calls)  # wandb warns "has no effect" on any value


def test_an_exported_wandb_mode_wins(compose_cfg, init_calls, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "false")
    _start(compose_cfg, "logger.offline=false")
    assert init_calls[0]["effective_mode"] == "disabled" and "settings" not in init_calls[0]
    monkeypatch.delenv("WANDB_MODE")
    _start(compose_cfg, "logger.offline=false")
    assert init_calls[1]["effective_mode"] == "online"


def test_model_upload_from_an_offline_run_is_refused(compose_cfg, init_calls) -> None:
    with pytest.raises(ValueError, match=r"logger\.log_model=all needs logger\.offline=false"):
        instantiate_logger(compose_cfg("logger=wandb", "logger.log_model=all").logger)
