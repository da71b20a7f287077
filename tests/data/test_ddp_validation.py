"""Validation and the in-training zero-shot / retrieval evaluations under two real gloo ranks: each rank
encodes only its block of the held-out batches (uneven: 13 samples in batches of 3, so one rank holds a
batch more and takes one padding step), and every rank ends with the one-process numbers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datahelpers import pattern, write_sizes

from clipforge.data.config import Augment, ZeroShotSet
from clipforge.data.datamodule import WebDataModule
from clipforge.data.manifest import MANIFEST_NAME, SIZES_NAME
from clipforge.data.tokenizer import Tokenizer
from clipforge.distributed import is_padding
from clipforge.eval.distributed import shard_dataloader
from clipforge.eval.retrieval import evaluate_retrieval
from clipforge.eval.zeroshot import zero_shot_eval
from clipforge.losses import ClipLoss
from clipforge.models.clip import CLIP
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer
from clipforge.module import ContrastiveModule
from gloohelpers import free_port, init_gloo

SIZES = [7, 6]  # 13 held-out samples: batches of 3 -> 5 batches, 3 on rank 0 and 2 on rank 1
CLASSNAMES = ["zero", "one", "two"]  # write_sizes labels sample n with n % 3


def make_module() -> ContrastiveModule:
    torch.manual_seed(0)
    vision = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, output_dim=8)
    text = TextTransformer(
        vocab_size=Tokenizer(8).vocab_size, context_length=8, embed_dim=16, depth=1, num_heads=2, output_dim=8
    )
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    return ContrastiveModule(CLIP(vision, text), ClipLoss(), optimizer)


def data(shards: str, train: str | None = None) -> WebDataModule:
    zeroshot = ZeroShotSet(urls=shards, classnames=CLASSNAMES, templates=["a photo of {}."])
    return WebDataModule(
        train or shards, val_urls=shards, zeroshot=zeroshot, batch_size=3, num_workers=0, context_length=8,
        augment=Augment(image_size=16),
    )  # fmt: skip


@torch.no_grad()
def evaluate(shards: str, train: str | None = None) -> dict:
    """What one rank computes: val/loss through the module's validation hooks, zero-shot and retrieval
    through the callbacks' functions, and the rows each one encoded."""
    dm, module = data(shards, train), make_module().eval()
    dm.setup("validate")
    encoded: list[int] = []
    module.model.visual.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # no trainer here
    module.on_validation_epoch_start()
    steps = padding = 0
    for i, batch in enumerate(dm.val_dataloader()):
        module.validation_step(batch, i)
        steps, padding = steps + 1, padding + is_padding(batch)
    module.on_validation_epoch_end()
    val_rows = sum(encoded) - padding  # a padding step encodes one blank pair
    encoded.clear()
    zs = zero_shot_eval(module.model, CLASSNAMES, ["a photo of {}."], dm.zeroshot_dataloader(), device="cpu")
    zs_rows = sum(encoded)
    encoded.clear()
    ret = evaluate_retrieval(module.model, shard_dataloader(dm.val_dataloader()), ks=(1, 5))
    return {
        "val_loss": logged["val/loss"],
        "steps": steps,
        "padding": padding,
        "rows": [val_rows, zs_rows, sum(encoded)],
        "zeroshot": [zs["top1"], zs["top5"], zs["mean_per_class_accuracy"], zs["num_samples"]],
        "retrieval": [ret["i2t_r1"], ret["t2i_r1"], ret["i2t_r5"], ret["num_samples"]],
    }


def rank_main(rank: int, world: int, shards: str, port: int, out: str, train: str | None = None) -> None:
    init_gloo(rank, world, port)
    Path(out, f"{rank}.json").write_text(json.dumps(evaluate(shards, train)))
    dist.destroy_process_group()


def test_two_ranks_each_encode_their_share_and_log_the_one_process_metrics(tmp_path):
    write_sizes(tmp_path / "shards", SIZES, labels=True)
    shards = pattern(tmp_path / "shards", len(SIZES))
    single = evaluate(shards)
    assert single["rows"] == [13, 13, 13] and single["padding"] == 0 and single["steps"] == 5
    # fork: the children reuse the parent's imports, which spawn would redo (seconds each on 2 cores)
    args = (2, shards, free_port(), str(tmp_path))
    mp.start_processes(rank_main, args=args, nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    # each rank encoded only its batches: 3 + 2 of the 5, nothing twice, nothing dropped
    assert r0["rows"] == [9, 9, 9] and r1["rows"] == [4, 4, 4]
    assert r0["steps"] == r1["steps"] == 3 and (r0["padding"], r1["padding"]) == (0, 1)
    for r in (r0, r1):
        # every batch is scored alone, as one process scores it; the sums are summed over the ranks
        assert abs(r["val_loss"] - single["val_loss"]) < 1e-6 * single["val_loss"]
        assert r["zeroshot"] == single["zeroshot"] and r["retrieval"] == single["retrieval"]


def test_without_a_manifest_two_ranks_log_the_one_process_val_loss_too(tmp_path):
    """No sample counts beside the held-out shards: whole shards go round-robin to the ranks, and since
    every shard is cut into its own batches (none spans two shards) the batches, and so val/loss, are
    the ones one process makes."""
    write_sizes(tmp_path / "train", SIZES)  # training needs a manifest; the held-out set does without
    write_sizes(tmp_path / "val", SIZES, labels=True)
    for name in (MANIFEST_NAME, SIZES_NAME):
        (tmp_path / "val" / name).unlink()
    train, shards = pattern(tmp_path / "train", len(SIZES)), pattern(tmp_path / "val", len(SIZES))
    single = evaluate(shards, train)
    assert single["rows"] == [13, 13, 13] and single["steps"] == 5  # 3 + 3 + 1 from shard 0, 3 + 3 from 1
    args = (2, shards, free_port(), str(tmp_path), train)
    mp.start_processes(rank_main, args=args, nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["rows"] == [7, 7, 7] and r1["rows"] == [6, 6, 6]  # one whole shard each
    assert r0["steps"] == r1["steps"] == 3 and (r0["padding"], r1["padding"]) == (0, 1)
    for r in (r0, r1):  # the same batch losses, only summed in another order
        assert r["val_loss"] == pytest.approx(single["val_loss"], rel=1e-12, abs=0)
        assert r["zeroshot"] == single["zeroshot"] and r["retrieval"] == single["retrieval"]


def test_lightning_validate_logs_the_pair_weighted_mean_of_the_batch_losses(tmp_path):
    """One process through Lightning's loop: val/loss is the mean over pairs of each batch's loss."""
    write_sizes(tmp_path / "shards", SIZES)
    shards = pattern(tmp_path / "shards", len(SIZES))
    module, dm = make_module(), data(shards)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    got = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    dm.setup("validate")
    with torch.no_grad():
        losses = [
            (module.contrastive_loss(*module.embed_all(b[0], b[1])), len(b[0])) for b in dm.val_dataloader()
        ]
    assert [n for _, n in losses] == [3, 3, 3, 3, 1]
    assert abs(got - sum(float(v) * n for v, n in losses) / 13) < 1e-6
