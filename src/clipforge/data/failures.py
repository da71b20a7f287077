"""Bad input in the WebDataset stream: what is counted, and when the run stops. No paper; web-scale image-
text sets (LAION, DataComp) always hold some broken shards and images, and a trainer must survive a few
without ever hiding many.

Two halves:

* :class:`FailureMonitor`, in each DataLoader worker, counts every skipped sample and shard by cause
  (:data:`~clipforge.data.shards.CAUSES`) together with the samples read and shards opened, into a
  shared-memory table the main process reads, and the failed samples of each shard, so an error can
  name the shards.
* :class:`FailurePolicy` judges those counts, **summed over all ranks**, in the main process
  (:class:`clipforge.data.loader.EpochLoader`): every rank reaches the same decision at the same
  batch, so no rank is left waiting in a collective for one that stopped. With a manifest (exact epochs)
  the fraction is judged over the epoch's planned samples, and the run stops as soon as the failures alone
  make the limit unreachable; without one (resampled streams) only over a window of at least
  ``min_samples`` samples read from at least ``min_shards`` shards. A handful of bad shards never decides
  a run by the order in which they happen to come.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from clipforge.data.shards import CAUSES, DataError

log = logging.getLogger(__name__)

# Causes that lose a sample (the shard-level causes count shards; their samples are lost_samples).
SAMPLE_CAUSES = ("corrupt_image", "missing_image", "missing_caption", "missing_label", "lost_samples")
# Columns of the shared table after the causes: first-pass samples read and shards opened.
PROGRESS = ("samples_read", "shards_read")
COLUMNS = (*CAUSES, *PROGRESS)


@dataclass(frozen=True)
class FailurePolicy:
    """When bad input stops a run: more than ``max_fraction`` of the samples failing, judged on enough
    evidence (see the module docstring). ``check_every`` batches the ranks compare their counts."""

    max_fraction: float = 0.5
    min_samples: int = 4096
    min_shards: int = 8
    check_every: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"data.failures.max_fraction must be in [0, 1], got {self.max_fraction}")
        if self.check_every < 1:
            raise ValueError(f"data.failures.check_every must be >= 1, got {self.check_every}")

    def verdict(self, totals: dict[str, int], planned: int | None, final: bool = False) -> str | None:
        """Why the run must stop, or None. ``totals``: counts of :data:`COLUMNS` since the epoch began,
        summed over ranks; ``planned``: samples the epoch still promised when it began (None: unknown)."""
        failed = sum(totals[c] for c in SAMPLE_CAUSES)
        attempted = totals["samples_read"] + totals["lost_samples"]
        if planned:
            # Even if every remaining sample were good, the epoch could not stay under the limit.
            if failed > self.max_fraction * planned:
                return f"{failed} of the epoch's {planned} planned samples failed"
            return None
        enough = final or (attempted >= self.min_samples and totals["shards_read"] >= self.min_shards)
        if enough and attempted and failed > self.max_fraction * attempted:
            return f"{failed} of {attempted} samples read from {totals['shards_read']} shards failed"
        return None

    def error(self, reason: str, totals: dict[str, int], shards: list[str], world: int) -> DataError:
        causes = ", ".join(f"{c}: {totals[c]}" for c in CAUSES if totals[c])
        where = f"on {world} ranks" if world > 1 else "in this run"
        return DataError(
            f"{reason} {where} ({causes}); that is not a few bad files but bad input "
            f"(limit {self.max_fraction:.0%}, data.failures.max_fraction). Shards: {', '.join(shards) or '?'}"
        )


def new_tables(num_rows: int, num_urls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-memory tables: ``(rows, COLUMNS)`` counts per worker and ``(urls, 2)`` per shard
    ``[failed samples, 1 + index of its shard-level cause in CAUSES (0: none)]``."""
    counts = torch.zeros(max(1, num_rows), len(COLUMNS), dtype=torch.int64).share_memory_()
    per_shard = torch.zeros(max(1, num_urls), 2, dtype=torch.int32).share_memory_()
    return counts, per_shard


def table_totals(counts: torch.Tensor) -> dict[str, int]:
    return dict(zip(COLUMNS, (int(t) for t in counts.sum(0).tolist())))


def worst_shards(per_shard: torch.Tensor, urls: list[str], n: int = 8) -> list[str]:
    """The shards with most failures, as ``"url (k failed)"`` or ``"url (cause)"``."""
    failed, cause = per_shard[:, 0].tolist(), per_shard[:, 1].tolist()
    order = sorted(range(len(urls)), key=lambda i: (-failed[i], -cause[i]))
    out = []
    for i in order[:n]:
        what = [CAUSES[cause[i] - 1]] if cause[i] else []
        what += [f"{failed[i]} failed"] if failed[i] else []
        if what:
            out.append(f"{urls[i]} ({', '.join(what)})")
    return out


class FailureMonitor:
    """One worker's accounting: writes its row of the shared tables and logs the first cases of each
    cause. ``table=None`` (re-read passes) counts nothing, so no failure is counted twice."""

    def __init__(
        self,
        table: torch.Tensor | None,
        per_shard: torch.Tensor | None,
        row: int,
        url_index: dict[str, int],
        where: str,
    ) -> None:
        self.table, self.per_shard, self.row = table, per_shard, row
        self.url_index, self.where = url_index, where
        self.read = self.failed = self.opened = self.short_shards = 0
        self.by_cause: Counter[str] = Counter()
        self.by_shard: Counter[str] = Counter()
        self.bad_shards: dict[str, str] = {}

    def quiet(self) -> FailureMonitor:
        return FailureMonitor(None, None, self.row, self.url_index, self.where)

    def _add(self, column: str, n: int) -> None:
        if self.table is not None:
            self.table[self.row, COLUMNS.index(column)] += n

    def count(self, cause: str, n: int = 1) -> None:
        self._add(cause, n)
        self.by_cause[cause] += n

    def samples_read(self, n: int = 1) -> None:
        self._add("samples_read", n)
        self.read += n

    def shard_opened(self) -> None:
        self._add("shards_read", 1)
        self.opened += 1

    def sample_failed(self, cause: str, url: str, key: str = "", n: int = 1) -> None:
        self.count(cause, n)
        self.failed += n
        self.by_shard[url] += n
        if self.per_shard is not None and url in self.url_index:
            self.per_shard[self.url_index[url], 0] += n
        if self.table is not None and self.by_cause[cause] <= 3:
            log.warning("skipped %s: %s in %s (%s)", key or f"{n} samples", cause, url, self.where)

    def manifest_short(self, url: str, count: int) -> None:
        """Shard ``url`` holds more samples than the manifest's ``count``: exact epochs never read the rest."""
        self.short_shards += 1
        if self.table is not None and self.short_shards <= 3:
            log.warning(
                "%s holds more than the %d samples its manifest says; the rest are never read: the manifest "
                "is stale or belongs to other shards (rewrite it: clipforge-shards manifest DIR) (%s)",
                url,
                count,
                self.where,
            )

    def shard_failed(self, cause: str, url: str) -> None:
        self.count(cause)
        self.bad_shards[url] = cause
        if self.per_shard is not None and url in self.url_index:
            self.per_shard[self.url_index[url], 1] = CAUSES.index(cause) + 1

    def check_final(self, policy: FailurePolicy) -> None:
        """Single-process passes (evaluation sets): judge this worker's own pass when it ends."""
        totals = dict.fromkeys(COLUMNS, 0) | dict(self.by_cause)
        totals |= {"samples_read": self.read, "shards_read": self.opened}
        reason = policy.verdict(totals, None, final=True)
        nothing = self.read == 0 and bool(self.bad_shards)
        if reason or nothing:
            shards = [f"{u} ({n} failed)" for u, n in self.by_shard.most_common(8)]
            shards += [f"{u} ({c})" for u, c in list(self.bad_shards.items())[:8] if u not in self.by_shard]
            raise policy.error(reason or "no sample could be read", totals, shards, 1)
