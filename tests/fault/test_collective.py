"""Naming the lost rank of a failed collective (clipforge.fault.collective) and the process-group timeout
setting, without a second process: the store check-in runs on torch's in-memory HashStore. The real
thing (a node killed or frozen under torchrun) is tests/launch/test_torchrun_nodes.py (slow)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist
from hydra.utils import instantiate

from clipforge.fault.collective import (
    CHECKIN_PREFIX,
    explain_collective_failure,
    is_collective_failure,
    lost_ranks,
)
from clipforge.train import strategy_timeout

GLOO_CLOSED = RuntimeError(
    "[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:10123. "
    "This is typically caused by a remote worker crashing."
)
GLOO_TIMEOUT = RuntimeError(
    "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation"
)


def test_collective_failures_are_recognised_and_other_errors_are_not() -> None:
    assert is_collective_failure(GLOO_CLOSED) and is_collective_failure(GLOO_TIMEOUT)
    assert is_collective_failure(dist.DistBackendError("NCCL communicator was aborted"))
    wrapped = ValueError("while saving")
    wrapped.__cause__ = GLOO_CLOSED
    assert is_collective_failure(wrapped)
    assert not is_collective_failure(ValueError("data.batch_size must be positive"))
    assert not is_collective_failure(KeyError("state_dict"))


def test_ranks_that_do_not_check_in_are_the_lost_ones() -> None:
    store = dist.HashStore()
    store.set(f"{CHECKIN_PREFIX}/2", "1")  # rank 2 survived and checked in; rank 1 never does
    assert lost_ranks(0, 3, grace=0.2, store=store) == [1]
    store.set(f"{CHECKIN_PREFIX}/1", "1")
    assert lost_ranks(0, 3, grace=0.2, store=store) == []
    assert lost_ranks(1, 2, grace=0.1, store=dist.HashStore()) == [0]


class _GoneStore:
    def set_timeout(self, timeout: timedelta) -> None:
        pass

    def set(self, key: str, value: str) -> None:
        raise RuntimeError("Connection refused")


def test_an_unreachable_store_names_the_other_rank_of_two_and_nobody_of_more() -> None:
    assert lost_ranks(0, 2, grace=0.1, store=_GoneStore()) == [1]
    assert lost_ranks(0, 4, grace=0.1, store=_GoneStore()) is None


def test_nothing_to_explain_without_a_process_group() -> None:
    assert not dist.is_initialized()
    assert explain_collective_failure(GLOO_CLOSED) is None


def test_strategy_timeout_is_a_config_key(compose_cfg) -> None:
    cfg = compose_cfg("trainer=ddp", "trainer.strategy.timeout.seconds=20")
    assert strategy_timeout(cfg) == timedelta(seconds=20)
    assert instantiate(cfg.trainer.strategy)._timeout == timedelta(seconds=20)  # what Lightning hands torch
    assert strategy_timeout(compose_cfg("trainer=ddp", "trainer/strategy=fsdp")) == timedelta(minutes=30)
    assert strategy_timeout(compose_cfg()) is None  # one process: no process group
    with pytest.raises(ValueError, match=r"trainer.strategy.timeout must build a datetime.timedelta"):
        strategy_timeout(compose_cfg("trainer=ddp", "trainer.strategy.timeout=30"))
