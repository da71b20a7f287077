"""What a contrastive run writes to Weights & Biases, read back from the offline run directory: the run's
name/group/tags and resolved config, every training metric, the evaluation metrics, the pictures (files
under ``files/media/images``) and, as an option, checkpoints as artifacts.

wandb 0.31 has no Python reader for ``run-<id>.wandb`` (wandb-core writes it), so ``read_wandb_records``
undoes its framing, LevelDB's log format (32 KiB blocks of CRC-checked chunks after a 7-byte ``:W&B``
header), and parses each record with wandb's own protobuf, ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from clipforge.conf import CONF_DIR
from omegaconf import OmegaConf, open_dict
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from clipforge.callbacks import DataSkipMonitor, ThroughputMonitor
from clipforge.callbacks.similarity import render_heatmap, similarity_logits
from clipforge.data.shards import CAUSES
from clipforge.train import train

BLOCK, HEADER, CHUNK_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def read_wandb_run(run_dir: Path, timeout_s: float = 60.0) -> dict:
    """{run, config, history (one dict per logged row), artifacts} of an offline run directory.

    wandb-core may still be appending to the log when ``finish()`` returns, so this waits until the
    run's final ``exit`` record is there.
    """
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{log} has no exit record after {timeout_s:.0f} s"
        time.sleep(0.5)
    out = {"run": None, "config": {}, "history": [], "artifacts": []}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
    return out


STEPS = 4
RUN = (
    "loss=siglip",  # SigLIP also has the logit bias
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=2",
    "final_eval=false",
    "data.source.num_train=128",
    "data.source.num_heldout=32",
    "data.source.samples_per_shard=64",
    "data.batch_size=16",
    "data.num_workers=0",
    "callbacks.similarity_heatmap.every_n_steps=2",
    "callbacks.attention_maps.every_n_steps=2",
    "callbacks.throughput.peak_flops=1e11",  # MFU on the CPU too, against a made-up peak
    "logger.name=wandb-test",
    "logger.group=tests",
    "tags=[tiny,cpu]",
    # Checkpoints as artifacts: Lightning refuses log_model with offline=true, so the test keeps W&B offline
    # through WANDB_MODE instead, as a user checking the option without a network would.
    "logger.offline=false",
    "logger.log_model=all",
)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),  # artifact staging
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
    }.items():
        monkeypatch.setenv(var, value)
    yield
    import wandb

    wandb.finish()  # a run left open would be reused by the next WandbLogger in this process


def test_offline_run_has_metrics_pictures_config_and_artifacts(compose_cfg, tmp_path, wandb_env) -> None:
    cfg = compose_cfg(*RUN)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")  # small private shards
        zeroshot = OmegaConf.load(CONF_DIR / "callbacks" / "zeroshot.yaml")["zeroshot"]
        zeroshot.every_n_steps, zeroshot.every_n_epochs = STEPS, None
        cfg.callbacks["zeroshot"] = zeroshot
    _, objs = train(cfg)
    objs["logger"].experiment.finish()  # flush and close the transaction log

    (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    run = read_wandb_run(run_dir)

    # The run as configured, and the resolved Hydra config saved with it.
    assert (run["run"].project, run["run"].display_name, run["run"].run_group) == (
        "clipforge",
        "wandb-test",
        "tests",
    )
    assert list(run["run"].tags) == ["tiny", "cpu"]
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run["config"].items()}
    assert config["loss"]["_target_"] == "clipforge.losses.SigLipLoss"
    assert config["data"]["augment"]["image_size"] == config["model"]["vision"]["img_size"] == 32  # resolved
    assert config["module"]["accum_freq"] == 1 and config["trainer"]["max_steps"] == STEPS

    # Scalars: every key on every logged step, with values that make sense.
    rows = [r for r in run["history"] if "train/loss" in r]
    assert [r["trainer/global_step"] for r in rows] == list(range(STEPS))
    per_step = ["loss", "lr", "logit_scale", "logit_bias", "image_feature_norm", "text_feature_norm"]
    per_step += [f"logit_{kind}_{s}" for kind in ("pos", "neg") for s in ("mean", "min", "max")]
    for row in rows:
        for key in per_step:
            assert math.isfinite(row[f"train/{key}"]), key
        for kind in ("pos", "neg"):
            assert (
                row[f"train/logit_{kind}_min"]
                <= row[f"train/logit_{kind}_mean"]
                <= row[f"train/logit_{kind}_max"]
            )
        assert 5 < row["train/logit_scale"] < 20 and -11 < row["train/logit_bias"] < -9  # SigLIP's init
        assert {f"data/skipped_{c}" for c in CAUSES} <= row.keys()
        assert all(row[f"data/skipped_{c}"] == 0 for c in CAUSES)  # nothing is broken in synthetic shards
    timed = [r for r in rows if "train/samples_per_s" in r]  # from the second step on
    assert len(timed) == STEPS - 1
    throughput = next(cb for cb in objs["trainer"].callbacks if isinstance(cb, ThroughputMonitor))
    for row in timed:
        want = throughput.flops_per_sample * row["train/samples_per_s"] / 1e11
        assert row["train/samples_per_s"] > 0 and row["train/mfu"] == pytest.approx(want)

    # Evaluation metrics from the zero-shot callback.
    evals = [r for r in run["history"] if "val/zeroshot_top1" in r]
    assert len(evals) == 1 and 0 <= evals[0]["val/zeroshot_top1"] <= evals[0]["val/zeroshot_top5"] <= 1

    # Pictures: the similarity heatmap every 2 steps and the attention maps, as PNG files of the run.
    pictures, picture_steps = {}, {}
    for row in run["history"]:
        for key, value in row.items():
            if key.endswith("/filenames"):
                pictures.setdefault(key.removesuffix("/filenames"), []).extend(value)
                picture_steps.setdefault(key.removesuffix("/filenames"), []).append(
                    row["trainer/global_step"]
                )
    assert len(pictures["train/similarity"]) == STEPS // 2
    # One step axis that never goes back: each picture in the row of the scalars of its moment, the heatmap
    # of the batches of optimizer steps 2 and 4 with their train/loss, the confusion matrix with val/zeroshot_*.
    steps = [r["trainer/global_step"] for r in run["history"]]
    assert steps == sorted(steps), steps
    assert picture_steps["train/similarity"] == [
        rows[1]["trainer/global_step"],
        rows[3]["trainer/global_step"],
    ]
    assert picture_steps["viz/attention_heads"] == picture_steps["train/similarity"]
    assert picture_steps["val/zeroshot_confusion"] == [evals[0]["trainer/global_step"]]
    assert {"viz/patch_grid", "viz/attention_heads", "viz/attention_rollout"} <= pictures.keys()
    for name in pictures["train/similarity"] + pictures["viz/attention_heads"]:
        with Image.open(run_dir / "files" / name) as im:
            assert im.format == "PNG" and min(im.size) >= 100 and len(set(im.convert("L").getdata())) > 10

    # Checkpoints as model artifacts (logger.log_model).
    assert any(
        a.type == "model" and [e.path for e in a.manifest.contents] == ["model.ckpt"]
        for a in run["artifacts"]
    )


def test_resumed_run_logs_into_the_checkpoints_wandb_run(compose_cfg, wandb_env) -> None:
    quick = ("~callbacks.attention_maps", "~callbacks.similarity_heatmap", "~callbacks.zeroshot")
    quick += ("~callbacks.retrieval", "final_eval=false", "trainer.log_every_n_steps=1", "logger=wandb")
    quick += tuple(o for o in RUN if o.startswith("data."))
    train(compose_cfg(*quick, "trainer.max_steps=2"))
    cfg = compose_cfg(*quick, "trainer.max_steps=4", "ckpt_path=auto")  # the same output dir
    train(cfg)

    first, second = sorted((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    before, after = read_wandb_run(first), read_wandb_run(second)
    assert after["run"].run_id == before["run"].run_id  # one W&B run (`wandb sync` of both dirs joins them)
    steps = [
        [r["trainer/global_step"] for r in run["history"] if "train/loss" in r] for run in (before, after)
    ]
    assert steps == [[0, 1], [2, 3]]  # and its step goes on from the checkpoint's


# -- the callbacks on their own ----------------------------------------------------------------------------
def test_similarity_logits_and_heatmap() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    logits = similarity_logits(x, y, torch.tensor(10.0), torch.tensor(-10.0), max_samples=32)
    assert logits.shape == (32, 32)
    torch.testing.assert_close(logits[3, 5], 10 * x[3] @ y[5] - 10)
    picture = render_heatmap(logits, "test")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.std() > 10  # not a blank canvas


class _SkippingData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        images, tokens = torch.randn(8, 3, 16, 16), torch.randint(1, 63, (8, 8))
        tokens[:, -1] = 63
        return DataLoader(TensorDataset(images, tokens), batch_size=4)

    def skip_counts(self) -> dict[str, int]:
        return {"corrupt_image": 3, "missing_caption": 0}


def test_data_skip_counters_are_logged() -> None:
    import functools

    from clipforge.losses import ClipLoss
    from clipforge.models.clip import CLIP
    from clipforge.models.text import TextTransformer
    from clipforge.models.vision import VisionTransformer
    from clipforge.module import ContrastiveModule

    model = CLIP(
        VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, output_dim=8),
        TextTransformer(vocab_size=64, context_length=8, embed_dim=16, depth=1, num_heads=2, output_dim=8),
    )
    module = ContrastiveModule(model, ClipLoss(), functools.partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=[DataSkipMonitor()],
    )  # fmt: skip
    trainer.fit(module, datamodule=_SkippingData())
    assert trainer.callback_metrics["data/skipped_corrupt_image"] == 3
    assert trainer.callback_metrics["data/skipped_missing_caption"] == 0
