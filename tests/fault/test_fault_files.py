"""Checkpoint files: atomic writes, auto-resume's choice, refusal of unsafe pickles, secret scrubbing."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import time
import warnings
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import load_checkpoint
from clipforge.fault import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    find_latest_checkpoint,
    resolve_ckpt_path,
    safe_torch_load,
    scrub_secrets,
    verify_checkpoint,
)


def fake_ckpt(step: int, size: int = 256) -> dict:
    """The keys a Lightning checkpoint has that resuming relies on."""
    g = torch.Generator().manual_seed(step)
    return {
        "global_step": step,
        "epoch": 0,
        "state_dict": {"w": torch.randn(size, generator=g)},
        "loops": {},
        "optimizer_states": [],
    }


class Boom(Exception):
    pass


def test_atomic_save_interrupted_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save(fake_ckpt(1), path)

    def hook(written: int) -> None:
        if written > 4096:
            raise Boom  # a write error (disk full) half-way through the tensor records

    with pytest.raises((Boom, RuntimeError)):  # torch's zip writer may re-raise it as a RuntimeError
        atomic_torch_save(fake_ckpt(2, size=100_000), path, write_hook=hook)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial temp file is gone


def test_a_full_disk_is_named_as_such_and_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    path = tmp_path / "last.ckpt"
    atomic_torch_save(fake_ckpt(1), path)

    def hook(written: int) -> None:
        if written > 4096:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1024))
    with pytest.raises(OSError, match=r"last.ckpt: the disk is \(nearly\) full, 0 MiB free") as info:
        atomic_torch_save(fake_ckpt(2, size=100_000), path, write_hook=hook)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_roundtrip_is_complete(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    ckpt = fake_ckpt(3)
    io.save_checkpoint(ckpt, tmp_path / "sub" / "a.ckpt")
    back = io.load_checkpoint(tmp_path / "sub" / "a.ckpt")
    assert back["global_step"] == 3 and torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])


def test_auto_resume_picks_the_highest_step_and_skips_corrupt_files(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        atomic_torch_save(fake_ckpt(step), ckpts / f"periodic-step{step:07d}.ckpt")
    os.symlink("periodic-step0000012.ckpt", ckpts / "last.ckpt")
    assert find_latest_checkpoint(tmp_path) == ckpts / "periodic-step0000012.ckpt"

    newest = ckpts / "periodic-step0000012.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, e.g. a full disk
    (ckpts / "periodic-step0000016.ckpt.tmp").write_bytes(b"partial")  # a save killed before its rename
    with pytest.warns(UserWarning, match=r"periodic-step0000012\.ckpt"):
        found = find_latest_checkpoint(tmp_path)
    assert found == ckpts / "periodic-step0000008.ckpt"
    assert resolve_ckpt_path("auto", tmp_path) == str(found)


def test_auto_resume_removes_the_partial_file_of_an_interrupted_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A save killed before its rename leaves <name>.ckpt.tmp: never resumed from, and as large as a checkpoint.
    # One older than a save could still be writing goes; a fresh one may be a live save (another process in
    # this directory) and stays, named.
    ckpts = tmp_path / "checkpoints"
    atomic_torch_save(fake_ckpt(4), ckpts / "periodic-step0000004.ckpt")
    stale, fresh = ckpts / "periodic-step0000008.ckpt.tmp", ckpts / "preempt-step0000009.ckpt.tmp"
    stale.write_bytes(b"partial" * 1000)
    fresh.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    with caplog.at_level("INFO", logger="clipforge.fault.resume"):
        assert find_latest_checkpoint(tmp_path) == ckpts / "periodic-step0000004.ckpt"
    assert not stale.exists() and fresh.exists()
    assert f"removed {stale}" in caplog.text and "interrupted" in caplog.text
    assert f"left {fresh}" in caplog.text


@pytest.mark.parametrize(
    "garbage",
    [b"hello\n", b"Q\xd2\xd5\x08(", b"X", b""],
    ids=["text: KeyError", "pop from empty stack: IndexError", "short argument: struct.error", "empty"],
)
def test_auto_resume_skips_a_file_of_garbage_whatever_the_unpickler_trips_on(
    tmp_path: Path, garbage: bytes
) -> None:
    # Not a zip, so torch.load reads it as a legacy pickle, and the restricted unpickler fails with
    # whatever exception the first opcodes cause; every one of them is "not a checkpoint".
    ckpts = tmp_path / "checkpoints"
    atomic_torch_save(fake_ckpt(4), ckpts / "periodic-step0000004.ckpt")
    _write(ckpts / "periodic-step0000008.ckpt", garbage)
    with pytest.warns(UserWarning, match=r"skips .*periodic-step0000008\.ckpt: .*not a readable torch"):
        assert find_latest_checkpoint(tmp_path) == ckpts / "periodic-step0000004.ckpt"
    with pytest.raises(CorruptCheckpointError, match=r"periodic-step0000008\.ckpt") as info:
        load_checkpoint(ckpts / "periodic-step0000008.ckpt")
    assert garbage or "the file is empty" in str(info.value)


def test_auto_resume_on_an_empty_dir_starts_fresh(tmp_path: Path) -> None:
    assert resolve_ckpt_path("auto", tmp_path / "missing") is None
    assert resolve_ckpt_path("auto", tmp_path) is None
    assert resolve_ckpt_path(None, tmp_path) is None


def test_auto_resume_refuses_to_start_over_when_every_checkpoint_is_bad(tmp_path: Path) -> None:
    _write(tmp_path / "last.ckpt", b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="none of the 1 checkpoints"):
        resolve_ckpt_path("auto", tmp_path)


def test_explicit_path_must_exist_and_be_resumable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        resolve_ckpt_path(tmp_path / "nope.ckpt", tmp_path)
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, weights)
    with pytest.raises(CorruptCheckpointError, match="weights-only export"):
        resolve_ckpt_path(weights, tmp_path)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        verify_checkpoint(_write(tmp_path / "junk.ckpt", b"not a zip file at all"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    ckpt = fake_ckpt(100)
    ckpt["loops"] = {"evil": Payload(marker)}
    torch.save(ckpt, path)
    # The payload is live: a full unpickle of the same kind of file does run it.
    probe = marker.with_name("probe")
    torch.save({"x": Payload(probe)}, marker.with_name("probe.pt"))
    torch.load(marker.with_name("probe.pt"), weights_only=False)
    assert probe.exists()
    return path


def test_malicious_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    bad = malicious_checkpoint(tmp_path / "checkpoints" / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="would execute arbitrary code"):
        resolve_ckpt_path(bad, tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(bad)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(bad)
    # auto-resume skips it (with a warning) and falls back to the older, safe checkpoint
    atomic_torch_save(fake_ckpt(50), tmp_path / "checkpoints" / "ok.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "ok.ckpt"
    assert any("evil.ckpt" in str(w.message) and "arbitrary code" in str(w.message) for w in caught)
    assert not marker.exists()


def test_unsafe_error_is_an_unpickling_error() -> None:
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)


def test_scrub_secrets_masks_credentials_but_keeps_model_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    cfg = {
        "logger": {"api_key": "sk-live-123", "project": "clipforge", "settings": {"token": "hf_abc"}},
        "env": {"copied": "0123456789abcdef0123456789abcdef01234567"},  # secret under an innocent key
        "model": {"eot_token": 49407, "vocab_size": 49408, "tokens": "keep-me", "password": ""},
        "list": [{"secret": "x"}, "plain"],
        "aws_secret_access_key": "AKIA",
    }
    out = scrub_secrets(cfg)
    assert out["logger"] == {"api_key": "***", "project": "clipforge", "settings": {"token": "***"}}
    assert out["env"]["copied"] == "***"
    assert out["model"] == cfg["model"]  # ints, a plural "tokens" and empty strings are not secrets
    assert out["list"] == [{"secret": "***"}, "plain"]
    assert out["aws_secret_access_key"] == "***"
    assert cfg["logger"]["api_key"] == "sk-live-123"  # the input is not modified


def test_bytes_that_are_no_checkpoint_are_not_met_with_advice_to_unpickle_them(tmp_path: Path) -> None:
    # torch's message around the unpickler's detail says weights_only=False "will likely succeed", which
    # for random bytes is untrue, and asks the user to file a torch issue
    path = tmp_path / "noise.ckpt"
    path.write_bytes(bytes(range(256)) * 12)
    with pytest.raises(CorruptCheckpointError, match="not a readable torch checkpoint") as info:
        safe_torch_load(path)
    assert "weights_only" not in str(info.value) and "file an issue" not in str(info.value)
