"""Pictures of what a Vision Transformer sees (Dosovitskiy et al., 2021): the patch grid, the cosine
similarity of the learned position embeddings (their Fig. 7), per-head attention of the CLS token or of
the attention-pooling query (Zhai et al., 2022), and attention rollout (Abnar & Zuidema, 2020,
"Quantifying Attention Flow in Transformers").

Attention probabilities are read from the math (explicit softmax) attention path, which the blocks
switch to while :func:`record_attention` is active. Figures are built with matplotlib's object API
(no pyplot, no global backend), so the same code serves files, notebooks and W&B.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from clipforge.models.vision import VisionTransformer

ImageLike = str | Path | Image.Image | torch.Tensor
# ``interpolation``, ``mean``, ``std`` of the model's training run (clipforge.data.config.stored_preprocessing;
# None: CLIP's mean/std, bicubic)
Preprocessing = Mapping[str, Any] | None


def vision_tower(model: nn.Module) -> VisionTransformer:
    """The ViT inside a CLIP (``model.visual``) or the ViT itself."""
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"expected a CLIP or a VisionTransformer, got {type(model).__name__}")
    return visual


def model_input(image: ImageLike, img_size: int, preprocessing: Preprocessing = None) -> torch.Tensor:
    """A normalised (1, 3, S, S) batch, preprocessed as evaluation does (:func:`clipforge.eval.datasets.
    eval_transform`: short side to S, centre crop, the run's mean/std). A tensor is taken to be model input
    already ((3, S, S) or (B, 3, S, S), normalised)."""
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        if x.shape[-2:] != (img_size, img_size):
            raise ValueError(f"expected {img_size}x{img_size} input, got {tuple(x.shape[-2:])}")
        return x
    from clipforge.data.transforms import to_rgb
    from clipforge.eval.datasets import eval_transform, load_images

    transform = eval_transform(img_size, **(preprocessing or {}))
    if not isinstance(image, Image.Image):  # a path: an unreadable file is an error naming it
        return load_images(str(image), transform)
    return transform(to_rgb(image)).unsqueeze(0)


def denormalize(x: torch.Tensor, preprocessing: Preprocessing = None) -> np.ndarray:
    """(3, S, S) normalised (with ``preprocessing``'s mean/std) -> (S, S, 3) RGB in [0, 1] for display."""
    from clipforge.data.transforms import CLIP_MEAN, CLIP_STD

    mean = (preprocessing or {}).get("mean") or CLIP_MEAN
    std = (preprocessing or {}).get("std") or CLIP_STD
    x = x.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


@contextmanager
def record_attention(visual: VisionTransformer) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the block, forwards store attention probabilities: ``{"blocks": [(B, H, T, T) per layer],
    "pool": [(B, H, 1, N)]}`` (the attention-pool query, if the tower has one)."""
    modules = [blk.attn for blk in visual.blocks]
    if visual.attn_pool is not None:
        modules.append(visual.attn_pool)
    for m in modules:
        m.keep_attn, m.last_attn = True, None
    record: dict[str, list[torch.Tensor]] = {"blocks": [], "pool": []}
    try:
        yield record
    finally:
        for m in modules:
            m.keep_attn = False
        record["blocks"] = [blk.attn.last_attn for blk in visual.blocks if blk.attn.last_attn is not None]
        if visual.attn_pool is not None and visual.attn_pool.last_attn is not None:
            record["pool"] = [visual.attn_pool.last_attn]
        for m in modules:
            m.last_attn = None


def pos_embed_similarity(visual: VisionTransformer) -> torch.Tensor:
    """(N, N) cosine similarity between the position embeddings of the N patches (prefix tokens left out)."""
    pos = visual.pos_embed[0, visual.num_prefix_tokens :].detach().float().cpu()  # (N, D)
    pos = F.normalize(pos, dim=-1)
    return pos @ pos.T


def similarity_mosaic(sim: torch.Tensor) -> np.ndarray:
    """Tile i of a g x g mosaic (separated by NaN lines) shows patch i's similarity to every patch."""
    g = math.isqrt(sim.shape[0])
    tiles = sim.reshape(g, g, g, g).numpy()  # (row, col, row', col')
    out = np.full((g * (g + 1) - 1, g * (g + 1) - 1), np.nan, dtype=np.float32)
    for r in range(g):
        for c in range(g):
            out[r * (g + 1) : r * (g + 1) + g, c * (g + 1) : c * (g + 1) + g] = tiles[r, c]
    return out


def rollout(blocks: list[torch.Tensor], readout: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) -> (B, N) relevance of each patch to the readout.

    Each layer's head-averaged attention gets the residual path added (0.5 A + 0.5 I, rows renormalised);
    layers compose by matrix product. The readout is the CLS row, the pooling query's attention over
    patches (``readout``: (B, N)), or, without either, the mean over patch rows.
    """
    joint = None
    for attn in blocks:
        a = attn.float().mean(dim=1)  # (B, T, T)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    if readout is not None:  # the pooling query attends over patch tokens only
        flow = readout.float().unsqueeze(1) @ joint[:, num_prefix:]  # (B, 1, T)
        flow = flow[:, 0]
    elif num_prefix:
        flow = joint[:, 0]
    else:
        flow = joint.mean(dim=1)
    flow = flow[:, num_prefix:]
    return flow / flow.sum(dim=-1, keepdim=True)


@torch.no_grad()
def vit_attention(
    model: nn.Module, image: ImageLike, layer: int = -1, preprocessing: Preprocessing = None
) -> dict[str, Any]:
    """Run ``image`` through the image tower (eval mode, fp32) and return the data behind the pictures.

    ``heads``: (H, g, g) per-head attention of the readout: the attention-pool query when the tower pools
    with ``map`` (``layer`` then must name the last block), else the CLS token at block ``layer``, else (no CLS) the
    mean attention each patch receives at that block. ``rollout``: (g, g). ``image``: (S, S, 3) in [0, 1].
    ``preprocessing``: how the model's run prepared its images (see :data:`Preprocessing`).
    """
    visual = vision_tower(model)
    param = next(visual.parameters())
    x = model_input(image, visual.img_size, preprocessing).to(device=param.device, dtype=param.dtype)[:1]
    was_training = visual.training
    visual.eval()
    try:
        with record_attention(visual) as rec, torch.autocast(param.device.type, enabled=False):
            visual(x)
    finally:
        visual.train(was_training)
    g, p = visual.grid_size, visual.num_prefix_tokens
    depth = len(rec["blocks"])
    if not -depth <= layer < depth:
        raise ValueError(
            f"layer {layer} is not a block of this {depth}-block image tower: use 0..{depth - 1} or -1"
        )
    layer_index = range(depth)[layer]
    if rec["pool"] and layer_index != depth - 1:  # the query reads the last block: any other was ignored
        raise ValueError(
            f"layer {layer}: this tower reads out with an attention-pool query, whose attention over the last "
            "block's tokens is the per-head picture; it has no per-layer readout to draw (leave layer at -1)"
        )
    attn = rec["blocks"][layer_index][0].float()  # (H, T, T)
    if rec["pool"]:
        heads, query = rec["pool"][0][0, :, 0].float(), "attention-pool query"  # (H, N)
    elif p:
        heads, query = attn[:, 0, p:], f"CLS token, layer {layer_index}"
    else:
        heads, query = attn[:, p:, p:].mean(dim=1), f"mean over queries, layer {layer_index}"
    readout = rec["pool"][0][:, :, 0].mean(dim=1) if rec["pool"] else None  # (1, N)
    return {
        "image": denormalize(x[0], preprocessing),
        "heads": heads.reshape(-1, g, g).cpu(),
        "rollout": rollout(rec["blocks"], readout, p)[0].reshape(g, g).cpu(),
        "query": query,
        "layer": layer_index,
        "patch_size": visual.patch_size,
    }


def _overlay(ax: Any, image: np.ndarray, amap: torch.Tensor, title: str) -> None:
    size = image.shape[0]
    m = F.interpolate(amap[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    m = (m - m.min()) / (m.max() - m.min() + 1e-12)
    ax.imshow(image.mean(axis=-1), cmap="gray", vmin=0, vmax=1)  # grey underlay keeps the heat map readable
    ax.imshow(m.numpy(), cmap="inferno", alpha=0.6)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def vit_figures(
    model: nn.Module, image: ImageLike, layer: int = -1, preprocessing: Preprocessing = None
) -> dict[str, Figure]:
    """Matplotlib figures: ``patch_grid``, ``pos_embed_similarity``, ``attention_heads``, ``attention_rollout``."""
    visual = vision_tower(model)
    data = vit_attention(model, image, layer, preprocessing)
    img, g, patch = data["image"], visual.grid_size, data["patch_size"]
    figs: dict[str, Figure] = {}

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(img, interpolation="nearest")
    for i in range(1, g):
        ax.axhline(i * patch - 0.5, color="white", lw=0.6)
        ax.axvline(i * patch - 0.5, color="white", lw=0.6)
    ax.set_title(f"{g}x{g} patches of {patch}x{patch} px", fontsize=9)
    ax.set_axis_off()
    figs["patch_grid"] = fig

    fig = Figure(figsize=(5, 4.4), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(similarity_mosaic(pos_embed_similarity(visual)), cmap="viridis", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title("position embedding similarity\n(tile r,c: patch (r,c) vs every patch)", fontsize=9)
    ax.set_axis_off()
    figs["pos_embed_similarity"] = fig

    heads = data["heads"]
    cols = math.ceil(math.sqrt(heads.shape[0]))
    rows = math.ceil(heads.shape[0] / cols)
    fig = Figure(figsize=(2 * cols, 2 * rows + 0.4), dpi=100)
    for h in range(heads.shape[0]):
        _overlay(fig.add_subplot(rows, cols, h + 1), img, heads[h], f"head {h}")
    fig.suptitle(f"attention of the {data['query']}", fontsize=9)
    figs["attention_heads"] = fig

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(img)
    ax.set_title("input", fontsize=8)
    ax.set_axis_off()
    _overlay(
        fig.add_subplot(1, 2, 2), img, data["rollout"], f"attention rollout ({len(visual.blocks)} layers)"
    )
    figs["attention_rollout"] = fig
    return figs


def figure_to_array(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of ``fig`` (for W&B or tests)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_vit_pictures(
    model: nn.Module,
    image: ImageLike,
    out_dir: str | Path,
    layer: int = -1,
    preprocessing: Preprocessing = None,
) -> dict[str, Path]:
    """Write the pictures of :func:`vit_figures` as ``out_dir/<name>.png``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in vit_figures(model, image, layer, preprocessing).items():
        FigureCanvasAgg(fig)
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], bbox_inches="tight")
    return paths
