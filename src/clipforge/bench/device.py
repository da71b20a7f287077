"""The driver of ``scripts/device/measure_all.sh``: every GPU figure issue 20 asks for in one device-tool
call of at most 8 minutes on one GPU, installs included, most important first.

Each part is one command under its own ``timeout`` (its budget, cut to what is left of the total), so a
slow part (a long compile, an unexpected hang) costs only itself; a part with too little time left is
skipped. JSON lines of the benchmarks go to a few files under the output folder (the device tool brings
back at most 8), everything else to ``log.txt``, and ``summary.md`` tables whatever finished, rewritten
after every part so that even a call cut short leaves one.

``--dry-run`` runs the same parts at tiny sizes on CPU (compile disabled, the CUDA-only parts marked
"skipped: no CUDA"), in well under a minute on an idle machine: the test suite runs it, so the script
cannot rot between GPU leases. No paper; the benchmarks it runs name theirs.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.bench.summary import FILES, PartResult, write_summary

TOTAL_S = 480  # the whole call, installs included (the device tool allows 600 s a command)
RESERVE_S = 10  # kept back at the end for the summary and timeout's kill grace
MIN_PART_S = 15  # a part with less than this left is skipped rather than started
KILL_AFTER_S = 5  # SIGKILL this long after timeout's SIGTERM

B16, B32 = "vit_b16:256", "vit_b32:512"
STEPS = ("--steps", "15", "--warmup", "3")  # warm-up includes the compile (about a minute for B/16)
TINY = ("--device", "cpu", "--steps", "1", "--warmup", "0")
CLIPFORGE_CLIP = ("--losses", "clip", "--impls", "clipforge")
LOADER = ("--repeats", "1", "--root", "/tmp/clipforge-bench-shards")
TOKEN_REDUCTION = (
    "--token-reduction",
    "model.vision.patch_dropout=0.5",
    "model.text.context_length=32",
    "model.vision.patch_dropout=0.5 model.text.context_length=32",
)


@dataclass(frozen=True)
class Part:
    """One command of the call. ``out`` is its file under the output folder: a ``.jsonl`` keeps only the
    JSON lines (each tagged with the part's name; other lines go to log.txt), any other file every line.
    ``dry`` is the command at tiny sizes on CPU, ``None`` where the part needs CUDA."""

    name: str
    budget_s: int
    out: str
    what: str
    gpu: tuple[str, ...]
    dry: tuple[str, ...] | None


def bench(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "clipforge.bench.cli", *args)


def gpu_test_files(root: Path = Path("tests")) -> list[str]:
    """The test files that hold ``-m gpu`` tests: collecting only them keeps pytest's start short."""
    return sorted(str(p) for p in root.rglob("test_*.py") if "mark.gpu" in p.read_text())


def parts() -> list[Part]:
    """The budget table, in the order the parts run (most important first)."""
    fsdp2_dir = "/tmp/clipforge-fsdp2"
    train = [sys.executable, "-m", "clipforge.train", "trainer=ddp", "trainer/strategy=fsdp2", "debug=fast"]
    train += ["trainer.max_steps=20", "data.source.num_train=4096", "data.source.num_heldout=256"]
    train += ["paths.data_dir=/tmp/clipforge-data", f"hydra.run.dir={fsdp2_dir}"]
    train += ["callbacks.periodic_checkpoint.every_n_train_steps=10"]
    consolidate = [sys.executable, "-m", "clipforge.consolidate", f"{fsdp2_dir}/checkpoints/last.ckpt"]
    consolidate += [f"{fsdp2_dir}/consolidated.ckpt", "--force"]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    pytest += ["--continue-on-collection-errors", *gpu_test_files()]
    return [
        Part(
            "step_b16",
            140,
            "step.jsonl",
            "training step ViT-B/16 batch 256: open_clip, clipforge eager, clipforge compiled; CLIP, SigLIP",
            bench("step", "--models", B16, "--compile", *STEPS),
            bench("step", "--models", "tiny:8", "--compile", *TINY),
        ),
        Part(
            "step_b32",
            120,
            "step.jsonl",
            "training step ViT-B/32 batch 512: the same six",
            bench("step", "--models", B32, "--compile", *STEPS),
            bench("step", "--models", "tiny:4", *CLIPFORGE_CLIP, *TINY),
        ),
        Part(
            "loss",
            70,
            "loss.jsonl",
            "loss forward + backward alone, d = 768, batch 65,536 / 131,072 / 262,144, both losses",
            # TF32 as the peer's recorded open_clip figures (../shared/peer/openclip_step.py)
            bench("loss", "--batches", "65536", "131072", "262144", "--tf32", "--repeats", "2"),
            bench("loss", "--batches", "256", "--dim", "64", "--device", "cpu", "--repeats", "1"),
        ),
        Part("gpu_tests", 60, "gpu_tests.txt", "the -m gpu tests", tuple(pytest), None),
        Part(
            "profile",
            40,
            "profile.txt",
            "torch.profiler: top kernels of the compiled ViT-B/16 CLIP step",
            bench("profile", "--model", B16, "--loss", "clip", "--compile", "--steps", "5"),
            bench("profile", "--model", "tiny:8", "--compile", *TINY),
        ),
        Part(
            "lightning",
            60,
            "extras.jsonl",
            "the Lightning loop against the bare step (ViT-B/16, CLIP, compiled)",
            bench("step", "--models", B16, *CLIPFORGE_CLIP, "--compile", "--lightning", *STEPS),
            bench("step", "--models", "tiny:8", *CLIPFORGE_CLIP, "--compile", "--lightning", *TINY),
        ),
        Part(
            "token_reduction",
            40,
            "extras.jsonl",
            "patch dropout 0.5, text context 32, both (ViT-B/16, CLIP, eager)",
            bench("step", "--models", B16, *CLIPFORGE_CLIP, *TOKEN_REDUCTION, *STEPS),
            bench("step", "--models", "tiny:8", *CLIPFORGE_CLIP, *TOKEN_REDUCTION, *TINY),
        ),
        Part(
            "gpu_decode",
            45,
            "extras.jsonl",
            "loader throughput with nvJPEG decode on the GPU beside the CPU loaders",
            bench("loader", "--gpu-decode", "--num-samples", "2048", "--workers", "2", *LOADER),
            None,
        ),
        Part(
            "memory",
            60,
            "extras.jsonl",
            "peak memory and step time with and without grad_checkpointing (ViT-B/16 CLIP, beside open_clip)",
            bench("memory", "--models", B16, "--steps", "5", "--warmup", "2"),
            bench("memory", "--models", "tiny:4", "--impls", "clipforge", *TINY),
        ),
        Part(
            "fsdp2",
            60,
            "log.txt",
            "FSDP2 on the GPU (NCCL, bf16-mixed, sharded checkpoints), then consolidation",
            ("bash", "-c", f"{shlex.join(train)} && {shlex.join(consolidate)}"),
            None,
        ),
    ]


def _json_row(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def run_part(
    part: Part, argv: tuple[str, ...], out_dir: Path, limit_s: int, env: dict[str, str]
) -> PartResult:
    """Run ``argv`` under ``timeout limit_s``, streaming its lines to the console and to its files."""
    t0 = time.monotonic()
    keep_json = part.out.endswith(".jsonl")
    with open(out_dir / part.out, "a") as out, open(out_dir / "log.txt", "a") as log:
        log.write(f"==> {part.name} (timeout {limit_s} s): {shlex.join(argv)}\n")
        log.flush()
        cmd = ["timeout", "-k", str(KILL_AFTER_S), str(limit_s), *argv]
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(f"[{part.name}] {line}", end="", flush=True)
                row = _json_row(line) if keep_json else None
                dest = out if row is not None or not keep_json else log
                dest.write(line if row is None else json.dumps({"part": part.name, **row}) + "\n")
                dest.flush()  # what a part printed survives its kill, and the call's
            rc = proc.wait()
    took = time.monotonic() - t0
    if rc == 0:
        status = "ok"
    elif rc in (124, 137):  # timeout's own exit status; 137 after its SIGKILL
        status = f"TIMED OUT after {limit_s} s"
    else:
        status = f"failed (exit {rc})"
    return PartResult(part.name, part.budget_s, part.out, part.what, status, round(took, 1))


def run_parts(
    todo: list[Part], out_dir: Path, dry_run: bool, deadline: float, env: dict[str, str], header: str
) -> list[PartResult]:
    """Each part in turn within ``deadline`` (time.time()); the summary is rewritten after each."""
    results: list[PartResult] = []
    for part in todo:
        argv = part.dry if dry_run else part.gpu
        left = int(deadline - time.time() - RESERVE_S)
        if argv is None:
            status = "skipped: no CUDA"
        elif left < MIN_PART_S:
            status = f"skipped: out of time ({max(left, 0)} s left)"
        else:
            status = ""
        if status:
            print(f"[{part.name}] {status}", flush=True)
            # a JSON-lines file stays pure JSON: the note goes to the log
            note = "log.txt" if part.out.endswith(".jsonl") else part.out
            with open(out_dir / note, "a") as f:
                f.write(f"==> {part.name}: {status}\n")
            results.append(PartResult(part.name, part.budget_s, part.out, part.what, status, None))
        else:
            results.append(run_part(part, argv, out_dir, min(part.budget_s, left), env))
        write_summary(out_dir, results, todo, header)
    return results


def environment(dry_run: bool) -> str:
    """One block of text: interpreter, torch, CUDA and the device; the first line heads the summary."""
    import platform

    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "no CUDA device"
    lines = [
        f"{'dry run (CPU, tiny sizes, compile off: no figure here means anything)' if dry_run else 'GPU run'} on "
        f"{device}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{os.cpu_count()} CPUs, host {platform.node()}",
    ]
    if gpu:
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU memory {props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)"
        )
    for dist in ("open_clip_torch", "lightning", "hydra-core", "webdataset", "timm", "pytest"):
        try:
            lines.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            lines.append(f"{dist} MISSING")
    return "\n".join(lines)


def missing_wheels(folder: str) -> list[str]:
    """The wheels in ``folder`` whose distribution this interpreter lacks (the machine's own builds,
    compiled against its numpy and torch, stay in charge)."""
    wheels = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        try:
            md.version(os.path.basename(path).split("-")[0])
        except md.PackageNotFoundError:
            wheels.append(path)
    return wheels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, CUDA-only parts skipped")
    ap.add_argument("--out", default=os.environ.get("OUT", "device-out"), help="output folder ($OUT)")
    ap.add_argument("--only", nargs="+", metavar="PART", help="run these parts only (a rerun)")
    ap.add_argument("--total-s", type=float, default=TOTAL_S, help="the whole call's budget")
    ap.add_argument("--missing-wheels", metavar="DIR", help="print the wheels of DIR to install; exit")
    args = ap.parse_args(argv)
    if args.missing_wheels:
        for wheel in missing_wheels(args.missing_wheels):  # none: print nothing (no blank name for mapfile)
            print(wheel)
        return 0
    # measure_all.sh sets MEASURE_T0 before its installs, so they count against the total
    deadline = float(os.environ.get("MEASURE_T0", time.time())) + args.total_s
    todo = parts()
    if args.only:
        unknown = set(args.only) - {p.name for p in todo}
        if unknown:
            ap.error(f"unknown part(s) {sorted(unknown)}; parts: {[p.name for p in todo]}")
        todo = [p for p in todo if p.name in args.only]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_text = environment(args.dry_run)
    with open(out_dir / "env.txt", "a") as f:
        f.write(env_text + "\n")
    print(env_text, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        # one thread: tiny ops on a shared CPU only wait for each other with more
        env |= {"TORCH_COMPILE_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: nothing to measure (on CPU, use --dry-run)", file=sys.stderr)
            return 2
        # every part reuses the compiled kernels of the ones before (the step's towers in profile/lightning)
        env |= {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/clipforge-inductor")
    for name in FILES:
        (out_dir / name).touch()
    run_parts(todo, out_dir, args.dry_run, deadline, env, env_text.splitlines()[0])
    print((out_dir / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
