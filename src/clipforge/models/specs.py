"""The settings groups of the transformer towers (ViT, Dosovitskiy et al., 2021; CLIP's text tower,
Radford et al., 2021): what every block of a tower shares (:class:`BlockSpec`) and the details in which
CLIP's, SigLIP's and timm's image towers differ (:class:`VisionLayout`).

Each group is one constructor argument and one nested config node (``model.vision.block.norm_eps``), so a
new block setting is one field here. Converters and old checkpoints describe a tower by its flat settings
(``norm_eps`` beside ``embed_dim``); :func:`group_settings` and :func:`flat_settings` move between the two.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, TypeVar

__all__ = [
    "BlockSpec",
    "SettingError",
    "VisionLayout",
    "as_spec",
    "check_setting_types",
    "flat_settings",
    "group_settings",
]

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
        check_setting_types(type(self), _fields_of(self), prefix="block.")
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

    def __post_init__(self) -> None:
        check_setting_types(type(self), _fields_of(self), prefix="layout.")


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


class SettingError(TypeError):
    """A setting of a type its constructor does not take (``depth='two'``, ``class_token='no'``, which as a
    non-empty string would have been true). ``key``: its dotted name in the node being built; the builder of
    the enclosing node names it in full with :meth:`under` (``model.vision.depth``)."""

    def __init__(self, key: str, expected: str, value: Any) -> None:
        self.key, self.expected, self.value = key, expected, value
        super().__init__(f"{key} must be {expected}, got {value!r}")

    def under(self, prefix: str) -> SettingError:
        return SettingError(f"{prefix}.{self.key}", self.expected, self.value)


_KINDS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    # every plain int setting of a tower is a size or a count: 0 builds empty tables that fail later
    int: ("an integer >= 1", lambda v: type(v) is int and v >= 1),
    float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def check_setting_types(owner: Callable[..., Any], values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise :class:`SettingError` for the first of ``values`` that its annotation in ``owner`` (a function,
    or a class: its ``__init__``, or a dataclass's fields) does not admit. Checked: ``bool``, ``int``,
    ``float``, ``str`` and their unions with ``None``; other annotations (literals, specs, mappings) are
    left to the owner's own checks, which name the choices."""
    hints = _hints(owner)
    for name, value in values.items():
        expected = _mismatch(hints.get(name), value)
        if expected is not None:
            raise SettingError(prefix + name, expected, value)


@functools.cache
def _hints(owner: Callable[..., Any]) -> dict[str, Any]:
    target = owner if is_dataclass(owner) else getattr(owner, "__init__", owner)
    return typing.get_type_hints(target)


def _mismatch(hint: Any, value: Any) -> str | None:
    """What ``hint`` asks for when ``value`` is not that; ``None`` when it fits or the hint is not checked."""
    if hint in _KINDS:
        expected, fits = _KINDS[hint]
        return None if fits(value) else expected
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(hint)
    options = [a for a in args if a is not type(None)]
    if not all(a in _KINDS for a in options):
        return None  # a part of the union (a spec, a mapping) is not checked here
    if (value is None and type(None) in args) or any(_KINDS[a][1](value) for a in options):
        return None
    return " or ".join([_KINDS[a][0] for a in options] + (["null"] if type(None) in args else []))


def _fields_of(spec: Any) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}
