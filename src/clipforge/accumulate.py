"""Exact large contrastive batches on little memory by feature caching: GradCache (Gao et al., 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"), as in open_clip's
``--accum-freq``.

Plain gradient accumulation does not add negatives: a contrastive loss over ``k`` micro-batches of ``b``
is not the loss over one batch of ``k * b``. Feature caching gets the big-batch gradient exactly:

1. embed every micro-batch without a graph and keep the features (``(k * b, d)``, small);
2. compute the loss over the whole cached batch and its gradient ``G = dL/df`` with respect to the cached
   features (and to the logit scale/bias, which enter only here);
3. re-embed each micro-batch with a graph and back-propagate the surrogate ``sum(f * G)``: by the chain
   rule its parameter gradient is exactly that micro-batch's share of ``dL/dθ``.

Peak activation memory is that of one micro-batch; the price is one extra forward pass. Random layers
(patch dropout, drop path) must draw the same numbers in steps 1 and 3, so the RNG state is recorded
before each cached forward and restored for its re-forward. Under data parallelism the loss of step 2
gathers the cached features of all ranks exactly as it would gather a normal batch's, and the caller
passes a ``no_sync`` context so DDP all-reduces the accumulated gradients once, after the last micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# (images, tokens) -> (image_features, text_features), each (b, d), with a graph to the parameters.
Embed = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# () -> (logit_scale, logit_bias or None), with a graph to the parameters.
ScaleBias = Callable[[], tuple[Tensor, Tensor | None]]
# (image_features, text_features, logit_scale, logit_bias) -> scalar loss.
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


@dataclass
class CachedStep:
    """What one accumulated step computed, all detached: the loss and the features of the whole batch."""

    loss: Tensor
    image_features: Tensor  # (B, d) as returned by ``embed``
    text_features: Tensor  # (B, d)
    logit_scale: Tensor
    logit_bias: Tensor | None


class _RngState:
    """The CPU generator and, for a CUDA tensor, its device's generator: all a forward pass draws from."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state, then put the generators back where they were."""
        cuda_devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def feature_cache_backward(
    embed: Embed,
    scale_bias: ScaleBias,
    loss_fn: LossFn,
    images: Tensor,
    tokens: Tensor,
    accum_freq: int,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> CachedStep:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over the whole batch, embedding it in
    ``accum_freq`` micro-batches (``tensor_split``, so any batch size works).

    ``backward`` runs each micro-batch's backward pass (Lightning: ``manual_backward``, which applies
    mixed-precision scaling). ``no_sync`` wraps every micro-batch but the last, so a data-parallel wrapper
    all-reduces once (Lightning: ``strategy.block_backward_sync``). The scale/bias gradient is folded into
    the last micro-batch's surrogate, so every parameter receives its gradient in that synchronised pass
    (DDP with ``find_unused_parameters=False`` requires it).
    """
    if accum_freq < 1:
        raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
    micro = list(zip(images.tensor_split(accum_freq), tokens.tensor_split(accum_freq)))
    micro = [(im, tok) for im, tok in micro if len(im)]  # a batch smaller than accum_freq

    # 1. Cached forward passes, no graph: activations of one micro-batch at a time.
    rng_states, img_cache, txt_cache = [], [], []
    with torch.no_grad():
        for im, tok in micro:
            rng_states.append(_RngState(im.device))
            img, txt = embed(im, tok)
            img_cache.append(img)
            txt_cache.append(txt)

    # 2. The loss over the whole batch and its gradient with respect to the cached features.
    image_features = torch.cat(img_cache).requires_grad_()
    text_features = torch.cat(txt_cache).requires_grad_()
    scale, bias = scale_bias()
    scale_leaf = scale.detach().requires_grad_()
    bias_leaf = bias.detach().requires_grad_() if bias is not None else None
    with torch.enable_grad():
        loss = loss_fn(image_features, text_features, scale_leaf, bias_leaf)
    inputs = [image_features, text_features, scale_leaf] + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]  # e.g. bias of a softmax
    sizes = [len(im) for im, _ in micro]
    g_img, g_txt = grads[0].split(sizes), grads[1].split(sizes)

    # 3. Re-embed each micro-batch with a graph, from the same RNG state, and back-propagate sum(f * G).
    last = len(micro) - 1
    for j, (im, tok) in enumerate(micro):
        with no_sync() if j < last else contextlib.nullcontext(), rng_states[j].replay():
            img, txt = embed(im, tok)
            surrogate = (img * g_img[j]).sum() + (txt * g_txt[j]).sum()
            if j == last:
                s, b = scale_bias()
                surrogate = surrogate + (s * grads[2]).sum()
                if b is not None:
                    surrogate = surrogate + (b * grads[3]).sum()
            backward(surrogate)

    return CachedStep(
        loss=loss.detach(),
        image_features=image_features.detach(),
        text_features=text_features.detach(),
        logit_scale=scale.detach(),
        logit_bias=bias.detach() if bias is not None else None,
    )


_AUTO = "epoch_loop.automatic_optimization.optim_progress"
_MANUAL = "epoch_loop.manual_optimization.optim_step_progress"


def carry_step_progress(checkpoint: dict[str, Any], automatic: bool) -> int:
    """Move a checkpoint's optimizer-step count to the loop this run steps with; returns the steps moved.

    ``accum_freq=1`` steps through Lightning's automatic optimization, ``accum_freq>1`` through manual
    optimization, and Lightning counts ``global_step`` in whichever loop ran. A resume that changes between
    them found no steps in its own loop and started again from step 0, while the LR schedule went on from
    the checkpoint's step (and ``max_steps`` trained that many steps more)."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    auto, manual = loops.get(_AUTO), loops.get(_MANUAL)
    if auto is None or manual is None:
        return 0
    have = auto["optimizer"]["step"] if automatic else manual
    other = manual if automatic else auto["optimizer"]["step"]
    if have["total"]["completed"] or not other["total"]["completed"]:
        return 0
    if automatic:
        auto["optimizer"]["step"] = copy.deepcopy(other)
    else:
        loops[_MANUAL] = copy.deepcopy(other)
    return int(other["total"]["completed"])
