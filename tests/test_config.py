"""Every node of the real conf/ tree instantiates, and config mistakes fail at once with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clipforge.conf import CONF_DIR
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

import clipforge.train as train_module
from clipforge.checkpoint import build_model
from clipforge.ema import build_ema
from clipforge.optim import check_optimization
from clipforge.train import check_trainer, train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("model"))
def test_every_model_config_builds(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"model={name}")
    with torch.device("meta"):  # shapes only: ViT-H/14's 986M parameters take 20 s to initialise on a CPU
        model = build_model(cfg.model, cfg.loss)
    n = sum(p.numel() for p in model.parameters())
    assert n > 0
    assert model.visual.output_dim == model.text.output_dim == model.embed_dim


@pytest.mark.parametrize("name", options("loss"))
def test_every_loss_config_builds(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"loss={name}")
    loss = instantiate(cfg.loss)
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    value = loss(f, f, torch.tensor(10.0), torch.tensor(-10.0) if loss.init_logit_bias is not None else None)
    assert value.ndim == 0 and torch.isfinite(value)


def test_loss_switch_sets_paper_initial_temperature(compose_cfg) -> None:
    clip = build_model(compose_cfg("loss=clip").model, compose_cfg("loss=clip").loss)
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert clip.logit_bias is None
    cfg = compose_cfg("loss=siglip")
    siglip = build_model(cfg.model, cfg.loss)
    assert siglip.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-5)
    assert siglip.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("group", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_configs_build(compose_cfg, group: str) -> None:
    for name in options(group):
        cfg = compose_cfg(f"{group}={name}")
        p = torch.nn.Parameter(torch.zeros(2, 2))
        opt = instantiate(cfg.optimizer)([p])
        if group == "scheduler":
            sched = instantiate(cfg.scheduler)(opt, total_steps=100)
            sched.step()


@pytest.mark.parametrize("name", [n for n in options("trainer") if n != "gpu"])
def test_trainer_configs_build(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"trainer={name}", "trainer.devices=1", "trainer.accelerator=cpu")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_gpu_trainer_config_is_bf16(compose_cfg) -> None:
    cfg = compose_cfg("trainer=gpu")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_build(compose_cfg, name: str) -> None:
    from clipforge.loggers import instantiate_logger

    cfg = compose_cfg(f"logger={name}")
    logger = instantiate_logger(cfg.get("logger"))
    assert (logger is False) == (name == "none")


def test_callbacks_and_data_configs_build(compose_cfg) -> None:
    for data in options("data"):
        overrides = [f"data={data}"]
        if data == "wds":
            overrides.append("data.train_urls='/tmp/x-{000000..000001}.tar'")
        cfg = compose_cfg(*overrides)
        assert instantiate(cfg.data) is not None
    cfg = compose_cfg()
    cbs = [instantiate(c) for c in cfg.callbacks.values()]
    assert cbs, "the default run has callbacks"


def test_unknown_top_level_key_fails_at_compose(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="lernig_rate"):
        compose_cfg("lernig_rate=3")


def test_unknown_constructor_key_fails_at_instantiate(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.vision.embed_dimm=64")
    cfg = compose_cfg("+model.vision.embed_dimm=64")
    with pytest.raises(InstantiationException, match="embed_dimm"):
        build_model(cfg.model, cfg.loss)


def test_unknown_group_option_fails(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="sigmoid"):
        compose_cfg("loss=sigmoid")


def test_missing_checkpoint_fails_before_anything_runs(compose_cfg, tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    cfg = compose_cfg(f"ckpt_path={missing}")
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        train(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_steps=abc", "max_steps"),
        ("trainer.max_steps=2.5", "max_steps"),
        ("trainer.max_epochs=x", "max_epochs"),
    ],
)
def test_a_step_budget_of_the_wrong_type_is_named_before_anything_runs(
    compose_cfg, override: str, key: str
) -> None:
    # Lightning failed on these with "'<' not supported between 'str' and 'int'" or a val_check_interval
    # complaint, naming only "trainer"; now nothing (data shards included) is built before the error.
    cfg = compose_cfg(override)
    with pytest.raises(ValueError, match=rf"trainer\.{key} must be an integer >= -1, got"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", r"optimizer torch\.optim\.adamw\.AdamW\(lr=-1, .*\): Invalid learning rate"),
        ("+optimizer.lrr=3", r"optimizer .*lrr=3\): .*unexpected keyword argument 'lrr'"),
        ("scheduler.min_lr_ratio=2", r"scheduler clipforge\.optim\.warmup_cosine\(.*min_lr_ratio=2\): "),
        ("scheduler.warmup_steps=abc", r"scheduler clipforge\.optim\.warmup_cosine\(warmup_steps='abc'"),
    ],
)
def test_optimizer_and_schedule_settings_fail_before_anything_is_built(
    compose_cfg, override: str, message: str
) -> None:
    # Lightning builds both inside fit: these failed after the shards were written and the model built,
    # lr=-1 with torch's bare "Invalid learning rate: -1"
    cfg = compose_cfg(override, "model.vision.depth=1", "model.text.depth=1")
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Lightning's seed_everything: "invalid literal for int() with base 10: 'abc'", a traceback naming no key
        ("seed=abc", r"seed must be an integer in \[0, 4294967295\], got 'abc'"),
        # 1.5 was cut to 1 by Lightning, then failed in numpy's "seed must be integer" after the shards were written
        ("seed=1.5", r"seed must be an integer in \[0, 4294967295\], got 1\.5"),
        # failed in the schedule, inside fit, after the shards were written
        ("trainer.max_steps=0", r"trainer\.max_steps=0 trains no step"),
        # failed at the first step, after the shards were written: "expected 32x32 images, got (48, 48)"
        (
            "data.augment.image_size=48",
            r"data\.augment\.image_size=48 differs from model\.vision\.img_size=32",
        ),
        # Lightning refused it at the Trainer, after the model was built (19 s for ViT-B/16 on a CPU), with a
        # Hydra traceback naming only "trainer"
        (
            "trainer.precision=bf61",
            r"trainer\.precision='bf61' is not one of Lightning's precisions: .*'bf16-mixed'",
        ),
        # data.augment.image_size follows it: its check named that key, which the user never set
        ("model.vision.img_size=0", r"model\.vision\.img_size must be an integer >= 1, got 0"),
        ("trainer.precision=8", r"trainer\.precision=8 is not one of Lightning's precisions"),
    ],
)
def test_a_run_setting_that_cannot_train_fails_before_anything_is_written(
    compose_cfg, override: str, message: str
) -> None:
    cfg = compose_cfg(override)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU")
@pytest.mark.parametrize("override", ["trainer=gpu", "trainer=ddp", "trainer.accelerator=cuda"])
def test_a_gpu_run_on_a_machine_without_one_is_refused_before_anything_is_written(
    compose_cfg, override: str
) -> None:
    # Lightning refused it at the Trainer, after the model was built, with "No supported gpu backend found!"
    # in a Hydra error naming only "trainer"
    cfg = compose_cfg(override)
    with pytest.raises(
        ValueError, match=r"trainer\.accelerator=\S+ asks for a CUDA GPU, but torch sees none"
    ):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=0", r"trainer: `Trainer\(devices=0\)` value is not a valid input"),
        ("+trainer.strategy=ddpx", r"trainer: .*ddpx"),
    ],
)
def test_a_trainer_value_lightning_refuses_fails_before_the_model_is_built(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, override: str, message: str
) -> None:
    # Lightning checks these itself, at the Trainer: it was built after the model (19 s for ViT-B/16 on a CPU)
    built: list[object] = []
    monkeypatch.setattr(train_module, "build_model", lambda *a: built.append(a))
    cfg = compose_cfg(override)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert built == []


def test_a_learning_rate_of_zero_is_said_before_anything_is_built(compose_cfg, caplog) -> None:
    # it trained to the end with weights that never changed, without a word (a frozen run can be meant:
    # tests/test_train.py uses one to compare loaded weights, so it is a warning)
    cfg = compose_cfg("optimizer.lr=0")
    with caplog.at_level("WARNING", logger="clipforge.optim"):
        check_optimization(instantiate(cfg.optimizer), instantiate(cfg.scheduler), 10)
    assert "optimizer.lr=0: the weights never change" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforge.optim"):
        check_optimization(instantiate(compose_cfg().optimizer), None, 10)
    assert not caplog.text


def test_a_warmup_as_long_as_the_run_is_said_before_anything_is_built(compose_cfg, caplog) -> None:
    # scheduler.warmup_steps=50 with trainer.max_steps=20: the learning rate rose for the whole run and
    # ended at 40% of optimizer.lr, without a word
    cfg = compose_cfg()
    with caplog.at_level("WARNING", logger="clipforge.optim"):
        check_optimization(instantiate(cfg.optimizer), instantiate(cfg.scheduler), 20)
    assert "scheduler.warmup_steps=50 is not shorter than trainer.max_steps=20" in caplog.text
    assert "ends at 40% of optimizer.lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipforge.optim"):
        check_optimization(instantiate(cfg.optimizer), instantiate(cfg.scheduler), 51)
        check_optimization(instantiate(cfg.optimizer), instantiate(cfg.scheduler), -1)  # an epoch budget
    assert not caplog.text


def test_captions_longer_than_the_text_towers_position_table_fail_before_anything_is_built(
    compose_cfg,
) -> None:
    # failed at the first step, after the shards were written: "got 100 tokens but context_length is 20"
    cfg = compose_cfg("data.context_length=100")
    with pytest.raises(ValueError, match=r"data\.context_length=100 .* \(model\.text\.context_length=20\)"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()
    check_trainer(compose_cfg("data.context_length=8"))  # shorter captions are fine


def test_a_text_vocabulary_smaller_than_the_tokenizers_fails_before_anything_is_built(compose_cfg) -> None:
    # failed at the first step, after the shards were written: torch's "index out of range in self"
    with pytest.raises(
        ValueError, match=r"model\.text\.vocab_size=32000 is smaller than the 49408 token ids"
    ):
        check_trainer(compose_cfg("model.text.vocab_size=32000"))
    check_trainer(compose_cfg("model.text.vocab_size=49500"))  # a padded table is fine


@pytest.mark.parametrize("text", ["model.text.causal=false", "model.text.pool_type=last"])
def test_a_shorter_data_context_is_refused_where_the_features_depend_on_the_padded_length(
    compose_cfg, text: str
) -> None:
    # trained on captions padded to 8 tokens, a bidirectional (or last-token) tower was evaluated on prompts
    # padded to its 20, other features than training's
    with pytest.raises(
        ValueError, match=r"data\.context_length=8 is shorter .* set model\.text\.context_length=8"
    ):
        check_trainer(compose_cfg("data.context_length=8", text))
    check_trainer(compose_cfg("model.text.context_length=8", text))  # the way to train it shorter


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_builds(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"experiment={name}", "data.train_urls='/tmp/x-{000000..000001}.tar'")
    assert cfg.data._target_.endswith("WebDataModule") and "DDP" in cfg.trainer.strategy._target_
    # the preset's family names its loss: clip_* -> ClipLoss, siglip_* and siglip2_* -> SigLipLoss
    assert cfg.loss._target_.split(".")[-1].lower().startswith(name.split("_")[0].rstrip("0123456789"))
    assert instantiate(cfg.loss) is not None and instantiate(cfg.data) is not None
    with torch.device("meta"):  # full-size towers: shapes only
        model = build_model(cfg.model, cfg.loss)
    assert (model.logit_bias is not None) == (name.startswith("siglip"))


@pytest.mark.parametrize("name", options("debug"))
def test_every_debug_config_composes(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"debug={name}")
    assert cfg.trainer.max_steps <= 10
    assert not cfg.get("logger")


def test_siglip2_preset_has_the_papers_recipe(compose_cfg) -> None:
    from clipforge.train import siglip2_parts

    cfg = compose_cfg("experiment=siglip2_b16", "data.train_urls='/tmp/x-{000000..000001}.tar'")
    assert cfg.model.vision.img_size == 256 and cfg.model.vision.patch_size == 16
    assert (
        cfg.model.text.context_length == 64
        and cfg.optimizer.lr == 1e-3
        and cfg.optimizer.weight_decay == 1e-4
    )
    with torch.device("meta"):  # full-size decoder and heads: shapes only
        parts = siglip2_parts(cfg)
        model = build_model(cfg.model, cfg.loss)
        objectives = parts["objectives"]
        ema = build_ema(
            parts["ema"], {"model": model, "objectives": torch.nn.ModuleDict(objectives)}, objectives
        )
    weights = {name: (o.weight, o.start_frac) for name, o in objectives.items()}
    assert weights == {"locca": (1.0, 0.0), "silc": (0.25, 0.8), "tips": (0.0625, 0.8)}
    assert objectives["silc"].num_local == 8 and objectives["tips"].mask_ratio == 0.5
    assert objectives["silc"].head.prototypes.shape == (65536, 256)
    dec = objectives["locca"].decoder
    assert len(dec.blocks) == 6 and dec.text_vocab_size == 49408 and dec.max_len == 64 + 5
    assert ema.start_frac == 0.8 and cfg.callbacks.zeroshot.use_ema


@pytest.mark.parametrize("name", ["locca", "silc", "tips", "siglip2"])
def test_objective_configs_compose_one_word_each(compose_cfg, name: str) -> None:
    from clipforge.train import siglip2_parts

    cfg = compose_cfg("loss=siglip", f"objectives={name}")
    parts = siglip2_parts(cfg)
    expected = {"siglip2": {"locca", "silc", "tips"}}.get(name, {name})
    assert set(parts["objectives"]) == expected
    assert ("ema" in parts) == bool(expected & {"silc", "tips"})  # the teacher comes with distillation
    assert (
        (cfg.get("decoder") is not None) == ("locca" in expected) == cfg.data.stream.regions
    )  # boxes in batches
    assert compose_cfg().get("objectives") is None and compose_cfg().get("ema") is None  # off by default


def test_a_decoder_without_the_objective_that_trains_it_is_refused_before_anything_is_built(
    compose_cfg,
) -> None:
    # decoder=locca alone trained no decoder at all, silently (the checkpoint had none for clipforge-caption)
    cfg = compose_cfg("loss=siglip", "decoder=locca")
    with pytest.raises(ValueError, match=r"decoder=locca .* objectives=locca \(or siglip2\)"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()
    check_trainer(compose_cfg("loss=siglip", "decoder=locca", "objectives=locca"))  # the way to train it


def test_a_silc_crop_as_large_as_the_models_patch_grid_is_refused_before_any_shard_is_written(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # local_grid=8 on the tiny model's 8 x 8 patches trained SILC on "local" crops as large as the global view
    from clipforge.data.datamodule import WebDataModule

    monkeypatch.setattr(WebDataModule, "prepare_data", lambda self: pytest.fail("shards were written"))
    cfg = compose_cfg("loss=siglip", "objectives=silc", "objectives.silc.local_grid=8")
    cfg.paths.data_dir = str(tmp_path / "data")
    with pytest.raises(
        ValueError,
        match=r"objectives\.silc: local_grid=8 is not smaller than the model's patch grid of 8 \(model\.vision"
        r"\.img_size 32 // model\.vision\.patch_size 4\)",
    ):
        train(cfg)
    assert not (tmp_path / "data").exists()


def test_a_presets_objective_settings_without_their_objective_are_named(compose_cfg) -> None:
    # experiment=siglip2_b16 objectives=silc kept the preset's locca and tips settings as nodes naming no
    # objective: the run failed after writing the shards with "Missing key needs_teacher", naming neither
    cfg = compose_cfg(
        "experiment=siglip2_b16", "objectives=silc", "data.train_urls='/tmp/x-{000000..000001}.tar'"
    )
    with pytest.raises(
        ValueError, match=r"objectives\.locca, objectives\.tips: settings without an objective"
    ):
        check_trainer(cfg)


@pytest.mark.parametrize(
    ("module", "script", "groups"),
    [
        ("clipforge.eval.cli", "clipforge-zeroshot", {"eval/dataset", "model"}),
        # ~11 s each (a fresh interpreter): slow, the zeroshot case above is the one that regressed
        pytest.param("clipforge.caption_cli", "clipforge-caption", set(), marks=pytest.mark.slow),
        pytest.param("clipforge.train", "clipforge-train", None, marks=pytest.mark.slow),  # all of conf/
    ],
)
def test_help_names_the_command_and_lists_its_own_groups(module: str, script: str, groups) -> None:
    """``--help`` of a Hydra command names it and lists the groups it reads, with every option under conf/
    (Hydra's default lists all groups of conf/, the training ones too, under the job's module name)."""
    import subprocess
    import sys

    code = f"import sys; sys.argv = [{script!r}, '--help']; from {module} import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    text = out.stdout
    assert text.startswith(script), text[:200]
    listed = {}
    if "== Configuration groups ==" in text:
        block = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
        listed = {
            line.split(":")[0]: set(line.split(":", 1)[1].replace(" ", "").split(","))
            for line in block.splitlines()
            if ": " in line
        }
    if groups is not None:
        assert set(listed) == groups, listed
    for group, options in listed.items():
        assert options == {p.stem for p in (CONF_DIR / group).glob("*.yaml")}, group
