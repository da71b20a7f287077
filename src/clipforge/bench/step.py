"""Training-step throughput of clipforge beside open_clip, measured in one process on one device.

For each (model, loss) it times a full optimizer step — forward of both towers, contrastive loss
(CLIP, Radford et al., 2021, or SigLIP, Zhai et al., 2023), backward, AdamW — for open_clip's model
and loss and for clipforge's, on the same synthetic batch, precision and optimizer settings, and
optionally the whole Lightning loop around clipforge's step. It prints one JSON line per measurement
and a table: samples/s, TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``), MFU against the device's
dense bf16 peak (``clipforge.flops.PEAK_BF16_TFLOPS`` by CUDA device name, e.g. 989 TFLOP/s for an H100 SXM
or H200; ``--peak-tflops`` overrides; n/a on the CPU or an unknown device without it), peak memory and
warm-up/compile time.

GPU:  clipforge-benchmark --models vit_b16:256 vit_b32:512 --losses clip siglip --compile
CPU smoke test:  clipforge-benchmark --models tiny:8 --device cpu --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from torch.utils.flop_counter import FlopCounterMode

from clipforge.bench.args import add_device_args, device_defaults, model_batch, non_negative_int, positive_int
from clipforge.bench.losses import _free
from clipforge.bench.open_clip_ref import open_clip_loss, open_clip_model
from clipforge.checkpoint import build_model
from clipforge.compilation import COMPILE_MODES, compile_in_place
from clipforge.conf import CONF_DIR
from clipforge.flops import peak_tflops
from clipforge.optim import param_groups


@dataclass(frozen=True)
class StepSpec:
    """What one timed training step is: whose model and loss (``open_clip`` or ``clipforge``), of the shape
    of ``conf/model/<model>``, at what batch, device, precision and compilation."""

    impl: str
    model: str
    loss: str
    batch: int
    device: torch.device
    precision: str
    compile: bool = False
    overrides: tuple[str, ...] = ()
    compile_mode: str = "default"
    grad_checkpointing: bool = False  # both implementations' set_grad_checkpointing (bench.memory)


@dataclass
class StepResult:
    impl: str
    model: str
    loss: str
    batch: int
    precision: str
    compile: bool
    samples_per_s: float
    step_ms: float
    gflop_per_sample: float
    tflops: float
    mfu: float | None  # None: no known peak for the device (the CPU) and no --peak-tflops
    peak_mem_gib: float | None
    warmup_s: float
    final_loss: float
    device: str
    note: str = ""


def compose_model_cfg(model: str, loss: str, overrides: list[str] | None = None) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", f"loss={loss}", *(overrides or [])])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    device: torch.device,
    precision: str,
    compile_: bool,
    after_step: Callable[[], None] | None = None,
    optim_impl: str | None = None,
    compile_mode: str = "default",
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step. With ``compile_`` each tower and the loss are compiled in place in
    ``compile_mode`` (``reduce-overhead`` adds CUDA graphs), exactly as ``clipforge-train compile=...``
    does, so the bare step and the Lightning loop time the same graphs (clipforge models only).

    ``optim_impl``: ``fused`` (default on GPU), ``foreach`` (default on CPU) or ``loop`` (the plain
    per-parameter reference).
    """
    optim_impl = optim_impl or ("fused" if device.type == "cuda" else "foreach")
    opt = torch.optim.AdamW(
        param_groups(model, 0.1), lr=1e-4, fused=optim_impl == "fused", foreach=optim_impl == "foreach"
    )

    if compile_:
        compile_in_place(model, loss_fn, compile_mode)

    def forward_loss(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = model(images, tokens)
        # open_clip leaves logit_bias out of its output dict when the model has none (CLIP)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))

    def step(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with _autocast(device, precision):
            loss = forward_loss(images, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return loss.detach()

    return step


def time_step(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[float, float, float, float]:
    """(seconds per step, FLOPs per step, warm-up seconds, last loss). No host sync inside the loop."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(images, tokens)
    _sync(device)
    warm_s = time.perf_counter() - t0
    with FlopCounterMode(display=False) as fc:
        step(images, tokens)
    flops = float(fc.get_total_flops())
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, loss = run_steps(step, images, tokens, steps, device)
    return seconds, flops, warm_s, loss


def run_steps(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    device: torch.device,
) -> tuple[float, float]:
    """(seconds per step, last loss) over ``steps`` calls, with one host sync at the end."""
    t = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(steps):
        loss = step(images, tokens)
    _sync(device)
    return (time.perf_counter() - t) / steps, float(loss)


def build_step(
    spec: StepSpec,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(step, images, tokens)``: the model and loss ``spec`` names, on its device, with a synthetic batch
    for them."""
    torch.manual_seed(0)
    device, batch, overrides = spec.device, spec.batch, list(spec.overrides)
    cfg = compose_model_cfg(spec.model, spec.loss, overrides)
    loss_cls = get_class(cfg.loss._target_)
    if spec.impl == "open_clip":
        model = open_clip_model(spec.model, cfg.model, loss_cls, overrides)
        loss_fn = open_clip_loss(spec.loss)
        after = None
    else:
        model = build_model(cfg.model, cfg.loss)
        loss_fn = instantiate(cfg.loss)
        after = model.clamp_logit_scale
    model = model.to(device).train()
    model.set_grad_checkpointing(spec.grad_checkpointing)
    loss_fn = loss_fn.to(device)
    img_size = cfg.model.vision.img_size
    ctx = cfg.model.text.context_length
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    tokens = torch.randint(1, 49407, (batch, ctx), device=device)
    tokens[:, -1] = 49407  # an EOT in every row, as the tokenizer writes
    step = make_step(
        model, loss_fn, device, spec.precision, spec.compile, after, compile_mode=spec.compile_mode
    )
    return step, images, tokens


def bench_step(spec: StepSpec, steps: int, warmup: int, peak: float | None) -> StepResult:
    """Time ``steps`` steps of ``spec`` after ``warmup`` untimed ones; MFU against ``peak`` TFLOP/s, if any."""
    device, batch = spec.device, spec.batch
    step, images, tokens = build_step(spec)
    dt, flops, warm_s, last = time_step(step, images, tokens, steps, warmup, device)
    tflops = flops / dt / 1e12
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return StepResult(
        impl=spec.impl,
        model=spec.model,
        loss=spec.loss,
        batch=batch,
        precision=spec.precision,
        compile=spec.compile,
        samples_per_s=round(batch / dt, 1),
        step_ms=round(dt * 1e3, 2),
        gflop_per_sample=round(flops / batch / 1e9, 2),
        # three significant digits, not decimals: a CPU step (a few GFLOP/s) printed as 0.0 TFLOP/s, 0.0 MFU
        tflops=float(f"{tflops:.3g}"),
        mfu=None if peak is None else float(f"{tflops / peak:.3g}"),
        peak_mem_gib=None if peak_mem is None else round(peak_mem, 2),
        warmup_s=round(warm_s, 1),
        final_loss=round(last, 4),
        device=_device_name(device),
        note=" ".join(
            [
                *spec.overrides,
                *([f"mode={spec.compile_mode}"] if spec.compile and spec.compile_mode != "default" else []),
            ]
        ),
    )


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


STEP_COLUMNS = (
    "impl",
    "model",
    "loss",
    "batch",
    "compile",
    "samples_per_s",
    "tflops",
    "mfu",
    "peak_mem_gib",
    "warmup_s",
    "note",
)


def format_table(rows: list[dict[str, Any]], cols: Sequence[str] = STEP_COLUMNS) -> str:
    """``cols`` of ``rows`` as a table: a missing value blank, a None ``n/a``."""
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join("n/a" if r.get(c, "") is None else str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows: list[dict[str, Any]] = []
    peak = args.peak_tflops or peak_tflops(device)  # TFLOP/s; None: MFU n/a, not against a made-up peak
    name = _device_name(device)
    print(
        f"MFU against {peak:g} TFLOP/s ({name})"
        if peak
        else f"MFU n/a: no known peak for {name} (--peak-tflops sets one)",
        flush=True,
    )

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    def timed(
        name: str, batch: int, impl: str, loss_kind: str, comp: bool, overrides: list[str] | None = None
    ) -> StepResult:
        spec = StepSpec(
            impl,
            name,
            loss_kind,
            batch,
            device,
            args.precision,
            comp,
            tuple(overrides or ()),
            args.compile_mode,
        )
        r = bench_step(spec, args.steps, args.warmup, peak)
        emit({"kind": "step", **asdict(r)})
        _free(device)  # the next measurement's peak memory is its own
        return r

    for name, batch in args.models:
        # Every eager step first, the compiled ones last: a compile that overruns the caller's time
        # limit (about a minute for ViT-B/16 on one GPU) then costs only the compiled rows.
        plan = [(impl, loss_kind, False) for loss_kind in args.losses for impl in args.impls]
        if args.compile and "clipforge" in args.impls:
            plan += [("clipforge", loss_kind, True) for loss_kind in args.losses]
        speed: dict[tuple[str, str], float] = {}  # (loss, impl[+compile]) -> samples/s
        for impl, loss_kind, comp in plan:
            key = f"{impl}{'+compile' if comp else ''}"
            speed[loss_kind, key] = timed(name, batch, impl, loss_kind, comp).samples_per_s
            if impl == "clipforge" and (loss_kind, "open_clip") in speed:
                ratio = round(speed[loss_kind, key] / speed[loss_kind, "open_clip"], 3)
                emit({"kind": "ratio", "model": name, "loss": loss_kind, "impl": key, "vs_open_clip": ratio})
        for loss_kind in args.losses:
            for extra in args.token_reduction:  # one item may hold several overrides, space-separated
                timed(name, batch, "clipforge", loss_kind, args.compile, extra.split())
            if args.lightning:
                # the loop around the bare step measured above (compiled when --compile)
                mode = args.compile_mode if args.compile else None
                from clipforge.bench.loop import bench_lightning  # imports Lightning: only when asked

                lit = bench_lightning(
                    name, loss_kind, batch, device, args.precision, args.steps, args.warmup, mode
                )
                emit({"kind": "lightning", **lit})
                bare = speed.get((loss_kind, "clipforge+compile" if args.compile else "clipforge"))
                if bare:
                    ratio = round(lit["samples_per_s"] / bare, 3)
                    emit(
                        {
                            "kind": "ratio",
                            "model": name,
                            "loss": loss_kind,
                            "impl": "clipforge+lightning",
                            "vs_bare_step": ratio,
                        }
                    )
    print(format_table([r for r in rows if r["kind"] in ("step", "lightning")]), flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        nargs="+",
        type=model_batch,
        default=[("vit_b16", 256), ("vit_b32", 512)],
        help="conf/model name:batch",
    )
    ap.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    ap.add_argument(
        "--impls", nargs="+", default=["open_clip", "clipforge"], choices=["open_clip", "clipforge"]
    )
    add_device_args(ap)
    ap.add_argument("--compile", action="store_true", help="also time clipforge with torch.compile")
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode for --compile (reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--lightning", action="store_true", help="also time the full Lightning loop")
    ap.add_argument(
        "--token-reduction",
        nargs="*",
        default=[],
        help="extra clipforge runs with config overrides, e.g. model.vision.patch_dropout=0.5; "
        "several in one quoted item (space-separated) apply together",
    )
    ap.add_argument("--steps", type=positive_int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps before them")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak for MFU; default: clipforge.flops.PEAK_BF16_TFLOPS by CUDA device name "
        "(MFU n/a on the CPU or a device not in it)",
    )
    args = device_defaults(ap.parse_args(argv))
    if args.peak_tflops is not None and (not math.isfinite(args.peak_tflops) or args.peak_tflops <= 0):
        ap.error("--peak-tflops must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
