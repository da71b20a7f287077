"""Optimizer parameter groups and the learning-rate schedule used in CLIP pretraining
(Radford et al., 2021: AdamW with decoupled weight decay, Loshchilov & Hutter, 2019; linear warmup then
cosine decay, Loshchilov & Hutter, 2017).

Weight decay applies to matrices only: biases, norm gains, embeddings, position embeddings, the CLS
token and the logit scale/bias are excluded (``p.ndim < 2`` or named by ``model.no_weight_decay()``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """``[decay group, no-decay group]``. ``decay_embeddings`` decays the embedding tables too (token and
    position embeddings: the names ``no_weight_decay`` lists whose squeezed shape has 2 dims), as
    open_clip's rule does (every matrix but norms, biases and the logit scale); CLS tokens, attention-pool
    latents, norms, biases and the logit scale/bias are never decayed."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        table = decay_embeddings and p.squeeze().ndim >= 2
        (no_decay if p.ndim < 2 or (name in skip and not table) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def decayed_names(
    model: nn.Module, objectives: nn.Module | None = None, decay_embeddings: bool = False
) -> set[str]:
    """The names of the parameters that take weight decay: the model's by :func:`param_groups`' rule, and
    the ``objectives.``-prefixed matrices of the SigLIP 2 objectives (decoder, heads) but the embeddings
    they list in ``no_weight_decay``. Decided by name on the unwrapped modules, since under FSDP
    (use_orig_params) the parameters are flat 1-D shards by the time the optimizer is built."""
    decay = {id(p) for p in param_groups(model, 1.0, decay_embeddings)[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decay}
    if objectives is not None:
        skip = {
            f"{prefix}.{n}" if prefix else n
            for prefix, m in objectives.named_modules()
            if hasattr(m, "no_weight_decay")
            for n in m.no_weight_decay()
        }
        names |= {
            f"objectives.{n}" for n, p in objectives.named_parameters() if p.ndim >= 2 and n not in skip
        }
    return names


def split_by_decay(
    named: Iterable[tuple[str, nn.Parameter]], decayed: set[str], weight_decay: float
) -> list[dict[str, Any]]:
    """``[decay group, no-decay group]`` of the trainable ``(name, parameter)`` pairs, by name in
    ``decayed`` (:func:`decayed_names`) once FSDP / activation-checkpointing wrapper segments are dropped."""
    decay, no_decay = [], []
    for name, p in named:
        unwrapped = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if p.requires_grad:
            (decay if unwrapped in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (all but its parameters), as the optimizer holds them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    settings: list[dict[str, Any]],
) -> list[str]:
    """Give ``optimizer`` the group ``settings`` of a freshly configured one (:func:`group_settings`) where a
    resumed checkpoint left others, and return ``"param group i key: checkpoint X, config Y"`` for each.

    The peak learning rate of a scheduled group is its ``initial_lr`` (the scheduler's ``base_lrs``); the
    current ``lr`` is rescaled with it, so the schedule goes on from the same point at the new peak. Settings
    that already agree are not touched: an unchanged config resumes bit for bit.
    """
    changed = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, settings, strict=True)):
        scheduled = "initial_lr" in want
        for key, value in want.items():
            have = group.get(key)
            if (key == "lr" and scheduled) or _same(have, value):
                continue  # a scheduled lr is the schedule's, rescaled with initial_lr below
            changed.append(f"param group {i} {key}: checkpoint {have!r}, config {value!r}")
            if key == "initial_lr":
                if have:  # (a peak of 0 leaves lr as it is; the next scheduler step sets it)
                    group["lr"] = group["lr"] * value / have
                if scheduler is not None:
                    scheduler.base_lrs[i] = value
            group[key] = value
    return changed + _resync(optimizer, scheduler)


def _resync(optimizer: torch.optim.Optimizer, scheduler: Any) -> list[str]:
    """Set each group's lr to the configured schedule's value at the restored step. A checkpoint holds the
    lr its own schedule gave for the next step; with another ``trainer.max_steps`` or warmup that step ran on
    the old schedule and only the following ones on the new. Unchanged, the value is the same to the bit."""
    if not isinstance(scheduler, LambdaLR):
        return []
    changed, step = [], scheduler.last_epoch
    for i, (group, base, fn) in enumerate(
        zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas)
    ):
        want = base * fn(step)
        if not math.isclose(group["lr"], want, rel_tol=1e-6, abs_tol=1e-12):
            changed.append(
                f"param group {i} lr at step {step}: checkpoint's schedule {group['lr']!r}, config's {want!r}"
            )
        group["lr"] = want
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed


def _same(a: Any, b: Any) -> bool:
    """Equal settings; a tuple and a list of the same values (``betas`` from YAML) are the same."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return list(a) == list(b)
    return a == b


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps (trainer.max_steps) must be positive, got {total_steps}")
    check_warmup(warmup_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        # below 0 the tail of training would run at a negative learning rate (ascent), above 1 it climbs
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    cooldown_frac: float = 0.2,
    cooldown_power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, a constant rate, then a cooldown over the last ``cooldown_frac`` of the steps to
    ``min_lr_ratio * lr`` by ``(1 - progress) ** cooldown_power`` (1: linear): open_clip's
    ``const-cooldown`` schedule, and the warmup-stable-decay schedule whose short cooldown Hägele et al.
    (2024, "Scaling Laws and Compute-Optimal Training beyond Fixed Training Durations") find to match a
    cosine of the same length, while the stable phase can be checkpointed and continued without knowing
    where training ends."""
    if total_steps <= 0:
        raise ValueError(f"total_steps (trainer.max_steps) must be positive, got {total_steps}")
    check_warmup(warmup_steps)
    if not 0.0 < cooldown_frac <= 1.0:
        raise ValueError(f"scheduler.cooldown_frac must be in (0, 1], got {cooldown_frac}")
    if not cooldown_power > 0:
        raise ValueError(f"scheduler.cooldown_power must be > 0, got {cooldown_power}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    # a warmup longer than the stable phase (a smoke run) delays the cooldown, which then takes what is left
    start = max(total_steps - max(1, round(cooldown_frac * total_steps)), warmup_steps)
    cooldown = max(1, total_steps - start)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < start:
            return 1.0
        decay = (1 - min(step - start, cooldown) / cooldown) ** cooldown_power
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return LambdaLR(optimizer, factor)


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    del total_steps  # same signature as warmup_cosine so configs swap freely
    check_warmup(warmup_steps)
    return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def check_optimization(
    optimizer: Callable[..., torch.optim.Optimizer],
    scheduler: Callable[..., Any] | None,
    total_steps: int,
) -> None:
    """Build the configured optimizer (on one stand-in parameter) and schedule once, before any data is
    written or model built: Lightning builds the real ones inside ``fit``, after both, so ``optimizer.lr=-1``
    or ``scheduler.min_lr_ratio=2`` failed only then, the first with torch's bare "Invalid learning rate".
    A ValueError or TypeError names the group and its settings; any other error is left to the real build."""
    try:
        opt = optimizer([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        raise ValueError(f"optimizer {_describe(optimizer)}: {e}") from e
    if all(group["lr"] == 0 for group in opt.param_groups):  # torch takes it; a frozen run can be meant
        log.warning("optimizer.lr=0: the weights never change in this run (a learning rate > 0 trains them)")
    if scheduler is None:
        return
    warmup = getattr(scheduler, "keywords", {}).get("warmup_steps")
    if isinstance(warmup, int) and 0 < total_steps <= warmup:  # taken as asked (a smoke run can mean it)
        log.warning(
            "scheduler.warmup_steps=%d is not shorter than trainer.max_steps=%d: the learning rate rises for the "
            "whole run and ends at %.0f%% of optimizer.lr",
            warmup,
            total_steps,
            100 * total_steps / warmup,
        )
    try:
        scheduler(opt, total_steps=max(total_steps, 1))  # -1 (an epoch budget): the real total comes later
    except (ValueError, TypeError) as e:
        raise ValueError(f"scheduler {_describe(scheduler)}: {e}") from e


def _describe(factory: Callable[..., Any]) -> str:
    """``module.name(key=value, ...)`` of a Hydra partial (``_partial_: true``) or a plain callable."""
    func = getattr(factory, "func", factory)
    settings = ", ".join(f"{k}={v!r}" for k, v in getattr(factory, "keywords", {}).items())
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}({settings})"


def check_warmup(warmup_steps: int) -> None:
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")


def check_start_frac(start_frac: float, owner: str) -> None:
    """``start_frac``, the fraction of training after which ``owner`` starts, must be in [0, 1]."""
    if not 0.0 <= start_frac <= 1.0:
        raise ValueError(f"{owner} start_frac must be in [0, 1], got {start_frac}")


def first_step(start_frac: float, total_steps: int) -> int:
    """The first step count at which ``start_frac`` of ``total_steps`` is reached."""
    # Rounded: in binary 0.55 * 100 is 55.00000000000001, which started the objective (or EMA) a step late.
    return math.ceil(round(start_frac * total_steps, 9))


def has_started(step: int, start_frac: float, total_steps: int | None) -> bool:
    """Whether ``step`` (optimizer steps done) has reached ``start_frac`` of ``total_steps``; with no known
    total, from the start."""
    return not total_steps or step >= first_step(start_frac, total_steps)
