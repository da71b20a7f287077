"""Adapter: box targets for LocCa's decoder tasks (Wan et al., 2024) on the synthetic data, derived from the
generator (:mod:`clipforge.data.synthetic`) instead of the batch, until the data module delivers them.

Kept apart on purpose: it depends on the synthetic generator, not on the data pipeline's internals. It
reads each sample's key from a batch with ``data.return_keys=true`` (``(images, tokens, keys)``, a key
being ``<shard url>/<sample index>``), regenerates the sample's metadata (a pure function of split, index,
seed) and returns ``{"boxes": (B, 4), "region_tokens": (B, L)}`` as :class:`clipforge.losses.locca.LocCaLoss`
expects them. The boxes are those of the uncropped image: train with ``data.scale=[1.0, 1.0]`` (what
``objectives=locca_synthetic`` sets), where the random resized crop keeps the whole image up to a pixel.

What replaces it: the data module adding a fourth batch element, a mapping with the same two entries,
the box transformed by the sample's own crop (see ``clipforge.losses.locca``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clipforge.data import synthetic
from clipforge.data.tokenizer import Tokenizer


class SyntheticBoxTargets:
    """Callable: a raw batch with keys -> ``{"boxes", "region_tokens"}`` for the synthetic ``split``."""

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        seed: int = 0,
        holdout: str = "tuples",
        context_length: int = 77,
    ) -> None:
        if split not in synthetic.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(synthetic.SPLITS)}")
        self.split, self.image_size, self.seed, self.holdout = split, image_size, seed, holdout
        self.tokenizer = Tokenizer(context_length)
        self._cache: dict[int, tuple[list[float], str]] = {}

    def target(self, index: int) -> tuple[list[float], str]:
        """(box, referring expression) of sample ``index`` (regenerated once, then cached)."""
        if index not in self._cache:
            meta = synthetic.make_sample(index, self.split, self.image_size, self.seed, self.holdout).meta
            self._cache[index] = (meta["box"], meta["referring_expression"])
        return self._cache[index]

    def __call__(self, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        keys = next(
            (x for x in batch[2:] if isinstance(x, list | tuple) and x and isinstance(x[0], str)), None
        )
        if keys is None:
            raise ValueError("SyntheticBoxTargets reads sample keys: set data.return_keys=true")
        targets = [self.target(int(key.rsplit("/", 1)[-1])) for key in keys]
        return {
            "boxes": torch.tensor([box for box, _ in targets], dtype=torch.float32),
            "region_tokens": self.tokenizer([text for _, text in targets]),
        }
