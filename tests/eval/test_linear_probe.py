from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from evalhelpers import images_from_features
from sklearn.linear_model import LogisticRegression

from clipforge.eval.linear_probe import fit_and_score, linear_probe, select_C
from clipforge.eval.zeroshot import IGNORE_LABEL


def _blobs(n_per_class: int, centers: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + noise * rng.standard_normal((n_per_class, centers.shape[1])) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per_class)
    return x.astype(np.float32), y


def test_probe_matches_sklearn_reference():
    centers = np.eye(4, 8) * 2
    xtr, ytr = _blobs(20, centers, 1.0, 0)
    xte, yte = _blobs(15, centers, 1.0, 1)
    res = fit_and_score(xtr, ytr, xte, yte, C=0.5, top_k=(1, 2))
    ref = LogisticRegression(C=0.5, max_iter=1000).fit(xtr, ytr)
    pred = ref.predict(xte)
    assert res["top1"] == pytest.approx(float((pred == yte).mean()))
    top2 = np.argsort(-ref.predict_proba(xte), axis=1)[:, :2]
    assert res["top2"] == pytest.approx(float((top2 == yte[:, None]).any(1).mean()))
    expected_conf = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected_conf, (yte, pred), 1)
    assert res["confusion"].numpy().tolist() == expected_conf.tolist()
    assert 0.5 < res["top1"] < 1.0  # noisy enough that the test could fail


def test_select_c_follows_the_papers_search(caplog):
    # Imbalanced classes: with very strong regularisation only the (unpenalised) intercept is left,
    # which predicts the majority class everywhere.
    x0, y0 = _blobs(30, np.eye(1, 6) * 3, 1.0, 0)
    x1, y1 = _blobs(10, np.eye(3, 6)[1:] * 3, 1.0, 1)
    x, y = np.concatenate([x0, x1]), np.concatenate([y0, y1 + 1])
    with caplog.at_level("INFO", logger="clipforge.eval.linear_probe"):
        C, sweep = select_C(x, y)
    # every fit of the search (minutes each on a large split) is reported as it ends
    assert len([r for r in caplog.records if "validation accuracy" in r.getMessage()]) == len(sweep)
    coarse = {-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0}
    assert coarse <= set(sweep)
    assert np.log10(C) in sweep and sweep[np.log10(C)] == max(sweep.values())
    # resolution reached: 1/8 decade steps exist next to the optimum
    assert any(abs(abs(k - np.log10(C)) - 0.125) < 1e-9 for k in sweep)
    assert sweep[-6.0] < sweep[np.log10(C)]


def test_a_train_split_too_small_for_the_search_says_how_to_skip_it():
    x, y = _blobs(2, np.eye(3, 6) * 3, 1.0, 0)  # two images per class: none left over for validation
    with pytest.raises(ValueError, match=r"too small .* linear_probe\.C=<value>"):
        select_C(x, y)
    assert fit_and_score(x, y, x, y, C=1.0)["top1"] == 1.0


def test_linear_probe_on_model_features(handset_model):
    rng = np.random.default_rng(0)
    feats = np.eye(3, 4)[np.repeat(np.arange(3), 6)] + 0.05 * rng.standard_normal((18, 4))
    labels = np.repeat(np.arange(3), 6)
    images = images_from_features(feats.tolist())
    lab = torch.tensor(labels)
    lab_with_skip = lab.clone()
    lab_with_skip[0] = IGNORE_LABEL
    res = linear_probe(handset_model, [(images, lab_with_skip)], [(images, lab)], C=10.0)
    assert res["top1"] == 1.0 and res["num_samples"] == 18 and res["num_train"] == 17
    assert res["num_skipped"] == 1


def _probe_on_a_stream(out: str | None = None) -> dict:
    """CLIP's C search and probe on 60 noisy train images streamed in batches of 5 (an iterable that every
    rank reads in full, so under torch.distributed each rank takes every other batch)."""
    from evalhelpers import CONTEXT_LENGTH, HandSetModel, _BatchStream
    from torch.utils.data import DataLoader

    from clipforge.data.tokenizer import Tokenizer
    from clipforge.eval.distributed import shard_dataloader

    def stream(n: int, seed: int) -> Iterable:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, n)
        images = images_from_features((np.eye(3, 4)[y] + 0.8 * rng.standard_normal((n, 4))).tolist())
        return shard_dataloader(DataLoader(_BatchStream(images, torch.from_numpy(y), 5), batch_size=None))

    words = {"cat": [1, 0, 0, 0], "dog": [0, 1, 0, 0], "bird": [0, 0, 1, 0], "photo": [0, 0, 0, 1]}
    model = HandSetModel(words, dim=4, tokenizer=Tokenizer(CONTEXT_LENGTH))
    res = linear_probe(model, stream(60, 0), stream(30, 1))
    if out is not None:
        torch.save(res, out)
    return res


def _probe_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from gloohelpers import init_gloo

    init_gloo(rank, world, port)
    try:
        _probe_on_a_stream(f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_choose_the_one_process_C_and_score(tmp_path):
    import torch.multiprocessing as mp

    from gloohelpers import free_port

    single = _probe_on_a_stream()
    assert 0.5 < single["top1"] < 1.0 and len(single["c_sweep"]) > 7  # a real search, with errors
    # fork: the children reuse the parent's imports, which spawn would redo (seconds each on 2 cores)
    mp.start_processes(_probe_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.keys() == single.keys()
        for k, v in single.items():
            assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k


def test_feature_extraction_copies_no_batch_without_a_skipped_sample(handset_model):
    # images[keep] copied every whole batch to drop nothing; zero-shot copies only when a sample is skipped
    from clipforge.eval.linear_probe import extract_features

    seen = []
    encode = handset_model.encode_image
    handset_model.encode_image = lambda images, normalize=False: (
        seen.append(images) or encode(images, normalize)
    )
    images = images_from_features(np.eye(3, 4).tolist())
    skipped = torch.tensor([0, IGNORE_LABEL, 2])
    x, y, n_skipped = extract_features(handset_model, [(images, torch.arange(3)), (images, skipped)])
    assert seen[0].data_ptr() == images.data_ptr()  # the loader's batch itself
    assert torch.equal(seen[1], images[[0, 2]]) and n_skipped == 1
    # rows come back in the canonical order (label, then feature bytes)
    assert y.tolist() == [0, 0, 1, 2, 2] and np.allclose(x, np.eye(3, 4)[[0, 0, 1, 2, 2]])
