"""``summary.md`` of a device call (``clipforge.bench.device``): Markdown tables of whatever the parts
wrote, read back from their JSON lines, with the parts that did not finish marked. No paper.

Tables: the parts (budget, time taken, status); the training step of open_clip and clipforge (eager and
compiled) with their ratio and MFU; the losses alone (time, peak extra memory, out of memory marked);
the ``-m gpu`` tests; the Lightning loop against the bare step; token reduction; the loaders; the
profile's top kernels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Everything a call writes, most important first (the device tool brings back at most 8 files).
FILES = (
    "summary.md",
    "step.jsonl",
    "loss.jsonl",
    "gpu_tests.txt",
    "extras.jsonl",
    "profile.txt",
    "env.txt",
    "log.txt",
)
Row = dict[str, Any]


@dataclass(frozen=True)
class PartResult:
    name: str
    budget_s: int
    out: str
    what: str
    status: str  # "ok", "TIMED OUT after N s", "failed (exit N)", "skipped: ..."
    took_s: float | None


def read_rows(out_dir: Path) -> list[Row]:
    """Every JSON line of every file the call wrote, in file order."""
    rows = []
    for name in FILES:
        path = out_dir / name
        if not path.is_file() or name == "summary.md":
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def table(head: list[str], body: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in body]
    return lines


def _num(value: float | None, fmt: str = ",.1f") -> str | None:
    return None if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str | None:
    return f"{a / b:.2f}×" if a and b else None


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def _groups(rows: list[Row], key: Callable[[Row], tuple]) -> dict[tuple, list[Row]]:
    out: dict[tuple, list[Row]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _pick(rows: list[Row], **match: Any) -> Row | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _cut(results: list[PartResult], names: Iterable[str]) -> list[str]:
    """A line under a table for each of its parts that did not finish."""
    return [
        f"\n_{r.name}: {r.status}; its missing rows were not measured._"
        for r in results
        if r.name in names and r.status != "ok"
    ]


def step_section(rows: list[Row], parts: list[str]) -> list[str]:
    steps = [r for r in rows if r.get("kind") == "step" and r.get("part") in parts]
    body = []
    for (model, loss, batch), group in _groups(steps, lambda r: (r["model"], r["loss"], r["batch"])).items():
        oc = _pick(group, impl="open_clip", compile=False)
        cf = _pick(group, impl="clipforge", compile=False, note="")
        cc = next((r for r in group if r["impl"] == "clipforge" and r["compile"]), None)
        speed = [r and r["samples_per_s"] for r in (oc, cf, cc)]
        body.append(
            [
                model,
                loss,
                batch,
                *(_num(s) for s in speed),
                _ratio(speed[1], speed[0]),
                _ratio(speed[2], speed[0]),
                " / ".join(_pct(r and r["mfu"]) or "-" for r in (oc, cf, cc)),
                " / ".join(_num(r and r["peak_mem_gib"]) or "-" for r in (oc, cf, cc)),
                _num(cc and cc["warmup_s"]),
            ]
        )
    head = ["model", "loss", "batch", "open_clip samples/s", "clipforge", "clipforge compiled"]
    head += ["clipforge / open_clip", "compiled / open_clip", "MFU (oc / cf / compiled)"]
    head += ["peak GiB (oc / cf / compiled)", "warm-up + compile s"]
    return table(head, body)


def loss_section(rows: list[Row]) -> list[str]:
    losses = [r for r in rows if r.get("part") == "loss" and "time_ms" in r]
    body = []
    for (loss, batch), group in _groups(losses, lambda r: (r["loss"], r["batch"])).items():
        ours, theirs = _pick(group, impl="clipforge"), _pick(group, impl="open_clip")

        def cells(r: Row | None) -> list[str | None]:
            if r is None or r["status"] != "ok":
                return [r and r["status"].upper()] * 2
            gib = r["peak_extra_mib"] and r["peak_extra_mib"] / 1024
            return [_num(r["time_ms"]), _num(gib, ".2f")]

        ok = ours and theirs and ours["status"] == theirs["status"] == "ok"
        speedup = _ratio(theirs["time_ms"], ours["time_ms"]) if ok else None
        body.append([loss, f"{batch:,}", ours and ours.get("path"), *cells(ours), *cells(theirs), speedup])
    head = ["loss", "batch", "clipforge path", "clipforge ms", "clipforge peak extra GiB"]
    head += ["open_clip ms", "open_clip peak extra GiB", "open_clip time / clipforge"]
    return table(head, body)


def lightning_section(rows: list[Row]) -> list[str]:
    mine = [r for r in rows if r.get("part") == "lightning"]
    body = []
    for lit in (r for r in mine if r.get("kind") == "lightning"):
        bare = _pick(mine, kind="step", model=lit["model"], loss=lit["loss"], compile=lit["compile"])
        bare_speed = bare and bare["samples_per_s"]
        row = [lit["model"], lit["loss"], lit["batch"], lit["compile"], _num(bare_speed)]
        body.append([*row, _num(lit["samples_per_s"]), _ratio(lit["samples_per_s"], bare_speed)])
    head = ["model", "loss", "batch", "compiled", "bare step samples/s", "Lightning samples/s"]
    return table([*head, "Lightning / bare"], body)


def token_section(rows: list[Row]) -> list[str]:
    mine = [r for r in rows if r.get("part") == "token_reduction" and r.get("kind") == "step"]
    body = []
    for r in mine:
        plain = _pick(mine, model=r["model"], loss=r["loss"], note="")
        speed = r["samples_per_s"]
        ratio = _ratio(speed, plain and plain["samples_per_s"])
        body.append([r["model"], r["loss"], r["note"] or "(none)", _num(speed), r["gflop_per_sample"], ratio])
    head = ["model", "loss", "overrides", "samples/s", "GFLOP/sample", "× plain step"]
    return table(head, body)


def loader_section(rows: list[Row]) -> list[str]:
    mine = [r for r in rows if r.get("kind") == "loader"]
    base = _pick(mine, loader="open_clip get_wds_dataset")
    body = []
    for r in mine:
        speed = r["per_worker_wall"]
        body.append([r["loader"], r["workers"], _num(speed), _ratio(speed, base and base["per_worker_wall"])])
    return table(["loader", "workers", "images/s per worker (wall)", "× open_clip"], body)


def profile_section(rows: list[Row], top: int = 12) -> list[str]:
    out: list[str] = []
    for r in (r for r in rows if r.get("kind") == "profile"):
        what = f"{r['model']} batch {r['batch']}, {r['loss']}, {'compiled' if r['compile'] else 'eager'}"
        out.append(f"{what}, {r['steps']} steps: {r['total_ms_per_step']:.1f} ms/step of {r['timed']}")
        out.append("")
        body = ([k["name"], k["calls_per_step"], k["ms_per_step"], _pct(k["share"])] for k in r["top"][:top])
        name = "kernel" if r["timed"] == "device kernels" else "operator"
        out += [*table([name, "calls/step", "ms/step", "share"], body), ""]
    return out or ["(no profile)"]


def memory_section(rows: list[Row]) -> list[str]:
    body = []
    for r in (r for r in rows if r.get("kind") == "memory"):
        row = [r["impl"], r["model"], r["loss"], r["batch"], "on" if r["grad_checkpointing"] else "off"]
        body.append([*row, r["peak_gib"], r.get("peak_x_plain"), _num(r["step_ms"]), r.get("time_x_plain")])
    head = ["impl", "model", "loss", "batch", "grad ckpt", "peak GiB", "× off", "step ms", "× off"]
    return table(head, body)


def tests_line(out_dir: Path) -> str:
    path = out_dir / "gpu_tests.txt"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()] if path.is_file() else []
    lines = [ln for ln in lines if ln]
    return f"`{lines[-1]}`" if lines else "(no output)"


def write_summary(out_dir: Path, results: list[PartResult], planned: list[Any], header: str) -> str:
    """Write ``out_dir/summary.md`` from the parts run so far (``planned``: every part of the call, those
    not yet run listed as pending); returns its text."""
    rows = read_rows(out_dir)
    done = {r.name for r in results}
    status = [[r.name, r.what, r.budget_s, _num(r.took_s), r.status, r.out] for r in results]
    status += [[p.name, p.what, p.budget_s, None, "pending", p.out] for p in planned if p.name not in done]
    lines = ["# clipforge on the device: measured", "", header, ""]
    lines += table(["part", "what", "budget s", "took s", "status", "file"], status)
    lines += ["", "## Training step (bf16 autocast, fused AdamW; samples/s)", ""]
    lines += step_section(rows, ["step_b16", "step_b32"]) + _cut(results, ["step_b16", "step_b32"])
    lines += ["", "## Loss forward + backward alone (fp32 features, TF32 matmuls on the GPU, d = 768)", ""]
    lines += loss_section(rows) + _cut(results, ["loss"])
    lines += ["", "## GPU tests (-m gpu)", "", tests_line(out_dir)]
    lines += ["", "## Lightning loop against the bare step", ""]
    lines += lightning_section(rows) + _cut(results, ["lightning"])
    lines += ["", "## Token reduction (clipforge, eager)", ""]
    lines += token_section(rows) + _cut(results, ["token_reduction"])
    lines += ["", "## Loader with GPU JPEG decode", ""]
    lines += loader_section(rows) + _cut(results, ["gpu_decode"])
    lines += ["", "## Gradient checkpointing: peak memory and step time", ""]
    lines += memory_section(rows) + _cut(results, ["memory"])
    lines += ["", "## Profile: where the step's time goes", ""]
    lines += profile_section(rows) + _cut(results, ["profile"])
    lines += [
        "",
        "MFU: FLOPs of one step counted by torch.utils.flop_counter / step time / the device's dense bf16 "
        "peak (clipforge.flops.PEAK_BF16_TFLOPS: 989 TFLOP/s for an H100 SXM or H200). Warm-up includes the "
        "compile. Lightning rows include the "
        "host-to-device copy of each batch, which the bare step (one batch kept on the device) does not.",
        "",
    ]
    text = "\n".join(lines)
    (out_dir / "summary.md").write_text(text)
    return text
