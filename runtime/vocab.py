"""Token ids <-> words, with the reference's post-processing (``misc/utils.py:decode_sequence``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Words a caption should not end with: stripped from the text by ``decode_sequence(remove_bad_endings=True)``.
BAD_ENDING_WORDS = frozenset(
    ["with", "in", "on", "of", "a", "at", "to", "for", "an", "this", "his", "her", "that", "the"]
)

# Words after which the decoder may not emit EOS (``remove_bad_endings`` at decoding time). The
# reference uses a different list here than in ``decode_sequence``; both are kept as they are.
BAD_ENDING_DECODE_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "in",
        "for",
        "at",
        "of",
        "with",
        "before",
        "after",
        "on",
        "upon",
        "near",
        "to",
        "is",
        "are",
        "am",
    ]
)


def bad_ending_ids(ix_to_word: Mapping[str, str]) -> np.ndarray:
    """Sorted int64 ids of the vocabulary words in ``BAD_ENDING_DECODE_WORDS`` (for ``bad_ending_ids=``)."""
    ids = sorted(int(ix) for ix, word in ix_to_word.items() if word in BAD_ENDING_DECODE_WORDS)
    return np.asarray(ids, dtype=np.int64)


def _strip_bad_endings(words: list[str]) -> list[str]:
    end = len(words)
    while end > 0 and words[end - 1] in BAD_ENDING_WORDS:
        end -= 1
    # The reference keeps the caption unchanged when every word is a bad ending.
    return words[:end] if end > 0 else words


def caption_tokens(ix_to_word: Mapping[str, str], seq: Iterable[int], remove_bad_endings: bool = False) -> list[str]:
    """The vocabulary words of one caption's tokens, up to the first 0 (EOS/pad), with trailing bad endings removed
    as ``decode_sequence`` removes them: token t of the result is the caption's t-th token (its attention is row t
    of the search's ``attention``)."""
    words = []
    for ix in seq:
        ix = int(ix)
        if ix <= 0:
            break
        words.append(ix_to_word[str(ix)])
    return _strip_bad_endings(words) if remove_bad_endings else words


def decode_sequence(
    ix_to_word: Mapping[str, str],
    seqs: Iterable[Iterable[int]] | np.ndarray,
    remove_bad_endings: bool = False,
) -> list[str]:
    """One caption per row of ``seqs``: the words up to the first 0 (EOS/pad), joined by spaces.

    BPE continuation marks (``"@@ "``) are merged as in the reference.
    """
    return [
        " ".join(caption_tokens(ix_to_word, row, remove_bad_endings)).replace("@@ ", "") for row in seqs
    ]
