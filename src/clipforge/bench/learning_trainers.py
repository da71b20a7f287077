"""The two trainers of the learning-parity benchmark (:mod:`clipforge.bench.learning`) as a user runs
them: the recipe both are given, rounded to whole open_clip epochs; the subprocess commands of
``python -m clipforge.train`` and ``open_clip_train.main``; clipforge's tower shapes exported as an open_clip
model config; and the trained model each leaves behind, read back as clipforge's ``CLIP``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.bench.learning_data import Data


@dataclass(frozen=True)
class Recipe:
    """What both trainers are given."""

    model: str = "tiny"
    steps: int = 600
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup: int = 50
    grad_clip: float = 1.0
    workers: int = 1


def steps_per_epoch(data: Data, recipe: Recipe) -> int:
    spe = data.num_train // recipe.batch_size
    if spe < 1:
        raise ValueError(f"{data.num_train} training images are fewer than one batch of {recipe.batch_size}")
    return spe


def whole_epochs(data: Data, recipe: Recipe) -> tuple[int, int]:
    """``(epochs, steps)``: the requested steps rounded up to whole open_clip epochs."""
    spe = steps_per_epoch(data, recipe)
    epochs = math.ceil(recipe.steps / spe)
    return epochs, epochs * spe


def _thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_logged(cmd: list[str], log: Path, threads: int) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_thread_env(threads), check=False)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{cmd[:4]}... failed ({proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - start


def clipforge_command(
    run_dir: Path, data: Data, recipe: Recipe, loss: str, seed: int, overrides: Sequence[str] = ()
) -> list[str]:
    _, steps = whole_epochs(data, recipe)
    return [
        sys.executable,
        "-m",
        "clipforge.train",
        f"hydra.run.dir={run_dir}",
        f"model={recipe.model}",
        f"loss={loss}",
        "data=wds",
        f"data.train_urls='{data.train_shards}'",
        f"data.batch_size={recipe.batch_size}",
        f"data.num_workers={recipe.workers}",
        "data.stream.drop_last=true",
        f"optimizer.lr={recipe.lr}",
        f"optimizer.weight_decay={recipe.weight_decay}",
        f"scheduler.warmup_steps={recipe.warmup}",
        f"module.grad_clip_norm={recipe.grad_clip}",
        f"trainer.max_steps={steps}",
        "trainer.precision=32-true",
        f"seed={seed}",
        "logger=none",
        "final_eval=false",
        "~callbacks.similarity_heatmap",
        "~callbacks.attention_maps",
        *overrides,
    ]


# Registers the tower shapes under their file name in the trainer's own process, then runs it.
_OPEN_CLIP_MAIN = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)


def open_clip_command(
    run_dir: Path, data: Data, recipe: Recipe, loss: str, seed: int, model_json: Path
) -> list[str]:
    epochs, _ = whole_epochs(data, recipe)
    argv = [
        "--train-data", str(data.train_csv), "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", model_json.stem, "--batch-size", str(recipe.batch_size), "--epochs", str(epochs),
        "--lr", str(recipe.lr), "--wd", str(recipe.weight_decay), "--warmup", str(recipe.warmup),
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", str(recipe.grad_clip),
        "--workers", str(recipe.workers), "--precision", "fp32", "--device", "cpu", "--seed", str(seed),
        "--logs", str(run_dir), "--name", "run", "--save-frequency", "0", "--log-every-n-steps", "50",
        "--report-to", "",
    ]  # fmt: skip
    if loss == "siglip":
        argv.append("--siglip")
    return [sys.executable, "-c", _OPEN_CLIP_MAIN, str(model_json), *argv]


def export_tower_shapes(recipe: Recipe, out: Path) -> tuple[Path, dict[str, Any]]:
    """clipforge's ``model`` config as an open_clip model config file ``<out>/clipforge_<model>.json``."""
    from hydra import compose, initialize_config_dir

    from clipforge.checkpoint import build_model
    from clipforge.conf import CONF_DIR
    from clipforge.models.convert import open_clip_model_cfg

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={recipe.model}"])
    model_cfg = open_clip_model_cfg(build_model(cfg.model, cfg.loss))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"clipforge_{recipe.model}.json"  # not an open_clip built-in name
    path.write_text(json.dumps(model_cfg, indent=2))
    return path, model_cfg


def load_trained(trainer: str, run_dir: Path, model_cfg: dict[str, Any]) -> Any:
    """The trained model of either trainer as clipforge's ``CLIP`` (eval mode)."""
    import torch

    from clipforge.checkpoint import load_model
    from clipforge.models.convert.openclip import from_open_clip_state

    if trainer == "clipforge":
        return load_model(run_dir / "checkpoints" / "last.ckpt")[0]
    ckpts = sorted((run_dir / "run" / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem[6:]))
    if not ckpts:
        raise FileNotFoundError(f"open_clip_train wrote no checkpoint under {run_dir}/run/checkpoints")
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return from_open_clip_state(state, model_cfg, None).eval()
