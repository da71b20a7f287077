from __future__ import annotations

import math

import pytest
import torch
from evalhelpers import CLASSNAMES, FEATURES, LABELS, images_from_features

from clipforge.eval.zeroshot import IGNORE_LABEL, build_zero_shot_classifier, evaluate_zero_shot, predict


def _loader(batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = images_from_features(FEATURES), torch.tensor(LABELS)
    return [
        (images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(LABELS), batch_size)
    ]


def test_classifier_is_mean_of_normalised_prompt_embeddings(handset_model, tokenizer):
    w = build_zero_shot_classifier(
        handset_model, tokenizer, CLASSNAMES, ["{}", "a photo of a {}."], batch_size=4
    )
    assert w.shape == (4, 3) and w.dtype == torch.float32
    # "{}" embeds to e_c, "a photo of a {}." to (e_c + e_photo)/sqrt(2); their mean, renormalised:
    a, b = 1 + 1 / math.sqrt(2), 1 / math.sqrt(2)
    expected = torch.zeros(4, 3)
    for c in range(3):
        expected[c, c], expected[3, c] = a, b
    expected /= math.hypot(a, b)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)


def test_classifier_independent_of_batch_size_and_template_kind(handset_model, tokenizer):
    templates = ["{}", "a photo of a {}.", "itap of a {c}."]
    w1 = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, templates, batch_size=1)
    w2 = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, templates, batch_size=1000)
    lambdas = [lambda c: c, lambda c: f"a photo of a {c}.", lambda c: f"itap of a {c}."]
    w3 = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, lambdas, batch_size=5)
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=0)
    torch.testing.assert_close(w1, w3, atol=1e-6, rtol=0)


def test_class_names_cut_to_the_same_prompt_are_an_error(handset_model, tokenizer, caplog):
    """Names longer than the text context (16 tokens here, 77 in CLIP) are cut: two that differ only past
    the cut got identical weights, and every image of the second was scored as the first, silently."""
    long = "a very long and detailed description of a small domestic animal that is called a "
    with pytest.raises(ValueError, match="become the same prompts once cut"):
        build_zero_shot_classifier(handset_model, tokenizer, [long + "cat", long + "dog", "bird"], ["{}"])
    # cut but still different: scored, with a warning naming them
    w = build_zero_shot_classifier(handset_model, tokenizer, ["cat " + long, "dog " + long, "bird"], ["{}"])
    assert w.shape == (4, 3) and "prompts of 2 class(es) fill the text context" in caplog.text
    # the same name twice (ImageNet's two "missile" classes) is no error, cut or not
    build_zero_shot_classifier(handset_model, tokenizer, ["cat " + long, "cat " + long, "bird"], ["{}"])


def test_exact_accuracy_and_confusion(handset_model, tokenizer):
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}", "a photo of a {}."])
    res = evaluate_zero_shot(handset_model, w, _loader(), top_k=(1, 2, 5))
    assert res["num_samples"] == 6 and res["num_skipped"] == 0
    assert res["top1"] == pytest.approx(4 / 6)
    assert res["top2"] == pytest.approx(5 / 6)  # the misread cat has cat 2nd, the misread bird has bird 3rd
    assert res["top5"] == 1.0  # k is capped at the 3 classes
    assert res["trivial_top_k"] == [5]  # ... and the result says so
    assert res["confusion"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert res["per_class_accuracy"] == [0.5, 1.0, 0.5]
    assert res["mean_per_class_accuracy"] == pytest.approx(2 / 3)


def test_top_k_of_every_class_is_flagged_not_passed_off_as_a_measurement(handset_model, tokenizer, caplog):
    """top-5 of 3 classes is 100% whatever the model does: the result names it and a warning says so."""
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    res = evaluate_zero_shot(handset_model, w, _loader(), top_k=(1, 2, 3, 5))
    assert res["trivial_top_k"] == [3, 5] and res["top3"] == res["top5"] == 1.0
    assert "top-3/5 of 3 classes holds every class" in caplog.text
    from clipforge.eval.report import format_summary

    summary = {"model": "m", "num_samples": 6, "num_classes": 3, "num_templates": 1, "num_skipped": 0}
    summary |= {"top1": 0.5, "top5": 1.0, "mean_per_class_accuracy": 0.5, "per_class_accuracy": {}}
    assert "top-5 100.00% (every one of 3 classes)" in format_summary(summary | {"trivial_top_k": [5]})
    assert "every one" not in format_summary(summary | {"trivial_top_k": []})
    # top_k=10 is in the results file, and the printed summary shows it too (it showed top-1 and top-5 only)
    line = format_summary(summary | {"top10": 1.0, "trivial_top_k": [5, 10]}).splitlines()[2]
    assert line.startswith(
        "  top-1 50.00%   top-5 100.00% (every one of 3 classes)   top-10 100.00% (every one"
    )


def test_batches_with_sample_keys_score_the_same(handset_model, tokenizer):
    """A loader built with data.stream.return_keys=true yields (images, labels, keys): the keys are ignored."""
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    keyed = [(images, labels, [f"k{i}" for i in range(len(labels))]) for images, labels in _loader()]
    plain, with_keys = (
        evaluate_zero_shot(handset_model, w, _loader()),
        evaluate_zero_shot(handset_model, w, keyed),
    )
    assert (
        with_keys["top1"] == plain["top1"] and with_keys["confusion"].tolist() == plain["confusion"].tolist()
    )


def test_ignored_labels_are_counted_not_scored(handset_model, tokenizer):
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    images, labels = _loader(6)[0]
    labels = labels.clone()
    labels[1] = IGNORE_LABEL  # the misclassified cat is now "unreadable"
    res = evaluate_zero_shot(handset_model, w, [(images, labels), (images[:1], torch.tensor([IGNORE_LABEL]))])
    assert res["num_skipped"] == 2 and res["num_samples"] == 5
    assert res["top1"] == pytest.approx(4 / 5)
    assert res["confusion"][0].tolist() == [1, 0, 0]


def test_class_without_samples_has_nan_accuracy(handset_model, tokenizer):
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    images = images_from_features(FEATURES[:4])
    res = evaluate_zero_shot(handset_model, w, [(images, torch.tensor(LABELS[:4]))])
    assert math.isnan(res["per_class_accuracy"][2])
    assert res["mean_per_class_accuracy"] == pytest.approx(0.75)  # mean of 0.5 and 1.0


def test_label_outside_classifier_is_an_error(handset_model, tokenizer):
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    with pytest.raises(ValueError, match="outside the 3 classes"):
        evaluate_zero_shot(handset_model, w, [(images_from_features(FEATURES[:1]), torch.tensor([3]))])


@pytest.mark.parametrize("k", [0, -2, 2.5, "5"])
def test_a_top_k_that_is_no_rank_is_an_error(handset_model, tokenizer, k):
    # top_k=0 was reported as "top0": 0.0 and top_k=-2 sliced the wrong columns into a "top-2" accuracy
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    with pytest.raises(ValueError, match="top_k must be a whole number of at least 1"):
        evaluate_zero_shot(handset_model, w, _loader(), top_k=(1, k))
    with pytest.raises(ValueError, match="top_k must be a whole number of at least 1"):
        predict(handset_model, w, images_from_features(FEATURES[:1]), CLASSNAMES, k=k)


def test_evaluation_restores_train_mode(handset_model, tokenizer):
    handset_model.train()
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    evaluate_zero_shot(handset_model, w, _loader())
    assert handset_model.training


def test_predict_softmax_probabilities(handset_model, tokenizer):
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    feats = [0.5, 0.4, 0.3, 0.0]
    top = predict(handset_model, w, images_from_features([feats]), CLASSNAMES, k=2)[0]
    cos = torch.tensor(feats[:3]) / torch.tensor(feats).norm()
    probs = (100 * cos).softmax(0)
    assert [name for name, _ in top] == ["cat", "dog"]
    assert top[0][1] == pytest.approx(float(probs[0]), rel=1e-5)
    assert top[1][1] == pytest.approx(float(probs[1]), rel=1e-5)


def test_predict_sigmoid_for_siglip(handset_model, tokenizer):
    handset_model.logit_scale.data.fill_(math.log(10.0))
    handset_model.logit_bias = torch.nn.Parameter(torch.tensor(-5.0))
    w = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}"])
    top = predict(handset_model, w, images_from_features([[1.0, 0.0, 0.0, 0.0]]), CLASSNAMES, k=3)[0]
    assert top[0] == ("cat", pytest.approx(1 / (1 + math.exp(-(10 - 5)))))
    assert top[1][1] == pytest.approx(1 / (1 + math.exp(5)))


def test_bf16_autocast_path_gives_the_same_answers(handset_model, tokenizer):
    # CPU autocast exercises the reduced-precision code path that GPUs take with precision=auto
    w32 = build_zero_shot_classifier(handset_model, tokenizer, CLASSNAMES, ["{}", "a photo of a {}."])
    w16 = build_zero_shot_classifier(
        handset_model, tokenizer, CLASSNAMES, ["{}", "a photo of a {}."], precision="bf16"
    )
    assert w16.dtype == torch.float32
    torch.testing.assert_close(w16, w32, atol=1e-2, rtol=0)
    res = evaluate_zero_shot(handset_model, w16, _loader(), precision="bf16")
    assert res["confusion"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="precision"):
        evaluate_zero_shot(handset_model, w16, _loader(), precision="fp8")
