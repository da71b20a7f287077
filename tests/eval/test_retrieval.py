from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evalhelpers import images_from_features

from clipforge.eval.retrieval import evaluate_retrieval, image_hashes, recall_at_k, retrieval_metrics


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_recall_known_ranks():
    # 3 pairs; image 0 ranks its caption 1st, image 1 ranks its caption 2nd, image 2 ranks it 3rd.
    texts = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    images = _unit([[1, 0.1, 0], [0.9, 0.5, 0], [0.5, 0.4, 0.3]])
    diagonal = torch.arange(3)[:, None].expand(3, 2)  # (query i, candidate i) pairs
    r = recall_at_k(images, texts, diagonal, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_a_recall_k_that_is_no_rank_is_an_error(k):
    # retrieval.ks=[0] printed "i2t_r0 0.00%" as if the model had retrieved nothing
    texts = _unit([[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"retrieval\.ks must be a whole number of at least 1"):
        recall_at_k(texts, texts, torch.arange(2)[:, None].expand(2, 2), ks=(1, k))


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


def _brute_recall(sim: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Reference recall@k: sort each query's candidates, find the first correct one, count the wrong
    ones ranked before it (ties with it are not above it)."""
    hits = 0
    for row, pos in zip(sim, positive):
        best = row[pos].max()
        hits += int(((row > best) & ~pos).sum() < k)
    return hits / len(sim)


def test_coco_style_five_captions_per_image_match_a_brute_force_reference(handset_model, tokenizer):
    """COCO's five captions per image come as five pairs repeating the image. CLIP's protocol: each
    image is one image->text query, right with any of its captions; each caption one text->image query
    among the distinct images. Scored per pair, the other four captions of an image were wrong answers
    and a wrong image counted five times: i2t/t2i R@1 came out far below the reference."""
    words = ["cat", "dog", "bird", "photo"]
    g = torch.Generator().manual_seed(3)
    n_img, per = 6, 5
    img_feats = torch.randn(n_img, 4, generator=g)
    # caption j of image i: two words, so the 30 captions are mostly distinct, a few repeated
    caption_words = torch.randint(0, 4, (n_img * per, 2), generator=g)
    captions = [f"{words[a]} {words[b]}" for a, b in caption_words.tolist()]
    images = images_from_features(img_feats.repeat_interleave(per, dim=0).tolist())
    tokens = tokenizer(captions)
    loader = [(images[s : s + 7], tokens[s : s + 7]) for s in range(0, len(captions), 7)]
    m = evaluate_retrieval(handset_model, loader, ks=(1, 2, 5))

    fi = F.normalize(img_feats, dim=-1).numpy()
    ft = F.normalize(handset_model.encode_text(tokens), dim=-1).detach().numpy()
    owner = np.repeat(np.arange(n_img), per)
    # a caption text is right for an image if any of that image's captions has the same text
    same_text = np.array([[a == b for b in captions] for a in captions])
    i2t_pos = np.array([same_text[owner == i].any(axis=0) for i in range(n_img)])  # (images, captions)
    _, first = np.unique(captions, return_index=True)  # each distinct caption text once
    t2i_pos = np.array([[same_text[j, owner == i].any() for i in range(n_img)] for j in range(len(captions))])
    for k in (1, 2, 5):
        assert m[f"i2t_r{k}"] == pytest.approx(_brute_recall(fi @ ft[first].T, i2t_pos[:, first], k))
        assert m[f"t2i_r{k}"] == pytest.approx(_brute_recall(ft @ fi.T, t2i_pos, k))
    assert m["num_unique_images"] == n_img and m["num_samples"] == n_img * per
    assert m["i2t_r1"] < 1 and m["t2i_r2"] < 1  # the case must hold misses


def test_image_hashes_are_equal_exactly_for_equal_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g)
    x[3] = x[1]
    y = x.clone()
    y[4, 2, 7, 7] = torch.nextafter(y[4, 2, 7, 7], torch.tensor(2.0))  # one pixel, one ulp
    h, hy = image_hashes(x), image_hashes(y)
    assert torch.equal(h[3], h[1]) and len({tuple(r) for r in h.tolist()}) == 4
    assert torch.equal(h[:4], hy[:4]) and not torch.equal(h[4], hy[4])
    assert torch.equal(image_hashes(x[1:4]), h[1:4])  # the batch around an image does not matter


def _whole_batch_hashes(images: torch.Tensor) -> torch.Tensor:
    """image_hashes as it was before it went a few rows at a time: an int64 copy of the whole batch."""
    x = images.detach().contiguous()
    if x.is_floating_point():
        x = x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])
    x = x.flatten(1).long()
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-(2**62), 2**62, (2, x.shape[1]), generator=g, dtype=torch.long) * 2 + 1
    return torch.stack([(x * w[0]).sum(dim=1), (x * w[1]).sum(dim=1)], dim=1)


def _varied_batches() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 6, 5, generator=g) * 100  # signed bit patterns of every size
    u8 = torch.randint(0, 256, (7, 3, 6, 5), generator=g, dtype=torch.uint8)
    return {
        "float32": x,
        "bfloat16": x.bfloat16(),
        "float16": x.half(),
        "float64": x.double(),
        "uint8": u8,
        "int8": u8.view(torch.int8),
        "bool": u8 > 127,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": torch.randn(7, 3, 12, 5, generator=g)[:, :, ::2],
        "permuted": x.permute(0, 2, 3, 1),
        "flat": x.flatten(1),
        "empty": x[:0],
    }


@pytest.mark.parametrize("name", list(_varied_batches()))
@pytest.mark.parametrize("chunk_bytes", [1, 8 * 90 * 2, 2**25])  # one image, two (7 = 2+2+2+1), all
def test_image_hashes_equal_the_whole_batch_definition(name, chunk_bytes):
    images = _varied_batches()[name]
    assert torch.equal(image_hashes(images, chunk_bytes=chunk_bytes), _whole_batch_hashes(images))


def test_image_hashes_make_no_copy_of_the_batch():
    # the int64 copy of the batch (and its products with the weights) was 8x a uint8 batch's memory
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:  # no view
                    self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
            return out

    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    image_hashes(images, chunk_bytes=8 * 3 * 16 * 16 * 4)  # weights cached outside the count
    with LargestAllocation() as mode:
        h = image_hashes(images, chunk_bytes=8 * 3 * 16 * 16 * 4)  # four images' products at a time
    assert torch.equal(h, _whole_batch_hashes(images))
    assert mode.nbytes <= 8 * 3 * 16 * 16 * 4 < images.nbytes


def test_image_hashes_want_a_batch():
    with pytest.raises(ValueError, match=r"a batch of images \(B, \.\.\.\), got shape \(5,\)"):
        image_hashes(torch.zeros(5))
