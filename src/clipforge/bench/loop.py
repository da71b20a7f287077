"""The whole Lightning training loop (ContrastiveModule + Trainer, with its per-step logging) timed on an
in-memory batch, to compare with the bare step of :mod:`clipforge.bench.step` (the goal: within 5%).
CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) losses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from hydra.utils import instantiate

from clipforge.bench.step import _sync, compose_model_cfg
from clipforge.checkpoint import build_model
from clipforge.compilation import compile_in_place


def bench_lightning(
    model_name: str,
    loss_kind: str,
    batch: int,
    device: torch.device,
    precision: str,
    steps: int,
    warmup: int,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """samples/s of the full Lightning loop (ContrastiveModule + Trainer, with its per-step logging) on an
    in-memory batch; ``compile_mode`` compiles the towers and the loss in place as ``clipforge-train
    compile=...`` does (None: eager)."""
    import lightning as L

    from clipforge.module import ContrastiveModule

    cfg = compose_model_cfg(model_name, loss_kind)
    model = build_model(cfg.model, cfg.loss)
    img_size, ctx = cfg.model.vision.img_size, cfg.model.text.context_length
    images = torch.randn(batch, 3, img_size, img_size)
    tokens = torch.randint(1, 49407, (batch, ctx))
    tokens[:, -1] = 49407

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                yield images, tokens

    fused = device.type == "cuda"
    opt = instantiate(cfg.optimizer, fused=fused) if fused else instantiate(cfg.optimizer)
    loss = instantiate(cfg.loss)
    if compile_mode is not None:
        compile_in_place(model, loss, compile_mode)
    module = ContrastiveModule(model, loss, opt, None)
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            _sync(device)
            times.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_steps=warmup + steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
        log_every_n_steps=50,
    )
    loader = torch.utils.data.DataLoader(Repeat(), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    dt = (times[-1] - times[warmup]) / (len(times) - 1 - warmup)
    return {
        "impl": "clipforge+lightning",
        "model": model_name,
        "loss": loss_kind,
        "batch": batch,
        "precision": precision,
        "compile": compile_mode is not None,
        "samples_per_s": round(batch / dt, 1),
        "step_ms": round(dt * 1e3, 2),
    }
