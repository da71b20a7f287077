"""clipforge-convert (clipforge.convert_cli, wrapped by scripts/convert.py): export to open_clip and import
back, through clipforge's checkpoint loader."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from modelhelpers import tokens
from omegaconf import OmegaConf
from PIL import Image

from clipforge import convert_cli
from clipforge.checkpoint import checkpoint_config, is_checkpoint, load_model
from clipforge.convert_cli import cli, main
from clipforge.models.convert import check_parity, model_config
from clipforge.viz.cli import build_fresh


def test_export_then_import_round_trip(tmp_path: Path) -> None:
    exported = main(["export", "--model", "tiny", "--seed", "3", "--out", str(tmp_path / "oc")])
    original = build_fresh("tiny", seed=3)
    reference = open_clip.create_model(f"local-dir:{exported['config'].parent}").eval()
    images = torch.randn(2, 3, 32, 32)
    text = tokens(2, original.text.context_length, vocab=49408)
    with torch.no_grad():
        check_parity(original.encode_image(images), reference.encode_image(images))
        check_parity(original.encode_text(text), reference.encode_text(text))

    imported = main(["import", "--open-clip", str(tmp_path / "oc"), "--out", str(tmp_path / "cf")])
    model, cfg = load_model(imported["checkpoint"])
    folder_model, _ = load_model(imported["checkpoint"].parent)  # the import folder stands for its checkpoint
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), folder_model.state_dict().values())
    )
    assert OmegaConf.to_container(OmegaConf.load(imported["config"])) == cfg["model"] == model_config(model)
    assert type(instantiate(OmegaConf.load(imported["config"]))).__name__ == "CLIP"
    with torch.no_grad():
        check_parity(model.encode_image(images), reference.encode_image(images))
        check_parity(model.encode_text(text), reference.encode_text(text))

    # Exporting the imported checkpoint again gives the same open_clip weights.
    again = main(["export", "--checkpoint", str(imported["checkpoint"]), "--out", str(tmp_path / "oc2")])
    from safetensors.torch import load_file

    first, second = load_file(exported["weights"]), load_file(again["weights"])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_an_export_name_that_open_clip_gives_siglips_tokenizer_is_refused(tmp_path: Path) -> None:
    # open_clip.get_tokenizer("my-siglip") after add_model_config picked SentencePiece (downloading its
    # vocabulary) for a model trained on CLIP BPE tokens
    with pytest.raises(ValueError, match=r"name='my-SigLIP': open_clip.get_tokenizer .* SentencePiece"):
        main(["export", "--model", "tiny", "--name", "my-SigLIP", "--out", str(tmp_path / "oc")])
    assert not (tmp_path / "oc").exists()
    main(["export", "--model", "tiny", "--name", "my-sigmoid-clip", "--out", str(tmp_path / "oc")])
    open_clip.add_model_config(tmp_path / "oc" / "my-sigmoid-clip.json")
    assert type(open_clip.get_tokenizer("my-sigmoid-clip")).__name__ == "SimpleTokenizer"


def test_a_folder_that_holds_no_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    """By every reader of checkpoints: the stored config was read from "<folder>/model.ckpt", whose
    "checkpoint not found" named a file nobody had given."""
    with pytest.raises(FileNotFoundError, match="is a folder, not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a folder, not a checkpoint"):
        checkpoint_config(tmp_path)
    assert not is_checkpoint(tmp_path) and not is_checkpoint(tmp_path / "none.ckpt")


def test_a_folder_of_checkpoints_lists_them_and_an_open_clip_folder_names_every_reader(
    tmp_path: Path,
) -> None:
    # a run's checkpoints/ folder said only "pass a .ckpt file"; an open_clip folder named zeroshot's key alone
    for name in ("last.ckpt", "periodic-step0000008.ckpt"):
        (tmp_path / "checkpoints" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"pass a \.ckpt file from it: last\.ckpt, periodic-step0000008"
    ):
        load_model(tmp_path / "checkpoints")
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="open_clip_checkpoint=, clipforge-visualize --open-clip"):
        checkpoint_config(tmp_path / "oc")


@pytest.mark.parametrize("module", ["clipforge.convert_cli", "clipforge.viz.cli"])
def test_python_dash_m_runs_the_tool(module: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # `python -m clipforge.convert_cli export ...` imported the module and did nothing, exit 0
    import runpy

    monkeypatch.setattr("sys.argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__")
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_console_scripts_that_write_files_exit_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The generated clipforge-convert / clipforge-visualize scripts run sys.exit(<entry point>()): an entry
    # point returning its dict of paths printed it to stderr and exited 1 after a successful export.
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()  # tomllib needs Python 3.11
    scripts = dict(re.findall(r'^(clipforge-[a-z]+) = "([\w.:]+)"$', pyproject, flags=re.M))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    runs = {
        "clipforge-convert": ["export", "--model", "tiny", "--out", str(tmp_path / "oc")],
        "clipforge-visualize": [
            "--image",
            str(tmp_path / "red.png"),
            "--model",
            "tiny",
            "--out",
            str(tmp_path / "v"),
        ],
    }
    for name, args in runs.items():
        module, func = scripts[name].split(":")
        monkeypatch.setattr(sys, "argv", [name, *args])
        with pytest.raises(SystemExit) as info:
            sys.exit(getattr(importlib.import_module(module), func)())
        assert info.value.code in (0, None), f"{name} exited with {info.value.code!r}"
    assert (tmp_path / "oc" / "open_clip_config.json").is_file() and (
        tmp_path / "v" / "patch_grid.png"
    ).is_file()


def test_a_mistake_in_the_input_is_one_line_on_stderr_and_a_bug_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a missing --open-clip file printed a traceback ending in FileNotFoundError
    argv = ["clipforge-convert", "import", "--open-clip", str(tmp_path / "gone.bin"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli() == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"clipforge-convert: [Errno 2] No such file or directory: '{tmp_path / 'gone.bin'}'"
    ]

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(convert_cli, "load_open_clip_checkpoint", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli()


def test_an_out_path_that_is_a_file_fails_before_the_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it failed at the first file written, after the model was built (or a checkpoint loaded)
    (tmp_path / "taken").write_text("")
    monkeypatch.setattr("clipforge.viz.cli.build_fresh", lambda *args: pytest.fail("the model was built"))
    with pytest.raises(NotADirectoryError, match=r"^--out .*taken: it is a file$"):
        main(["export", "--model", "tiny", "--out", str(tmp_path / "taken")])


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("vit-b-32", ": did you mean ViT-B-32, "),
        ("ViT-B-3", ": did you mean ViT-B-32, "),
        ("zzz", "; open_clip.list"),
    ],
)
def test_a_model_name_open_clip_does_not_know_is_named_with_the_nearest(
    tmp_path: Path, name: str, suggested: str
) -> None:
    # said only "open_clip has no model config named 'vit-b-32'", leaving the spelling to guess
    with pytest.raises(
        ValueError, match=rf"^open_clip has no model config named '{name}'{re.escape(suggested)}"
    ):
        main(["import", "--open-clip", str(tmp_path / "w.bin"), "--model-name", name, "--out", str(tmp_path)])


def test_an_import_killed_mid_write_leaves_the_previous_import_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main(["export", "--model", "tiny", "--out", str(tmp_path / "oc")])
    imported = main(["import", "--open-clip", str(tmp_path / "oc"), "--out", str(tmp_path / "cf")])
    before = imported["checkpoint"].read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs) -> None:  # a kill (or full disk) after the first bytes
        if isinstance(f, str | Path):
            f = open(f, "wb")  # noqa: SIM115 - closed by the crash, as a killed process would leave it
        f.write(b"PK\x03\x04 partial")
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        main(["import", "--open-clip", str(tmp_path / "oc"), "--out", str(tmp_path / "cf")])
    monkeypatch.setattr(torch, "save", real_save)
    assert imported["checkpoint"].read_bytes() == before
    load_model(imported["checkpoint"])


def test_clipforge_and_open_clip_checkpoints_given_to_each_others_loader_say_which_is_which(
    tmp_path: Path,
) -> None:
    # an open_clip checkpoint given as checkpoint= (or the reverse) failed with "pass model_name" or a bare
    # "has no clipforge config", which sent users to the wrong fix
    from clipforge.checkpoint import checkpoint_dict
    from clipforge.models.convert import load_open_clip_checkpoint

    exported = main(["export", "--model", "tiny", "--out", str(tmp_path / "oc")])
    with pytest.raises(
        FileNotFoundError,
        match=r"it is an open_clip folder, read as open_clip weights \(clipforge-zeroshot open_clip_checkpoint=",
    ):
        load_model(tmp_path / "oc")
    with pytest.raises(ValueError, match=r"has no clipforge config.*open_clip_checkpoint="):
        load_model(exported["weights"])
    model = build_fresh("tiny")
    torch.save(checkpoint_dict(model.state_dict(), {"model": model_config(model)}), tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"this is a clipforge checkpoint .* load it as checkpoint=<file>"):
        load_open_clip_checkpoint(tmp_path / "run.ckpt")


def test_an_import_of_another_tokenizers_model_is_named_whenever_it_is_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the import itself warned: clipforge-zeroshot checkpoint=<import> (or init_from=) then fed CLIP BPE
    # ids to a SentencePiece text tower without a word, and scored another model than open_clip's.
    import json

    from open_clip.model import CustomTextCLIP

    from clipforge.checkpoint import init_from

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 32000, "width": 32, "heads": 4, "layers": 1},
        "custom_text": True,
    }
    cfg["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    torch.save(CustomTextCLIP(**kwargs).state_dict(), folder / "open_clip_pytorch_model.bin")
    with pytest.warns(UserWarning, match="timm/ViT-B-16-SigLIP"):
        imported = main(["import", "--open-clip", str(folder), "--out", str(tmp_path / "cf")])
    named = r"reads the tokens of 'timm/ViT-B-16-SigLIP', and clipforge tokenizes text with CLIP BPE"
    caplog.clear()
    model, _ = load_model(imported["checkpoint"].parent)
    assert re.search(named, caplog.text)
    caplog.clear()
    init_from(model, imported["checkpoint"])
    assert re.search(named, caplog.text)
    caplog.clear()  # a CLIP BPE model's import says nothing
    exported = main(["export", "--model", "tiny", "--out", str(tmp_path / "tiny")])
    load_model(
        main(["import", "--open-clip", str(exported["config"].parent), "--out", str(tmp_path / "t")])[
            "checkpoint"
        ]
    )
    assert "reads the tokens of" not in caplog.text


def test_weights_of_another_architecture_than_model_name_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a 3-block model's weights imported as ViT-B-32 (12 blocks) ended in a traceback: KeyError 'state dict
    # lacks [...resblocks.3.ln_1.weight]', from the key map, naming neither the file nor the model name
    exported = main(["export", "--model", "tiny", "--out", str(tmp_path / "oc")])
    bare = tmp_path / "bare" / "open_clip_pytorch_model.bin"
    bare.parent.mkdir()
    from safetensors.torch import load_file

    torch.save(load_file(str(exported["weights"])), bare)
    argv = ["clipforge-convert", "import", "--open-clip", str(bare), "--model-name", "ViT-B-32"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "cf")])
    assert cli() == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"clipforge-convert: {bare} does not fit open_clip's 'ViT-B-32'"
    )
    assert "resblocks.3.ln_1.weight" in err[0]
