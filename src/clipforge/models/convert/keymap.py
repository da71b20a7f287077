"""Explicit key maps between our state dicts and a reference implementation's, and the numerical
check that proves a port right.

A key map is a list of :class:`Rule`: which of our keys become which of theirs, and the tensor transform
each way (reshape, transpose, split or concatenation of fused projections). Applying a map is strict:
every key of the source must be consumed and every key a rule needs must be there, so a renamed or
missing parameter fails loudly instead of staying at its random init. Equal names and shapes do not
prove equal networks (swapping two same-shaped norms passes every shape check), so ports are proven
by comparing outputs with :func:`check_parity`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)

Tensors = tuple[torch.Tensor, ...]


def _identity(t: Tensors) -> Tensors:
    return t


@dataclass(frozen=True)
class Rule:
    """``ours`` keys <-> ``theirs`` keys, with the transform in each direction."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_theirs: Callable[[Tensors], Tensors] = _identity
    to_ours: Callable[[Tensors], Tensors] = _identity


KeyMap = list[Rule]


def rename(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


def squeezed(ours: str, theirs: str, n: int) -> Rule:
    """Our tensor with ``n`` leading singleton dims (e.g. (1, T, D)) <-> theirs without them ((T, D))."""
    return Rule((ours,), (theirs,), lambda t: (t[0][(0,) * n],), lambda t: (t[0][(None,) * n],))


def transposed(ours: str, theirs: str) -> Rule:
    """Our ``nn.Linear`` weight (out, in) <-> a bare projection matrix (in, out) used as ``x @ W``."""
    return Rule((ours,), (theirs,), lambda t: (t[0].t().contiguous(),), lambda t: (t[0].t().contiguous(),))


def fused(ours: str, theirs: Sequence[str]) -> Rule:
    """One fused tensor of ours (e.g. qkv) <-> equal chunks along dim 0 in theirs (q, k, v)."""
    n = len(theirs)
    return Rule(
        (ours,),
        tuple(theirs),
        lambda t: tuple(c.contiguous() for c in t[0].chunk(n)),
        lambda t: (torch.cat(t),),
    )


def unfused(ours: Sequence[str], theirs: str, sizes: Sequence[int]) -> Rule:
    """Several tensors of ours (e.g. q and kv) <-> one tensor of theirs split at ``sizes`` along dim 0."""
    return Rule(
        tuple(ours),
        (theirs,),
        lambda t: (torch.cat(t),),
        lambda t: tuple(c.contiguous() for c in t[0].split(list(sizes))),
    )


def prefix_rename(key: str, table: Iterable[tuple[str, str]]) -> str | None:
    """Rename ``key`` by the first ``(ours, theirs)`` prefix pair matching a whole dotted component."""
    for ours, theirs in table:
        if key == ours or key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    return None


def build_key_map(
    our_keys: Iterable[str],
    special: Mapping[str, Rule],
    table: Sequence[tuple[str, str]],
    blocks: tuple[str, str, Sequence[tuple[str, str]]] | None = None,
) -> KeyMap:
    """A key map for every key in ``our_keys``.

    ``special`` holds rules with transforms, keyed by each of their own keys; the rest are renamed by
    ``table`` (prefix pairs) or, below ``blocks = (our_prefix, their_prefix, leaf_table)``, per block.
    A key that nothing matches is an error: the reference has no place for that parameter.
    """
    rules: KeyMap = []
    seen: set[int] = set()
    for key in our_keys:
        if key in special:
            rule = special[key]
            if id(rule) not in seen:
                seen.add(id(rule))
                rules.append(rule)
            continue
        theirs = None
        if blocks is not None and key.startswith(blocks[0] + "."):
            index, leaf = key[len(blocks[0]) + 1 :].split(".", 1)
            new_leaf = prefix_rename(leaf, blocks[2])
            theirs = None if new_leaf is None else f"{blocks[1]}.{index}.{new_leaf}"
        else:
            theirs = prefix_rename(key, table)
        if theirs is None:
            raise KeyError(f"no rule maps our parameter {key!r} to the reference model")
        rules.append(rename(key, theirs))
    return rules


def prefixed(key_map: KeyMap, ours: str, theirs: str) -> KeyMap:
    """The same rules with ``ours``/``theirs`` prepended to the keys (e.g. a tower inside a model)."""
    return [
        Rule(tuple(ours + k for k in r.ours), tuple(theirs + k for k in r.theirs), r.to_theirs, r.to_ours)
        for r in key_map
    ]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    to: Literal["ours", "theirs"],
    ignore: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Apply ``key_map`` to ``state_dict`` in direction ``to``; strict in both directions."""
    if to not in ("ours", "theirs"):
        raise ValueError(f"to must be 'ours' or 'theirs', got {to!r}")
    ignore = set(ignore)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in key_map:
        src, dst, fn = (
            (rule.ours, rule.theirs, rule.to_theirs)
            if to == "theirs"
            else (rule.theirs, rule.ours, rule.to_ours)
        )
        missing = [k for k in src if k not in state_dict]
        if missing:
            raise KeyError(f"state dict lacks {missing} (needed for {list(dst)})")
        tensors = fn(tuple(state_dict[k] for k in src))
        if len(tensors) != len(dst):
            raise ValueError(f"rule for {list(src)} produced {len(tensors)} tensors for {list(dst)}")
        out.update(zip(dst, tensors))
        used.update(src)
    unused = sorted(k for k in state_dict if k not in used and k not in ignore)
    if unused:
        raise KeyError(f"the key map does not consume {unused}")
    return out


def build_with_weights(factory: Callable[[], M], state_dict: Mapping[str, torch.Tensor]) -> M:
    """``factory()`` built on the meta device, then given ``state_dict`` (strict): no wasted random init.

    The tensors are cloned, so the new module never shares storage with the one they came from.
    """
    with torch.device("meta"):
        module = factory()
    module.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=True, assign=True)
    return module


class ParityError(AssertionError):
    """A ported model does not compute the same function as its reference."""


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ParityError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check_parity(
    ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5, what: str = "outputs"
) -> float:
    """Raise :class:`ParityError` unless ``max |ours - theirs| <= atol``; return the difference."""
    diff = max_abs_diff(ours, theirs)
    if not diff <= atol:  # also catches NaN
        raise ParityError(f"{what} differ: max abs difference {diff:.3e} > {atol:.1e}")
    return diff


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
