from __future__ import annotations

from pathlib import Path

import lightning as L
import lightning.pytorch.loggers as pl_loggers
import pytest
import torch
from evalhelpers import CLASSNAMES, FEATURES, LABELS, images_from_features
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from clipforge.callbacks.evaluation import RetrievalCallback, ZeroShotCallback
from clipforge.eval import plots


class TinyModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.train_modes.append(self.model.training)
        # gain stays 1, so features stay fixed; logit_scale enters only so DDP sees every parameter used
        return (self.model.gain - 1.0) ** 2 + 0.0 * self.model.logit_scale

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoBackwardModule(TinyModule):
    """Takes no optimizer step: a forked rank cannot run autograd once its parent process has (an earlier
    test in the same session), and the callbacks under test only evaluate."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.train_modes.append(self.model.training)


class TinyData(L.LightningDataModule):
    def __init__(self, tokenizer, with_zeroshot: bool = True) -> None:
        super().__init__()
        self.images = images_from_features(FEATURES)
        self.tokens = tokenizer(["cat", "cat", "dog", "dog", "bird", "bird"])
        if with_zeroshot:
            self.zeroshot_classnames = CLASSNAMES
            self.zeroshot_templates = ["{}", "a photo of a {}."]

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.tokens), batch_size=2)

    def zeroshot_dataloader(self):
        return DataLoader(TensorDataset(self.images, torch.tensor(LABELS)), batch_size=4)


class FakeWandb(Logger):
    """Stands in for WandbLogger (patched over it) and records the pictures it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, int]] = []
        self.metric_steps: dict[str, list[int]] = {}

    name = "fake"
    version = 0

    def log_metrics(self, metrics, step=None):
        for key in metrics:
            self.metric_steps.setdefault(key, []).append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        assert images[0].size[0] > 100  # a rendered picture, not a placeholder
        self.images.append((key, step))


def _fit(module, data, callbacks, max_epochs=2, logger=False, log_every_n_steps=50):
    trainer = L.Trainer(
        log_every_n_steps=log_every_n_steps,
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def test_zeroshot_callback_logs_exact_metrics_and_restores_train_mode(
    handset_model, tokenizer, monkeypatch, tmp_path
):
    monkeypatch.setattr(pl_loggers, "WandbLogger", FakeWandb)
    saved: list[tuple[str, str]] = []  # (file name, figure title) of each confusion PNG
    write = plots.save_figure

    def save_figure(fig, path):
        saved.append((Path(path).name, fig.axes[0].get_title()))
        return write(fig, path)

    monkeypatch.setattr(plots, "save_figure", save_figure)
    logger = FakeWandb()
    cb = ZeroShotCallback(every_n_steps=2, every_n_epochs=1, save_dir=str(tmp_path))
    module = TinyModule(handset_model)
    trainer = _fit(module, TinyData(tokenizer), [cb], logger=logger, log_every_n_steps=3)
    assert trainer.callback_metrics["val/zeroshot_top1"] == pytest.approx(4 / 6)
    assert trainer.callback_metrics["val/zeroshot_top5"] == pytest.approx(1.0)
    assert trainer.callback_metrics["val/zeroshot_mean_per_class"] == pytest.approx(2 / 3)
    assert cb.last_result["confusion"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert all(module.train_modes) and len(module.train_modes) == 6
    # 3 steps per epoch, 6 steps: every 2 steps (2, 4, 6) and each epoch end (3; 6 already done)
    # each picture at Lightning's logger step of its evaluation: with the val/zeroshot_* scalars it shows
    steps = [s for _, s in logger.images]
    assert steps == [1, 2, 3, 5]
    # and every evaluation's scalars reach the logger once, on its step, though trainer.log_every_n_steps (3)
    # skips some of them (Lightning sent them later, again at each log step of the epoch, or not at all)
    assert logger.metric_steps["val/zeroshot_top1"] == steps
    # the PNG files are named and titled by that same step (they were named by trainer.global_step, one on)
    assert [name for name, _ in saved] == [f"zeroshot_confusion_step{s:08d}.png" for s in steps]
    assert [title.splitlines()[0] for _, title in saved] == [f"zero-shot, step {s}" for s in steps]
    assert sorted(p.name for p in tmp_path.glob("zeroshot_confusion_step*.png")) == [n for n, _ in saved]


def test_retrieval_callback(handset_model, tokenizer):
    data = TinyData(tokenizer)
    data.val_dataloader = lambda: DataLoader(TensorDataset(data.images, data.tokens), batch_size=4)
    cb = RetrievalCallback(every_n_epochs=1, ks=(1, 5))
    trainer = _fit(TinyModule(handset_model), data, [cb], max_epochs=1)
    # images 1 and 5 score another caption above their own ("cat"/"bird" are each shared by 2 images)
    expected = cb.last_result
    assert expected["num_samples"] == 6 and expected["num_unique_captions"] == 3
    assert trainer.callback_metrics["val/i2t_r1"] == pytest.approx(4 / 6)
    assert trainer.callback_metrics["val/i2t_r5"] == pytest.approx(1.0)
    assert "val/t2i_r1" in trainer.callback_metrics


def test_missing_zeroshot_set_warns_once_and_skips(handset_model, tokenizer):
    cbs = [ZeroShotCallback(every_n_steps=1), RetrievalCallback(every_n_steps=1)]
    with pytest.warns(UserWarning, match="skipping") as record:
        trainer = _fit(TinyModule(handset_model), TinyData(tokenizer, with_zeroshot=False), cbs)
    assert len([w for w in record if "skipping" in str(w.message)]) == 2  # one per callback
    assert not any(k.startswith("val/") for k in trainer.callback_metrics)


def test_bad_period_is_rejected():
    with pytest.raises(ValueError, match="every_n_steps"):
        ZeroShotCallback(every_n_steps=0)


def test_a_bad_top_k_or_recall_k_fails_when_the_callback_is_built():
    # not at the first evaluation, an epoch (or hours) into training, as a "top0" of 0.0 before
    with pytest.raises(ValueError, match=r"callbacks\.zeroshot\.top_k must be a whole number"):
        ZeroShotCallback(top_k=[1, 0])
    with pytest.raises(ValueError, match=r"callbacks\.retrieval\.ks must be a whole number"):
        RetrievalCallback(ks=[1, -5])


@pytest.mark.parametrize("name", ["zeroshot", "retrieval"])
def test_callback_configs_instantiate(name):
    from clipforge.conf import CONF_DIR
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF_DIR / "callbacks" / f"{name}.yaml")[name]
    cb = instantiate(node)
    assert isinstance(cb, {"zeroshot": ZeroShotCallback, "retrieval": RetrievalCallback}[name])
    assert cb.every_n_epochs == 1 and cb.every_n_steps is None


def test_callbacks_under_two_rank_ddp_equal_one_process(handset_model, tokenizer):
    """Lightning DDP (2 forked gloo ranks): each rank scores half the set; metrics equal the 1-rank ones."""
    data = TinyData(tokenizer)
    data.val_dataloader = lambda: DataLoader(TensorDataset(data.images, data.tokens), batch_size=2)
    zs, ret = ZeroShotCallback(every_n_epochs=1), RetrievalCallback(every_n_epochs=1, ks=(1, 5))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=1,
        logger=False,
        callbacks=[zs, ret],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(NoBackwardModule(handset_model), datamodule=data)
    m = trainer.callback_metrics  # rank 0's, sent back to this process
    assert m["val/zeroshot_top1"] == pytest.approx(4 / 6)
    assert m["val/zeroshot_mean_per_class"] == pytest.approx(2 / 3)
    assert m["val/i2t_r1"] == pytest.approx(4 / 6)


def test_only_the_advice_to_sync_metrics_that_are_already_global_is_silenced() -> None:
    # Under DDP Lightning advised sync_dist=True for each of val/loss, val/zeroshot_*, val/i2t_r* ... (a dozen
    # warnings a run), which clipforge reduces over ranks itself; a user's own unsynced metric keeps it.
    import warnings

    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from clipforge.callbacks.evaluation import quiet_reduced_metric_warnings

    def advice(name: str) -> str:
        return (
            f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)` when logging on epoch level in "
            "distributed setting to accumulate the metric across devices."
        )

    ours = ["val/loss", "val/zeroshot_top1", "val/ema_zeroshot_mean_per_class", "val/t2i_r10"]
    ours.append("val/retrieval_mean_recall")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_reduced_metric_warnings()
        for name in [*ours, "val/my_metric", "val/loss_of_mine"]:
            warnings.warn(advice(name), PossibleUserWarning, stacklevel=1)
    assert [str(w.message).split("'")[1] for w in caught] == ["val/my_metric", "val/loss_of_mine"]
