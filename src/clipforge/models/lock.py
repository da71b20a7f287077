"""Locked-tower tuning, LiT (Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"):
freeze a tower, usually one loaded with ``init_from``, and train the rest against it.

A tower's parameters fall into groups counted as open_clip's ``--lock-image-unlocked-groups`` and
``--lock-text-unlocked-layers`` count them: the embeddings (patch or token embedding, class token, position
table, pre-norm), each block but the last, the last block with what follows the trunk (final norm,
attention-pool head, fc-norm), and the projection. ``unlocked_groups=N`` leaves the last N of them
trainable. The frozen parameters get ``requires_grad=False``, so the optimizer never sees them
(:func:`clipforge.optim.param_groups` skips them) and DDP does not reduce their gradients.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from clipforge.models.clip import CLIP
from clipforge.models.layers import Tower

log = logging.getLogger(__name__)

# What comes before the trunk in each tower, by attribute name (the rest that is neither a block nor the
# projection follows the trunk and joins the last block's group).
STEM = ("patch_embed", "cls_token", "pos_embed", "norm_pre", "token_embedding")


def lock_groups(tower: Tower) -> list[list[nn.Parameter]]:
    """The tower's parameters in open_clip's lock groups, first to last (a group without parameters, the
    projection of a tower that has none, is left out)."""
    depth = len(tower.blocks)
    stem: list[nn.Parameter] = []
    blocks: list[list[nn.Parameter]] = [[] for _ in range(depth)]
    tail: list[nn.Parameter] = []
    proj: list[nn.Parameter] = []
    for name, p in tower.named_parameters():
        head, _, rest = name.partition(".")
        if head == "transformer" and rest.startswith("blocks."):
            blocks[int(rest.split(".")[1])].append(p)
        elif head in STEM:
            stem.append(p)
        elif head == "proj":
            proj.append(p)
        else:
            tail.append(p)
    if depth:
        blocks[-1] += tail
    else:
        stem += tail
    return [g for g in (stem, *blocks, proj) if g]


def lock_tower(tower: Tower, unlocked_groups: int, key: str) -> int:
    """Freeze all of ``tower`` but its last ``unlocked_groups`` lock groups; returns the number of parameters
    (elements) frozen. ``key``: the config key the count is read from, to name it in an error."""
    groups = lock_groups(tower)
    if unlocked_groups >= len(groups):
        raise ValueError(
            f"{key}={unlocked_groups}, but the tower has {len(groups)} groups (embeddings, {len(tower.blocks)} "
            f"blocks, projection): nothing would be locked; set it to at most {len(groups) - 1}, or do not lock "
            "the tower"
        )
    frozen = 0
    for group in groups[: len(groups) - unlocked_groups]:
        for p in group:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


@dataclass(frozen=True)
class Lock:
    """The ``lock`` node of the train config: which towers to freeze, and how many of each one's last lock
    groups to train all the same. All off (the default) trains both towers whole."""

    vision: bool = False
    vision_unlocked_groups: int = 0
    text: bool = False
    text_unlocked_groups: int = 0

    def __post_init__(self) -> None:
        for tower in ("vision", "text"):
            on, unlocked = getattr(self, tower), getattr(self, f"{tower}_unlocked_groups")
            if not isinstance(on, bool):
                raise ValueError(f"lock.{tower} must be true or false, got {on!r}")
            if isinstance(unlocked, bool) or not isinstance(unlocked, int) or unlocked < 0:
                raise ValueError(f"lock.{tower}_unlocked_groups must be an integer >= 0, got {unlocked!r}")
            if unlocked and not on:
                raise ValueError(
                    f"lock.{tower}_unlocked_groups={unlocked} has no effect while lock.{tower} is false: "
                    f"set lock.{tower}=true to lock the rest of the tower"
                )

    @property
    def any(self) -> bool:
        return self.vision or self.text

    def as_config(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, model: CLIP) -> str | None:
        """Freeze what this asks for in ``model``; returns a one-line account of it (None when nothing is
        locked). Call it after the weights are loaded and before the optimizer is built."""
        if not self.any:
            return None
        parts = []
        for tower, module in (("vision", model.visual), ("text", model.text)):
            if getattr(self, tower):
                unlocked = getattr(self, f"{tower}_unlocked_groups")
                frozen = lock_tower(module, unlocked, f"lock.{tower}_unlocked_groups")
                total = sum(p.numel() for p in module.parameters())
                parts.append(
                    f"{tower} tower {frozen:,} of {total:,} parameters frozen"
                    + (f" (its last {unlocked} groups train)" if unlocked else "")
                )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"locked (LiT): {'; '.join(parts)}; {trainable:,} parameters train"
