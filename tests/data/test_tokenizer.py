"""The fast BPE gives open_clip's tokens exactly, scales to one huge word, and caches within a bound."""

from __future__ import annotations

import random
import string
from types import SimpleNamespace

import pytest
from open_clip.tokenizer import SimpleTokenizer

from clipforge.data import tokenizer as tokmod
from clipforge.data.tokenizer import Tokenizer, bpe_merge

CAPTIONS = [
    "A dog running on the beach at sunset.",
    "Two children playing soccer in a park, with trees in the background!",
    "close-up of a red rose with water droplets",
    "The Eiffel Tower lit up at night — Paris, France (2019)",
    "Vintage 1970s Ford Mustang parked outside a diner",
    "a bowl of ramen: noodles, egg, scallions & pork",
    "Screenshot of https://example.com/path?q=cats&lang=en#top",
    'iPhone 12 Pro Max case — shockproof, 6.7" — BLACK',
    "it's a man's world; they're here, we've won, I'm sure, you'll see, he'd go",
    "Café au lait, naïve résumé, Zürich, São Paulo, Kraków",
    "<start_of_text> a photo of a cat <end_of_text>",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39;",
    "    lots   of\twhite\nspace   ",
    "",
    "!!!??? ... --- *** ### @@@ $$$ %%% ^^^",
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    "日本の桜の写真, 北京的天安门, 서울의 야경, Москва зимой, القاهرة ليلا",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
]


@pytest.fixture(scope="module")
def ref() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(77)


def _random_captions(ref: SimpleTokenizer, rng: random.Random, n: int) -> list[str]:
    """Sentences of real English words: the vocabulary's whole-word tokens, in assorted cases."""
    words = [w[:-4] for w in ref.encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6]
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(3, 20))]
        ws = [w.capitalize() if rng.random() < 0.2 else w.upper() if rng.random() < 0.05 else w for w in ws]
        out.append(" ".join(ws) + rng.choice([".", "!", "", ",", " 2024"]))
    return out


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x600, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x300, 0x36F)]  # fmt: skip
    out = []
    for _ in range(n):
        lo, hi = rng.choice(blocks)
        mix = [chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(0, 10))]
        out.append("".join([chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))] + mix))
    return out


def _assert_same(tok: Tokenizer, ref: SimpleTokenizer, texts: list[str]) -> None:
    for text in texts:
        assert tok._bpe.encode(text) == ref.encode(text), text[:80]
    assert tok(texts).tolist() == ref(texts, context_length=77).tolist()


def test_same_ids_as_open_clip_on_captions_unicode_and_punctuation(
    tok: Tokenizer, ref: SimpleTokenizer
) -> None:
    rng = random.Random(0)
    punct = ["".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 30))) for _ in range(100)]
    _assert_same(tok, ref, CAPTIONS + _random_captions(ref, rng, 300) + _random_unicode(rng, 300) + punct)


def test_same_ids_as_open_clip_on_repeated_character_words(tok: Tokenizer, ref: SimpleTokenizer) -> None:
    # runs of one pair overlap ('aaa' merges only its first two); the parity of a run decides every merge
    words = [unit * n for unit in ("a", "ab", "aab", "ing") for n in range(1, 301)]
    _assert_same(tok, ref, words + [" ".join(words[i : i + 5]) for i in range(0, 300, 7)])


def test_same_ids_as_open_clip_on_random_letter_words(tok: Tokenizer, ref: SimpleTokenizer) -> None:
    rng = random.Random(1)
    words = []
    for alphabet in (string.ascii_lowercase, "abc", "eiostn", string.ascii_letters + string.digits):
        words += ["".join(rng.choices(alphabet, k=rng.randint(1, 200))) for _ in range(60)]
        words += ["".join(rng.choices(alphabet, k=k)) for k in (500, 1000, 2000)]
    _assert_same(tok, ref, words)


def test_bpe_merge_matches_open_clip_bpe_under_any_merge_order() -> None:
    """Arbitrary rank tables, not just CLIP's: a pair made by a merge may outrank the merge itself."""
    rng = random.Random(2)
    for _ in range(40):
        symbols = ["a", "b", "c", "ab", "ba", "aa", "bb", "abc", "aab", "c</w>", "a</w>", "b</w>", "aa</w>"]
        pairs = [(x, y) for x in symbols for y in symbols if not x.endswith("</w>")]
        ranks = {p: r for r, p in enumerate(rng.sample(pairs, rng.randint(1, len(pairs))))}
        for _ in range(50):
            token = "".join(rng.choices("abc", k=rng.randint(1, 40)))
            oc = SimpleNamespace(cache={}, bpe_ranks=ranks)  # open_clip's own bpe, run on this table
            want = SimpleTokenizer.bpe(oc, token)
            assert " ".join(bpe_merge([*token[:-1], token[-1] + "</w>"], ranks)) == want, (token, ranks)


def test_a_200000_letter_word_tokenizes(tok: Tokenizer) -> None:
    """open_clip needs minutes here (rescan per merge); the heap merge takes well under a second."""
    word = "".join(random.Random(3).choices(string.ascii_lowercase, k=200_000))
    ids = tok._bpe.encode(word)
    assert tok._bpe.decode(ids) == word + " "
    assert tok(word)[0, -1].item() == tok.eot_token_id
    assert tok._bpe.decode(tok._bpe.encode("a" * 200_000)) == "a" * 200_000 + " "


def test_word_cache_is_bounded_on_a_stream_of_unique_words() -> None:
    tok = Tokenizer(8)
    letters = string.ascii_lowercase
    for i in range(tokmod.CACHE_WORDS + 2000):
        tok(letters[i % 26] + letters[i // 26 % 26] + letters[i // 676 % 26] + "q")  # unique, letters only
    assert len(tok._bpe.cache) == tokmod.CACHE_WORDS
    tok("x" * (tokmod.CACHE_MAX_CHARS + 1))
    assert "x" * (tokmod.CACHE_MAX_CHARS + 1) not in tok._bpe.cache
    assert tok("<start_of_text>")[0, 1].item() == tok.sot_token_id  # special words survive any eviction
