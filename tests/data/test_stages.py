"""The pipeline's stages on their own: one block shuffle for every path, the resampled shard draws, and the
settings groups that Hydra builds (every data setting once, a typo failing at once)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from clipforge.data import plan
from clipforge.data.config import Augment, Stream
from clipforge.data.datamodule import WebDataModule
from clipforge.data.shuffle import block_shuffle, block_start


@pytest.mark.parametrize("size", [1, 4, 7])
def test_block_shuffle_is_a_permutation_within_blocks_and_resumes_anywhere(size: int) -> None:
    data = list(range(30))
    full = list(block_shuffle(data, size, (3, 1)))
    assert sorted(full) == data
    for b in range(0, 30, size):  # output block b holds input block b, permuted
        assert sorted(full[b : b + size]) == data[b : b + size]
    if size > 1:
        assert full != data and full != list(block_shuffle(data, size, (3, 2)))  # the salt matters
    for skip in range(31):  # the reader starts at the block holding `skip` (whole blocks skipped)
        assert list(block_shuffle(data[block_start(skip, size) :], size, (3, 1), skip)) == full[skip:]


def test_block_shuffle_of_an_endless_stream_keys_each_block_to_its_salt() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    stream = block_shuffle(endless(), 5, (0, 9))
    got = [next(stream) for _ in range(15)]
    for b in range(3):
        perm = np.random.default_rng([0, 9, b]).permutation(5)
        assert got[5 * b : 5 * b + 5] == [5 * b + int(i) for i in perm]


def test_resampled_draws_weight_sources_by_samples_not_shards() -> None:
    sources = [[f"a{i}" for i in range(2)], [f"b{i}" for i in range(8)]]
    counts = {u: 40 for u in sources[0]} | {u: 5 for u in sources[1]}
    draws = plan.draw_shards(sources, [1.0, 1.0], counts, np.random.default_rng(0))
    shards = collections.Counter(next(draws)[0] for _ in range(4000))
    samples = {k: n * (40 if k == "a" else 5) for k, n in shards.items()}
    assert (
        0.45 < samples["a"] / (samples["a"] + samples["b"]) < 0.55
    )  # equal weights: equal shares of samples


def test_settings_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ValueError, match="resampled=true"):
        Stream(weights=[1, 2])
    with pytest.raises(ValueError, match="epoch_samples"):
        Stream(resampled=True)
    with pytest.raises(ValueError, match="decode_device"):
        Augment(decode_device="tpu")
    assert Augment(scale=[0.5, 1]).scale == (0.5, 1.0)  # a Hydra list becomes a plain tuple


def test_every_data_setting_is_one_key_with_data_synthetic_too(compose_cfg) -> None:
    # data=synthetic extends data=wds: settings that data=synthetic could not take before
    cfg = compose_cfg(
        "data.augment.interpolation=bilinear",
        "data.failures.max_fraction=0.25",
        "data.stream.prefetch_factor=4",
        "data.source.num_train=64",
    )
    dm = instantiate(cfg.data)
    assert dm.augment.interpolation == "bilinear" and dm.failures.max_fraction == 0.25
    assert dm.stream.prefetch_factor == 4 and dm.source.num_train == 64
    assert dm.zeroshot_classnames and dm.train_urls.endswith("{00000..00000}.tar")


def test_a_misspelt_nested_key_fails_at_once(compose_cfg) -> None:
    for key in (
        "data.stream.shuffle_bufer=8",
        "data.augment.scales=[0.5,1]",
        "data.failures.max_fractoin=0.1",
    ):
        cfg = compose_cfg(f"+{key}")
        with pytest.raises(InstantiationException, match=key.split(".")[2].split("=")[0]):
            instantiate(cfg.data)


def test_a_source_and_urls_together_are_refused(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(f"data.train_urls='{tmp_path}/{{0..1}}.tar'")
    with pytest.raises(InstantiationException, match=r"data\.source writes and names its own shards"):
        instantiate(cfg.data)
    with pytest.raises(ValueError, match="train_urls is required"):
        WebDataModule()


def test_the_crop_aspect_range_is_one_setting_end_to_end(compose_cfg, tmp_path: Path) -> None:
    from datahelpers import pattern, write_sizes

    assert instantiate(compose_cfg("data.augment.ratio=[1,1]").data).augment.ratio == (1.0, 1.0)
    default = instantiate(compose_cfg().data).augment.ratio
    assert default == (3 / 4, 4 / 3)  # the YAML spells torchvision's default exactly: same crops as before
    write_sizes(tmp_path, [4])
    dm = WebDataModule(pattern(tmp_path, 1), num_workers=0, augment=Augment(image_size=8, ratio=(1, 1)))
    transform = dm._dataset("train").transform
    boxes = [transform.box(40, 20, np.random.default_rng(i).random(40)) for i in range(50)]
    assert all(r - x == b - y for x, y, r, b in boxes)  # square crops of a 2:1 image
