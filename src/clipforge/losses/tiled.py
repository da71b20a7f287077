"""Tiled contrastive-loss kernels whose memory does not grow with the square of the batch.

* CLIP (Radford et al., 2021): the log-sum-exp of every row (and column) of the logit matrix is built
  tile by tile with the online softmax of Milakov & Gimelshein (2018), as FlashAttention (Dao et al.,
  2022) does: forward keeps only per-row and per-column statistics; backward recomputes each tile.
* SigLIP (Zhai et al., 2023): the sum of ``softplus`` over all pairs, tile by tile. A logit's gradient,
  ``sigmoid(l)``, depends on its tile alone, so on one device forward also accumulates the feature
  gradients (three matmuls per tile, as dense, instead of four with recomputation); the ring of
  ``siglip.py`` recomputes tiles in backward instead, because its gradients must travel between ranks.

Plain PyTorch, so they run on CPU and GPU alike (a fused Triton kernel could replace the tile loop on
GPU, but there was no GPU to measure one against this). Working memory is a few ``tile x tile`` blocks
plus ``O(B d)`` for inputs and gradients. Scales are folded into the small ``tile x d`` operands and
``d loss / d scale`` is read off the accumulated raw gradient, ``sum_i x_i . (G y)_i``, so no extra pass
over any tile is spent on either.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

IMPLS = ("auto", "dense", "tiled")


def check_impl(impl: str, tile_size: int) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")


def use_tiled(impl: str, rows: int, cols: int, tile_size: int) -> bool:
    """``auto`` tiles as soon as a logit block is larger than one tile."""
    return impl == "tiled" or (impl == "auto" and rows * cols > tile_size * tile_size)


def tiles(n: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


def stat_dtype(x: Tensor) -> torch.dtype:
    # Reductions of bf16/fp16 logits lose too much; keep statistics in at least float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``x``'s device type: the kernels compute in the dtype of their features."""
    return torch.autocast(x.device.type, enabled=False)


def without_autocast(method: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` or ``backward`` of an ``autograd.Function`` run with autocast off (see ``autocast_off``).

    Under ``bf16-mixed`` the loss runs inside autocast, which would turn every tile's matmul into bf16
    whatever the features' dtype (float32 after ``F.normalize``), while backward, which recomputes the
    tiles, runs wherever the caller's ``backward()`` does, usually outside autocast. The CLIP kernels would
    then take softmaxes of float32 logits against log-sum-exps of bf16 ones (rows that do not sum to one:
    gradients off by tens of percent at scale 100), and SigLIP's would add bf16 tiles into float32
    gradients (a dtype error). In the features' dtype both passes see the same logits.
    """

    @functools.wraps(method)
    def run(ctx: Any, *args: Any) -> Any:
        with autocast_off(next(a for a in args if isinstance(a, Tensor))):
            return method(ctx, *args)

    return run


# ----------------------------------------------------------------------------------------- SigLIP tiles
def _softplus_sum(logits: Tensor, acc: torch.dtype) -> Tensor:
    # Above the threshold softplus(z) = z to within the dtype's precision (e^-20 / 20 < fp32 eps).
    threshold = 40.0 if logits.dtype == torch.float64 else 20.0
    return F.softplus(logits, threshold=threshold).sum(dtype=acc)


def sigmoid_tiles(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    tile: int,
    *,
    value: bool = True,
    grads: tuple[Tensor, Tensor] | None = None,
    alpha: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One pass over the tiles of ``l = scale * x @ y.T + bias``.

    Returns ``(sum_ij softplus(l_ij), sum_ij G_ij)`` (zeros for what is not asked), the sigmoid loss of
    all pairs taken as negatives and its gradient w.r.t. the bias, with ``G = alpha * sigmoid(l)`` the
    gradient w.r.t. the logits (``alpha`` defaults to 1). With ``grads=(gx, gy)`` it also accumulates the
    raw feature gradients ``gx += G @ y`` and ``gy += G.T @ x`` (before the factor ``scale``).
    """
    acc = stat_dtype(x)
    total = torch.zeros((), dtype=acc, device=x.device)
    g_bias = torch.zeros((), dtype=acc, device=x.device)
    bias = bias.to(x.dtype)
    for i0, i1 in tiles(x.shape[0], tile):
        xi = x[i0:i1]
        xs = xi * scale  # (ti, d)
        xa = xi if alpha is None else xi * alpha
        for j0, j1 in tiles(y.shape[0], tile):
            yj = y[j0:j1]
            logits = torch.addmm(bias, xs, yj.T)  # (ti, tj)
            if value:
                total += _softplus_sum(logits, acc)
            if grads is not None:
                p = logits.sigmoid_()  # the tile's logits are not needed any more
                g_bias += p.sum(dtype=acc)
                grads[0][i0:i1].addmm_(p, yj if alpha is None else yj * alpha)
                grads[1][j0:j1].addmm_(p.T, xa)
    return total, g_bias if alpha is None else g_bias * alpha


class SigmoidTiled(torch.autograd.Function):
    """Single-device SigLIP loss ``coef * (sum_ij softplus(l_ij) - sum_i l_ii)``, tiled.

    The gradient w.r.t. each logit, ``sigmoid(l)``, needs nothing beyond its own tile, so forward computes
    it along with the value and keeps only the ``O(B d)`` feature gradients: one matmul per tile in
    forward and two for the gradients, as a dense implementation, instead of recomputing the tile in
    backward. Use it only when a backward pass will follow (``siglip_loss`` checks).
    """

    @staticmethod
    @without_autocast
    def forward(
        ctx: FunctionCtx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, tile: int, coef: float
    ) -> Tensor:
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        total, g_bias = sigmoid_tiles(x, y, scale, bias, tile, grads=(gx, gy))
        n = x.shape[0]
        pos = torch.linalg.vecdot(x, y).sum(dtype=total.dtype) * scale + bias * n  # sum_i l_ii
        gx.sub_(y)  # d(-sum_i l_ii) / d(scale x_i), raw; in place: no (B, d) temporaries
        gy.sub_(x)
        g_bias -= n
        g_scale = torch.linalg.vecdot(x, gx).sum(dtype=total.dtype)  # sum_ij G_ij x_i . y_j
        ctx.save_for_backward(gx, gy, scale, g_scale, g_bias)
        ctx.coef, ctx.bias_dtype = coef, bias.dtype
        return (coef * (total - pos)).to(x.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, g: Tensor):
        gx, gy, scale, g_scale, g_bias = ctx.saved_tensors
        alpha = g * ctx.coef
        feat = (alpha * scale).to(gx.dtype)
        return (
            gx * feat,
            gy * feat,
            (alpha * g_scale).to(scale.dtype),
            (alpha * g_bias).to(ctx.bias_dtype),
            None,
            None,
        )


# ------------------------------------------------------------------------------------------- CLIP tiles
def lse_tiles(
    a: Tensor, c: Tensor, scale: Tensor, tile: int, lse_row: Tensor, lse_col: Tensor | None
) -> None:
    """Merge the row log-sum-exps of ``S = scale * a @ c.T`` into ``lse_row`` (``(n,)``) and, if given, its
    column log-sum-exps into ``lse_col`` (``(m,)``), in place, one tile of ``S`` at a time.

    This is the online softmax: statistics that already cover other columns (rows) are combined with
    this tile's by ``logaddexp``, so ``S`` can arrive in pieces (tiles, or blocks of another rank).
    """
    sd = lse_row.dtype
    for i0, i1 in tiles(a.shape[0], tile):
        a_s = a[i0:i1] * scale  # (ti, d)
        row = lse_row[i0:i1]
        for j0, j1 in tiles(c.shape[0], tile):
            s = (a_s @ c[j0:j1].T).to(sd)  # (ti, tj)
            torch.logaddexp(row, torch.logsumexp(s, dim=1), out=row)
            if lse_col is not None:
                col = lse_col[j0:j1]
                torch.logaddexp(col, torch.logsumexp(s, dim=0), out=col)


def lse_grad_tiles(
    a: Tensor,
    c: Tensor,
    scale: Tensor,
    tile: int,
    lse_row: Tensor,
    w_row: Tensor,
    ga: Tensor,
    gc: Tensor,
    lse_col: Tensor | None = None,
    w_col: Tensor | None = None,
    col_dots: Tensor | None = None,
) -> None:
    """Accumulate ``ga += G @ c`` and ``gc += G.T @ a`` (raw: before the factor ``scale``) for
    ``G_ij = w_row * softmax_rows(S)_ij [+ w_col_j * softmax_cols(S)_ij]``, ``S = scale * a @ c.T``,
    recomputing each tile of ``S`` and its softmaxes from the complete log-sum-exps of ``lse_tiles``.

    ``w_row`` is 0-dim, ``w_col`` 0-dim or ``(m,)``: under the CLIP ring the column terms of a visiting
    block belong to the loss of the rank that owns it, and take that rank's weight. ``col_dots``
    (``(m,)``), if given, accumulates ``w_col_j * sum_i softmax_cols(S)_ij S_ij``, which the owner needs
    for its own ``d loss / d scale``.
    """
    sd = lse_row.dtype
    # Fold the weights into the statistics, w * exp(S - lse) = sign(w) * exp(S - (lse - log|w|)), so that
    # no pass over a tile is spent on them (a zero weight gives exp(-inf) = 0). The row sign goes into
    # the small (tile, d) operands (+1 for a zero weight, whose terms the exponent has already zeroed),
    # the column sign relative to it into the sum of the two softmaxes.
    sign_row = torch.where(w_row < 0, -1.0, 1.0).to(a.dtype)
    row_shift = lse_row - w_row.to(sd).abs().log()
    if lse_col is not None:
        w_col = w_col.to(sd).expand(c.shape[0])  # (m,)
        col_shift = lse_col - w_col.abs().log()
        col_sign = w_col.sign()
        rel_sign = col_sign * sign_row.to(sd)
    for i0, i1 in tiles(a.shape[0], tile):
        ai = a[i0:i1]
        a_s, a_g = ai * scale, ai * sign_row  # (ti, d)
        for j0, j1 in tiles(c.shape[0], tile):
            cj = c[j0:j1]
            s = (a_s @ cj.T).to(sd)  # (ti, tj)
            p = (s - row_shift[i0:i1, None]).exp_()  # |w_row| * row softmax
            if lse_col is not None:
                if col_dots is None:
                    q = s.sub_(col_shift[None, j0:j1]).exp_()  # |w_col| * column softmax; s is spent
                    p.addcmul_(q, rel_sign[None, j0:j1])
                else:
                    q = (s - col_shift[None, j0:j1]).exp_()
                    p.addcmul_(q, rel_sign[None, j0:j1])
                    col_dots[j0:j1].addcmul_(q.mul_(s).sum(dim=0), col_sign[j0:j1])
            p = p.to(a.dtype)
            ga[i0:i1].addmm_(p, cj * sign_row)
            gc[j0:j1].addmm_(p.T, a_g)


class TiledLSE(torch.autograd.Function):
    """``coef * (sum_i lse_j S_ij [+ sum_j lse_i S_ij] - k sum_i S_{i, offset + i})`` with
    ``S = scale * a @ c.T``, never materialising ``S``.

    ``both=True`` (single device, ``a`` and ``c`` the two modalities of the same batch) adds the column
    log-sum-exps from the same tiles and uses ``k = 2``: that is the symmetric CLIP loss times ``2 B``.
    ``both=False`` (distributed: local rows ``a`` against gathered columns ``c``) uses ``k = 1``.
    """

    @staticmethod
    @without_autocast
    def forward(
        ctx: FunctionCtx, a: Tensor, c: Tensor, scale: Tensor, tile: int, both: bool, offset: int, coef: float
    ):
        n, m = a.shape[0], c.shape[0]
        sd = stat_dtype(a)
        lse_row = torch.full((n,), float("-inf"), dtype=sd, device=a.device)
        lse_col = torch.full((m,), float("-inf"), dtype=sd, device=a.device) if both else None
        lse_tiles(a, c, scale, tile, lse_row, lse_col)
        k = 2 if both else 1
        pos = torch.linalg.vecdot(a, c[offset : offset + n]).sum(dtype=sd) * scale
        total = lse_row.sum() + (lse_col.sum() if both else 0.0) - k * pos
        ctx.save_for_backward(a, c, scale, lse_row, lse_col if both else lse_row)
        ctx.tile, ctx.both, ctx.offset, ctx.coef = tile, both, offset, coef
        return (coef * total).to(a.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, g: Tensor):
        a, c, scale, lse_row, lse_col = ctx.saved_tensors
        both, offset, n = ctx.both, ctx.offset, a.shape[0]
        alpha = (g * ctx.coef).to(lse_row.dtype)
        ga, gc = torch.zeros_like(a), torch.zeros_like(c)  # raw: G @ c and G.T @ a
        lse_grad_tiles(a, c, scale, ctx.tile, lse_row, alpha, ga, gc, lse_col if both else None, alpha)
        # the positives: -k * S_{i, offset + i}
        k, alpha = (2 if both else 1), alpha.to(a.dtype)
        ga.addcmul_(c[offset : offset + n], alpha, value=-k)  # in place: no (B, d) temporaries
        gc[offset : offset + n].addcmul_(a, alpha, value=-k)
        g_scale = None
        if ctx.needs_input_grad[2]:
            g_scale = torch.linalg.vecdot(a, ga).sum(dtype=lse_row.dtype).to(scale.dtype)
        return ga.mul_(scale), gc.mul_(scale), g_scale, None, None, None, None


@torch.compiler.disable
def tiled_lse(a: Tensor, c: Tensor, scale: Tensor, tile: int, both: bool, offset: int, coef: float) -> Tensor:
    """``TiledLSE``, run eagerly under ``torch.compile``: tracing would unroll the tile loops into one graph
    per batch size, and the tiles are matmul-bound anyway."""
    return TiledLSE.apply(a, c, scale, tile, both, offset, coef)
