"""Under weight-sharding strategies the evaluation and picture callbacks skip instead of hanging rank 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from clipforge.callbacks.attention import AttentionMapCallback
from clipforge.callbacks.evaluation import ZeroShotCallback
from clipforge.eval.metadata import load_templates
from clipforge.sharding import weights_sharded
from clipforge.summary import final_zero_shot


def _trainer(strategy, **kw):
    # after the 4th optimizer step
    return SimpleNamespace(
        strategy=strategy, global_step=4, current_epoch=0, is_global_zero=True,
        log_every_n_steps=1, should_stop=False, **kw,
    )  # fmt: skip


def test_weights_sharded_by_strategy_type():
    assert weights_sharded(_trainer(FSDPStrategy()))
    assert weights_sharded(_trainer(ModelParallelStrategy()))  # trainer/strategy=fsdp2
    assert not weights_sharded(_trainer(DDPStrategy()))
    assert not weights_sharded(SimpleNamespace())


def test_zero_shot_callback_skips_under_fsdp_without_touching_the_model():
    cb = ZeroShotCallback(every_n_steps=2, every_n_epochs=None)
    called = []
    cb.evaluate = lambda *a: called.append(a)  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="shards the model's weights"):
        cb.on_train_batch_end(_trainer(FSDPStrategy()), object())
    assert called == []
    cb._last_step = -1
    cb.on_train_batch_end(_trainer(DDPStrategy()), object())
    assert len(called) == 1


def test_attention_callback_and_final_eval_skip_under_fsdp():
    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"touched {name}")

    cb = AttentionMapCallback(every_n_steps=2)
    with pytest.warns(UserWarning, match="no pictures"):
        cb.on_train_batch_end(_trainer(FSDPStrategy()), Boom(), None, None, 0)
    dm = SimpleNamespace(zeroshot_classnames=["a", "b"], zeroshot_dataloader=Boom())
    assert final_zero_shot(Boom(), dm, _trainer(FSDPStrategy())) == {}


def test_final_eval_of_a_zero_shot_set_without_templates_uses_the_callbacks_default(monkeypatch):
    # data.zeroshot.templates null: the callback falls back to clipforge-zeroshot's default, but train's final
    # evaluation (run when no callback result is reusable, e.g. callbacks=none) called list(None)
    import clipforge.eval.zeroshot as zeroshot

    seen = {}

    def fake_eval(model, classnames, templates, loader, **kw):
        seen["templates"] = templates
        return {"top1": 0.5, "top5": 1.0, "num_samples": 4}

    monkeypatch.setattr(zeroshot, "zero_shot_eval", fake_eval)
    dm = SimpleNamespace(
        zeroshot_classnames=["a", "b"], zeroshot_templates=None, zeroshot_dataloader=lambda: []
    )
    model = SimpleNamespace(to=lambda device: SimpleNamespace(eval=lambda: "model"))
    trainer = _trainer(DDPStrategy(), callbacks=[])
    monkeypatch.setattr(DDPStrategy, "root_device", property(lambda self: "cpu"))
    assert final_zero_shot(model, dm, trainer)["final/zeroshot_top1"] == 0.5
    assert seen["templates"] == load_templates("openai")
