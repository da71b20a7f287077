"""A lost rank, named: turn a failed collective into an error that says which rank went away.

No paper. When a node dies, the survivors learn it from their next collective: gloo reports
``Connection reset by peer`` / ``Connection closed by peer [addr]:port`` at once when the peer's process
is gone, or ``Timed out waiting <timeout>ms for recv operation`` after the process-group timeout
(``trainer.strategy.timeout``) when the peer hangs; NCCL reports a watchdog timeout. None of these
names the rank that was lost (gloo names an address and port, and on one machine every rank has the
same address), so the person reading the log of the surviving node cannot tell which node to look at.

:func:`explain_collective_failure` turns such an exception into a :class:`LostRankError` naming the
lost rank(s). Every surviving rank checks in through the process group's key-value store (the
launcher's rendezvous store) and waits ``grace`` seconds for the others: the ranks that never check in
are named. A survivor still blocked in a collective of its own checks in only after its own timeout, so
with more than two ranks the list can name a survivor too (the message says so). If the store itself
cannot be reached, the node that hosts it is gone; with two ranks that is the other one.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

# What gloo, NCCL and the c10d store say when a peer is gone or silent (torch raises most of them as
# plain RuntimeErrors, not as torch.distributed.DistError).
_PATTERNS = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out waiting|"
    r"watchdog caught collective operation timeout|socket timeout|recv operation|send operation",
    re.IGNORECASE,
)
CHECKIN_PREFIX = "clipforge/lost_rank_checkin"


class LostRankError(RuntimeError):
    """A collective failed because a rank (a node, a process) died or stopped answering."""

    def __init__(self, message: str, lost: list[int] | None) -> None:
        super().__init__(message)
        self.lost = lost


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a failed collective or store operation."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, getattr(dist, "DistError", ())) or _PATTERNS.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _store() -> Any:
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def lost_ranks(rank: int, world_size: int, grace: float = 10.0, store: Any = None) -> list[int] | None:
    """The ranks, seen from ``rank``, that do not check in through ``store`` (default: the process group's)
    within ``grace`` seconds. When the store cannot be reached either (it lives on a node that is gone):
    the other rank if there are two, else ``None`` (unknown)."""
    try:
        store = _store() if store is None else store
        # A store on a hung node would hold every call for the whole process-group timeout.
        store.set_timeout(timedelta(seconds=max(grace, 1.0)))
        store.set(f"{CHECKIN_PREFIX}/{rank}", "1")
        keys = [f"{CHECKIN_PREFIX}/{r}" for r in range(world_size)]
        deadline = time.monotonic() + grace
        while True:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(min(0.5, grace))
    except Exception as e:  # the store is gone too (it lives on a lost node)
        log.debug("lost-rank check-in failed: %s", e)
        return [1 - rank] if world_size == 2 else None


def explain_collective_failure(
    exc: BaseException, timeout: timedelta | None = None, grace: float = 10.0
) -> LostRankError | None:
    """A :class:`LostRankError` naming the lost rank(s) if ``exc`` is a failed collective of an initialised
    process group with more than one rank; ``None`` for any other exception (re-raise it unchanged)."""
    if not (dist.is_available() and dist.is_initialized()) or not is_collective_failure(exc):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        return None
    lost = lost_ranks(rank, world, grace)
    first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    limit = f" (trainer.strategy.timeout = {timeout.total_seconds():g} s)" if timeout is not None else ""
    if lost is None:
        who = (
            "a rank that hosts the launcher's key-value store (the rendezvous host under torchrun, global "
            "rank 0 otherwise) is gone: the store cannot be reached either"
        )
    elif not lost:
        who = "every rank still answers, so a collective failed without a rank being lost"
    elif world == 2:
        who = f"lost rank {lost[0]}: it died or stopped answering (no check-in within {grace:g} s)"
    else:
        who = (
            f"lost rank(s) {lost}: they did not check in within {grace:g} s of the failure (a survivor still "
            "blocked in a collective of its own checks in only after its own timeout)"
        )
    return LostRankError(
        f"rank {rank} of {world}: a collective failed{limit}; {who}. Restart every node with the same "
        f"command (ckpt_path=auto resumes from the newest checkpoint). First error: {first}",
        lost,
    )
