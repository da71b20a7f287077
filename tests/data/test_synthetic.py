import itertools

import numpy as np
import pytest

from clipforge.data import synthetic


def test_same_seed_same_pixels_and_caption():
    a = synthetic.make_sample(7, "train", 32, seed=3)
    b = synthetic.make_sample(7, "train", 32, seed=3)
    c = synthetic.make_sample(7, "train", 32, seed=4)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.meta == b.meta
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def combo(meta):
    return (meta["shape"], meta["color"], meta["size"], meta["position"])


@pytest.mark.parametrize("holdout", synthetic.HOLDOUTS)
def test_heldout_combinations_never_in_training_and_only_in_heldout(holdout):
    held = synthetic.heldout_combos(holdout)
    train = [synthetic.make_sample(i, "train", 16, holdout=holdout).meta for i in range(800)]
    heldout = [synthetic.make_sample(i, "heldout", 16, holdout=holdout).meta for i in range(200)]
    assert not any(combo(m) in held for m in train)
    assert all(combo(m) in held for m in heldout)
    assert {m["shape"] for m in heldout} == set(synthetic.SHAPES)  # every class is tested
    assert {m["shape"] for m in train} == set(synthetic.SHAPES)
    assert {m["color"] for m in train} == set(synthetic.COLORS)


def test_tuple_holdout_keeps_every_attribute_pair_in_training():
    held = synthetic.heldout_combos("tuples")
    combos = list(itertools.product(synthetic.SHAPES, synthetic.COLORS, synthetic.SIZES, synthetic.POSITIONS))
    assert len(held) == len(combos) // 8
    train = [t for t in combos if t not in held]
    for i, j in itertools.combinations(range(4), 2):
        seen = {(t[i], t[j]) for t in train}
        assert len(seen) == len({(t[i], t[j]) for t in combos})  # no pair of values is missing


def test_pair_holdout_removes_two_colours_per_shape():
    held = {(t[0], t[1]) for t in synthetic.heldout_combos("pairs")}
    assert held == synthetic.heldout_pairs() and len(held) == 2 * len(synthetic.SHAPES)


def test_zeroshot_labels_index_classnames_and_prompts_share_caption_words():
    classnames, templates = synthetic.zeroshot_task()
    for i in range(50):
        s = synthetic.make_sample(i, "heldout", 16)
        assert classnames[s.meta["label"]] == s.meta["shape"]
        assert s.meta["shape"] in s.caption
    assert all("{}" in t for t in templates)
    words = {w for i in range(300) for w in synthetic.make_sample(i, "train", 16).caption.strip(".").split()}
    prompt_words = {w for t in templates for w in t.format("x").strip(".").split() if w != "x"}
    assert prompt_words <= words


def test_image_shows_the_shape_colour_where_the_caption_says():
    s = synthetic.make_sample(11, "train", 64, seed=0)
    img = np.asarray(s.image).astype(float)
    target = np.array(synthetic.COLORS[s.meta["color"]], float)
    close = np.linalg.norm(img - target, axis=-1) < 60  # (H, W) pixels of the shape's colour
    ys, xs = np.nonzero(close)
    assert close.sum() > 20
    cx, cy = synthetic.POSITIONS[s.meta["position"]]
    assert abs(xs.mean() / 64 - cx) < 0.12 and abs(ys.mean() / 64 - cy) < 0.12


@pytest.mark.parametrize("shape", synthetic.SHAPES)
def test_box_is_the_tight_box_of_the_drawn_shape(shape):
    # Render without background noise so every pixel the shape touches is visible; same draws as draw().
    rng = np.random.default_rng(5)
    image, box, coverage = synthetic.draw(shape, "white", "large", "top right", 64, rng)
    x0, y0, x1, y1 = box
    assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    alpha_rng = np.random.default_rng(5)
    _, again, _ = synthetic.draw(shape, "white", "large", "top right", 64, alpha_rng)
    assert again == box  # a pure function of the draws
    ys_c, xs_c = np.nonzero(coverage > 0)  # the coverage map lies inside the box too
    assert xs_c.min() >= np.floor(x0 * 64) and xs_c.max() + 1 <= np.ceil(x1 * 64)
    assert ys_c.min() >= np.floor(y0 * 64) and ys_c.max() + 1 <= np.ceil(y1 * 64)
    img = np.asarray(image).astype(float).mean(axis=-1)
    ys, xs = np.nonzero(img > 160)  # (well inside the shape: white over a background below ~100)
    assert len(xs) > 20
    # every bright pixel lies inside the box, and the box hugs them (2 px: a thin apex is only partly covered)
    assert xs.min() >= np.floor(x0 * 64) and xs.max() + 1 <= np.ceil(x1 * 64)
    assert ys.min() >= np.floor(y0 * 64) and ys.max() + 1 <= np.ceil(y1 * 64)
    assert xs.min() - x0 * 64 <= 2.0 and x1 * 64 - (xs.max() + 1) <= 2.0
    assert ys.min() - y0 * 64 <= 2.0 and y1 * 64 - (ys.max() + 1) <= 2.0


def test_meta_adds_box_and_referring_expression_after_the_old_keys():
    s = synthetic.make_sample(3, "train", 32)
    assert list(s.meta)[:7] == ["shape", "color", "size", "position", "label", "split", "index"]
    x0, y0, x1, y1 = s.meta["box"]
    cx, cy = synthetic.POSITIONS[s.meta["position"]]
    assert x0 < cx < x1 and y0 < cy < y1  # the box is where the position says
    expr = s.meta["referring_expression"]
    assert s.meta["shape"] in expr and s.meta["color"] in expr and s.meta["size"] in expr
    # the image is the one draw() makes from the sample's random state: the box changed no pixel
    combos = synthetic._allowed("train", "tuples")
    rng = np.random.default_rng([0, synthetic.SPLITS["train"], 3])
    combo = combos[int(rng.integers(len(combos)))]
    rng.integers(len(synthetic.CAPTION_TEMPLATES))  # the caption template's draw
    plain = synthetic.draw(*combo, 32, rng)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(s.image))


def test_an_unknown_holdout_scheme_is_named_wherever_it_is_given(tmp_path):
    from clipforge.data.synthetic_shards import SyntheticShards
    from clipforge.eval.datasets import SyntheticHeldoutDataset

    for make in (
        lambda: synthetic.heldout_combos("pair"),
        lambda: SyntheticShards(str(tmp_path), holdout="pair"),
        lambda: SyntheticHeldoutDataset(holdout="pair"),
    ):
        with pytest.raises(ValueError, match=r"holdout must be one of \('tuples', 'pairs'\), got 'pair'"):
            make()
