"""``compile=true`` traces each tower and the dense losses as one graph with no breaks (issue: GPU speed).

Tracing only (``torch._dynamo.explain``, no code generation), so it runs in seconds on CPU; a break
introduced later (a ``.item()``, a Python branch on a tensor, an unsupported call) fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from hydra.utils import instantiate

from clipforge.checkpoint import build_model


@pytest.mark.parametrize(
    ("model", "loss", "extra"),
    [
        ("tiny", "clip", []),
        ("tiny", "siglip", []),
        ("tiny", "clip", ["model.vision.patch_dropout=0.5", "model.text.context_length=8"]),
        ("siglip_b16", "siglip", ["model.vision.depth=1", "model.text.depth=1"]),
        ("tiny", "clip", ["grad_checkpointing=true"]),  # each block under torch.utils.checkpoint
    ],
)
def test_towers_and_loss_trace_as_single_graphs(compose_cfg, model, loss, extra):
    cfg = compose_cfg(f"model={model}", f"loss={loss}", *extra)
    clip = build_model(cfg.model, cfg.loss).train()
    clip.set_grad_checkpointing(cfg.grad_checkpointing)  # as train() sets it
    size, ctx = cfg.model.vision.img_size, cfg.model.text.context_length
    images = torch.randn(2, 3, size, size)
    tokens = torch.randint(1, 1000, (2, ctx))
    tokens[:, -1] = 49407
    loss_fn = instantiate(cfg.loss)
    img, txt = clip.encode_image(images), clip.encode_text(tokens)
    args = (img, txt, clip.logit_scale) + ((clip.logit_bias,) if clip.logit_bias is not None else ())
    for name, fn, inputs in (
        ("vision tower", clip.visual, (images,)),
        ("text tower", clip.text, (tokens,)),
        ("loss", loss_fn, args),
    ):
        dynamo.reset()
        report = dynamo.explain(fn)(*inputs)
        reasons = [str(b.reason) for b in report.break_reasons]
        assert (report.graph_count, report.graph_break_count) == (1, 0), f"{name}: {reasons}"
