"""Linear-probe evaluation of frozen image features, as in CLIP (Radford et al., 2021, section 3.2 and
appendix A.3): an L2-regularised logistic regression (scikit-learn, L-BFGS, at most 1,000 iterations)
is fit on the image embeddings of a labelled train split and scored on its test split.

The regularisation strength is chosen as in the paper when ``C`` is not given: a validation split
is carved from the train split, ``C`` is tried at 10^-6, 10^-4, ..., 10^6, and the interval around the
best value is halved until the grid has 8 steps per decade; the final model is refit on the whole
train split. Features of all ranks are gathered and every rank fits the same (deterministic) model.

The gathered rows are put in a canonical order (by label, then by the feature vector's bytes) before
anything is fitted, so the validation split, the chosen ``C`` and every score depend only on the set of
(feature, label) pairs: not on the order in which ranks, DataLoader workers or shard splits deliver them
(rank-interleaved batches of a strided stream, or shards dealt round-robin to the ranks, would otherwise
put different images in the validation split on 1 and on 2 ranks).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.distributed import all_gather_cat, all_reduce_sum
from clipforge.eval.runtime import autocast, eval_mode, progress_bar, resolve_device
from clipforge.eval.zeroshot import IGNORE_LABEL, check_top_k, classification_metrics

log = logging.getLogger(__name__)


def extract_features(
    model: nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = False,
    distributed: bool = True,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(features (N, D) float32, labels (N,) int64, num_skipped)`` over all ranks, on the CPU, rows in
    :func:`canonical_order` (the same for any number of ranks)."""
    dev = resolve_device(device, model)
    feats, labels, skipped = [], [], 0
    with eval_mode(model):
        for batch in progress_bar(dataloader, progress, "features"):
            images, y = batch[0], batch[1]  # a third item (sample keys, return_keys) is not needed
            keep = y != IGNORE_LABEL
            skipped += int((~keep).sum())
            if not keep.any():
                continue
            if not keep.all():  # images[keep] copies the batch: only when there is a sample to drop
                images, y = images[keep.to(images.device)], y[keep]
            with autocast(dev, precision):
                f = model.encode_image(images.to(dev, non_blocking=True), normalize=False)
            f = f.float()
            feats.append(F.normalize(f, dim=-1) if normalize else f)
            labels.append(y.to(dev))
    x = torch.cat(feats) if feats else torch.zeros(0, 1, device=dev)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=dev)
    x, y = all_gather_cat(x, enabled=distributed), all_gather_cat(y, enabled=distributed)
    skipped = int(all_reduce_sum(torch.tensor([skipped], device=dev), enabled=distributed).item())
    xs, ys = x.cpu().numpy(), y.cpu().numpy()
    order = canonical_order(xs, ys)
    return xs[order], ys[order], skipped


def canonical_order(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The permutation that sorts rows by label, then by the bytes of the feature vector: a function of
    the set of rows alone (equal rows are interchangeable), whatever order they came in."""
    rows = np.ascontiguousarray(x).reshape(len(x), -1)
    keys = rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).ravel()
    by_bytes = np.argsort(keys, kind="stable")
    return by_bytes[np.argsort(y[by_bytes], kind="stable")]


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings():
        # CLIP stops at 1,000 iterations too; a probe that has not fully converged is still reported.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(round(len(idx) * val_fraction), len(idx) - 1)  # keep one per class for training
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.concatenate(train_idx), np.concatenate(val_idx)


def select_C(
    x: np.ndarray, y: np.ndarray, *, val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """CLIP's parametric binary search for ``C`` (= 1/lambda) on a stratified validation split.

    Returns ``(best C, {log10 C: validation accuracy})``; ties go to the stronger regularisation.
    """
    tr, va = _stratified_split(y, val_fraction, seed)
    if len(va) == 0 or len(np.unique(y[tr])) < 2:
        raise ValueError(
            "the train split is too small to hold out a validation part for choosing C "
            "(give C, linear_probe.C=<value> on the command line, to skip the search)"
        )
    scores: dict[float, float] = {}

    def score(log_c: float) -> float:
        if log_c not in scores:
            clf = _fit(x[tr], y[tr], 10.0**log_c, max_iter)
            scores[log_c] = float((clf.predict(x[va]) == y[va]).mean())
            # one fit takes minutes on a large train split: say where the search is
            log.info(
                "linear probe: C=%.3g, validation accuracy %.2f%% (%d fits so far)",
                10.0**log_c,
                100 * scores[log_c],
                len(scores),
            )
        return scores[log_c]

    def best_of(candidates: Iterable[float]) -> float:
        return max(candidates, key=lambda lc: (score(lc), -lc))

    best = best_of([-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0])
    step = 2.0
    while step > 1 / 8:  # halve the interval around the peak down to 8 steps per decade
        step /= 2
        best = best_of([best - step, best, best + step])
    return 10.0**best, dict(sorted(scores.items()))


def fit_and_score(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    C: float | None = None,
    top_k: Sequence[int] = (1, 5),
    max_iter: int = 1000,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the probe on ``train``; top-k, per-class accuracy and confusion on ``test``."""
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(
            f"linear probe needs samples in both splits (train {len(train_y)}, test {len(test_y)})"
        )
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear probe needs at least two classes in the train split")
    num_classes = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    sweep: dict[float, float] = {}
    if C is None:
        C, sweep = select_C(train_x, train_y, val_fraction=val_fraction, max_iter=max_iter, seed=seed)
    clf = _fit(train_x, train_y, C, max_iter)
    # Columns of predict_proba follow clf.classes_; classes absent from train get probability 0.
    scores = np.full((len(test_x), num_classes), -np.inf)
    scores[:, clf.classes_] = clf.predict_log_proba(test_x)
    scores_t = torch.from_numpy(scores)
    labels = torch.from_numpy(test_y).long()
    ks = sorted({check_top_k(k) for k in (*top_k, 1, 5)})
    topk = scores_t.topk(min(ks[-1], num_classes), dim=-1).indices
    hit = topk == labels[:, None]
    counts = torch.tensor([int(hit[:, :k].any(-1).sum()) for k in ks] + [0])
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
    confusion.index_add_(0, labels * num_classes + topk[:, 0], torch.ones_like(labels))
    out = classification_metrics(confusion.view(num_classes, num_classes), counts, ks)
    out |= {"C": float(C), "c_sweep": sweep, "num_train": len(train_y)}
    return out


def linear_probe(
    model: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int | None = None,
    C: float | None = None,
    device: str | torch.device | None = None,
    normalize: bool = True,
    top_k: Sequence[int] = (1, 5),
    max_iter: int = 1000,
    progress: bool = False,
    distributed: bool = True,
    precision: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a logistic-regression probe on frozen image features; metrics on the test split.

    ``normalize`` L2-normalises features first, so one ``C`` grid suits models whose feature scales
    differ. Returns ``top1``/``top5``, ``per_class_accuracy``, ``confusion``, ``num_samples`` (test),
    ``num_train``, ``num_skipped`` (unreadable images in both splits), ``C`` and the ``c_sweep``.
    """
    kw = dict(
        device=device, normalize=normalize, progress=progress, distributed=distributed, precision=precision
    )
    train_x, train_y, skip_tr = extract_features(model, train_loader, **kw)
    test_x, test_y, skip_te = extract_features(model, test_loader, **kw)
    out = fit_and_score(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=num_classes,
        C=C,
        top_k=top_k,
        max_iter=max_iter,
        seed=seed,
    )
    out["num_skipped"] = skip_tr + skip_te
    return out
