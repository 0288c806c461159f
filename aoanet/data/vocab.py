"""The vocabulary: which words are kept and in which order.

Order (documented choice): by descending count over all splits, ties broken alphabetically. Unlike the
reference, whose order is dict iteration order (first appearance in py3.7+, arbitrary in py2), this does not
depend on the order of images in the input file, and frequent words get small indices. ``UNK`` is always
appended last (index V), even when no word is rare, so that "UNK is the last index" holds for every model
built on this vocabulary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

UNK = "UNK"


def count_words(captions: Iterable[list[str]]) -> Counter:
    counts: Counter = Counter()
    for tokens in captions:
        counts.update(tokens)
    return counts


def build_vocab(counts: Counter, threshold: int) -> list[str]:
    """Words with count > threshold, by descending count then alphabetically, then ``UNK``."""
    kept = sorted((w for w, c in counts.items() if c > threshold), key=lambda w: (-counts[w], w))
    if UNK in kept:
        # A literal "UNK" in the captions would otherwise get two indices.
        kept.remove(UNK)
    return kept + [UNK]


def ix_to_word(words: list[str]) -> dict[str, str]:
    """1-based mapping as cocotalk.json stores it (index 0 is BOS/EOS/pad)."""
    return {str(i + 1): w for i, w in enumerate(words)}


def word_to_ix(ix_to_word_map: dict[str, str]) -> dict[str, int]:
    return {w: int(i) for i, w in ix_to_word_map.items()}
