from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from evalhelpers import images_from_features

from clipforge.eval.retrieval import evaluate_retrieval, recall_at_k, retrieval_metrics


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_recall_known_ranks():
    # 3 pairs; image 0 ranks its caption 1st, image 1 ranks its caption 2nd, image 2 ranks it 3rd.
    texts = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    images = _unit([[1, 0.1, 0], [0.9, 0.5, 0], [0.5, 0.4, 0.3]])
    ids = torch.arange(3)
    r = recall_at_k(images, texts, ids, ids, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_a_recall_k_that_is_no_rank_is_an_error(k):
    # retrieval.ks=[0] printed "i2t_r0 0.00%" as if the model had retrieved nothing
    texts = _unit([[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"retrieval\.ks must be a whole number of at least 1"):
        recall_at_k(texts, texts, torch.arange(2), torch.arange(2), ks=(1, k))


def test_retrieval_metrics_both_directions():
    texts = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    images = _unit([[1, 0.1, 0], [0.9, 0.5, 0], [0.5, 0.4, 0.3]])
    m = retrieval_metrics(images, texts, None, ks=(1, 5, 10))
    assert m["i2t_r1"] == pytest.approx(1 / 3) and m["i2t_r5"] == 1.0
    # text 0 -> images scores [1, .87, .71]: image 0 first; text 1 -> [.1, .49, .57]: own image 2nd;
    # text 2 -> [0, 0, .42]: own image first.
    assert m["t2i_r1"] == pytest.approx(2 / 3)
    assert m["num_samples"] == 3 and m["num_unique_captions"] == 3


def test_identical_captions_count_as_one():
    # Captions 0 and 1 are the same text; image 1 matches text 0 best, which is a correct answer.
    tokens = torch.tensor([[5, 6, 0], [5, 6, 0], [7, 0, 0]])
    texts = _unit([[1, 0, 0], [1, 0.01, 0], [0, 0, 1]])
    images = _unit([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    dedup = retrieval_metrics(images, texts, tokens, ks=(1,))
    plain = retrieval_metrics(images, texts, None, ks=(1,))
    assert dedup["i2t_r1"] == 1.0 and dedup["t2i_r1"] == 1.0 and dedup["num_unique_captions"] == 2
    assert plain["i2t_r1"] == pytest.approx(2 / 3)  # without merging, image 1 "misses" its caption


def test_a_wrong_caption_carried_by_several_images_costs_one_rank():
    """Captions A, A, B, B: image 0 scores B above A. Among the distinct captions A is 2nd (a hit at
    R@2), but B's two copies were each counted as a wrong candidate above it, ranking A 3rd."""
    tokens = torch.tensor([[5, 0], [5, 0], [7, 0], [7, 0]])
    texts = _unit([[1, 0], [1, 0], [0, 1], [0, 1]])
    images = _unit([[0.6, 0.8], [1, 0], [0, 1], [0, 1]])
    m = retrieval_metrics(images, texts, tokens, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(3 / 4) and m["i2t_r2"] == 1.0
    assert m["t2i_r1"] == 1.0  # text->image: images are distinct candidates, unchanged


def test_evaluate_retrieval_end_to_end(handset_model, tokenizer):
    captions = ["cat", "dog", "bird", "a photo of a cat"]
    tokens = tokenizer(captions)
    # image i's feature is its caption's bag of words, except image 3 which looks like a dog photo
    images = images_from_features([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]])
    loader = [(images[:3], tokens[:3]), (images[3:], tokens[3:])]
    m = evaluate_retrieval(handset_model, loader)
    # image 3 ([0,1,0,1]/√2): dog 0.71, "photo of a cat" 0.5 -> its caption is 2nd
    assert m["i2t_r1"] == pytest.approx(3 / 4) and m["i2t_r5"] == 1.0
    # text 3 ([1,0,0,1]/√2): image 0 0.71, image 3 0.5 -> 2nd
    assert m["t2i_r1"] == pytest.approx(3 / 4) and m["t2i_r10"] == 1.0
    assert m["mean_recall"] == pytest.approx((3 / 4 * 2 + 1 * 4) / 6)


def test_max_samples_caps_the_set(handset_model, tokenizer):
    tokens = tokenizer(["cat", "dog", "bird"])
    images = images_from_features([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    m = evaluate_retrieval(handset_model, [(images[:2], tokens[:2]), (images[2:], tokens[2:])], max_samples=2)
    assert m["num_samples"] == 2
