"""LocCa's referring task end to end on a small fixed set: the real data path (synthetic shards, random
resized crops, the regions stage), the real loss and decoder, then greedy decoding and scoring on the
training images through the eval transform. A consistent pipeline fits them; a mismatch between how boxes
become training targets and how they are decoded and scored (crop frame, x/y order, prompt layout, teacher
forcing offset, quantisation) keeps the accuracy near zero whatever the training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from clipforge.bench.siglip2 import _images
from clipforge.checkpoint import build_model
from clipforge.eval.dense import referring_box_accuracy
from clipforge.losses.objective import ObjectiveBatch

NUM_TRAIN, STEPS = 32, 150


@pytest.mark.slow
def test_the_referring_task_fits_its_training_images(tmp_path: Path) -> None:
    overrides = [
        "loss=siglip",
        "objectives=locca",
        "model=tiny",
        "objectives.locca.task_probs=[0,1,0]",  # the referring task only: what is scored here
        "decoder.num_box_bins=16",  # 2 px per bin at 32 px: fits within the step budget
        f"data.source.num_train={NUM_TRAIN}",
        "data.source.num_heldout=8",
        f"data.batch_size={NUM_TRAIN}",
        "data.num_workers=0",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path)
    torch.manual_seed(0)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model, locca = build_model(cfg.model, cfg.loss), instantiate(cfg.objectives.locca)
    params = [*model.parameters(), *locca.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    step = 0
    while step < STEPS:
        for images, tokens, extras in dm.train_dataloader():
            loss = locca(
                ObjectiveBatch(images, tokens, model.visual.forward_features(images), extras), model, None
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
    assert set(locca.last_tasks) == {"ref"}
    images, samples = _images("train", NUM_TRAIN, 32)
    refs = [s.meta["referring_expression"] for s in samples]
    res = referring_box_accuracy(model, locca.decoder, images, refs, [s.meta["box"] for s in samples])
    assert res["accuracy"] > 0.8, res
