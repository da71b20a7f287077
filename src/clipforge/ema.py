"""Exponential moving average (EMA) of model weights (Polyak & Juditsky, 1992), kept beside the trained
weights: an evaluation model that is often better than the last step, and the *teacher* of the
self-distillation objectives of SigLIP 2 (Tschannen et al., 2025), which takes SILC's (Naeem et al., 2023)
and DINO's (Caron et al., 2021) momentum teacher.

Every ``every_n_steps`` optimizer steps each averaged tensor moves towards the trained one:

    theta_ema <- decay * theta_ema + (1 - decay) * theta

Before ``start_frac`` of training the average simply copies the weights (decay 0), so a teacher switched
on late starts from the student, as SigLIP 2 initialises its teacher when the distillation losses begin
(at 80% of training). Buffers (e.g. a DINO centre) are copied, not averaged.

Why a submodule and not a callback: the averaged copy is part of the LightningModule's ``state_dict``, so
it is saved in and restored from every checkpoint bit for bit with the weights (a resumed run continues
the same average), moves to the device with the module, and is reachable by the objectives that need a
teacher. Under DDP every rank averages the same all-reduced weights with the same arithmetic, so the
averages are identical on every rank without any communication. The step counter is a buffer for the same
reason. The copy is never trained: no gradient, and always in eval mode (no drop path or patch dropout in
a teacher).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from clipforge.optim import check_start_frac, has_started


@contextlib.contextmanager
def as_teacher(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode under ``torch.no_grad`` (not inference mode: its outputs serve as targets in
    a loss that autograd records), every submodule's mode restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes.items():
            m.training = training


def teacher_start(teachers: Mapping[str, float]) -> tuple[float, str | None]:
    """Where an average whose ``start_frac`` is unset (``None``) starts: the earliest ``start_frac`` of the
    objectives that distil from it (``teachers``: name -> start_frac), and that objective's name; with none,
    0 and None."""
    return min(((start, name) for name, start in teachers.items()), default=(0.0, None))


def build_ema(
    factory: Callable[..., ModelEMA] | None,
    modules: dict[str, nn.Module],
    objectives: Mapping[str, Any] | None,
) -> ModelEMA | None:
    """``factory(modules)``, where ``factory`` is the config's partial (``ema=default``; None: no EMA). Its
    ``start_frac`` left unset (``None``) becomes the earliest start of the ``objectives`` that distil from the
    average (``needs_teacher``): SigLIP 2 initialises its teacher from the student when distillation begins.
    With no such objective the average starts at step 0 (an evaluation model)."""
    if factory is None:
        return None
    if getattr(factory, "keywords", {}).get("start_frac", 0.0) is None:
        teachers = {
            n: o.start_frac for n, o in (objectives or {}).items() if getattr(o, "needs_teacher", False)
        }
        return factory(modules, start_frac=teacher_start(teachers)[0])
    return factory(modules)


class ModelEMA(nn.Module):
    """EMA copies of ``modules`` (name -> module), in ``self.shadow[name]``.

    ``update(modules, total_steps)`` is called after each optimizer step with the same names; in the
    config the object is a partial (``ema=default``) that the LightningModule completes with its modules.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        decay: float = 0.999,
        every_n_steps: int = 1,
        start_frac: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"ema.every_n_steps must be >= 1, got {every_n_steps}")
        check_start_frac(start_frac, "ema")
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.start_frac = start_frac
        self.shadow = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items()})
        self.shadow.requires_grad_(False)
        # optimizer steps seen so far: in the state_dict, so a resumed run keeps the same update cadence
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def __getitem__(self, name: str) -> nn.Module:
        return self.shadow[name]

    def current_decay(self, total_steps: int | None) -> float:
        """The decay of the next update: 0 (copy) before ``start_frac`` of ``total_steps``."""
        return self.decay if has_started(int(self.steps), self.start_frac, total_steps) else 0.0

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], total_steps: int | None = None) -> bool:
        """Count one optimizer step; average (or copy) on every ``every_n_steps``-th. Returns whether the
        average changed."""
        decay = self.current_decay(total_steps)
        self.steps += 1
        if int(self.steps) % self.every_n_steps:
            return False
        if modules.keys() != self.shadow.keys():
            raise KeyError(f"EMA tracks {sorted(self.shadow)}, got {sorted(modules)}")
        for name, source in modules.items():
            average = self.shadow[name]
            ema_params = list(average.parameters())
            params = [p.detach() for p in source.parameters()]
            if len(ema_params) != len(params):
                raise ValueError(
                    f"EMA copy of {name!r} has {len(ema_params)} parameters, the model {len(params)}"
                )
            if decay == 0.0:
                torch._foreach_copy_(ema_params, params)
            else:
                # decay * ema + (1 - decay) * theta, in the parameters' own dtype
                torch._foreach_mul_(ema_params, decay)
                torch._foreach_add_(ema_params, params, alpha=1.0 - decay)
            for ema_buf, buf in zip(average.buffers(), source.buffers(), strict=True):
                ema_buf.copy_(buf)
        return True

    def extra_repr(self) -> str:
        return f"decay={self.decay}, every_n_steps={self.every_n_steps}, start_frac={self.start_frac}"
