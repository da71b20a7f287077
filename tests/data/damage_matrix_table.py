"""Print the damage matrix of ``test_damage_matrix.py`` as a table (each damage kind x position x workers /
ranks: finished or stopped, samples lost and how they were counted), by running the same cases:

    python tests/data/damage_matrix_table.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1]))  # gloohelpers
sys.path.insert(0, str(Path(__file__).parent))  # test_damage_matrix
from test_damage_matrix import (
    EVERY_DAMAGE,
    LOST_CAUSES,
    MOSTLY_BAD,
    ONE_RANK_CASES,
    _rank_main,
    free_port,
    make_set,
    run_epoch,
    two_rank_cases,
)

from clipforge.data.shards import CAUSES


def row(damage: str, where: str, procs: str, out: dict) -> str:
    counts = out["counts"]
    state = (
        f"stopped at batch {out['batches']} (as intended)"
        if out["error"]
        else f"finished {out['batches']}/{out['steps']}"
    )
    causes = ", ".join(
        f"{c} {n}"
        for c, n in counts.items()
        if n and c in CAUSES and c not in ("lost_samples", "repeated_samples")
    )
    lost = sum(counts[c] for c in LOST_CAUSES)
    return f"| {damage} | {where} | {procs} | {state} | {lost} | {causes} | {counts['repeated_samples']} |"


def main() -> None:
    print("| damage | position | workers / ranks | outcome | samples lost | counted as | re-read |")
    print("| --- | --- | --- | --- | ---: | --- | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (kind, where, workers) in enumerate(ONE_RANK_CASES):
            urls, manifest = make_set(root / f"c{i}", {where: kind})
            print(
                row(kind, where, f"{workers} worker(s), 1 rank", run_epoch(urls, manifest, workers)),
                flush=True,
            )
        for workers in (1, 2):
            urls, manifest = make_set(root / f"all{workers}", EVERY_DAMAGE)
            print(
                row(
                    "all 8 at once",
                    "shards 0-7",
                    f"{workers} worker(s), 1 rank",
                    run_epoch(urls, manifest, workers),
                )
            )
        urls, manifest = make_set(root / "bad", MOSTLY_BAD)
        print(row("6 of 10 shards garbage", "shards 0-5", "1 worker, 1 rank", run_epoch(urls, manifest, 1)))
        cases = two_rank_cases(root / "ranks")
        mp.start_processes(
            _rank_main, args=(2, cases, free_port(), tmp), nprocs=2, join=True, start_method="fork"
        )
        r0, r1 = (json.loads((root / f"{r}.json").read_text()) for r in range(2))
        for name in r0:
            a, b = r0[name], r1[name]
            both = {"counts": {c: a["counts"][c] + b["counts"][c] for c in CAUSES}, "batches": a["batches"]}
            both |= {"steps": a["steps"], "error": a["error"] or b["error"]}
            same = "" if a["batches"] == b["batches"] else f" (rank 1: {b['batches']})"
            kind, where = (
                ("6 of 10 shards garbage", "shards 0-5") if name == "mostly_bad" else name.rsplit("-", 1)
            )
            print(row(kind, where, "1 worker, 2 gloo ranks (summed)", both) + same)


if __name__ == "__main__":
    main()
