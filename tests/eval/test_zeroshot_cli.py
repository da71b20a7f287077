from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from clipforge.conf import CONF_DIR
from evalhelpers import ColorModel
from hydra import compose, initialize_config_dir
from PIL import Image

from clipforge.data import synthetic
from clipforge.eval import cli, model_facts
from clipforge.eval.cli import run_zeroshot

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def compose_zeroshot(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="zeroshot", overrides=list(overrides))


def compose_probe(tmp_path: Path, *overrides: str):
    """task=linear_probe, quiet, in-process, results under tmp_path."""
    return compose_zeroshot(
        "task=linear_probe", *overrides, f"output_dir={tmp_path / 'out'}", "num_workers=0", "progress=false"
    )


@pytest.fixture
def color_model(monkeypatch, tokenizer):
    model = ColorModel(tokenizer)
    monkeypatch.setattr(cli, "load_eval_model", lambda cfg: (model, "hand-set colour model", {}))
    return model


def make_color_folder(root: Path, content: dict[str, list[tuple[int, int, int]]]) -> Path:
    for name, colors in content.items():
        (root / name).mkdir(parents=True)
        for i, c in enumerate(colors):
            Image.new("RGB", (20, 24), c).save(root / name / f"{i}.png")
    return root


def test_image_folder_run_exact_results_and_files(tmp_path, color_model):
    # yellow = red + green at full intensity; green's channel is further above CLIP's mean -> "green"
    root = make_color_folder(
        tmp_path / "ds", {"a_red": [RED, RED, YELLOW], "b_green": [GREEN], "c_blue": [BLUE, BLUE]}
    )
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("# comment\n{}\na photo of {}.\n")
    (root / "a_red" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    cfg = compose_zeroshot(
        "eval/dataset=imagefolder",
        f"eval.dataset.root={root}",
        f"classnames={tmp_path / 'names.txt'}",
        f"templates={tmp_path / 'templates.txt'}",
        f"output_dir={out}",
        "num_workers=0",
        "batch_size=2",
        "progress=false",
    )
    res = run_zeroshot(cfg)
    assert res["num_samples"] == 6 and res["num_skipped"] == 1
    assert res["top1"] == pytest.approx(5 / 6)
    assert res["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 0, 2]]
    assert res["per_class_accuracy"] == {"red": pytest.approx(2 / 3), "green": 1.0, "blue": 1.0}
    assert res["num_templates"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["confusion"] == res["confusion"] and saved["top1"] == res["top1"]
    assert (out / "confusion.png").stat().st_size > 1000


def test_classes_sharing_a_name_keep_their_own_results(tmp_path, color_model):
    # classnames=imagenet holds "missile" and "sunglasses" twice: per_class_accuracy, a dict keyed by name,
    # kept 998 of the 1,000 classes, one result of each pair overwritten by the other
    root = make_color_folder(tmp_path / "ds", {"a_red": [RED], "b_green": [GREEN, GREEN], "c_blue": [BLUE]})
    (tmp_path / "names.txt").write_text("red\ngreen\ngreen\n")
    cfg = compose_zeroshot(
        "eval/dataset=imagefolder",
        f"eval.dataset.root={root}",
        f"classnames={tmp_path / 'names.txt'}",
        f"output_dir={tmp_path / 'out'}",
        "num_workers=0",
        "progress=false",
    )
    res = run_zeroshot(cfg)
    assert res["classnames"] == ["red", "green", "green"]
    # the two "green" columns tie, so which of them wins is torch's choice; each keeps its own entry
    assert list(res["per_class_accuracy"]) == ["red", "green [1]", "green [2]"]
    assert res["per_class_accuracy"]["red"] == 1.0 and None not in res["per_class_accuracy"].values()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["per_class_accuracy"]) == saved["num_classes"] == 3


def test_classname_count_mismatch_is_explained(tmp_path, color_model):
    root = make_color_folder(tmp_path / "ds", {"r": [RED], "g": [GREEN]})
    cfg = compose_zeroshot("eval/dataset=imagefolder", f"eval.dataset.root={root}", "classnames=cifar10")
    with pytest.raises(ValueError, match=r"10 class names were given but .* has 2 classes"):
        run_zeroshot(cfg)


@pytest.mark.parametrize(
    ("dataset", "key", "task"),
    [
        ("imagefolder", "root", "zeroshot"),
        ("wds", "urls", "zeroshot"),
        ("imagefolder", "root", "linear_probe"),
    ],
)
def test_a_dataset_without_its_required_key_names_the_key(tmp_path, color_model, dataset, key, task):
    # eval/dataset=imagefolder without eval.dataset.root failed with "ImageFolderDataset.__init__() missing
    # 1 required positional argument: 'root'" (hydra drops a ??? value from a partial)
    cfg = compose_zeroshot(
        f"eval/dataset={dataset}", f"task={task}", f"output_dir={tmp_path}", "num_workers=0"
    )
    with pytest.raises(ValueError, match=rf"needs eval\.dataset\.{key}: set it on the command line"):
        cli.run(cfg)


@pytest.mark.parametrize("task", ["zeroshot", "retrieval", "linear_probe"])
@pytest.mark.parametrize("num_samples", [0, -4])
def test_a_synthetic_set_of_no_images_names_the_key_before_the_model_loads(
    tmp_path, monkeypatch, task: str, num_samples: int
) -> None:
    # eval.dataset.num_samples=0 loaded the model and encoded every prompt, then failed with "no readable
    # images were evaluated (0 skipped)", naming no key
    monkeypatch.setattr(cli, "load_eval_model", lambda cfg: pytest.fail("the model was loaded"))
    cfg = compose_zeroshot(
        "model=tiny", f"task={task}", f"eval.dataset.num_samples={num_samples}", f"output_dir={tmp_path}"
    )
    with pytest.raises(
        ValueError, match=rf"^eval\.dataset\.num_samples must be an integer >= 1, got {num_samples}$"
    ):
        cli.run(cfg)


def test_classnames_file_in_natural_order_scores_like_the_folder_names(tmp_path, color_model):
    # Folders named after the classes; the names file lists them in another order than sorted.
    root = make_color_folder(
        tmp_path / "ds", {"red": [RED, RED], "green": [GREEN], "blue": [BLUE, BLUE, BLUE]}
    )
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    common = ("eval/dataset=imagefolder", f"eval.dataset.root={root}", "num_workers=0", "progress=false")
    by_folder = run_zeroshot(compose_zeroshot(*common, f"output_dir={tmp_path / 'a'}"))
    by_file = run_zeroshot(
        compose_zeroshot(*common, f"classnames={tmp_path / 'names.txt'}", f"output_dir={tmp_path / 'b'}")
    )
    assert by_folder["top1"] == by_file["top1"] == 1.0
    assert by_file["classnames"] == ["blue", "green", "red"]  # label order: the sorted folders


def test_linear_probe_splits_must_have_the_same_class_folders(tmp_path, color_model):
    train = make_color_folder(tmp_path / "train", {"a": [RED], "b": [BLUE]})
    test = make_color_folder(tmp_path / "test", {"a": [RED], "c": [BLUE]})
    cfg = compose_zeroshot(
        "task=linear_probe",
        "eval/dataset=imagefolder",
        f"eval.dataset.root={test}",
        f"linear_probe.train_dataset={{root: {train}}}",
        f"output_dir={tmp_path / 'out'}",
        "num_workers=0",
        "progress=false",
    )
    with pytest.raises(ValueError, match=r"different class folders: \['a', 'b'\] vs \['a', 'c'\]"):
        cli.run(cfg)


def test_empty_class_folder_is_explained(tmp_path, color_model):
    root = make_color_folder(tmp_path / "ds", {"r": [RED], "g": []})
    cfg = compose_zeroshot("eval/dataset=imagefolder", f"eval.dataset.root={root}")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['g'\]"):
        run_zeroshot(cfg)


def test_single_image_mode_prints_topk(tmp_path, color_model, capsys):
    color_model.logit_scale.data.fill_(math.log(10.0))  # at 100 the runner-up underflows to 0
    Image.new("RGB", (30, 30), BLUE).save(tmp_path / "blue.png")
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("{}\na photo of a {}.\n")
    cfg = compose_zeroshot(
        f"image={tmp_path / 'blue.png'}",
        f"classnames={tmp_path / 'names.txt'}",
        f"templates={tmp_path / 'templates.txt'}",
        "top_k=2",
    )
    res = run_zeroshot(cfg)
    top = res["predictions"][str(tmp_path / "blue.png")]
    # blue pixels, CLIP-normalised: channel values (0 - mean) / std for red and green, (1 - mean) / std for blue
    x = torch.tensor([-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, (1 - 0.40821073) / 0.27577711])
    # class vector = a * e_class + b * e_photo (mean of e_c and (e_c + e_photo)/sqrt2, renormalised)
    a = (1 + 1 / math.sqrt(2)) / math.hypot(1 + 1 / math.sqrt(2), 1 / math.sqrt(2))
    probs = (10 * a * x / x.norm()).softmax(0)
    assert [t["class"] for t in top] == ["blue", "green"]
    assert top[0]["probability"] == pytest.approx(float(probs[2]), rel=1e-4)
    assert top[1]["probability"] == pytest.approx(float(probs[1]), rel=1e-4)
    printed = capsys.readouterr().out
    assert f"{100 * float(probs[2]):6.2f}%  blue" in printed


def test_unreadable_single_image(tmp_path, color_model, monkeypatch):
    # read before the model loads and the prompts are encoded (minutes for a large model)
    monkeypatch.setattr(cli, "load_eval_model", lambda cfg: pytest.fail("the model was loaded"))
    (tmp_path / "x.jpg").write_bytes(b"nope")
    cfg = compose_zeroshot(f"image={tmp_path / 'x.jpg'}", "classnames=cifar10")
    with pytest.raises(ValueError, match="cannot read image"):
        run_zeroshot(cfg)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        # torch.device("gpu"): a RuntimeError listing torch's 20 device types, after the model loaded
        ("gpu", r"device='gpu' is not a device: auto, cpu, cuda or cuda:<index>"),
        pytest.param(
            "cuda",
            r"device='cuda' asks for a CUDA GPU, but torch sees none",  # "Found no NVIDIA driver", traceback
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU"),
        ),
        ("cuda:64", r"device='cuda:64' asks for a CUDA GPU, but torch sees (none|\d+)"),
    ],
)
def test_a_device_this_machine_lacks_is_named_before_the_model_loads(monkeypatch, device, message):
    monkeypatch.setattr(cli, "load_eval_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        cli.run(compose_zeroshot("model=tiny", f"device={device}"))


def test_model_source_must_be_unique(tmp_path):
    cfg = compose_zeroshot("model=tiny", "checkpoint=/nonexistent.ckpt")
    with pytest.raises(ValueError, match="exactly one model"):
        cli.load_eval_model(cfg)
    with pytest.raises(ValueError, match="exactly one model"):
        cli.load_eval_model(compose_zeroshot())


@pytest.mark.parametrize("source", ["model=tiny", "checkpoint=/nonexistent.ckpt"])
def test_an_open_clip_model_name_without_open_clip_weights_is_refused(source: str) -> None:
    # open_clip_model=ViT-B-32 beside model=tiny scored a randomly initialised tiny model as the results' model
    cfg = compose_zeroshot(source, "open_clip_model=ViT-B-32")
    with pytest.raises(
        ValueError, match=r"open_clip_model='ViT-B-32' names the architecture of open_clip_che"
    ):
        cli.load_eval_model(cfg)


def test_clipforge_checkpoint_on_synthetic_heldout(tmp_path):
    """The checkpoint route through the lead's loader, on the synthetic held-out split."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_zeroshot("model=tiny")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    ckpt = {
        "clipforge_config": {"model": OmegaConf.to_container(cfg.model, resolve=True)},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    out = tmp_path / "out"
    run_cfg = compose_zeroshot(
        f"checkpoint={tmp_path / 'm.ckpt'}",
        "eval.dataset.num_samples=12",
        f"output_dir={out}",
        "num_workers=0",
        "progress=false",
    )
    res = run_zeroshot(run_cfg)
    assert res["num_samples"] == 12 and res["num_classes"] == 6 and res["num_templates"] == 3
    # the same numbers straight from the library functions on the in-memory model
    from clipforge.data.tokenizer import Tokenizer
    from clipforge.eval.datasets import SyntheticHeldoutDataset, eval_transform
    from clipforge.eval.zeroshot import build_zero_shot_classifier, evaluate_zero_shot

    ds = SyntheticHeldoutDataset(12, eval_transform(32))
    w = build_zero_shot_classifier(model, Tokenizer(model.text.context_length), ds.classnames, ds.templates)
    ref = evaluate_zero_shot(model, w, torch.utils.data.DataLoader(ds, batch_size=5))
    assert res["confusion"] == ref["confusion"].tolist()


def test_synthetic_heldout_is_drawn_at_the_checkpoints_training_size(tmp_path, monkeypatch, caplog):
    """A checkpoint trained on 48 px synthetic images was scored on images drawn at a fixed 32 px and
    upsampled: render_size=null now draws them at the size the checkpoint's training data had."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_zeroshot("model=tiny", "model.vision.img_size=48")
    model = instantiate(cfg.model)
    stored = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {"source": {"image_size": 48}},
    }
    ckpt = {
        "clipforge_config": stored,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    sizes = []
    draw = synthetic.make_sample
    monkeypatch.setattr(
        synthetic,
        "make_sample",
        lambda i, split, size, seed, *rest: sizes.append(size) or draw(i, split, size, seed, *rest),
    )
    run = (
        f"checkpoint={tmp_path / 'm.ckpt'}",
        "eval.dataset.num_samples=4",
        "num_workers=0",
        "progress=false",
    )
    # the training size comes from the config loading the model read: the file was read again (mmap) for it
    monkeypatch.setattr(
        "clipforge.checkpoint.checkpoint_config", lambda path: pytest.fail(f"{path} read a second time")
    )
    res = run_zeroshot(compose_zeroshot(*run, f"output_dir={tmp_path / 'a'}", "save_confusion=false"))
    assert set(sizes) == {48} and res["dataset"]["render_size"] == 48  # the size used, not the node's null
    sizes.clear()
    run_zeroshot(compose_zeroshot(*run, f"output_dir={tmp_path / 'b'}", "eval.dataset.render_size=32"))
    assert set(sizes) == {32}  # a size given is kept, and the disagreement named
    assert "render_size=32, but checkpoint" in caplog.text and "data.source.image_size=48" in caplog.text


def test_synthetic_heldout_takes_the_checkpoints_holdout_scheme(tmp_path, monkeypatch, caplog):
    """A checkpoint trained with data.source.holdout=pairs was scored on the default tuples split, 45 of
    whose 60 combinations it had trained on: holdout=null now takes the checkpoint's scheme."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_zeroshot("model=tiny")
    model = instantiate(cfg.model)
    stored = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {"source": {"holdout": "pairs"}},
    }
    ckpt = {
        "clipforge_config": stored,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    drawn, draw = set(), synthetic.make_sample

    def record(*args):
        meta = draw(*args).meta
        drawn.add((meta["shape"], meta["color"], meta["size"], meta["position"]))
        return draw(*args)

    monkeypatch.setattr(synthetic, "make_sample", record)
    run = (
        f"checkpoint={tmp_path / 'm.ckpt'}",
        "eval.dataset.num_samples=40",
        "num_workers=0",
        "progress=false",
    )
    run_zeroshot(compose_zeroshot(*run, f"output_dir={tmp_path / 'a'}", "save_confusion=false"))
    assert drawn and not drawn & set(synthetic._allowed("train", "pairs"))  # none of them trained on
    given = run_zeroshot(
        compose_zeroshot(*run, f"output_dir={tmp_path / 'b'}", "eval.dataset.holdout=tuples")
    )
    assert given["dataset"]["holdout"] == "tuples"  # a scheme given is kept, and the disagreement named
    assert "eval.dataset.holdout=tuples, but checkpoint" in caplog.text


def test_the_label_says_which_weights_of_an_ema_checkpoint_are_scored(tmp_path):
    """A checkpoint trained with ema=default holds two models; scored without use_ema, the results named
    only the file, so one could not tell which of them the numbers belong to."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_zeroshot("model=tiny")
    state = instantiate(cfg.model).state_dict()
    stored = {"model": OmegaConf.to_container(cfg.model, resolve=True), "ema": {"decay": 0.99}}
    weights = {f"model.{k}": v for k, v in state.items()} | {
        f"ema.shadow.model.{k}": v for k, v in state.items()
    }
    torch.save({"clipforge_config": stored, "state_dict": weights}, tmp_path / "m.ckpt")
    _, label, _ = cli.load_eval_model(compose_zeroshot(f"checkpoint={tmp_path / 'm.ckpt'}"))
    assert label.endswith("(training weights; it also holds EMA weights, which use_ema=true scores)")
    _, label, _ = cli.load_eval_model(compose_zeroshot(f"checkpoint={tmp_path / 'm.ckpt'}", "use_ema=true"))
    assert label.endswith("(EMA weights)")
    del stored["ema"]
    torch.save({"clipforge_config": stored, "state_dict": weights}, tmp_path / "plain.ckpt")
    assert cli.load_eval_model(compose_zeroshot(f"checkpoint={tmp_path / 'plain.ckpt'}"))[1].endswith(
        "plain.ckpt"
    )


def test_retrieval_task_on_synthetic_captions(tmp_path, color_model):
    cfg = compose_zeroshot(
        "task=retrieval",
        "eval.dataset.num_samples=10",
        f"output_dir={tmp_path}",
        "num_workers=0",
        "progress=false",
    )
    res = cli.run(cfg)
    assert res["num_samples"] == 10 and 1 <= res["num_unique_captions"] <= 10
    assert set(res) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert res["i2t_r10"] >= res["i2t_r5"] >= res["i2t_r1"]
    assert json.loads((tmp_path / "retrieval.json").read_text())["i2t_r1"] == res["i2t_r1"]


def test_linear_probe_task_on_colour_folders(tmp_path, color_model):
    shades = {
        "a_red": [(255, 0, 0), (200, 30, 30), (230, 10, 60)],
        "b_blue": [(0, 0, 255), (30, 30, 200), (20, 60, 220)],
    }
    train = make_color_folder(tmp_path / "train", shades)
    test = make_color_folder(
        tmp_path / "test", {"a_red": [(180, 40, 40)], "b_blue": [(40, 40, 180), (0, 0, 120)]}
    )
    cfg = compose_probe(
        tmp_path,
        "eval/dataset=imagefolder",
        f"eval.dataset.root={test}",
        f"linear_probe.train_dataset={{root: {train}}}",
        "linear_probe.C=100",
    )
    res = cli.run(cfg)
    assert res["num_train"] == 6 and res["num_samples"] == 3
    assert res["top1"] == 1.0 and res["confusion"] == [[1, 0], [0, 2]]
    assert res["classnames"] == ["a red", "b blue"]


def test_linear_probe_on_the_default_synthetic_set_fits_on_its_train_split(tmp_path):
    """No dataset given: the probe fits on the generator's train split and scores the held-out one."""
    cfg = compose_probe(tmp_path, "model=tiny", "eval.dataset.num_samples=24", "linear_probe.C=1")
    res = cli.run(cfg)
    assert res["num_train"] == 24 and res["num_samples"] == 24
    assert res["classnames"] == list(synthetic.SHAPES) and 0.0 <= res["top1"] <= 1.0


def test_linear_probe_needs_a_train_split(tmp_path, color_model):
    root = make_color_folder(tmp_path / "ds", {"r": [RED], "g": [GREEN]})
    cfg = compose_zeroshot("task=linear_probe", "eval/dataset=imagefolder", f"eval.dataset.root={root}")
    with pytest.raises(ValueError, match="needs a train split"):
        cli.run(cfg)


def test_retrieval_on_caption_shards_equals_in_memory_pairs(tmp_path):
    """task=retrieval over shards written by the data package, against the same pairs held in memory."""
    from hydra.utils import instantiate

    from clipforge.data.sources import synthetic_records
    from clipforge.data.tokenizer import Tokenizer
    from clipforge.data.writer import write_shards
    from clipforge.eval.datasets import eval_transform, load_image
    from clipforge.eval.retrieval import evaluate_retrieval

    write_shards(synthetic_records("heldout", 14), tmp_path / "shards", max_count=5, progress=False)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert len(urls) == 3
    torch.manual_seed(0)
    model = instantiate(compose_zeroshot("model=tiny").model).eval()
    cfg = compose_zeroshot(
        "model=tiny",
        "task=retrieval",
        "eval/dataset=captions_wds",
        f"eval.dataset.urls=[{','.join(urls)}]",
        f"output_dir={tmp_path / 'out'}",
        "batch_size=4",
        "num_workers=0",
        "progress=false",
    )
    from unittest import mock

    with mock.patch.object(cli, "load_eval_model", lambda cfg: (model, "tiny", {})):
        res = cli.run(cfg)
    # the reference reads the same (JPEG-encoded) shard members by hand, in one batch
    tok = Tokenizer(model.text.context_length)
    images, captions = [], []
    for url in urls:
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".txt")):
            stem = name[: -len(".txt")]
            image = next(
                members[f"{stem}.{ext}"] for ext in ("jpg", "png", "webp") if f"{stem}.{ext}" in members
            )
            images.append(eval_transform(32)(load_image(image)))
            captions.append(members[name].decode())
    ref = evaluate_retrieval(model, [(torch.stack(images), tok(captions))])
    assert res["num_samples"] == 14
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "num_unique_captions"):
        assert res[k] == pytest.approx(ref[k]), k


def test_open_clip_checkpoint_route_matches_the_source_model(tmp_path):
    """Export a tiny model to an open_clip folder, evaluate it through open_clip_checkpoint=."""
    from hydra.utils import instantiate

    from clipforge.models.convert import export_open_clip

    torch.manual_seed(0)
    model = instantiate(compose_zeroshot("model=tiny").model).eval()
    export_open_clip(model, tmp_path / "oc")
    common = ["eval.dataset.num_samples=12", "num_workers=0", "progress=false", "save_confusion=false"]
    via_oc = run_zeroshot(
        compose_zeroshot(f"open_clip_checkpoint={tmp_path / 'oc'}", f"output_dir={tmp_path / 'a'}", *common)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "load_eval_model", lambda cfg: (model, "in memory", {}))
        direct = run_zeroshot(compose_zeroshot(f"output_dir={tmp_path / 'b'}", *common))
    assert via_oc["model"].startswith("open_clip")
    assert via_oc["confusion"] == direct["confusion"] and via_oc["top5"] == direct["top5"]
    # a random model predicts nearly one class, so also compare what the route loaded, numerically
    loaded, _, _ = cli.load_eval_model(compose_zeroshot(f"open_clip_checkpoint={tmp_path / 'oc'}"))
    images, tokens = torch.randn(2, 3, 32, 32), cli_tokenizer(model)(["a red circle.", "a ring"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5
        )


def cli_tokenizer(model):
    from clipforge.data.tokenizer import Tokenizer

    return Tokenizer(model.text.context_length)


def test_cli_writes_results_into_hydra_run_dir(tmp_path, color_model, monkeypatch):
    # `hydra.run.dir=` (not only `output_dir=`) must move results.json and the picture beside the log
    root = make_color_folder(tmp_path / "ds", {"red": [RED], "green": [GREEN], "blue": [BLUE]})
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    argv = ["clipforge-zeroshot", "eval/dataset=imagefolder", f"eval.dataset.root={root}"]
    argv += ["num_workers=0", "progress=false", f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr("sys.argv", argv)
    cli.main()
    assert json.loads((run_dir / "results.json").read_text())["top1"] == 1.0
    assert (run_dir / "confusion.png").exists()
    assert not (tmp_path / "outputs").exists()


def test_a_mistake_in_the_input_is_one_line_on_stderr_and_a_bug_keeps_its_traceback(
    tmp_path, monkeypatch, capsys
) -> None:
    # a missing checkpoint printed Hydra's "Error executing job with overrides" and a traceback
    gone = tmp_path / "gone.ckpt"
    cmd = [
        sys.executable,
        "-m",
        "clipforge.eval.cli",
        f"checkpoint={gone}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"clipforge-zeroshot: checkpoint not found: {gone}"]

    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "load_eval_model", bug)
    monkeypatch.setattr("sys.argv", ["clipforge-zeroshot", "model=tiny", f"hydra.run.dir={tmp_path / 'bug'}"])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err


def test_an_image_size_the_model_cannot_take_fails_before_any_image_is_read(tmp_path):
    # image_size=48 on a 32 px model failed at the first batch, asking to "resample the position embedding"
    cfg = compose_zeroshot(
        "model=tiny", "image_size=48", f"output_dir={tmp_path / 'out'}", "num_workers=0", "progress=false"
    )
    with pytest.raises(ValueError, match=r"image_size=48, but the model takes 32x32 images"):
        run_zeroshot(cfg)
    assert not (tmp_path / "out").exists()
    assert model_facts.model_image_size(torch.nn.Module(), 40) == 40  # a model that does not say its size


def test_a_text_vocabulary_smaller_than_the_tokenizers_is_named(tmp_path, caplog):
    # an open_clip SigLIP import (SentencePiece, 32,000 ids) failed at the first prompt with torch's
    # "index out of range in self"
    common = [f"output_dir={tmp_path / 'out'}", "num_workers=0", "progress=false"]
    common += ["eval.dataset.num_samples=4"]
    cfg = compose_zeroshot("model=tiny", "model.text.vocab_size=32000", *common)
    with pytest.raises(
        ValueError,
        match=r"random init: its text tower embeds 32000 token ids, clipforge's tokenizer \(CLIP BPE\) writes 49408",
    ):
        run_zeroshot(cfg)
    run_zeroshot(compose_zeroshot("model=tiny", "model.text.vocab_size=49500", *common))
    assert "embeds 49500 token ids" in caplog.text


@pytest.mark.parametrize("first", [["--cfg", "job"], ["num_workers=0", "progress=false"]])
def test_a_programmatic_run_after_an_in_process_cli_call_writes_to_its_own_output_dir(
    tmp_path, color_model, monkeypatch, first
):
    # Hydra keeps its run config in a process-wide singleton: after `--cfg job` (run dir '???') or a whole
    # CLI run (run dir of that run), run_zeroshot(cfg) failed or wrote into the other run's directory
    root = make_color_folder(tmp_path / "ds", {"red": [RED], "green": [GREEN], "blue": [BLUE]})
    dataset = ["eval/dataset=imagefolder", f"eval.dataset.root={root}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "sys.argv", ["clipforge-zeroshot", *dataset, f"hydra.run.dir={tmp_path / 'cli'}", *first]
    )
    cli.main()
    out = tmp_path / "mine"
    res = run_zeroshot(compose_zeroshot(*dataset, f"output_dir={out}", "num_workers=0", "progress=false"))
    assert res["results_file"] == str(out / "results.json") and (out / "confusion.png").exists()


def test_training_and_the_command_prompt_a_zero_shot_set_without_templates_alike():
    """With no templates set and none from the data, training's val/zeroshot_* used one prompt ("a photo of
    a {}.") and clipforge-zeroshot CLIP's 80, so the two reported different numbers for one checkpoint."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from clipforge.callbacks.evaluation import zeroshot_templates

    cfg = OmegaConf.create({"classnames": ["cat", "dog"], "templates": None})
    _, command = cli.resolve_task(cfg, SimpleNamespace())
    training = zeroshot_templates(SimpleNamespace(zeroshot_templates=None))
    assert len(command) == 80 and [t("cat") for t in training] == [t("cat") for t in command]
