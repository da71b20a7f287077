"""Our classifier against open_clip's build_zero_shot_classifier on the same (open_clip) model."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.zero_shot_classifier import build_zero_shot_classifier as oc_build
from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

from clipforge.data.tokenizer import Tokenizer
from clipforge.eval.metadata import CIFAR10_CLASSNAMES
from clipforge.eval.zeroshot import build_zero_shot_classifier


@pytest.fixture(scope="module")
def oc_model() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(context_length=24, vocab_size=49408, width=32, heads=2, layers=2),
    )
    return model.eval()


def test_matches_open_clip_build_zero_shot_classifier(oc_model):
    tokenizer = Tokenizer(24)
    templates = SIMPLE_IMAGENET_TEMPLATES  # open_clip's own lambdas
    ours = build_zero_shot_classifier(oc_model, tokenizer, CIFAR10_CLASSNAMES, templates, batch_size=16)
    ref = oc_build(oc_model, tokenizer, CIFAR10_CLASSNAMES, templates, num_classes_per_batch=3)
    assert ours.shape == ref.shape == (32, 10)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    # and the legacy one-class-at-a-time reference
    from open_clip.zero_shot_classifier import build_zero_shot_classifier_legacy

    torch.testing.assert_close(
        ours,
        build_zero_shot_classifier_legacy(oc_model, tokenizer, CIFAR10_CLASSNAMES, templates),
        atol=2e-6,
        rtol=0,
    )
    # a wrong recipe (no per-prompt normalisation) would differ by far more than the tolerance
    assert not torch.allclose(
        ours[:, 0],
        torch.nn.functional.normalize(
            oc_model.encode_text(tokenizer([t("airplane") for t in templates])).mean(0), dim=0
        ),
        atol=1e-4,
    )
