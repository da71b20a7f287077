"""Smoke test of the loader benchmark: both pipelines run on the same shards and give the same shapes."""

import pytest
import torch

from clipforge.bench import loader as bench


def test_benchmark_runs_both_loaders_on_the_same_shards(tmp_path, capsys):
    pytest.importorskip("open_clip_train.data")
    pytest.importorskip("skimage")
    pattern = bench.write_benchmark_shards(tmp_path, num_samples=24, samples_per_shard=10)
    ours, _ = bench.clipforge_loader(pattern, 4, 0, 32)
    theirs = bench.open_clip_loader(pattern, 24, 4, 0, 32)
    a, b = list(ours), list(theirs)
    assert a[0][0].shape == b[0][0].shape == (4, 3, 32, 32) and a[0][1].shape == b[0][1].shape == (4, 77)
    # the same 24 photos, normalised the same way: per-channel means of the epoch agree
    mean_a = torch.cat([x[0] for x in a]).mean((0, 2, 3))
    mean_b = torch.cat([x[0] for x in b]).mean((0, 2, 3))
    assert torch.allclose(mean_a, mean_b, atol=0.05), (mean_a, mean_b)
    results = bench.main(
        [
            "--root",
            str(tmp_path),
            "--num-samples",
            "24",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--image-size",
            "32",
            "--repeats",
            "1",
        ]
    )
    assert set(results) == {"clipforge", "open_clip get_wds_dataset"}
    assert all(r["images"] > 0 and r["per_worker_wall"] > 0 for r in results.values())
    assert "vs open_clip" in capsys.readouterr().out


def test_too_few_samples_to_time_is_an_error_not_zero_images_per_second(tmp_path):
    # 40 samples in batches of 16 leave nothing after the two warm-up batches: the benchmark printed
    # "0.0 images/s per worker", as though the loader had stalled.
    pytest.importorskip("skimage")
    pattern = bench.write_benchmark_shards(tmp_path, num_samples=40, samples_per_shard=40)
    for batch in (16, 32):  # nothing left to time; fewer batches than the warm-up
        loader, _ = bench.clipforge_loader(pattern, batch, 0, 32)
        with pytest.raises(ValueError, match="no batch was left to time after the 2 warm-up batches"):
            bench.measure(loader, 0)
