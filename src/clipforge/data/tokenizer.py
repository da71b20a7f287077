"""Text tokenization with the byte-pair encoding of CLIP (Radford et al., 2021).

Wraps open_clip's bundled ``SimpleTokenizer`` (its vocabulary file ships inside the wheel, so nothing is
downloaded). Every caption becomes ``[SOT] tokens... [EOT] 0 0 ...`` truncated to ``context_length``;
a truncated caption still ends in EOT, which the text tower's EOT readout relies on.

open_clip's ``SimpleTokenizer.bpe`` rescans the whole word for its lowest-rank pair once per merge, so
one long unbroken word (a base64 blob or a URL in a web caption) costs time quadratic in its length
(32,000 random letters: ~23 s) and a 200,000-letter one stalls a data worker. ``FastBPETokenizer``
keeps its vocabulary, byte encoder, cleaning and regex but merges with a heap over a linked list of
symbols (:func:`bpe_merge`, O(n log n)), giving the same tokens for every word; its word cache is an
LRU bounded in entries and in word length instead of a dict that grows with every unique word.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, defaultdict
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer

CACHE_WORDS = 10_000  # LRU entries: a stream of unique words (ids, hashes) must not grow worker memory
CACHE_MAX_CHARS = 100  # longer words are rare and recomputed; caching them would let a few blobs hold MBs


def bpe_merge(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge ``word`` (a list of symbols) exactly as open_clip's ``SimpleTokenizer.bpe`` does.

    Its rounds: take the lowest-rank pair among all adjacent pairs, merge every non-overlapping
    occurrence of it scanning left to right ('a a a' -> 'aa a'), repeat until no pair has a rank.
    Here the symbols form a linked list, a heap holds the ranks of candidate pairs and each rank the
    positions of its candidates: one round visits them sorted, i.e. left to right, and skips stale ones
    (a symbol merged away or grown since). The pairs a round creates become candidates only once the
    round is over, as the rescan would find them. Each merge costs O(log n), not a rescan of the word.
    """
    n = len(word)
    # index n is a None sentinel, reached as the next of the last symbol and, via index -1, as the previous
    # of the first; merged-away symbols become None too. A pair with a None has no rank.
    sym: list[str | None] = [*word, None]
    nxt = [*range(1, n + 1), n]
    prv = list(range(-1, n))
    at: defaultdict[int, list[int]] = defaultdict(list)  # rank -> left positions of candidate pairs
    for i, r in enumerate(map(ranks.get, itertools.pairwise(word))):
        if r is not None:
            at[r].append(i)
    heap = list(at)  # the ranks that have candidates, stale ones included
    heapq.heapify(heap)
    rank_of = ranks.get
    while heap:
        rank = heapq.heappop(heap)
        merged = []
        for i in sorted(at.pop(rank)):
            j = nxt[i]
            if rank_of((sym[i], sym[j])) != rank:
                continue  # stale: i was merged away, or i or its neighbour changed since
            sym[i] += sym[j]
            sym[j] = None
            nxt[i] = k = nxt[j]
            prv[k] = i
            merged.append(i)
        # the round's new pairs, each once: (prev, i) unless prev merged this round too and adds it as
        # its (i, next). A merged symbol can't take part in its own round again: AB is neither A nor B.
        last = -1
        for i in merged:
            for h in (prv[i], i) if prv[i] != last else (i,):
                if (r := rank_of((sym[h], sym[nxt[h]]))) is not None:
                    if r not in at:
                        heapq.heappush(heap, r)
                    at[r].append(h)
            last = i
    return [s for s in sym if s is not None]


class FastBPETokenizer(SimpleTokenizer):
    """open_clip's ``SimpleTokenizer`` with :func:`bpe_merge` and a bounded LRU word cache."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.special_words = dict(self.cache)  # open_clip seeds its cache with the special tokens: keep those
        self.cache: OrderedDict[str, str] = OrderedDict()

    def bpe(self, token: str) -> str:
        if token in self.special_words:
            return self.special_words[token]
        hit = self.cache.get(token)
        if hit is not None:
            self.cache.move_to_end(token)
            return hit
        word = " ".join(bpe_merge([*token[:-1], token[-1] + "</w>"], self.bpe_ranks))
        if len(token) <= CACHE_MAX_CHARS:
            self.cache[token] = word
            if len(self.cache) > CACHE_WORDS:
                self.cache.popitem(last=False)
        return word


class Tokenizer:
    """Callable: ``str | list[str]`` -> LongTensor ``(B, context_length)``."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = context_length
        self._bpe = FastBPETokenizer(context_length=context_length)
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
