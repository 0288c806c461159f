"""CIDEr-D, the SCST reward (ruotianluo/cider ``CiderD``), and the n-gram document-frequency file it uses.

Document frequencies
    ``document_frequency(refs)`` counts, for every 1..4-gram, the number of images whose references contain it
    (the set union over one image's references: one count per image). ``save_document_frequency`` and
    ``load_document_frequency`` store it as gzip-compressed JSON (no pickle) tagged
    ``{"format": "aoanet-ngram-df", "version": 1}``. N-grams of int tokens are stored per order as one flat
    integer list, n-grams of words as strings joined by U+001F, so a tuple of ints comes back as a tuple of
    ints and a tuple of str as a tuple of str.

CIDEr-D
    ``CiderD(df, ref_len)``, ``CiderD.from_file(path)`` or ``CiderD.from_corpus(references)``; then
    ``scorer(candidates, references)`` or ``scorer.score_groups(candidates, references_per_image, group)``.
    See :class:`CiderD` for the formula and the reference's quirks that it keeps.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np

N_MAX = 4
SIGMA = 6.0
DF_FORMAT = "aoanet-ngram-df"
DF_VERSION = 1
_SEP = "\x1f"  # ASCII unit separator: never part of a word token

Caption = Sequence  # a sequence of tokens (ints or words), or a str split on whitespace


# ------------------------------------------------------------------------------------------------------------
# Document frequencies
# ------------------------------------------------------------------------------------------------------------


def _tokens(caption) -> tuple:
    """A caption as a tuple of tokens: a str is split on whitespace; numpy integers become Python ints."""
    if isinstance(caption, str):
        return tuple(caption.split())
    if isinstance(caption, np.ndarray):
        return tuple(caption.tolist())
    return tuple(int(t) if isinstance(t, np.integer) else t for t in caption)


def document_frequency(refs: Iterable[Sequence[Caption]], n_max: int = N_MAX) -> dict[tuple, int]:
    """Document frequency of every 1..n_max-gram. ``refs`` has one entry per image, the list of its reference
    captions; an n-gram counts at most once per image."""
    df: dict[tuple, int] = {}
    for image_refs in refs:
        seen: set = set()
        for ref in image_refs:
            tokens = _tokens(ref)
            for k in range(1, n_max + 1):
                seen.update(tokens[i : i + k] for i in range(len(tokens) - k + 1))
        for g in seen:
            df[g] = df.get(g, 0) + 1
    return df


def save_document_frequency(path: str | os.PathLike, df: dict[tuple, int], ref_len: int) -> None:
    """Write ``df`` and ``ref_len`` (the number of images it was counted over) as tagged gzip JSON."""
    ints: dict[int, tuple[list, list]] = {}  # order -> (flat tokens, counts)
    strs: dict[int, tuple[list, list]] = {}  # order -> (joined n-grams, counts)
    int_types, str_types = {int}, {str}
    for g, c in df.items():
        types = set(map(type, g)) if isinstance(g, tuple) and g else None
        if types is not None and types != int_types and types != str_types:
            if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in g):
                g, types = tuple(int(t) for t in g), int_types  # numpy integer tokens
            else:
                raise ValueError(f"document_frequency key {g!r} mixes token types (need all int or all str)")
        if types == int_types:
            flat, counts = ints.setdefault(len(g), ([], []))
            flat.extend(g)
            counts.append(int(c))
        elif types == str_types:
            joined = _SEP.join(g)
            if joined.count(_SEP) != len(g) - 1:
                raise ValueError(f"document_frequency key {g!r} contains the reserved separator \\x1f")
            grams, counts = strs.setdefault(len(g), ([], []))
            grams.append(joined)
            counts.append(int(c))
        else:
            raise ValueError(f"document_frequency key {g!r} is not a non-empty tuple of tokens")
    payload = {
        "format": DF_FORMAT,
        "version": DF_VERSION,
        "ref_len": int(ref_len),
        "int_ngrams": {str(n): {"tokens": v[0], "counts": v[1]} for n, v in sorted(ints.items())},
        "str_ngrams": {str(n): {"ngrams": v[0], "counts": v[1]} for n, v in sorted(strs.items())},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"))  # json.dump to a gzip stream is slower (docs/benchmarks.md)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=3) as f:
        f.write(text)


def _read_df_payload(path: Path) -> dict:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            payload = json.loads(f.read())
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a gzip JSON n-gram document-frequency file ({e})") from e
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != DF_FORMAT:
        raise ValueError(f"{path}: field 'format' is {fmt!r}, expected {DF_FORMAT!r}")
    if payload.get("version") != DF_VERSION:
        raise ValueError(f"{path}: field 'version' is {payload.get('version')!r}, expected {DF_VERSION}")
    ref_len = payload.get("ref_len")
    if not isinstance(ref_len, int) or isinstance(ref_len, bool) or ref_len < 1:
        raise ValueError(f"{path}: field 'ref_len' must be a positive integer, got {ref_len!r}")
    for n_str, block in payload.get("int_ngrams", {}).items():
        n, flat, counts = int(n_str), block.get("tokens"), block.get("counts")
        if not isinstance(flat, list) or not isinstance(counts, list) or len(flat) != n * len(counts):
            raise ValueError(f"{path}: field 'int_ngrams.{n_str}' must hold {n} tokens per count")
    for n_str, block in payload.get("str_ngrams", {}).items():
        grams, counts = block.get("ngrams"), block.get("counts")
        if not isinstance(grams, list) or not isinstance(counts, list) or len(grams) != len(counts):
            raise ValueError(f"{path}: field 'str_ngrams.{n_str}' must hold one count per n-gram")
    return payload


def load_document_frequency(path: str | os.PathLike) -> tuple[dict[tuple, int], int]:
    """Read a file written by :func:`save_document_frequency`; returns ``(df, ref_len)``."""
    payload = _read_df_payload(Path(path))
    df: dict[tuple, int] = {}
    for n_str, block in payload.get("int_ngrams", {}).items():
        n, flat = int(n_str), block["tokens"]
        df.update(zip(zip(*(flat[i::n] for i in range(n)), strict=True), block["counts"], strict=True))
    for block in payload.get("str_ngrams", {}).values():
        df.update(zip((tuple(g.split(_SEP)) for g in block["ngrams"]), block["counts"], strict=True))
    return df, payload["ref_len"]


# ------------------------------------------------------------------------------------------------------------
# CIDEr-D
#
# The scoring is vectorised with numpy end to end, with no Python loop over n-grams or captions:
# - an n-gram of up to four tokens is packed into one uint64 key (16 bits per token holding token_id + 1, so
#   the key also encodes its order); a hash table of the document frequencies, probed with whole arrays,
#   turns keys into dense n-gram ids and idf values;
# - captions are processed in buckets of equal length, so that their n-grams form dense rows: sorting each row
#   gives the term frequencies;
# - one row per image holds the n-grams of its references, then those of its candidates; sorting each row by
#   (n-gram id, is-candidate) puts the references that hold an n-gram right before the candidates that hold
#   it, which is the join needed for the clipped numerator.
# Many small row sorts (np.sort, SIMD) cost far less than one global sort or a random-order search.
# ------------------------------------------------------------------------------------------------------------

_TOKEN_BITS = 16
MAX_TOKEN_ID = (1 << _TOKEN_BITS) - 2  # the field value token_id + 1 must fit 16 bits and be non-zero
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_INT64_MAX = np.iinfo(np.int64).max


def _table_bits(n: int) -> int:
    """log2 of the smallest power-of-two table with a load factor of at most 0.5 for n keys."""
    return max(4, int(2 * max(n, 1) - 1).bit_length())


class _HashTable:
    """Open addressing with linear probing over non-zero uint64 keys (0 marks an empty slot).

    ``get_or_insert`` and ``lookup`` take whole arrays. Equal keys start at the same slot and probe in
    lock-step, so duplicates within one call always end in the same slot; the slot index then serves as the
    key's id."""

    def __init__(self, n_keys: int):
        self.bits = _table_bits(n_keys)
        self.mask = np.int64((1 << self.bits) - 1)
        self.keys = np.zeros(1 << self.bits, np.uint64)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def _start(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _GOLD) >> np.uint64(64 - self.bits)).view(np.int64)

    def get_or_insert(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty(keys.shape[0], np.int64)
        idx = np.arange(keys.shape[0])
        slot = self._start(keys)
        while idx.size:
            occupant = self.keys[slot]
            empty = occupant == 0
            if empty.any():  # several keys may claim one empty slot: the last write wins, the others move on
                self.keys[slot[empty]] = keys[empty]
                occupant = self.keys[slot]
            hit = occupant == keys
            out[idx[hit]] = slot[hit]
            miss = ~hit
            idx, keys, slot = idx[miss], keys[miss], (slot[miss] + 1) & self.mask
        return out

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        slot = self._start(keys)
        occupant = self.keys[slot]
        found = occupant == keys
        out = np.where(found, slot, -1)  # most keys are settled by their first probe
        idx = np.flatnonzero(~found & (occupant != 0))
        keys, slot = keys[idx], (slot[idx] + 1) & self.mask
        while idx.size:
            occupant = self.keys[slot]
            hit = occupant == keys
            out[idx[hit]] = slot[hit]
            go_on = ~hit & (occupant != 0)
            idx, keys, slot = idx[go_on], keys[go_on], (slot[go_on] + 1) & self.mask
        return out


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [starts[i], starts[i] + counts[i]): (i, position) for every position, as two arrays."""
    owner = np.repeat(np.arange(starts.shape[0]), counts)
    first = np.cumsum(counts) - counts
    return owner, np.repeat(starts - first, counts) + np.arange(owner.shape[0])


def _sort_rows(row_len: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | int]]):
    """Sort non-negative int64 values within rows.

    ``parts``: (values, count per row, first column per row); a part's values are laid out row by row. Returns
    (the sorted values, row by row in an arbitrary order of the rows, and where each non-empty row starts).
    Rows are padded to a width rounded up to 1/8 of the longest row, grouped by width into contiguous 2-D
    blocks and sorted in place with ``np.sort``: many small sorts cost far less than one global sort. Callers
    pack what they need to recover into the low bits of the values."""
    if int(row_len.sum()) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    quantum = max(16, -(-int(row_len.max()) // 8))
    width = -(-row_len // quantum) * quantum
    order = np.argsort(width, kind="stable")
    offset = np.empty(row_len.shape[0], np.int64)
    offset[order] = np.cumsum(width[order]) - width[order]
    buf = np.full(int(width.sum()), _INT64_MAX)
    for values, counts, first_col in parts:
        dest = np.repeat(offset + first_col - (np.cumsum(counts) - counts), counts)
        dest += np.arange(values.shape[0])
        buf[dest] = values
    w_sorted = width[order]
    cuts = np.flatnonzero(np.diff(w_sorted)) + 1
    for seg_first, seg_end in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(order)].tolist(), strict=True):
        w = int(w_sorted[seg_first])
        if w:
            a = int(offset[order[seg_first]])
            buf[a : a + w * (seg_end - seg_first)].reshape(-1, w).sort(axis=1)
    lens = row_len[order]
    return buf[buf != _INT64_MAX], (np.cumsum(lens) - lens)[lens > 0]


class _Vocab(dict):
    """Word -> 16-bit field value (1..MAX_TOKEN_ID + 1), assigned on first sight."""

    def __missing__(self, word):
        if not isinstance(word, str):  # the reference compares strings: 5 and "5" are the same token
            value = self[str(word)]
        else:
            value = len(self) + 1
            if value > MAX_TOKEN_ID + 1:
                raise ValueError(f"more than {MAX_TOKEN_ID + 1} distinct words: CiderD packs a token in "
                                 f"{_TOKEN_BITS} bits")
        self[word] = value
        return value


def cut_at_eos(seq, eos: int = 0) -> tuple[int, ...]:
    """The tokens of ``seq`` up to and including its first ``eos`` (the reference's ``array_to_str``)."""
    out = []
    for t in np.asarray(seq).reshape(-1).tolist():
        out.append(t)
        if t == eos:
            break
    return tuple(out)


class _Bags:
    """The tf-idf vectors of a list of distinct captions, as flat arrays of (caption, n-gram) entries.

    Entries are grouped by caption (caption t owns ``start[t] : start[t] + count[t]``) and sorted by n-gram id
    within a caption."""

    __slots__ = ("gid", "order", "tf", "tf_int", "idf", "w", "start", "count", "norms", "bigram_len", "n_gid")


def _index_captions(scorer: CiderD, ref_lists: list, candidates):
    """Number the distinct captions of one call (references of each image, then candidates).

    Returns (distinct captions as token tuples, (caption number of every reference, image-major; references
    per image), caption number of every candidate). Equal captions share a number, so each is vectorised once
    however often it is used."""
    n_refs = [len(refs) for refs in ref_lists]
    flat = list(chain.from_iterable(ref_lists))
    flat.extend(candidates)
    index: dict[tuple, int] = {}
    add = index.setdefault
    if set(map(type, flat)) <= {list, tuple}:
        ids = [add(tuple(c), len(index)) for c in flat]  # the common case, kept lean: ~0.5 us a caption
    else:
        ids = []
        for pos, c in enumerate(flat):
            try:
                ids.append(add(scorer._canon(c), len(index)))
            except (TypeError, ValueError) as err:
                raise type(err)(f"{_where(pos, n_refs)}: {err}") from None
    if scorer._int_tokens is None:  # no document frequencies to tell: ids if every token is one
        scorer._int_tokens = _all_id_tokens(chain.from_iterable(index))
    ids = np.asarray(ids, np.int64)
    n_ref_total = sum(n_refs)
    return list(index), (ids[:n_ref_total], np.asarray(n_refs, np.int64)), ids[n_ref_total:]


def _where(pos: int, n_refs: list[int]) -> str:
    """Name the caption at position ``pos`` of the flattened (references..., candidates...) list."""
    for b, n in enumerate(n_refs):
        if pos < n:
            return f"references of image {b}, caption {pos}"
        pos -= n
    return f"candidates[{pos}]"


class CiderD:
    """CIDEr-D exactly as ruotianluo/cider ``CiderD`` (the SCST reward) and coco-caption's ``Cider``.

    For a candidate c with references r_1..r_m and n-gram weights g(x) = tf(x) * (log(ref_len) -
    log(max(1, df(x)))) over the 1..4-grams x::

        score(c) = 10 / m * sum_j mean_n [ sum_{x of order n} min(g_c(x), g_rj(x)) * g_rj(x)
                                           / (|g_c|_n * |g_rj|_n) ] * exp(-(len_c - len_rj)^2 / (2 * 6^2))

    The division is skipped when either norm is 0; an n-gram missing from the document frequencies gets the
    full idf log(ref_len); and -- the reference's quirk -- ``len`` is the sum of the caption's bigram counts,
    i.e. its token count minus one (0 for a caption of at most one token), not its token count.

    Tokens are token ids (ints in 0..65534; the trainer passes sequences cut after their first 0 with the 0
    kept, see :func:`cut_at_eos`) or words; a caption may also be a str, split on whitespace. As in the
    reference, which compares strings, the int token 5 and the str token "5" are the same token. Whether a
    scorer works on ids or words follows its document frequencies (int or decimal-string tokens: ids).

    Sharing: within one call, captions are deduplicated by their token tuple, so each distinct reference is
    vectorised once however many candidates use it (SCST: 5 samples + the greedy caption per image), and the
    references of an image are merged once per image. ``score_groups`` states the grouping directly;
    ``__call__`` groups candidates that were given the same list object of references. Nothing is kept across
    calls: in SCST each batch brings new images, so a cross-call cache would not hit within an epoch.
    """

    def __init__(self, document_frequency: dict[tuple, float] | None, ref_len: float, sigma: float = SIGMA):
        df = document_frequency or {}
        int_tokens = _detect_int_tokens(df)
        self._vocab = _Vocab()
        by_len: dict[int, tuple[list, list]] = {}
        for g, c in df.items():
            grams, counts = by_len.setdefault(len(g), ([], []))
            grams.append(g)
            counts.append(c)
        keys, counts = [], []
        for n, (grams, cnts) in by_len.items():
            if not 1 <= n <= N_MAX:
                raise ValueError(f"document_frequency key {grams[0]!r} is a {n}-gram; CIDEr-D uses "
                                 f"1..{N_MAX}-grams")
            if int_tokens:
                tokens = np.array(grams, dtype=object).astype(np.int64).reshape(-1, n)
                _check_id_range(tokens, "document_frequency")
                fields = (tokens + 1).astype(np.uint64)
            else:
                fields = np.array([[self._vocab[t] for t in g] for g in grams], np.uint64).reshape(-1, n)
            keys.append(_pack_rows(fields))
            counts.append(np.asarray(cnts, np.float64))
        self._init(np.concatenate(keys) if keys else np.zeros(0, np.uint64),
                   np.concatenate(counts) if counts else np.zeros(0), ref_len, sigma, int_tokens)

    def _init(self, keys, counts, ref_len, sigma, int_tokens) -> None:
        if isinstance(ref_len, bool) or not isinstance(ref_len, (int, float, np.integer, np.floating)) \
                or not ref_len >= 1:
            raise ValueError(f"ref_len must be a number >= 1 (the number of images the document frequencies "
                             f"were counted over), got {ref_len!r}")
        self.ref_len = ref_len
        self.sigma = float(sigma)
        self.num_ngrams = int(keys.shape[0])
        self._int_tokens = int_tokens
        self._log_ref_len = float(np.log(float(ref_len)))
        self._df_table = _HashTable(keys.shape[0])
        slots = self._df_table.get_or_insert(keys)
        # one slot past the table: ids beyond it (n-grams without a document frequency) clip to it, full idf
        self._df_idf = np.full(self._df_table.size + 1, self._log_ref_len)
        self._df_idf[slots] = self._log_ref_len - np.log(np.maximum(1.0, counts))

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, sigma: float = SIGMA) -> CiderD:
        """A scorer with the document frequencies written by :func:`save_document_frequency`."""
        payload = _read_df_payload(Path(path))
        if payload.get("str_ngrams"):
            df, ref_len = load_document_frequency(path)
            return cls(df, ref_len, sigma)
        keys, counts = [], []  # token ids only: pack straight from the flat arrays, no tuples
        for n_str, block in payload.get("int_ngrams", {}).items():
            n = int(n_str)
            if not 1 <= n <= N_MAX:
                raise ValueError(f"{path}: field 'int_ngrams.{n_str}': CIDEr-D uses 1..{N_MAX}-grams")
            tokens = np.asarray(block["tokens"], np.int64).reshape(-1, n)
            _check_id_range(tokens, f"{path}: field 'int_ngrams.{n_str}'")
            keys.append(_pack_rows((tokens + 1).astype(np.uint64)))
            counts.append(np.asarray(block["counts"], np.float64))
        self = cls.__new__(cls)
        self._vocab = _Vocab()
        self._init(np.concatenate(keys) if keys else np.zeros(0, np.uint64),
                   np.concatenate(counts) if counts else np.zeros(0), payload["ref_len"], sigma,
                   True if keys else None)
        return self

    @classmethod
    def from_corpus(cls, references: Sequence[Sequence[Caption]], sigma: float = SIGMA) -> CiderD:
        """Document frequencies from ``references`` (one entry per image: its reference captions) and
        ref_len = len(references): coco-caption's ``Cider``, the reference's ``df_mode="corpus"``."""
        if len(references) == 0:
            raise ValueError("from_corpus needs the references of at least one image")
        self = cls.__new__(cls)
        self._vocab = _Vocab()
        self._init(np.zeros(0, np.uint64), np.zeros(0), len(references), sigma, None)
        # With an empty table every n-gram is a "miss" and gets a per-call id; count images per id.
        texts, ref_text, _ = _index_captions(self, list(references), [])
        bags, miss_keys = self._bags(texts, return_miss_keys=True)
        ent, _, per_img, _ = self._image_entries(bags, ref_text)
        gid, row_starts = _sort_rows(per_img, [(bags.gid[ent], per_img, 0)])
        first = np.ones(gid.shape[0], bool)
        first[1:] = gid[1:] != gid[:-1]
        first[row_starts] = True
        df = np.bincount(gid[first], minlength=bags.n_gid)
        present = np.flatnonzero(df)
        keys = miss_keys[present - self._df_table.size]
        self._init(keys, df[present].astype(np.float64), len(references), sigma, self._int_tokens)
        return self

    # ---- scoring -------------------------------------------------------------------------------------------
    def __call__(self, candidates: Sequence[Caption], references: Sequence[Sequence[Caption]]) -> np.ndarray:
        """CIDEr-D of ``candidates[i]`` against its references ``references[i]``; float64 array.

        Candidates that are given the same list object of references share its merged reference vectors (pass
        ``[refs_of_image[b] for b in image_of_candidate]``); equal copies give the same scores, a bit
        slower."""
        if len(candidates) != len(references):
            raise ValueError(f"candidates has {len(candidates)} captions but references has "
                             f"{len(references)} lists of references")
        references = list(references)  # keeps the reference containers alive: their ids stay unique
        group_of: dict[int, int] = {}
        ref_lists: list = []
        group = np.empty(len(candidates), np.int64)
        for i, refs in enumerate(references):
            g = group_of.setdefault(id(refs), len(ref_lists))
            if g == len(ref_lists):
                ref_lists.append(refs if type(refs) in (list, tuple) else list(refs))
            group[i] = g
        return self._score(*_index_captions(self, ref_lists, candidates), group)

    def score_groups(self, candidates: Sequence[Caption], references_per_image: Sequence[Sequence[Caption]],
                     group) -> np.ndarray:
        """CIDEr-D when several candidates share one image's references (SCST: 5 samples + greedy per image).

        ``references_per_image[b]`` is image b's list of references. ``group`` is either an int k (candidate i
        belongs to image i // k: k consecutive rows per image, the trainer's layout) or one image index per
        candidate. Equal to ``self(candidates, [references_per_image[b] for b in image_of_candidate])``."""
        n_img = len(references_per_image)
        if isinstance(group, (int, np.integer)):
            k = int(group)
            if k < 1 or len(candidates) != k * n_img:
                raise ValueError(f"group={k}: expected {k} x {n_img} images = {k * n_img} candidates, "
                                 f"got {len(candidates)}")
            group_idx = np.arange(len(candidates), dtype=np.int64) // k
        else:
            group_idx = np.asarray(group).reshape(-1)
            if group_idx.shape[0] != len(candidates):
                raise ValueError(f"group has {group_idx.shape[0]} entries for {len(candidates)} candidates")
            if group_idx.size and not np.issubdtype(group_idx.dtype, np.integer):
                raise ValueError(f"group must hold image indices (ints), got dtype {group_idx.dtype}")
            group_idx = group_idx.astype(np.int64)
            bad = np.flatnonzero((group_idx < 0) | (group_idx >= n_img))
            if bad.size:
                raise ValueError(f"group[{bad[0]}] = {group_idx[bad[0]]} is not an image index "
                                 f"(0..{n_img - 1})")
        ref_lists = [refs if type(refs) in (list, tuple) else list(refs) for refs in references_per_image]
        return self._score(*_index_captions(self, ref_lists, candidates), group_idx)

    # ---- internals -----------------------------------------------------------------------------------------
    @staticmethod
    def _canon(caption) -> tuple:
        """A caption as a hashable tuple of tokens."""
        t = type(caption)
        if t is tuple or t is list:
            return tuple(caption)
        if isinstance(caption, str):
            return tuple(caption.split())
        if isinstance(caption, np.ndarray):
            if caption.ndim != 1:
                raise ValueError(f"a caption must be 1-D, got an array of shape {caption.shape}")
            return tuple(caption.tolist())
        if isinstance(caption, Sequence):
            return tuple(caption)
        raise TypeError(f"a caption must be a str or a sequence of tokens, got {t.__name__}")

    def _encode(self, texts: list[tuple], total: int) -> np.ndarray:
        """Field values (token id + 1, uint64) of all tokens of ``texts``, back to back."""
        if not self._int_tokens:
            return np.fromiter(map(self._vocab.__getitem__, chain.from_iterable(texts)), np.uint64, total)
        try:
            ids = np.fromiter(chain.from_iterable(texts), np.int64, total)
        except (TypeError, ValueError):  # e.g. decimal-string tokens: convert one by one
            ids = np.fromiter(map(_as_id, chain.from_iterable(texts)), np.int64, total)
        _check_id_range(ids, "caption")
        return (ids + 1).astype(np.uint64)

    def _bags(self, texts: list[tuple], return_miss_keys: bool = False):
        """Vectorise distinct captions (see :class:`_Bags`)."""
        n_text = len(texts)
        lengths = np.fromiter(map(len, texts), np.int64, n_text)
        fields = self._encode(texts, int(lengths.sum()))
        tok_start = np.cumsum(lengths) - lengths
        by_len = np.argsort(lengths, kind="stable")
        sorted_len = lengths[by_len]
        cuts = np.flatnonzero(np.diff(sorted_len)) + 1
        # 1. dense n-gram rows per caption length: [captions of length L, 4L - 6] keys, all in one array
        segs = [seg for seg in np.split(by_len, cuts) if seg.size and lengths[seg[0]] > 0]
        n_grams = [max(0, 4 * int(lengths[seg[0]]) - 6) if lengths[seg[0]] >= 4
                   else int(lengths[seg[0]]) * (int(lengths[seg[0]]) + 1) // 2 for seg in segs]
        all_keys = np.empty(sum(g * seg.size for g, seg in zip(n_grams, segs, strict=True)), np.uint64)
        buckets, offset = [], 0
        for seg, w in zip(segs, n_grams, strict=True):
            L = int(lengths[seg[0]])
            tok = fields[tok_start[seg][:, None] + np.arange(L)]
            cols, orders, cur = [tok], [np.zeros(L, np.int64)], tok
            for k in range(1, min(N_MAX, L)):
                cur = cur[:, :-1] | (tok[:, k:] << np.uint64(_TOKEN_BITS * k))
                cols.append(cur)
                orders.append(np.full(L - k, k, np.int64))
            np.concatenate(cols, axis=1, out=all_keys[offset : offset + seg.size * w].reshape(seg.size, w))
            buckets.append((seg, w, offset, np.concatenate(orders)))
            offset += seg.size * w
        # 2. n-gram ids: the df table slot, or a per-call id for n-grams the table does not hold
        gid = self._df_table.lookup(all_keys)
        miss = gid < 0
        miss_table = _HashTable(int(miss.sum()))
        gid[miss] = self._df_table.size + miss_table.get_or_insert(all_keys[miss])
        n_gid = self._df_table.size + miss_table.size
        # 3. term frequencies: sort each caption's row of ids, count runs
        u_gid, u_order, u_tf, u_text = [], [], [], []
        count = np.zeros(n_text, np.int64)
        for seg, w, offset, orders in buckets:
            n = seg.size
            v = (gid[offset : offset + n * w].reshape(n, w) << 2) | orders  # id and order sort together
            v.sort(axis=1)
            first = np.ones((n, w), bool)
            np.not_equal(v[:, 1:], v[:, :-1], out=first[:, 1:])
            pos = np.flatnonzero(first)
            u_tf.append(np.diff(np.append(pos, n * w)))
            v = v.reshape(-1)[pos]
            u_gid.append(v >> 2)
            u_order.append(v & 3)
            per_row = first.sum(axis=1)
            count[seg] = per_row
            u_text.append(np.repeat(seg, per_row))
        bags = _Bags()
        empty = np.zeros(0, np.int64)
        bags.gid = np.concatenate(u_gid) if u_gid else empty
        bags.order = np.concatenate(u_order) if u_order else empty
        bags.tf_int = np.concatenate(u_tf) if u_tf else empty
        bags.tf = bags.tf_int.astype(np.float64)
        text = np.concatenate(u_text) if u_text else empty
        bags.count = count
        in_order = count[by_len]  # entries are laid out in by_len order of captions
        bags.start = np.empty(n_text, np.int64)
        bags.start[by_len] = np.cumsum(in_order) - in_order
        bags.idf = self._df_idf.take(bags.gid, mode="clip")
        bags.n_gid = n_gid
        bags.w = w = bags.tf * bags.idf
        norms = np.bincount(text * N_MAX + bags.order, w * w, minlength=(n_text + 1) * N_MAX)
        bags.norms = np.sqrt(norms).reshape(n_text + 1, N_MAX)  # row n_text: padding reference, norm 0
        bags.bigram_len = np.append(np.maximum(lengths - 1, 0), 0).astype(np.float64)
        if return_miss_keys:
            return bags, miss_table.keys
        return bags

    @staticmethod
    def _image_entries(bags: _Bags, ref_text: tuple[np.ndarray, np.ndarray]):
        """The entries of every reference of every image, image-major: (entry index, reference column, entries
        per image, column of every reference)."""
        occ_text, n_refs = ref_text
        occ_col = np.arange(occ_text.shape[0]) - np.repeat(np.cumsum(n_refs) - n_refs, n_refs)
        cnt = bags.count[occ_text]
        ent = np.repeat(bags.start[occ_text] - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        per_img = np.bincount(np.repeat(np.arange(n_refs.shape[0]), n_refs), cnt, minlength=n_refs.shape[0])
        return ent, np.repeat(occ_col, cnt), per_img.astype(np.int64), occ_col

    def _score(self, texts: list[tuple], ref_text: tuple[np.ndarray, np.ndarray], cand_text: np.ndarray,
               group: np.ndarray) -> np.ndarray:
        occ_text, n_refs = ref_text
        n_cand, n_img = cand_text.shape[0], n_refs.shape[0]
        if n_cand == 0:
            return np.zeros(0)
        if (n_refs[group] == 0).any():
            i = int(np.flatnonzero(n_refs[group] == 0)[0])
            raise ValueError(f"candidate {i} has an empty list of references (CIDEr-D needs at least one)")
        bags = self._bags(texts)
        n_text = len(texts)
        r_max = int(n_refs.max())

        # One row per image: the entries of its references (flag 0), then those of its candidates (flag 1).
        # Sorting each row by (n-gram id, flag) puts, for every n-gram, the references holding it right before
        # the candidates holding it: a run of equal ids is one n-gram of one image.
        r_ent, r_col, n_r, occ_col = self._image_entries(bags, ref_text)
        by_img = np.argsort(group, kind="stable")
        c_text = cand_text[by_img]
        c_cnt = bags.count[c_text]
        n_c_ent = int(c_cnt.sum())
        c_ent = np.repeat(bags.start[c_text] - (np.cumsum(c_cnt) - c_cnt), c_cnt) + np.arange(n_c_ent)
        c_owner = np.repeat(by_img, c_cnt)
        n_c = np.bincount(group[by_img], c_cnt, minlength=n_img).astype(np.int64)
        # low bits of a sort key: a reference entry's (tf, column), a candidate entry's index
        r_tf = bags.tf_int[r_ent]
        col_bits = max(r_max - 1, 1).bit_length()
        tf_bits = int(r_tf.max()).bit_length() if r_tf.size else 1
        low = max(max(n_c_ent - 1, 1).bit_length(), tf_bits + col_bits)
        if (int(bags.n_gid) << (low + 1)) >= 1 << 62:
            raise ValueError("CiderD: call too large to pack into int64 keys (split it into smaller calls)")
        packed, row_starts = _sort_rows(n_r + n_c, [
            ((bags.gid[r_ent] << (low + 1)) | (r_tf << col_bits) | r_col, n_r, 0),
            ((bags.gid[c_ent] << (low + 1)) | (1 << low) | np.arange(n_c_ent), n_c, n_r)])
        gram = packed >> (low + 1)
        is_cand = (packed >> low) & 1
        run_start = np.empty(packed.shape[0], bool)
        run_start[:1] = True
        np.not_equal(gram[1:], gram[:-1], out=run_start[1:])
        run_start[row_starts] = True
        run_id = np.cumsum(run_start) - 1
        starts = np.flatnonzero(run_start)
        n_ref_before = np.concatenate([[0], np.cumsum(1 - is_cand)])
        refs_in_run = n_ref_before[np.append(starts[1:], packed.shape[0])] - n_ref_before[starts]

        # every candidate entry against every reference entry of its run (the references come first)
        pos = np.flatnonzero(is_cand)
        rid = run_id[pos]
        cnt = refs_in_run[rid]
        keep = cnt > 0
        pos, rid, cnt = pos[keep], rid[keep], cnt[keep]
        c_i = packed[pos] & ((1 << low) - 1)
        e = c_ent[c_i]
        base = c_owner[c_i] * (r_max * N_MAX) + bags.order[e]
        ref_pos = np.repeat(starts[rid] - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        payload = packed[ref_pos]
        r = ((payload >> col_bits) & ((1 << (low - col_bits)) - 1)) * np.repeat(bags.idf[e], cnt)
        h = np.repeat(bags.w[e], cnt)
        slot = np.repeat(base, cnt) + (payload & ((1 << col_bits) - 1)) * N_MAX
        num = np.bincount(slot, np.minimum(h, r) * r, minlength=n_cand * r_max * N_MAX)
        num = num.reshape(n_cand, r_max, N_MAX)

        # cosine with the reference's zero-norm rule, length penalty, means
        ref_table = np.full((n_img, r_max), n_text, np.int64)  # caption n_text: padding, norm 0
        ref_table[np.repeat(np.arange(n_img), n_refs), occ_col] = occ_text
        refs_of = ref_table[group]
        norm_h = bags.norms[cand_text][:, None, :]
        norm_r = bags.norms[refs_of]
        both = (norm_h != 0) & (norm_r != 0)
        val = np.where(both, num / np.where(both, norm_h * norm_r, 1.0), num)
        delta = bags.bigram_len[cand_text][:, None] - bags.bigram_len[refs_of]
        per_ref = val.sum(axis=2) * np.exp(-(delta**2) / (2 * self.sigma**2)) * (refs_of < n_text)
        return per_ref.sum(axis=1) / N_MAX / n_refs[group] * 10.0


def _pack_rows(fields: np.ndarray) -> np.ndarray:
    """[n, k] uint64 field values -> packed n-gram keys."""
    key = np.zeros(fields.shape[0], np.uint64)
    for j in range(fields.shape[1]):
        key |= fields[:, j] << np.uint64(_TOKEN_BITS * j)
    return key


def _all_id_tokens(tokens) -> bool | None:
    """True if every token is an int or a decimal string, False if some is a word, None if there are none."""
    tokens = list(tokens)
    kinds = set(map(type, tokens))
    if not kinds:
        return None
    if str in kinds:
        if not all(t.isdecimal() for t in tokens if type(t) is str):
            return False
        kinds.discard(str)
    return all(issubclass(k, (int, np.integer)) and k is not bool for k in kinds)


def _as_id(t) -> int:
    if isinstance(t, str) and t.isdecimal() or isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        return int(t)
    raise ValueError(f"token {t!r} is not a token id, but this scorer's document frequencies are over ids")


def _check_id_range(ids: np.ndarray, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() > MAX_TOKEN_ID):
        bad = ids[(ids < 0) | (ids > MAX_TOKEN_ID)].reshape(-1)[0]
        raise ValueError(f"{what}: token id {bad} is outside 0..{MAX_TOKEN_ID}")


def _detect_int_tokens(df: dict) -> bool | None:
    """True if the n-gram keys are token ids (ints, or decimal strings as in the reference's idxs pickle)."""
    kinds = set()
    for g in df:
        if not isinstance(g, tuple):
            raise ValueError(f"document_frequency key {g!r} is not a tuple of tokens")
        for t in g:
            if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
                kinds.add("int")
            elif isinstance(t, str):
                kinds.add("id-str" if t.isdecimal() else "word")
            else:
                raise ValueError(f"document_frequency key {g!r}: token {t!r} is neither an int nor a str")
        if "word" in kinds and "int" in kinds:
            raise ValueError(f"document_frequency mixes int tokens and words (at key {g!r})")
    if not kinds:
        return None
    return "word" not in kinds
