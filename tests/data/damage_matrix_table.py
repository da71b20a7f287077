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

sys.path.insert(0, str(Path(__file__).parent))
from test_damage_matrix import (
    KINDS,
    ONE_RANK_CASES,
    _free_port,
    _rank_main,
    make_set,
    run_epoch,
)

from clipforge.data.shards import CAUSES

LOST = ("corrupt_image", "missing_image", "missing_caption", "lost_samples")


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
    lost = sum(counts[c] for c in LOST)
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
            kinds = [k for k in KINDS if k != "failing_pipe"]
            urls, manifest = make_set(root / f"all{workers}", {f"i{i}": k for i, k in enumerate(kinds)})
            print(
                row(
                    "all 8 at once",
                    "shards 0-7",
                    f"{workers} worker(s), 1 rank",
                    run_epoch(urls, manifest, workers),
                )
            )
        urls, manifest = make_set(root / "bad", {f"i{i}": "garbage" for i in range(6)})
        print(row("6 of 10 shards garbage", "shards 0-5", "1 worker, 1 rank", run_epoch(urls, manifest, 1)))
        cases = []
        for kind in KINDS:
            for where in ("first", "last"):
                cases.append((f"{kind}|{where}", *make_set(root / f"r-{kind}-{where}", {where: kind})))
        cases.append(
            (
                "6 of 10 shards garbage|shards 0-5",
                *make_set(root / "r-bad", {f"i{i}": "garbage" for i in range(6)}),
            )
        )
        mp.start_processes(
            _rank_main, args=(2, cases, _free_port(), tmp), nprocs=2, join=True, start_method="fork"
        )
        r0, r1 = (json.loads((root / f"{r}.json").read_text()) for r in range(2))
        for name in r0:
            a, b = r0[name], r1[name]
            both = {"counts": {c: a["counts"][c] + b["counts"][c] for c in CAUSES}, "batches": a["batches"]}
            both |= {"steps": a["steps"], "error": a["error"] or b["error"]}
            same = "" if a["batches"] == b["batches"] else f" (rank 1: {b['batches']})"
            kind, where = name.split("|")
            print(row(kind, where, "1 worker, 2 gloo ranks (summed)", both) + same)


if __name__ == "__main__":
    main()
