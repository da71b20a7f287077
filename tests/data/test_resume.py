"""Resuming continues the data stream where it stopped instead of restarting the epoch."""

import lightning as L
import pytest
import torch
from datahelpers import data_module, pattern, sample_ids, write_sizes
from lightning.pytorch.callbacks import ModelCheckpoint

SIZES = [13, 2, 40, 7, 21, 9]  # 92 samples, 12 batches of 8


@pytest.fixture
def shards(tmp_path):
    write_sizes(tmp_path / "shards", SIZES)
    return pattern(tmp_path / "shards", len(SIZES))


def make(shards, workers=0, scale=(0.9, 1.0)):
    dm = data_module(shards, 8, workers, stream={"shuffle_buffer": 16}, augment={"scale": scale})
    dm.setup("fit")
    return dm


def epoch_stream(shards, workers, epoch):
    """Epoch ``epoch`` of a fresh data module (random crops), uninterrupted."""
    dm = make(shards, workers, scale=(0.3, 1.0))
    dm.set_epoch(epoch)
    return list(dm.train_dataloader())


def interrupted(shards, workers, epoch, stop):
    """Epoch ``epoch`` stopped after ``stop`` batches and resumed by a new data module from the state;
    returns the batches of both parts and the state."""
    dm = make(shards, workers, scale=(0.3, 1.0))
    dm.set_epoch(epoch)
    first = []
    for batch in dm.train_dataloader():
        first.append(batch)
        if len(first) == stop:
            break
    state = dm.state_dict()
    resumed = make(shards, workers, scale=(0.3, 1.0))
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)
    return first + list(resumed.train_dataloader()), state


def same_stream(got, full) -> bool:
    """The same samples in the same order, with the same random crops."""
    ids = [i for b in got for i in sample_ids(b[2])]
    return ids == [i for b in full for i in sample_ids(b[2])] and torch.equal(
        torch.cat([b[0] for b in got]), torch.cat([b[0] for b in full])
    )


@pytest.mark.parametrize(("workers", "stop"), [(0, 5), (2, 5), (3, 7)])
def test_resume_mid_epoch_continues_the_exact_stream(shards, workers, stop):
    got, state = interrupted(shards, workers, 2, stop)
    assert state["epoch"] == 2 and state["batches"] == stop
    ids = [i for b in got for i in sample_ids(b[2])]
    assert sorted(ids) == list(range(sum(SIZES)))  # every sample once across the interruption
    # and it is the stream the uninterrupted run produces: same samples, order and random crops
    assert same_stream(got, epoch_stream(shards, workers, 2))


def test_resume_state_for_another_epoch_starts_that_epoch_fresh(shards):
    dm = make(shards)
    dm.load_state_dict({"epoch": 0, "batches": 5})
    dm.set_epoch(1)
    assert len(list(dm.train_dataloader())) == 12


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(sample_ids(batch[2]))
        return (self.w * batch[0].mean()).sum() + self.w.square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_lightning_resume_from_mid_epoch_checkpoint_continues_the_stream(shards, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    full = Recorder()
    trainer(tmp_path, max_epochs=2, callbacks=[ckpt]).fit(full, datamodule=make(shards, 2))
    assert len(full.seen) == 24
    resumed = Recorder()
    path = tmp_path / "ckpt" / "step=15.ckpt"  # epoch 1, after 3 of its 12 batches
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["WebDataModule"]["epoch"] == 1 and checkpoint["WebDataModule"]["batches"] == 3
    trainer(tmp_path, max_epochs=2).fit(
        resumed, datamodule=make(shards, 2), ckpt_path=path, weights_only=True
    )
    assert resumed.seen == full.seen[15:]  # the same batches, none of epoch 1's first three again


def position_of(state: dict) -> dict:
    """A data module's state without the skip counts that go with it."""
    return {k: v for k, v in state.items() if k != "skipped"}


def test_one_holder_of_the_position_for_the_module_and_its_loader(shards, caplog):
    dm = make(shards)
    saved = {"epoch": 1, "batches": 4, "world_size": 1, "num_workers": 1, "batch_size": 16, "seed": 0}
    dm.load_state_dict(saved)
    assert position_of(dm.state_dict()) == saved  # restored before any loader: kept whole
    loader = dm.train_dataloader()  # checked against this run: the batch size differs
    assert "different {'batch_size': (16, 8)}" in caplog.text
    assert loader.position is dm.position and position_of(dm.state_dict()) == loader.state_dict() == {
        "epoch": 1,
        "batches": 4,
    }
    dm.set_epoch(1)
    assert len(list(loader)) == 12 - 4 and dm.position.restored is None
    assert dm.state_dict()["batches"] == loader.state_dict()["batches"] == 12


def test_a_run_stopped_by_max_steps_mid_epoch_goes_on_from_there_when_extended(shards, tmp_path):
    """Training longer from the checkpoint of a finished run (same command, a larger max_steps): the save
    at the end of training is the state after its last step, not one where Lightning has closed the epoch
    that max_steps cut short, so the rest of that epoch is trained, not skipped."""
    from clipforge.callbacks.periodic import PeriodicCheckpoint

    full = Recorder()
    trainer(tmp_path / "full", max_steps=24).fit(full, datamodule=make(shards, 2))
    assert len(full.seen) == 24
    periodic = PeriodicCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1000)
    trainer(tmp_path, max_steps=5, callbacks=[periodic]).fit(Recorder(), datamodule=make(shards, 2))
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    resumed = Recorder()
    trainer(tmp_path, max_steps=24).fit(
        resumed, datamodule=make(shards, 2), ckpt_path=last, weights_only=True
    )
    assert resumed.seen == full.seen[5:]


def test_a_changed_setting_is_warned_about_once_though_lightning_restores_the_position_twice(shards, caplog):
    dm = make(shards)
    saved = {"epoch": 0, "batches": 2, "world_size": 2, "num_workers": 1, "batch_size": 8, "seed": 0}
    dm.load_state_dict(saved)  # the data module's copy, before any loader
    loader = dm.train_dataloader()
    loader.load_state_dict(saved)  # the train loader's copy, restored by Lightning's fit loop
    assert caplog.text.count("data position restored with a different {'world_size': (2, 1)}") == 1
    assert dm.position.restored == {"epoch": 0, "batches": 2}


def test_a_changed_setting_is_warned_about_once_though_the_two_restored_copies_differ(shards, caplog):
    """Lightning restores the data module's copy (with the skip counts and every rank's slots) and the train
    loader's (without them): the same position and settings, so one warning, not two."""
    dm = make(shards)
    loader_copy = {"epoch": 0, "batches": 2, "world_size": 1, "num_workers": 2, "batch_size": 8, "seed": 0}
    dm.load_state_dict({**loader_copy, "skipped": [{"corrupt_image": 1}], "slots": [[16, -1]]})
    loader = dm.train_dataloader()
    loader.load_state_dict(loader_copy)
    assert caplog.text.count("data position restored with a different {'num_workers': (2, 1)}") == 1


def test_a_changed_shard_list_is_named_when_the_position_is_restored(tmp_path, caplog):
    """The plan numbers the epoch's samples along the shard order: a shard added (or removed, or recounted
    in the manifest) moves every boundary, so a restored batch count no longer marks what was seen."""
    write_sizes(tmp_path / "a", SIZES)
    write_sizes(tmp_path / "b", [*SIZES, 11])
    dm = make(pattern(tmp_path / "a", len(SIZES)))
    loader = dm.train_dataloader()
    for i, _ in enumerate(loader, 1):
        if i == 5:
            break
    state = dm.state_dict()
    assert (state["shards"], state["samples"]) == (6, 92)
    grown = make(pattern(tmp_path / "b", len(SIZES) + 1))
    grown.load_state_dict(state)
    with caplog.at_level("WARNING", logger="clipforge.data.loader"):
        grown.train_dataloader()
    assert "'shards': (6, 7), 'samples': (92, 103), 'shard_list': (" in caplog.text
    assert "(checkpoint, config): the rest of epoch 0 will not line up exactly" in caplog.text
    caplog.clear()
    moved = make(pattern(tmp_path / "b", len(SIZES)))  # the same six shards in another folder: no warning
    moved.load_state_dict(state)
    with caplog.at_level("WARNING", logger="clipforge.data.loader"):
        moved.train_dataloader()
    assert "data position restored" not in caplog.text


@pytest.fixture
def damaged(tmp_path):
    """SIZES with every fifth sample's JPEG corrupt (18 of 92): skips fall in every stretch of batches."""
    from test_corruption import rewrite

    urls = write_sizes(tmp_path / "damaged", SIZES)
    start = 0
    for url, n in zip(urls, SIZES):
        rewrite(url, corrupt={i for i in range(start, start + n) if i % 5 == 2})
        start += n
    return pattern(tmp_path / "damaged", len(SIZES))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_survive_a_resume_as_in_the_uninterrupted_run(damaged, tmp_path, workers):
    """The counts behind ``data/skipped_*`` and the summary's "data skipped:" restarted at 0 on resume, and
    the workers' read-ahead (counted, then read again by the resumed run) must not count twice either."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full_dm = make(damaged, workers)
    trainer(tmp_path, max_epochs=2, callbacks=[ckpt]).fit(Recorder(), datamodule=full_dm)
    full = full_dm.skip_counts()
    assert full["corrupt_image"] > 0 and full["repeated_samples"] == full["corrupt_image"]
    for step in (4, 8, 12, 16, 20):  # mid-epoch and the end of epoch 0
        resumed_dm = make(damaged, workers)
        path = tmp_path / "ckpt" / f"step={step}.ckpt"
        trainer(tmp_path, max_epochs=2).fit(
            Recorder(), datamodule=resumed_dm, ckpt_path=path, weights_only=True
        )
        assert resumed_dm.skip_counts() == full, step


@pytest.mark.parametrize(
    "workers",
    [0, pytest.param(3, marks=pytest.mark.slow)],  # three workers: ~25 s; the exact-stream tests use 3
)
def test_a_mid_epoch_resume_after_skipped_samples_continues_the_exact_stream(damaged, workers):
    """Skipped samples shift every later batch of their worker; the resume point counted only the batches'
    samples, so the resumed run read again the samples that the skips had pulled forward (and drew their
    crops again): each worker must start behind the last sample it gave, bad ones included, and within
    the re-read passes that top up its last batches once its range ran out (the later stops)."""
    full = epoch_stream(damaged, workers, 1)
    for stop in range(1, len(full)):
        assert same_stream(interrupted(damaged, workers, 1, stop)[0], full), stop


@pytest.mark.slow  # ~20 s: every stop of a two-worker epoch
def test_a_resume_after_a_worker_switched_to_re_reading_the_whole_set_continues_the_exact_stream(tmp_path):
    """A worker whose whole range is unreadable tops up its batches from the whole set, after one pass of
    its range gave nothing. A resume in those passes must know it had switched: it fast-forwarded in
    passes of its range's length and started the whole set over."""
    from test_corruption import rewrite

    from clipforge.data import plan

    urls = write_sizes(tmp_path / "bad", SIZES)
    counts = dict(zip(urls, SIZES))
    wp = plan.plan_worker(
        urls, counts, seed=0, epoch=1, rank=0, world_size=1, worker=1, num_workers=3, batch_size=8
    )
    first = {u: sum(SIZES[:i]) for i, u in enumerate(urls)}
    bad = {first[s.url] + s.start + j for s in wp.segments for j in range(s.count)}
    for url, n in zip(urls, SIZES):
        rewrite(url, corrupt={i for i in range(first[url], first[url] + n) if i in bad})
    shards = pattern(tmp_path / "bad", len(SIZES))
    full = epoch_stream(shards, 3, 1)
    assert not {i for b in full[1::3] for i in sample_ids(b[2])} & bad  # worker 1 gave only others
    for stop in range(1, len(full)):
        assert same_stream(interrupted(shards, 3, 1, stop)[0], full), stop
