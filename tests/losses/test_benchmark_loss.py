"""The loss benchmark runs end to end on CPU at tiny sizes, on one device and in several gloo processes,
prints parseable JSON lines for clipforge and open_clip, and its table marks out-of-memory runs."""

from __future__ import annotations

import json

import pytest

from clipforge.bench.losses import format_table, main


def test_benchmark_smoke_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--batches", "64", "96", "--dim", "8", "--device", "cpu", "--tile-size", "32", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {(r["loss"], r["batch"], r["impl"]) for r in rows} == {
        (loss, batch, impl)
        for loss in ("clip", "siglip")
        for batch in (64, 96)
        for impl in ("clipforge", "open_clip")
    }
    for r in rows:
        assert r["status"] == "ok" and r["time_ms"] > 0 and r["dim"] == 8 and r["peak_extra_mib"] is None
    for loss in ("clip", "siglip"):
        ours = next(r for r in rows if (r["loss"], r["batch"], r["impl"]) == (loss, 96, "clipforge"))
        theirs = next(r for r in rows if (r["loss"], r["batch"], r["impl"]) == (loss, 96, "open_clip"))
        assert ours["path"] == "tiled"
        # tiled: two 96 x 8 fp32 feature-sized tensors and per-row statistics; open_clip 96 x 96 logits and more
        linear = 2 * 96 * 8 * 4 + 2 * 96 * 4 + 64
        assert ours["saved_mib"] * 2**20 <= linear < 96 * 96 * 4 <= theirs["saved_mib"] * 2**20
    assert "speedup" in out and "siglip" in out.splitlines()[-1]


def test_table_marks_oom() -> None:
    common = {"loss": "clip", "batch": 131072, "peak_extra_mib": None, "saved_mib": None}
    rows = [
        {
            **common,
            "impl": "clipforge",
            "status": "ok",
            "time_ms": 12.0,
            "peak_extra_mib": 900.0,
            "path": "tiled",
        },
        {**common, "impl": "open_clip", "status": "oom", "time_ms": None},
    ]
    table = format_table(rows)
    line = table.splitlines()[-1]
    assert "OOM" in line and "900.0" in line and "12.0" in line and line.endswith("-")


def test_benchmark_multiprocess_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # W = 2 and 3 gloo processes (3: a ring whose neighbours differ), local batch 6, d = 4
    main(["--world-sizes", "2", "3", "--batches", "6", "--dim", "4", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    impls = ("clipforge-ring", "clipforge-gather", "open_clip")
    assert sorted((r["loss"], r["world"], r["impl"]) for r in rows) == sorted(
        (loss, world, impl) for loss in ("clip", "siglip") for world in (2, 3) for impl in impls
    )
    for r in rows:
        assert r["status"] == "ok" and r["time_ms"] > 0 and r["saved_mib"] > 0
        assert (r["batch"], r["global_batch"], r["dim"]) == (6, 6 * r["world"], 4)
    saved = {(r["loss"], r["world"], r["impl"]): r["saved_mib"] for r in rows}
    for loss in ("clip", "siglip"):
        # the ring keeps the same bytes whatever W; the gathers keep b x B logits
        assert saved[loss, 2, "clipforge-ring"] == saved[loss, 3, "clipforge-ring"]
        assert saved[loss, 3, "clipforge-gather"] > saved[loss, 2, "clipforge-gather"]
    table = out.splitlines()[-4:]
    assert [line.split()[:3] for line in table] == [
        ["clip", "2", "6"],
        ["clip", "3", "6"],
        ["siglip", "2", "6"],
        ["siglip", "3", "6"],
    ]
    assert all(line.rstrip().endswith("x") for line in table)  # gather/ring time
