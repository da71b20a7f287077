"""Sharded (torch.distributed.checkpoint) checkpoint directories, as trainer/strategy=fsdp2 writes them,
built here in one process with DCP's no_dist mode: safe checks before anything loads them, auto-resume,
and consolidation into one clipforge checkpoint (``clipforge-consolidate``). FSDP2 training that writes
them on two processes is tests/launch/test_fsdp2.py (slow)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from clipforge.checkpoint import build_model, load_model
from clipforge.consolidate import consolidate_checkpoint, main
from clipforge.fault import CorruptCheckpointError, UnsafeCheckpointError, find_latest_checkpoint
from clipforge.fault.resume import resolve_ckpt_path
from clipforge.fault.sharded import is_sharded_checkpoint, verify_sharded_checkpoint
from runconf import towers

SMALL = (
    *towers(16, 1, 2),
    "model.text.vocab_size=100",
    "loss=siglip",  # a logit bias too: two scalars that FSDP2 stores as (1,)
)


@dataclass
class NotATensor:
    value: int = 1


@pytest.fixture
def config(compose_cfg) -> dict:
    return OmegaConf.to_container(compose_cfg(*SMALL), resolve=True)


def write_sharded(path: Path, config: dict, step: int = 3, extra: dict | None = None) -> dict:
    """A directory laid out like ModelParallelStrategy's save: DCP shards + index, then meta.pt."""
    model = build_model(config["model"], config["loss"])
    weights = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for name in ("model.logit_scale", "model.logit_bias"):
        weights[name] = weights[name].reshape(1)  # as FSDP2 keeps scalars
    state = {"state_dict": weights, "optimizer_0": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.98)}]}}
    dcp.save({**state, **(extra or {})}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": step, "epoch": 0, "loops": {}, "clipforge_config": config}, path / "meta.pt")
    return model.state_dict()


def test_consolidation_gives_the_model_its_weights_and_layout(tmp_path: Path, config: dict) -> None:
    src = tmp_path / "checkpoints" / "periodic-step0000003.ckpt"
    expected = write_sharded(src, config)
    assert is_sharded_checkpoint(src) and not is_sharded_checkpoint(tmp_path)
    ckpt = consolidate_checkpoint(src)
    assert ckpt["global_step"] == 3 and ckpt["clipforge_config"]["loss"]["_target_"].endswith("SigLipLoss")
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in expected}
    for k, v in expected.items():
        assert torch.equal(ckpt["state_dict"][f"model.{k}"], v), k  # scale and bias back to shape ()
    # The file clipforge-consolidate writes, and the directory itself, load as models.
    dst = tmp_path / "consolidated.ckpt"
    assert main([str(src), str(dst)]) == 0
    for path in (dst, src):
        model, _ = load_model(path)
        assert model.logit_scale.shape == () and torch.equal(model.logit_bias, expected["logit_bias"])
    assert set(torch.load(dst, weights_only=True)) >= {"state_dict", "clipforge_config", "global_step"}


def test_consolidate_command_fails_clearly(tmp_path: Path, config: dict, capsys) -> None:
    src = tmp_path / "sharded.ckpt"
    write_sharded(src, config)
    dst = tmp_path / "out.ckpt"
    dst.write_bytes(b"x")
    assert main([str(src), str(dst)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([str(src), str(dst), "--force"]) == 0
    assert main([str(dst), str(tmp_path / "again.ckpt")]) == 1
    assert "is not a sharded checkpoint directory: it is a file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # it used to say "no such directory" of a directory that is there
    assert main([str(tmp_path / "empty"), str(tmp_path / "again.ckpt")]) == 1
    assert "empty is not a sharded checkpoint directory: a directory without" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), str(tmp_path / "again.ckpt")]) == 1
    assert "nope is not a sharded checkpoint directory: no such directory" in capsys.readouterr().err
    config["model"]["vision"]["depth"] = 2  # the config no longer describes these weights
    torch.save({"global_step": 3, "loops": {}, "clipforge_config": config}, src / "meta.pt")
    with pytest.raises(ValueError, match=r"does not match its config's model: missing \['model.visual"):
        consolidate_checkpoint(src)


def test_auto_resume_takes_sharded_directories_and_skips_unfinished_ones(
    tmp_path: Path, config: dict
) -> None:
    ckpts = tmp_path / "checkpoints"
    write_sharded(ckpts / "periodic-step0000004.ckpt", config, step=4)
    write_sharded(ckpts / "periodic-step0000008.ckpt", config, step=8)
    (ckpts / "periodic-step0000008.ckpt" / "meta.pt").unlink()  # rank 0 never got to write it
    os.symlink("periodic-step0000008.ckpt", ckpts / "last.ckpt")
    with pytest.warns(UserWarning, match=r"periodic-step0000008.ckpt has no meta.pt"):
        assert find_latest_checkpoint(tmp_path) == ckpts / "periodic-step0000004.ckpt"
    assert resolve_ckpt_path(str(ckpts / "periodic-step0000004.ckpt"), tmp_path).endswith("0004.ckpt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or sharded checkpoint directory"):
        resolve_ckpt_path(str(tmp_path / "nope"), tmp_path)


def test_truncated_shard_is_corrupt(tmp_path: Path, config: dict) -> None:
    src = tmp_path / "s.ckpt"
    write_sharded(src, config)
    shard = next(src.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="missing or truncated"):
        verify_sharded_checkpoint(src)


class _Exploit:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_nothing_in_a_sharded_directory_runs_code(tmp_path: Path, config: dict) -> None:
    src = tmp_path / "s.ckpt"
    write_sharded(src, config)
    verify_sharded_checkpoint(src)
    marker = tmp_path / "pwned"
    good = (src / ".metadata").read_bytes()
    (src / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))  # DCP would pickle.load this
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"\.metadata refers to pathlib.Path.touch, which is not part of a DCP index",
    ):
        verify_sharded_checkpoint(src)
    with pytest.raises(UnsafeCheckpointError):
        load_model(src)
    (src / ".metadata").write_bytes(good)
    torch.save({"global_step": 3, "loops": {}, "payload": _Exploit(marker)}, src / "meta.pt")
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        verify_sharded_checkpoint(src)
    # A non-tensor item DCP would torch.load(weights_only=False): refused before that.
    other = tmp_path / "o.ckpt"
    write_sharded(other, config, extra={"extra": {"obj": NotATensor()}})
    with pytest.raises(UnsafeCheckpointError, match=r"item extra.obj needs arbitrary unpickling"):
        verify_sharded_checkpoint(other)
    assert not marker.exists()
