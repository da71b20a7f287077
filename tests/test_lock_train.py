"""Locked-tower tuning (LiT) through `train(cfg)`: a locked tower's weights do not move, its unlocked groups
and the other tower do, and a resume cannot change what is locked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import load_model
from clipforge.train import train
from runconf import PERIODIC, SMALL


def test_lit_trains_the_text_tower_and_the_unlocked_projection_against_a_frozen_image_tower(
    compose_cfg, tmp_path: Path, caplog
) -> None:
    cfg = compose_cfg("trainer.max_steps=2", *SMALL, *PERIODIC)
    train(cfg)
    base = tmp_path / "base.ckpt"
    shutil.copy(Path(cfg.paths.output_dir) / "last.ckpt", base)
    before, _ = load_model(base)

    lit = compose_cfg(
        "trainer.max_steps=3",
        f"init_from={base}",
        "lock.vision=true",
        "lock.vision_unlocked_groups=1",
        *SMALL,
    )
    with caplog.at_level("INFO", logger="clipforge.train"):
        _, objs = train(lit)
    assert "locked (LiT): vision tower" in caplog.text and "(its last 1 groups train)" in caplog.text
    assert "stay at their random initialisation" not in caplog.text  # init_from loaded them
    after = objs["module"].model.cpu()
    for name, p in before.visual.named_parameters():
        moved = not torch.equal(p, after.visual.get_parameter(name))
        assert moved == name.startswith("proj."), name
    assert all(not torch.equal(p, after.text.get_parameter(n)) for n, p in before.text.named_parameters())
    optimized = {id(p) for g in objs["trainer"].optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in after.parameters() if p.requires_grad}


def test_a_resume_keeps_the_lock_of_its_checkpoint(compose_cfg, caplog) -> None:
    locked = ("lock.text=true", *SMALL, *PERIODIC)
    with caplog.at_level("WARNING", logger="clipforge.train"):
        cfg = compose_cfg("trainer.max_steps=2", *locked)
        train(cfg)
    assert "stay at their random initialisation" in caplog.text  # nothing loaded the locked tower
    last = Path(cfg.paths.output_dir) / "last.ckpt"
    _, objs = train(compose_cfg("trainer.max_steps=4", f"ckpt_path={last}", *locked))
    assert objs["trainer"].global_step == 4
    with pytest.raises(ValueError, match=r"other towers locked \(lock.text: checkpoint True, config False\)"):
        train(compose_cfg("trainer.max_steps=6", f"ckpt_path={last}", *SMALL))


@pytest.mark.slow  # ~1 min each: two processes; the lock's single-process runs are the default tests above
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_locked_tower_stays_put_on_two_processes(tmp_path: Path, strategy: str) -> None:
    """DDP reduces only the gradients of trainable parameters; FSDP2 shards them as DTensors, which must keep
    ``requires_grad=False`` or the optimizer would move them."""
    import lightning as L
    from omegaconf import OmegaConf

    from clipforge.checkpoint import build_model
    from clipforge.consolidate import save_consolidated

    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "clipforge.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "trainer.max_steps=3", "scheduler.warmup_steps=1", "logger=csv",
        "final_eval=false", "data.source.num_train=64", "data.source.num_heldout=32",
        "data.source.samples_per_shard=32", "data.batch_size=16", "data.num_workers=0",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}", "lock.vision=true",
        "lock.vision_unlocked_groups=1", *(["trainer/strategy=fsdp2"] if strategy == "fsdp2" else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    last = run / "checkpoints" / "last.ckpt"
    if last.is_dir():  # FSDP2's sharded folder
        save_consolidated(last, tmp_path / "one.ckpt")
        last = tmp_path / "one.ckpt"
    model, cfg = load_model(last)
    L.seed_everything(0)  # as train(): nothing it builds before the model draws from the generators
    fresh = build_model(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["loss"]))
    for name, p in model.visual.named_parameters():
        assert torch.equal(p, fresh.visual.get_parameter(name)) != name.startswith("proj."), name
    assert not torch.equal(model.text.token_embedding.weight, fresh.text.token_embedding.weight)
