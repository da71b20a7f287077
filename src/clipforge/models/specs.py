"""The settings groups of the transformer towers (ViT, Dosovitskiy et al., 2021; CLIP's text tower,
Radford et al., 2021): what every block of a tower shares (:class:`BlockSpec`) and the details in which
CLIP's, SigLIP's and timm's image towers differ (:class:`VisionLayout`).

Each group is one constructor argument and one nested config node (``model.vision.block.norm_eps``), so a
new block setting is one field here. Converters and old checkpoints describe a tower by its flat settings
(``norm_eps`` beside ``embed_dim``); :func:`group_settings` and :func:`flat_settings` move between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, TypeVar

__all__ = ["BlockSpec", "VisionLayout", "as_spec", "flat_settings", "group_settings"]

T = TypeVar("T")


@dataclass(frozen=True)
class BlockSpec:
    """The settings every transformer block of a tower shares.

    ``mlp_ratio``: MLP width over model width; ``qkv_bias``: biases on the query/key/value projection;
    ``norm_eps``: LayerNorm epsilon; ``act``: the MLP activation (``gelu``, ``gelu_tanh``, ``quick_gelu``);
    ``init_values``: LayerScale's initial gain (Touvron et al., 2021; ``None``: no LayerScale);
    ``drop_path_rate``: stochastic depth of the last block, growing linearly from 0 at the first (Huang et
    al., 2016); ``fused_attn``: attention by ``scaled_dot_product_attention`` rather than the math path.
    """

    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    act: str = "gelu"
    init_values: float | None = None
    drop_path_rate: float = 0.0
    fused_attn: bool = True

    def __post_init__(self) -> None:
        # checked here, when the tower is built: a bad value otherwise surfaces at the first training step
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"block.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            raise ValueError(
                f"block.mlp_ratio and block.norm_eps must be > 0, got {self.mlp_ratio}, {self.norm_eps}"
            )

    def drop_path(self, index: int, depth: int) -> float:
        """Stochastic-depth rate of block ``index`` of ``depth`` (plain Python: builds on "meta" too)."""
        return self.drop_path_rate * index / max(depth - 1, 1)


@dataclass(frozen=True)
class VisionLayout:
    """Where an image tower's norms and biases sit, and its input channels.

    CLIP's ViT (open_clip) has a bias-free patch convolution and a LayerNorm before the blocks
    (``patch_bias=False, pre_norm=True``); SigLIP's and timm's have the bias and no such norm. ``fc_norm``:
    the final LayerNorm after pooling instead of before it (``None``: after for ``avg`` pooling only, as timm).
    """

    in_chans: int = 3
    patch_bias: bool = True
    pre_norm: bool = False
    fc_norm: bool | None = None


def as_spec(cls: type[T], value: T | Mapping[str, Any] | None, **defaults: Any) -> T:
    """``value`` as a ``cls``: an instance as is; a mapping (a YAML node) over ``defaults``; ``None``: the
    defaults. An unknown key fails at once, naming the group's fields."""
    if isinstance(value, cls):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"expected a {cls.__name__} or a mapping of its settings, got {type(value).__name__}")
    given = dict(value or {})
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} setting(s) {unknown}; its settings are {names}")
    return cls(**{**defaults, **given})


def group_settings(groups: Mapping[str, type], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a tower's settings, flat or already grouped: every flat setting that is a
    field of a group moves into that group's node. The same setting given both ways is an error."""
    out = dict(settings)
    for name, cls in groups.items():
        node = out.pop(name, None)
        node = asdict(node) if is_dataclass(node) else dict(node or {})
        for f in fields(cls):
            if f.name in out:
                if f.name in node:
                    raise ValueError(f"{f.name!r} is given both flat and in {name!r}; give it once")
                node[f.name] = out.pop(f.name)
        if node:
            out[name] = node
    return out


def flat_settings(groups: Mapping[str, type], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`group_settings`: each group's fields (a spec or its mapping) beside the other
    settings."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in groups:
            out |= asdict(v) if is_dataclass(v) else dict(v)
        else:
            out[k] = v
    return out
