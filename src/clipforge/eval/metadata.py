"""Class names and prompt templates for zero-shot classification, as in CLIP (Radford et al., 2021).

Built-in names: ``imagenet`` (open_clip's ``IMAGENET_CLASSNAMES``), ``cifar10`` and ``cifar100`` (the
datasets' label order, underscores replaced by spaces as in CLIP's prompt notebook; open_clip does not
ship them). Built-in templates: ``openai`` (the 80 ImageNet prompts of the CLIP paper) and ``simple``
(the 7-prompt subset from CLIP's prompt-engineering notebook). Anything else is read as a text file,
one entry per line; a template line holds ``{}`` (or ``{c}``) where the class name goes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)

from clipforge.data.decode import class_key

Template = str | Callable[[str], str]

log = logging.getLogger(__name__)

# The templates when none are set (data.zeroshot.templates, clipforge-zeroshot templates=) and the data
# names none: CLIP's 80 prompts, in training's evaluation as in clipforge-zeroshot (and as open_clip's
# trainer evaluates), so the number logged while training is the one the command gives afterwards.
DEFAULT_TEMPLATES = "openai"

CIFAR10_CLASSNAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_CLASSNAMES: tuple[str, ...] = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
)  # fmt: skip

BUILTIN_CLASSNAMES: dict[str, Sequence[str]] = {
    "imagenet": IMAGENET_CLASSNAMES,
    "cifar10": CIFAR10_CLASSNAMES,
    "cifar100": CIFAR100_CLASSNAMES,
}
BUILTIN_TEMPLATES: dict[str, Sequence[Template]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
}


def _read_lines(path: str | Path, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is neither a built-in name nor a readable file")
    # utf-8-sig: the byte-order mark Windows editors write first is not part of the first name
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {p} is empty")
    return lines


def load_classnames(spec: str | Path | Sequence[str]) -> list[str]:
    """``imagenet`` | ``cifar10`` | ``cifar100`` | a file with one class name per line | a list of names."""
    if isinstance(spec, str | Path) and str(spec).lower() in BUILTIN_CLASSNAMES:
        return list(BUILTIN_CLASSNAMES[str(spec).lower()])
    if isinstance(spec, str | Path):
        return _read_lines(spec, "class names")
    names = [str(c) for c in spec]
    if not names:
        raise ValueError("the list of class names is empty")
    return names


def align_classnames(label_names: Sequence[str], given: Sequence[str], where: str) -> list[str]:
    """The ``given`` class names in label order, for a data set whose labels carry ``label_names``
    (label ``i`` is ``label_names[i]``: the sorted class folders, the synthetic shapes, ...).

    When the two lists name the same classes (as sets, ignoring case, underscores and extra spaces), each
    label gets its own name, whatever the order of ``given``. Otherwise the counts must agree, and the
    names are applied by position, with one warning that shows the first pairs, so a mismatch is seen;
    a name that is the name of another label (a list in another order with one name misspelt) is an
    error, since applying it by position would score that class under the wrong label.
    """
    given = [str(c) for c in given]
    if len(given) != len(label_names):
        raise ValueError(
            f"{len(given)} class names were given but {where} has {len(label_names)} classes; "
            "give one name per class"
        )
    by_key = {class_key(c): c for c in given}
    label_keys = [class_key(n) for n in label_names]
    if len(by_key) == len(given) and set(by_key) == set(label_keys):
        return [by_key[k] for k in label_keys]
    crossed = [
        f"{c!r} would name {label_names[i]!r}"
        for i, c in enumerate(given)
        if class_key(c) in label_keys and class_key(c) != label_keys[i]
    ]
    if crossed:
        strays = [c for c in given if class_key(c) not in label_keys]
        unnamed = [n for n, k in zip(label_names, label_keys) if k not in by_key]
        more = ", ..." if len(crossed) > 4 else ""
        classes = ", ".join(map(repr, label_names[:8])) + (", ..." if len(label_names) > 8 else "")
        raise ValueError(
            f"the class names match some classes of {where} by name but not all (names matching no "
            f"class: {strays[:4]}; classes without their name: {unnamed[:4]}), and applied by position they "
            f"would cross: {', '.join(crossed[:4])}{more}. Give exactly the class names ({classes}) in any "
            "order, or names in that (label) order"
        )
    pairs = ", ".join(f"{n!r} -> {c!r}" for n, c in list(zip(label_names, given))[:4])
    log.warning(
        "the class names do not match the classes of %s by name; applying them by position "
        "(label order): %s%s",
        where,
        pairs,
        ", ..." if len(given) > 4 else "",
    )
    return given


def load_templates(spec: str | Path | Sequence[Template]) -> list[Template]:
    """``openai`` (80) | ``simple`` (7) | a file with one template per line | a list of templates."""
    if isinstance(spec, str | Path) and str(spec).lower() in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[str(spec).lower()])
    templates: list[Template] = _read_lines(spec, "templates") if isinstance(spec, str | Path) else list(spec)
    if not templates:
        raise ValueError("the list of prompt templates is empty")
    for t in templates:
        if not isinstance(t, str):
            continue
        if "{}" not in t and "{c}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' where the class name should go")
        try:
            fill_template(t, "class name")
        except (IndexError, KeyError, ValueError) as e:  # "{} and {}", "{name}", an unpaired "{"
            raise ValueError(
                f"prompt template {t!r} cannot be filled ({type(e).__name__}: {e}): it takes the class name "
                "at one '{}' (or '{c}'); write a literal brace as '{{' or '}}'"
            ) from e
    return templates


def fill_template(template: Template, classname: str) -> str:
    """Apply a template: a callable (open_clip's lambdas) or a string with ``{}`` or ``{c}``."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", "{}").format(classname)
