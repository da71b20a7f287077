import numpy as np

from clipforge.data import synthetic


def test_same_seed_same_pixels_and_caption():
    a = synthetic.make_sample(7, "train", 32, seed=3)
    b = synthetic.make_sample(7, "train", 32, seed=3)
    c = synthetic.make_sample(7, "train", 32, seed=4)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.meta == b.meta
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_heldout_pairs_never_in_training_and_only_in_heldout():
    held = synthetic.heldout_pairs()
    assert len(held) == 2 * len(synthetic.SHAPES)
    train = [synthetic.make_sample(i, "train", 16).meta for i in range(600)]
    heldout = [synthetic.make_sample(i, "heldout", 16).meta for i in range(200)]
    assert all((m["shape"], m["color"]) not in held for m in train)
    assert all((m["shape"], m["color"]) in held for m in heldout)
    # training still shows every shape and every colour, just not in the held-out combinations
    assert {m["shape"] for m in train} == set(synthetic.SHAPES)
    assert {m["color"] for m in train} == set(synthetic.COLORS)


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
