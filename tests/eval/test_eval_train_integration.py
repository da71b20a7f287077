"""The pretraining run reports held-out zero-shot accuracy and retrieval through clipforge.eval."""

from __future__ import annotations

import pytest
from clipforge.conf import CONF_DIR
from omegaconf import OmegaConf, open_dict

from clipforge.train import train


def test_training_callbacks_and_final_eval_agree(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "logger=csv",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "scheduler.warmup_steps=2",
        "data.source.num_train=256",
        "data.source.num_heldout=48",
        "data.source.samples_per_shard=128",
        "data.batch_size=32",
        "data.num_workers=0",
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")  # small private shards, not the session's shared set
        for name in ("zeroshot", "retrieval"):
            node = OmegaConf.load(CONF_DIR / "callbacks" / f"{name}.yaml")[name]
            node.every_n_steps, node.every_n_epochs = 4, None
            cfg.callbacks[name] = node
    metrics, objects = train(cfg)
    # the callback ran at step 4 on the final weights, as did train's final evaluation
    assert metrics["final/zeroshot_samples"] == 48
    assert metrics["val/zeroshot_top1"] == pytest.approx(metrics["final/zeroshot_top1"])
    assert metrics["val/zeroshot_top5"] == pytest.approx(metrics["final/zeroshot_top5"])
    for k in ("val/i2t_r1", "val/i2t_r5", "val/i2t_r10", "val/t2i_r1", "val/t2i_r10"):
        assert 0.0 <= metrics[k] <= 1.0
    assert metrics["val/i2t_r10"] >= metrics["val/i2t_r1"]
    zs = next(cb for cb in objects["trainer"].callbacks if type(cb).__name__ == "ZeroShotCallback")
    assert int(zs.last_result["confusion"].sum()) == 48
    # train() reused the callback's result for these weights; an independent evaluation agrees with it,
    # and a result from another step is not reused.
    from clipforge.eval.zeroshot import zero_shot_eval
    from clipforge.summary import final_zero_shot

    dm, model = objects["datamodule"], objects["module"].model.eval()
    fresh = zero_shot_eval(model, dm.zeroshot_classnames, dm.zeroshot_templates, dm.zeroshot_dataloader())
    assert fresh["top1"] == pytest.approx(metrics["final/zeroshot_top1"])
    assert fresh["top5"] == pytest.approx(metrics["final/zeroshot_top5"])
    stale = zs.last_result
    zs.last_result_step -= 1
    zs.last_result = {**stale, "top1": -1.0}
    again = final_zero_shot(model, dm, objects["trainer"])
    assert again["final/zeroshot_top1"] == pytest.approx(metrics["final/zeroshot_top1"])

    # clipforge-zeroshot on the run's checkpoint and the same held-out set reports the numbers training logged
    from hydra import compose, initialize_config_dir

    from clipforge.eval.cli import run_retrieval, run_zeroshot

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        zc = compose(
            config_name="zeroshot",
            overrides=[
                f"checkpoint={tmp_path / 'out' / 'checkpoints' / 'last.ckpt'}",
                "eval.dataset.num_samples=48",
                f"output_dir={tmp_path / 'eval'}",
                "num_workers=0",
                "progress=false",
                "save_confusion=false",
            ],
        )
    cli = run_zeroshot(zc)
    assert cli["num_samples"] == 48
    for k, logged in (
        ("top1", "zeroshot_top1"),
        ("top5", "zeroshot_top5"),
        ("mean_per_class_accuracy", "zeroshot_mean_per_class"),
    ):
        assert cli[k] == pytest.approx(metrics[f"val/{logged}"], abs=1e-6), k  # logged as float32
    with open_dict(zc):
        zc.task = "retrieval"
    cli = run_retrieval(zc)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert cli[k] == pytest.approx(metrics[f"val/{k}"], abs=1e-6), k


def test_a_run_with_an_ema_reports_the_final_zero_shot_of_both_weights(compose_cfg, tmp_path, capsys):
    # The EMA is the model such a run is meant to be used as (the SigLIP 2 preset scores it while training);
    # the summary scored only the trained weights.
    cfg = compose_cfg(
        "logger=none",
        "trainer.max_steps=3",
        "scheduler.warmup_steps=1",
        "data.source.num_train=96",
        "data.source.num_heldout=48",
        "data.source.samples_per_shard=48",
        "data.batch_size=32",
        "data.num_workers=0",
        "ema=default",
        "ema.decay=0.5",
        "callbacks.zeroshot.use_ema=true",
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
    metrics, objects = train(cfg)
    from clipforge.eval.zeroshot import zero_shot_eval

    dm, module = objects["datamodule"], objects["module"]
    ema = zero_shot_eval(
        module.ema["model"].eval(), dm.zeroshot_classnames, dm.zeroshot_templates, dm.zeroshot_dataloader()
    )
    assert metrics["final/ema_zeroshot_top1"] == pytest.approx(ema["top1"])
    assert metrics["final/ema_zeroshot_top5"] == pytest.approx(ema["top5"])
    assert metrics["val/ema_zeroshot_top1"] == pytest.approx(ema["top1"])  # the callback's, at the last step
    out = capsys.readouterr().out
    assert f"EMA weights: top-1 {100 * ema['top1']:.1f}%, top-5 {100 * ema['top5']:.1f}%" in out
