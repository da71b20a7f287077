from __future__ import annotations

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
    assert y.tolist() == [0, 1, 2, 0, 2] and np.allclose(x, np.eye(3, 4)[[0, 1, 2, 0, 2]])
