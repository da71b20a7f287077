"""A model override beside ``checkpoint=`` (clipforge-zeroshot, clipforge-caption) and ``checkpoint=`` given
to clipforge-train: Hydra failed with "Key 'model' is not in struct" / "Key 'checkpoint' is not in struct",
naming neither the override nor why it cannot apply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clipforge.conf import CONF_DIR
from omegaconf import OmegaConf

from clipforge import caption_cli, train
from clipforge.checkpoint import CONFIG_KEY
from clipforge.entry import checkpoint_overrides
from clipforge.eval import cli as zeroshot_cli


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A checkpoint file holding only the stored config of a conf/model/tiny run (depth 3): all the check reads."""
    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    torch.save({CONFIG_KEY: {"model": model}, "state_dict": {}}, tmp_path / "run.ckpt")
    return tmp_path / "run.ckpt"


def exit_message(main, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    return str(info.value.code)


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (zeroshot_cli.main, ["clipforge-zeroshot"]),
        (caption_cli.main, ["clipforge-caption", "image=shape.png"]),
    ],
)
def test_a_model_override_beside_a_checkpoint_names_the_key_and_both_values(
    main, argv: list[str], ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = exit_message(main, [*argv, f"checkpoint={ckpt}", "model.vision.depth=5"], monkeypatch)
    assert message.startswith(f"{argv[0]}: checkpoint={ckpt} builds its model from the settings stored in it")
    assert "model.vision.depth: checkpoint 3, override 5" in message
    message = exit_message(main, [*argv, f"checkpoint={ckpt}", "+model.vision.no_such_key=1"], monkeypatch)
    assert "model.vision.no_such_key: checkpoint '(none)', override 1" in message
    message = exit_message(main, [*argv, f"checkpoint={ckpt}", "model=vit_b16"], monkeypatch)
    assert "model=vit_b16 (the checkpoint has its own model)" in message


def test_a_model_override_equal_to_the_checkpoints_setting_is_no_error(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [f"checkpoint={ckpt}", "model.vision.depth=3", "model.text.depth=3", "batch_size=8"]
    assert checkpoint_overrides("zeroshot", args) == [f"checkpoint={ckpt}", "batch_size=8"]
    untouched = ["model=tiny", "model.vision.depth=5"]  # no checkpoint: model= builds the model
    assert checkpoint_overrides("zeroshot", untouched) == untouched
    monkeypatch.setattr(sys, "argv", ["clipforge-zeroshot", *args, "--cfg", "job"])
    zeroshot_cli.main()  # composes: --cfg job prints the config instead of running
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.checkpoint == str(ckpt) and printed.batch_size == 8


def test_train_given_checkpoint_names_the_keys_it_takes(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = exit_message(train.main, ["clipforge-train", f"checkpoint={ckpt}"], monkeypatch)
    assert message == (
        f"clipforge-train has no checkpoint= setting: resume a run with ckpt_path={ckpt}, or start from its "
        f"weights with init_from={ckpt}"
    )
    # its own keys beside a model override are its business (init_from resamples; a resume names what differs)
    assert checkpoint_overrides("train", [f"init_from={ckpt}", "model.vision.depth=5"]) == [
        f"init_from={ckpt}",
        "model.vision.depth=5",
    ]


def test_the_job_keeps_the_name_of_the_tools_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the check runs before Hydra's main: that main still names the job after the tool (cli, not entry)
    monkeypatch.setattr(sys, "argv", ["clipforge-zeroshot", "model=tiny", "--cfg", "hydra"])
    zeroshot_cli.main()
    assert OmegaConf.create(capsys.readouterr().out).hydra.job.name == "cli"


def test_a_value_error_raised_outside_clipforge_keeps_its_traceback(capsys: pytest.CaptureFixture) -> None:
    # One line is for the errors clipforge raises about its input; the same type raised inside torch or
    # Lightning mid-run is a failure whose traceback is the only clue.
    from clipforge.console import console_script
    from clipforge.optim import check_start_frac

    assert console_script("tool", lambda: check_start_frac(2.0, "ema"))() == 1
    assert capsys.readouterr().err == "tool: ema start_frac must be in [0, 1], got 2.0\n"
    with pytest.raises(ValueError, match="invalid literal"):
        console_script("tool", lambda: torch.tensor(int("x")))()
    with pytest.raises(RuntimeError):
        console_script("tool", lambda: torch.zeros(2) @ torch.zeros(3))()


@pytest.mark.parametrize(
    ("override", "line"),
    [
        # Hydra's instantiate wraps what a constructor raises: data.batch_size=0 printed "Error executing job
        # with overrides ...", the wrapped repr and full_key, where model.vision.embed_dim=100 was one line
        ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
        # Lightning validates the trainer node's values itself: its refusal came as Hydra's "Error in call to
        # target 'lightning.pytorch.trainer.trainer.Trainer'" with the exception's repr and "full_key: trainer"
        (
            "trainer.devices=0",
            "trainer: `Trainer(devices=0)` value is not a valid input using cpu accelerator.",
        ),
    ],
)
def test_a_settings_error_raised_in_a_config_nodes_constructor_is_one_line_too(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    override: str,
    line: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clipforge-train", override, "logger=csv"])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"clipforge-train: {line}"


def test_an_error_from_a_constructor_that_is_not_a_setting_keeps_its_traceback() -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from clipforge.console import console_script

    with pytest.raises(InstantiationException, match="negative dimension"):  # a failure, not a mistake: kept
        console_script("tool", instantiate)({"_target_": "torch.empty", "_args_": [-1]})


def test_the_benchmark_commands_help_imports_neither_torch_nor_hydra() -> None:
    # the one-line error handling every console script shares must not make `--help` load torch (seconds)
    code = (
        "import sys; from clipforge.bench.cli import benchmark; benchmark(['--help']); "
        "print(sorted(m for m in ('torch', 'hydra', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.splitlines()[-1] == "[]"
