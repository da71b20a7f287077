"""The SigLIP 2 parts inside ContrastiveModule: nothing changes when they are off; the EMA follows the
optimizer steps; objectives add their weighted losses, start at their fraction of training and are left
untouched (no update, no weight decay, no AdamW state) before it."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clipforge.ema import ModelEMA
from clipforge.losses import SigLipLoss
from clipforge.losses.dino import DinoHead
from clipforge.losses.locca import LocCaLoss
from clipforge.losses.silc import SilcLoss
from clipforge.losses.tips import TipsLoss
from clipforge.models.clip import CLIP
from clipforge.models.decoder import TextDecoder
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer
from clipforge.module import ContrastiveModule
from clipforge.optim import warmup_cosine

STEPS, BATCH, VOCAB = 4, 6, 64


def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    vision = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, output_dim=16)
    text = TextTransformer(
        vocab_size=VOCAB, context_length=8, embed_dim=32, depth=1, num_heads=2, output_dim=16
    )
    return CLIP(vision, text, init_logit_bias=-10.0)


def objectives(start: float = 0.0) -> dict:
    torch.manual_seed(1)
    decoder = TextDecoder(VOCAB, 8, image_dim=32, embed_dim=16, depth=1, num_heads=2, num_box_bins=8)
    return {
        "locca": LocCaLoss(decoder, weight=1.0, start_frac=0.0),
        "silc": SilcLoss(DinoHead(32, 16, 24, 8), weight=0.5, start_frac=start, num_local=2, local_grid=2),
        "tips": TipsLoss(DinoHead(32, 16, 24, 8), embed_dim=32, weight=0.25, start_frac=start),
    }


def make_module(**kwargs) -> ContrastiveModule:
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    scheduler = functools.partial(warmup_cosine, warmup_steps=1)
    return ContrastiveModule(tiny_clip(), SigLipLoss(), optimizer, scheduler, **kwargs)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(STEPS * BATCH, 3, 16, 16, generator=g)
    tokens = torch.zeros(STEPS * BATCH, 8, dtype=torch.long)
    tokens[:, 0] = VOCAB - 2
    tokens[:, 1:5] = torch.randint(1, VOCAB - 2, (STEPS * BATCH, 4), generator=g)
    tokens[:, 5] = VOCAB - 1
    return DataLoader(TensorDataset(images, tokens), batch_size=BATCH)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.metrics.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )


def fit(module: ContrastiveModule) -> Recorder:
    rec = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, callbacks=[rec],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader())
    return rec


def test_off_by_default_nothing_is_added() -> None:
    module = make_module()
    assert module.objectives is None and module.ema is None
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}


def test_ema_follows_every_optimizer_step_inside_lightning() -> None:
    module = make_module(ema=functools.partial(ModelEMA, decay=0.5))
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    rec = fit(module)
    expected = start
    for state in rec.states:  # the weights after each step
        expected = {
            k: 0.5 * v + 0.5 * state[f"model.{k}"] if v.is_floating_point() else state[f"model.{k}"]
            for k, v in expected.items()
        }
    assert int(module.ema.steps) == STEPS
    for k, v in expected.items():
        torch.testing.assert_close(module.ema["model"].state_dict()[k], v, rtol=1e-6, atol=1e-7)
    assert not torch.equal(expected["visual.proj.weight"], module.model.visual.proj.weight)


def test_objectives_add_their_weighted_losses_and_start_on_time() -> None:
    module = make_module(objectives=objectives(start=0.5), ema=functools.partial(ModelEMA, decay=0.5))
    heads = {
        n: [k for k in module.state_dict() if k.startswith(f"objectives.{n}.")] for n in ("silc", "tips")
    }
    rec = fit(module)
    first, last = rec.metrics[0], rec.metrics[-1]
    # steps 0 and 1 (before 0.5 * 4): only the decoder loss; the distillation heads do not move at all
    assert "train/locca_loss" in first and "train/silc_loss" not in first and "train/tips_loss" not in first
    for n, keys in heads.items():
        assert all(torch.equal(rec.states[0][k], rec.states[1][k]) for k in keys), n
        assert not all(torch.equal(rec.states[2][k], rec.states[3][k]) for k in keys), n
    total = last["train/contrastive_loss"] + last["train/locca_loss"]
    total += 0.5 * last["train/silc_loss"] + 0.25 * last["train/tips_loss"]
    assert last["train/loss"] == pytest.approx(total, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in rec.metrics)
    # AdamW saw the heads' gradients only from their start: two steps of moments, not four
    opt = module.trainer.optimizers[0]
    steps = {int(opt.state[p]["step"]) for p in module.objectives["silc"].parameters()}
    assert steps == {STEPS - 2}
    # the objectives' matrices take weight decay, their embeddings and the mask token do not
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    obj = module.objectives
    assert (
        id(obj["locca"].decoder.blocks[0].attn.qkv.weight) in decay
        and id(obj["silc"].head.prototypes) in decay
    )
    assert (
        id(obj["locca"].decoder.token_embedding.weight) in no_decay and id(obj["tips"].mask_token) in no_decay
    )
    # the teacher's heads are the EMA of the student's
    assert not torch.equal(
        module.ema["objectives"]["silc"].head.prototypes, module.objectives["silc"].head.prototypes
    )


def test_start_frac_starts_at_the_exact_fraction_of_training() -> None:
    """``start_frac * total`` in floating point is one ulp above a whole step for fractions like 0.55 or 0.07
    (of 100 steps): the objective and the EMA started a step late there."""
    from fractions import Fraction

    from clipforge.optim import has_started

    for frac, total in [(0.55, 100), (0.07, 100), (0.55, 180), (0.8, 10), (0.25, 10), (0.5, 3)]:
        first = next(s for s in range(total + 1) if has_started(s, frac, total))
        assert first == math.ceil(Fraction(repr(frac)) * total), (frac, total)
    head = DinoHead(32, 16, 24, 8)
    assert TipsLoss(head, embed_dim=32, start_frac=0.55).active(55, 100)
    ema = ModelEMA({"m": torch.nn.Linear(1, 1)}, decay=0.5, start_frac=0.07)
    ema.steps.fill_(7)
    assert ema.current_decay(100) == 0.5


def test_misconfigurations_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="EMA teacher"):
        make_module(objectives=objectives())
    with pytest.raises(ValueError, match="accum_freq=1"):
        make_module(objectives=objectives(), ema=functools.partial(ModelEMA), accum_freq=2)


@pytest.mark.parametrize(
    ("name", "mismatched", "message"),
    [
        (
            "locca",
            lambda: LocCaLoss(TextDecoder(VOCAB, 8, image_dim=24, embed_dim=16, depth=1, num_heads=2)),
            "objectives.locca: decoder.image_dim is 24 but model.vision.embed_dim is 32",
        ),
        (
            "locca",
            lambda: LocCaLoss(TextDecoder(VOCAB + 1, 8, image_dim=32, embed_dim=16, depth=1, num_heads=2)),
            "decoder.vocab_size is 65 but model.text.vocab_size is 64",
        ),
        (
            "locca",
            lambda: LocCaLoss(TextDecoder(VOCAB, 6, image_dim=32, embed_dim=16, depth=1, num_heads=2)),
            "decoder.context_length is 6 but model.text.context_length is 8",
        ),
        (
            "silc",
            lambda: SilcLoss(DinoHead(24, 16, 24, 8), start_frac=0.8),
            "objectives.silc: head.in_dim is 24 but model.vision.embed_dim is 32",
        ),
        (
            "silc",
            lambda: SilcLoss(DinoHead(32, 16, 24, 8), local_grid=4),
            r"objectives\.silc: local_grid=4 is not smaller than the model's patch grid of 4 "
            r"\(model\.vision\.img_size 16 // model\.vision\.patch_size 4\)",
        ),
        (
            "silc",
            lambda: SilcLoss(DinoHead(32, 16, 24, 8), local_grid=6),
            "local_grid=6 is not smaller than the model's patch grid of 4",
        ),
        (
            "tips",
            lambda: TipsLoss(DinoHead(32, 16, 24, 8), embed_dim=24),
            "objectives.tips: embed_dim is 24 but model.vision.embed_dim is 32",
        ),
    ],
)
def test_an_objective_built_for_another_model_fails_when_the_module_is_built(
    name, mismatched, message
) -> None:
    """A width, vocabulary or context that differs from the model's is named at once, not as a shape error
    at the step the objective starts (80% into a SILC run); so is a SILC crop as large as the image in
    patches (it trained on "local" views as large as the global one, silently)."""
    teacher = {"ema": functools.partial(ModelEMA, decay=0.9)} if name != "locca" else {}
    with pytest.raises(ValueError, match=message):
        make_module(objectives={name: mismatched()}, **teacher)
    make_module(objectives=objectives(), ema=functools.partial(ModelEMA, decay=0.9))  # built alike: fine


def test_a_resume_that_changes_max_steps_names_the_starts_it_moves(tmp_path) -> None:
    """Objectives and the EMA start at a fraction of trainer.max_steps: a 20-step run whose SILC began at step
    16, resumed at step 20 with max_steps=40, switched SILC off again until step 32 (and the EMA back to
    copying the weights), while the resume warning spoke of the learning-rate schedule alone."""
    from clipforge.checkpoint import start_differences

    def config(max_steps: int) -> dict:
        objectives = {"locca": {"start_frac": 0.0}, "silc": {"start_frac": 0.8}}
        return {"trainer": {"max_steps": max_steps}, "objectives": objectives, "ema": {"start_frac": 0.8}}

    torch.save({"clipforge_config": config(20), "state_dict": {}}, tmp_path / "run.ckpt")
    assert start_differences(tmp_path / "run.ckpt", config(40)) == [
        "objectives.silc (start_frac=0.8): step 16 in the checkpoint's run, 32 in this one",
        "ema (start_frac=0.8): step 16 in the checkpoint's run, 32 in this one",
    ]  # locca starts at step 0 at any length
    assert start_differences(tmp_path / "run.ckpt", config(20)) == []
    assert start_differences(tmp_path / "run.ckpt", {"trainer": {"max_steps": 40}}) == []  # no such parts


def test_a_resume_whose_config_starts_a_part_elsewhere_names_it(tmp_path) -> None:
    """Not only max_steps moves a start: a run trained with ema.start_frac=0.0 (the default before it became
    null, the first distilling objective's start) and resumed under today's default had its EMA copy the
    weights again until step 32, with no word; so did a changed objectives.*.start_frac."""
    from clipforge.checkpoint import start_differences

    silc = {"_target_": "clipforge.losses.silc.SilcLoss", "start_frac": 0.8}
    locca = {"_target_": "clipforge.losses.locca.LocCaLoss", "start_frac": 0.0}

    def config(ema_frac: float | None, silc_frac: float = 0.8) -> dict:
        objectives = {"locca": locca, "silc": {**silc, "start_frac": silc_frac}}
        return {"trainer": {"max_steps": 40}, "objectives": objectives, "ema": {"start_frac": ema_frac}}

    torch.save({"clipforge_config": config(0.0), "state_dict": {}}, tmp_path / "old.ckpt")
    assert start_differences(tmp_path / "old.ckpt", config(None)) == [
        "ema: step 0 in the checkpoint's run (start_frac=0.0), 32 in this one (start_frac=null: "
        "objectives.silc's start, 0.8)"
    ]  # LocCa does not distil from the EMA, so it does not set its start
    torch.save({"clipforge_config": config(None), "state_dict": {}}, tmp_path / "new.ckpt")
    assert start_differences(tmp_path / "new.ckpt", config(None)) == []
    assert start_differences(tmp_path / "new.ckpt", config(0.8)) == []  # the same step, said another way
    assert start_differences(tmp_path / "new.ckpt", config(None, silc_frac=0.5)) == [
        "objectives.silc: step 32 in the checkpoint's run (start_frac=0.8), 20 in this one (start_frac=0.5)",
        "ema: step 32 in the checkpoint's run (start_frac=null: objectives.silc's start, 0.8), 20 in this "
        "one (start_frac=null: objectives.silc's start, 0.5)",
    ]


def test_an_ema_without_a_start_starts_with_the_first_objective_that_distils_from_it(compose_cfg) -> None:
    # SigLIP 2 initialises the teacher from the student when distillation begins: `objectives=siglip2` alone
    # (ema=default) averaged from step 0, a teacher 0.8 of a run old by then.
    unset = functools.partial(ModelEMA, decay=0.5, start_frac=None)
    early = objectives(0.6)
    early["tips"].start_frac = 0.7
    assert make_module(objectives=early, ema=unset).ema.start_frac == 0.6
    assert make_module(ema=unset).ema.start_frac == 0.0  # no teacher to time: an evaluation average
    chosen = functools.partial(ModelEMA, decay=0.5, start_frac=0.3)
    assert make_module(objectives=objectives(0.6), ema=chosen).ema.start_frac == 0.3
    cfg = compose_cfg("loss=siglip", "objectives=siglip2")
    assert cfg.ema.start_frac is None and cfg.objectives.silc.start_frac == 0.8
