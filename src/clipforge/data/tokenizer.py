"""Text tokenization with the byte-pair encoding of CLIP (Radford et al., 2021).

Wraps open_clip's bundled ``SimpleTokenizer`` (its vocabulary file ships inside the wheel, so nothing is
downloaded). Every caption becomes ``[SOT] tokens... [EOT] 0 0 ...`` truncated to ``context_length``;
a truncated caption still ends in EOT, which the text tower's EOT readout relies on.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer


class Tokenizer:
    """Callable: ``str | list[str]`` -> LongTensor ``(B, context_length)``."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.sot_token_id: int = self._bpe.all_special_ids[0]
        self.eot_token_id: int = self._bpe.all_special_ids[1]
        self.vocab_size: int = len(self._bpe.encoder)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id, *self._bpe.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token_id
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, tokens: torch.Tensor) -> str:
        ids = [int(t) for t in tokens.tolist() if t not in (0, self.sot_token_id, self.eot_token_id)]
        return self._bpe.decode(ids).strip()
