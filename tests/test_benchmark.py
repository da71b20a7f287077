"""The throughput benchmark runs end to end on CPU (tiny model), and the optimised step computes the
same thing as the plain one."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from clipforge.bench.step import compose_model_cfg, make_step, parse_args, run
from clipforge.checkpoint import build_model
from clipforge.flops import peak_tflops


def test_benchmark_smoke_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--models", "tiny:4", "--device", "cpu", "--steps", "1", "--warmup", "1", "--lightning"]
    rows = run(parse_args([*argv, "--losses", "clip", "siglip"]))
    assert {r["loss"] for r in rows if r["kind"] == "step"} == {"clip", "siglip"}
    steps = {r["impl"]: r for r in rows if r["kind"] == "step" and r["loss"] == "siglip"}
    assert set(steps) == {"open_clip", "clipforge"}
    for r in steps.values():
        assert r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0
        # figures to three significant digits: a CPU step's few GFLOP/s used to round to 0.0 TFLOP/s
        assert r["tflops"] > 0
        assert r["mfu"] is None  # no peak for a CPU: not an MFU against an H100's
        expected = r["gflop_per_sample"] * r["samples_per_s"] / 1e3
        assert r["tflops"] == pytest.approx(expected, rel=0.05)
    # Same architecture on both sides: the FLOP counts agree to a few percent.
    a, b = steps["open_clip"]["gflop_per_sample"], steps["clipforge"]["gflop_per_sample"]
    assert abs(a - b) / a < 0.05
    assert any(r["kind"] == "ratio" for r in rows)
    assert any(r["kind"] == "lightning" and r["samples_per_s"] > 0 for r in rows)
    assert any(r["kind"] == "ratio" and r.get("vs_bare_step", 0) > 0 for r in rows)
    out = capsys.readouterr().out
    assert "samples_per_s" in out and "MFU n/a: no known peak for cpu" in out
    table = out[out.index("impl | model") :].splitlines()
    mfus = [line.split(" | ")[7] for line in table[2:] if line.split(" | ")[0] in ("open_clip", "clipforge")]
    assert len(mfus) == 4 and set(mfus) == {"n/a"}


def test_benchmark_mfu_against_peak_tflops_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--models", "tiny:2", "--device", "cpu", "--steps", "1", "--warmup", "0", "--losses", "clip"]
    rows = run(parse_args([*argv, "--impls", "clipforge", "--peak-tflops", "0.002"]))
    (r,) = [r for r in rows if r["kind"] == "step"]
    assert r["mfu"] == pytest.approx(r["tflops"] / 0.002, rel=0.01)
    assert "MFU against 0.002 TFLOP/s (cpu)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args([*argv, "--peak-tflops", "0"])


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_tflops_by_device_name(name: str, tflops: float | None) -> None:
    assert peak_tflops(name) == tflops


def test_peak_tflops_of_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops(torch.device("cuda", 0)) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda")) is None


def _two_steps(fused_attn: bool, foreach: bool, precision: str, loss: str = "clip") -> tuple[list, list]:
    torch.manual_seed(0)
    cfg = compose_model_cfg("tiny", loss)
    model = build_model(cfg.model, cfg.loss)
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused_attn
    loss_fn = instantiate(cfg.loss)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, cfg.model.vision.img_size, cfg.model.vision.img_size, generator=g)
    tokens = torch.randint(1, 49407, (6, cfg.model.text.context_length), generator=g)
    tokens[:, -1] = 49407
    step = make_step(
        model,
        loss_fn,
        torch.device("cpu"),
        precision,
        compile_=False,
        optim_impl="foreach" if foreach else "loop",
    )
    losses = [step(images, tokens).float() for _ in range(2)]
    return losses, [p.detach().clone() for p in model.parameters()]


def test_fused_attention_step_equals_math_step() -> None:
    """SDPA + foreach AdamW against explicit-softmax attention + the per-parameter AdamW loop."""
    l1, p1 = _two_steps(fused_attn=True, foreach=True, precision="fp32")
    l2, p2 = _two_steps(fused_attn=False, foreach=False, precision="fp32")
    for a, b in zip(l1, l2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Adam divides by sqrt(v) + eps: where a gradient is near eps (1e-6), its float32 twin from the other
    # attention kernel can move the weight by a sizeable part of lr (1e-4), even in the other direction.
    # So: nearly every weight agrees to float precision, and none is further apart than Adam can move two
    # weights in two steps (2 steps x 2 x lr).
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(p1, p2, strict=True)])
    assert (diff > 1e-6).float().mean().item() < 1e-3
    assert diff.max().item() <= 2 * 2 * 1e-4


def test_fused_attention_gradients_equal_math_gradients() -> None:
    grads = []
    for fused in (True, False):
        torch.manual_seed(0)
        cfg = compose_model_cfg("tiny", "siglip")
        model = build_model(cfg.model, cfg.loss)
        for m in model.modules():
            if hasattr(m, "fused"):
                m.fused = fused
        g = torch.Generator().manual_seed(1)
        images = torch.randn(6, 3, cfg.model.vision.img_size, cfg.model.vision.img_size, generator=g)
        tokens = torch.randint(1, 49407, (6, cfg.model.text.context_length), generator=g)
        out = model(images, tokens)
        instantiate(cfg.loss)(**out).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_bf16_step_tracks_fp32(loss: str) -> None:
    l32, _ = _two_steps(True, True, "fp32", loss)
    l16, _ = _two_steps(True, True, "bf16", loss)
    for a, b in zip(l32, l16, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_compiled_step_equals_eager(loss: str) -> None:
    """torch.compile of towers + loss: same loss and gradients as eager, and the same AdamW step."""
    cfg = compose_model_cfg("tiny", loss)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, cfg.model.vision.img_size, cfg.model.vision.img_size, generator=g)
    tokens = torch.randint(1, 49407, (4, cfg.model.text.context_length), generator=g)
    tokens[:, -1] = 49407
    losses, grads, stepped = [], [], []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.loss)
        loss_fn = instantiate(cfg.loss)

        def forward_loss(x, t, model=model, loss_fn=loss_fn):
            return loss_fn(**model(x, t))

        fn = torch.compile(forward_loss) if compile_ else forward_loss
        value = fn(images, tokens)
        value.backward()
        losses.append(value.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.loss)
        step = make_step(model, instantiate(cfg.loss), torch.device("cpu"), "fp32", compile_)
        step(images, tokens)
        stepped.append([p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    # The compiled kernels sum in another order. An element's float32 error scales with the terms summed
    # into it, not with the element (a position-embedding gradient sums the whole batch), so each gradient
    # tensor is compared as a whole: within 1e-4 of its own norm.
    for a, b in zip(*grads, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-8
    # Adam's first step moves a weight by lr * g / (|g| + eps): where a gradient is near eps (1e-6), its
    # float32 twin can move the weight by a sizeable part of lr (1e-4), even the other way. So nearly every
    # weight agrees to float precision, and none is further apart than two opposite steps (2 x lr).
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(*stepped, strict=True)])
    assert (diff > 1e-6).float().mean().item() < 1e-3
    assert diff.max().item() <= 2 * 1e-4


def test_one_command_dispatches_every_benchmark(capsys) -> None:
    import pytest

    from clipforge.bench.cli import BENCHMARKS, main

    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"clipforge-benchmark {name}" in out for name in BENCHMARKS if name != "step")
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])  # each parses its own arguments
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bench", "argv", "named"),
    [
        ("step", ["--models", "tiny"], "'tiny': expected conf/model name:batch"),
        ("step", ["--models", "tiny:0"], "'tiny:0': expected conf/model name:batch"),
        (
            "step",
            ["--models", "nope:8"],
            "unknown model 'nope': conf/model has siglip_b16, siglip_so400m, tiny",
        ),
        ("step", ["--models", "tiny:4", "--steps", "0"], "--steps: expected a positive integer"),
        ("step", ["--models", "tiny:4", "--warmup", "-1"], "--warmup: expected an integer >= 0"),
        ("profile", ["--model", "tiny:-1"], "'tiny:-1': expected conf/model name:batch"),
        ("loss", ["--batches", "64", "-4"], "--batches: expected a positive integer, got '-4'"),
        ("loss", ["--repeats", "0"], "--repeats: expected a positive integer"),
        ("loader", ["--num-samples", "0"], "--num-samples: expected a positive integer"),
        ("learning", ["--steps", "0"], "--steps: expected a positive integer"),
        ("init", ["--batch-size", "-8"], "--batch-size: expected a positive integer"),
        ("siglip2", ["--steps", "-1"], "--steps: expected a positive integer"),
        # torch's "Expected one of cpu, cuda, ... device type" / "Found no NVIDIA driver", with a traceback
        ("step", ["--models", "tiny:4", "--device", "gpu"], "--device: device='gpu' is not a device"),
        ("memory", ["--device", "gpu"], "--device: device='gpu' is not a device"),
        ("loss", ["--device", "cuda:64"], "--device: device='cuda:64' asks for a CUDA GPU, but torch sees"),
    ],
)
def test_bad_settings_are_named_before_anything_runs(bench: str, argv: list[str], named: str, capsys) -> None:
    # They used to fail deep inside with an IndexError, a ZeroDivisionError, a StatisticsError or a
    # negative tensor dimension, after models were built.
    from clipforge.bench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([bench, *argv, "--device", "cpu"] if bench in ("step", "profile", "loss") else [bench, *argv])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("text", ["²", "2.5", "x", "", "0", "-3"])
def test_count_arguments_are_checked_as_config_settings_are(text: str) -> None:
    """The benchmarks' counts are checked by check_at_least, the check of config settings: "²" passed
    str.isdigit and then failed int() with a bare ValueError instead of the argument's message."""
    import argparse

    from clipforge.bench.args import non_negative_int, positive_int

    with pytest.raises(argparse.ArgumentTypeError, match=rf"expected a positive integer, got '{text}'"):
        positive_int(text)
    if text != "0":
        with pytest.raises(argparse.ArgumentTypeError, match=rf"expected an integer >= 0, got '{text}'"):
            non_negative_int(text)
    assert positive_int("12") == 12 and non_negative_int("0") == 0


@pytest.mark.slow  # ~30 s: four models; the step benchmark's smoke test is in the default run
def test_memory_benchmark_measures_each_implementation_with_and_without_grad_checkpointing(capsys) -> None:
    from clipforge.bench.memory import parse_args as memory_args
    from clipforge.bench.memory import run as memory_run

    argv = ["--models", "tiny:4", "--device", "cpu", "--steps", "1", "--warmup", "1"]
    rows = memory_run(memory_args([*argv, "--impls", "clipforge", "open_clip"]))
    assert [(r["impl"], r["grad_checkpointing"]) for r in rows] == [
        ("clipforge", False),
        ("clipforge", True),
        ("open_clip", False),
        ("open_clip", True),
    ]
    for plain, ckpt in (rows[:2], rows[2:]):
        assert plain["peak_gib"] > 0.1 and plain["step_ms"] > 0  # a resident set of a process with torch
        assert ckpt["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-4)  # the same step, recomputed
        assert ckpt["peak_x_plain"] == pytest.approx(ckpt["peak_gib"] / plain["peak_gib"], abs=2e-3)
    out = capsys.readouterr().out
    assert "grad_checkpointing | peak_gib" in out
    assert "open_clip tiny:4 clip, grad_checkpointing on: 1 warm-up + 1 timed steps in a fresh process" in out
