"""CIDEr-D, the SCST reward (ruotianluo/cider ``CiderD``), and the n-gram document-frequency file it uses.

Document frequencies
    ``document_frequency(refs)`` counts, for every 1..4-gram, the number of images whose references contain it
    (the set union over one image's references: one count per image). ``save_document_frequency`` and
    ``load_document_frequency`` store it as gzip-compressed JSON (no pickle) tagged
    ``{"format": "aoanet-ngram-df", "version": 1}``. N-grams of int tokens are stored per order as one flat
    integer list, n-grams of words as strings joined by U+001F, so a tuple of ints comes back as a tuple of ints
    and a tuple of str as a tuple of str.

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


# ---------------------------------------------------------------------------------------------------------------
# Document frequencies
# ---------------------------------------------------------------------------------------------------------------


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
    text = json.dumps(payload, separators=(",", ":"))  # one dumps + one write: json.dump to a stream is 5x slower
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


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D
#
# The scoring is vectorised with numpy end to end. An n-gram of up to four tokens is packed into one uint64 key
# (16 bits per token holding token_id + 1, so the key also encodes its order). A hash table of the document
# frequencies, probed with whole arrays, turns keys into dense n-gram ids and idf values. Captions are processed
# in buckets of equal length, so that their n-grams form dense rows: a row-wise sort then gives the term
# frequencies, another row-wise sort merges each image's references, and one searchsorted over the merged
# references (image-major, so globally sorted) finds every candidate n-gram's matches. Small-row sorts and
# sorted-order searches are what make this fast; a global sort or random-order search costs 10-20x more.
# ---------------------------------------------------------------------------------------------------------------

_TOKEN_BITS = 16
MAX_TOKEN_ID = (1 << _TOKEN_BITS) - 2  # the field value token_id + 1 must fit 16 bits and be non-zero
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_INT64_MAX = np.iinfo(np.int64).max


def _table_bits(n: int) -> int:
    """log2 of the smallest power-of-two table with a load factor of at most 0.5 for n keys."""
    return max(4, int(2 * max(n, 1) - 1).bit_length())


class _HashTable:
    """Open addressing with linear probing over non-zero uint64 keys (0 marks an empty slot).

    ``get_or_insert`` and ``lookup`` take whole arrays. Equal keys start at the same slot and probe in lock-step,
    so duplicates within one call always end in the same slot; the slot index then serves as the key's id."""

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


def _sort_rows(packed: list[np.ndarray], row: list[np.ndarray], local: list[np.ndarray], row_len: np.ndarray):
    """Sort values within rows: entry i of part k (a non-negative int64 ``packed[k][i]``) sits at column
    ``local[k][i]`` of row ``row[k][i]``; rows have ``row_len`` entries. Returns (sorted values, their rows), row by row (rows in an
    arbitrary order). Rows are padded to a width rounded up to 1/8 of the longest row, grouped by width into
    contiguous 2-D blocks and sorted in place with ``np.sort`` -- many small sorts cost far less than a global
    sort. Callers pack what they need to recover (e.g. the column) into the low bits of the values."""
    if int(row_len.sum()) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    quantum = max(16, -(-int(row_len.max()) // 8))
    width = -(-row_len // quantum) * quantum
    order = np.argsort(width, kind="stable")
    offset = np.empty(row_len.shape[0], np.int64)
    offset[order] = np.cumsum(width[order]) - width[order]
    buf = np.full(int(width.sum()), _INT64_MAX)
    for p, r, c in zip(packed, row, local, strict=True):
        buf[offset[r] + c] = p
    w_sorted = width[order]
    cuts = np.flatnonzero(np.diff(w_sorted)) + 1
    for seg_first, seg_end in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(order)].tolist(), strict=True):
        w = int(w_sorted[seg_first])
        if w:
            a = int(offset[order[seg_first]])
            buf[a : a + w * (seg_end - seg_first)].reshape(-1, w).sort(axis=1)
    return buf[buf != _INT64_MAX], np.repeat(order, row_len[order])


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


def _index_captions(scorer: CiderD, ref_lists: list, candidates) -> tuple[list, list[list[int]], np.ndarray]:
    """Number the distinct captions of one call (references of each image, then candidates).

    Returns (distinct captions as token tuples, each image's reference caption numbers, each candidate's caption
    number). A caption object met again (the same list as candidate and reference) is recognised by identity;
    ``flat`` keeps every object alive for the call, so no id can be reused meanwhile."""
    n_refs = [len(refs) for refs in ref_lists]
    flat = list(chain.from_iterable(ref_lists))
    flat.extend(candidates)
    objects = list({id(c): c for c in flat}.values())
    kinds = set(map(type, objects))
    if scorer._int_tokens is not None and kinds <= {list, tuple}:
        keys = list(map(tuple, objects))
    else:
        keys = []
        for c in objects:
            try:
                keys.append(scorer._canon(c))
            except (TypeError, ValueError) as err:
                raise type(err)(f"{_where(flat.index(c), n_refs)}: {err}") from None
    number = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    of_object = dict(zip(map(id, objects), map(number.__getitem__, keys), strict=True))
    ids = np.fromiter(map(of_object.__getitem__, map(id, flat)), np.int64, len(flat))
    n_ref_total = sum(n_refs)
    bounds = np.cumsum(n_refs).tolist()
    ref_ids = ids[:n_ref_total].tolist()
    ref_text = [ref_ids[a:b] for a, b in zip([0] + bounds[:-1], bounds, strict=True)]
    return list(number), ref_text, ids[n_ref_total:]


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

    The division is skipped when either norm is 0; an n-gram missing from the document frequencies gets the full
    idf log(ref_len); and -- the reference's quirk -- ``len`` is the sum of the caption's bigram counts, i.e. its
    token count minus one (0 for a caption of at most one token), not its token count.

    Tokens are token ids (ints in 0..65534; the trainer passes sequences cut after their first 0 with the 0 kept,
    see :func:`cut_at_eos`) or words; a caption may also be a str, split on whitespace. As in the reference,
    which compares strings, the int token 5 and the str token "5" are the same token. Whether a scorer works on
    ids or words follows its document frequencies (int or decimal-string tokens: ids).

    Sharing: within one call, captions are deduplicated by their token tuple, so each distinct reference is
    vectorised once however many candidates use it (SCST: 5 samples + the greedy caption per image), and the
    references of an image are merged once per distinct reference list. ``score_groups`` states the grouping
    directly; ``__call__`` finds equal reference lists itself. Nothing is kept across calls: in SCST each batch
    brings new images, so a cross-call cache would not hit within an epoch.
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
        self._df_idf = np.full(self._df_table.size, self._log_ref_len)
        self._df_idf[slots] = self._log_ref_len - np.log(np.maximum(1.0, counts))

    # ---- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, sigma: float = SIGMA) -> CiderD:
        """A scorer with the document frequencies written by :func:`save_document_frequency`."""
        df, ref_len = load_document_frequency(path)
        return cls(df, ref_len, sigma)

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
        _, (img, _, ent) = self._image_entries(bags, ref_text)
        per_img = np.bincount(img, minlength=len(references))
        gid, img = _sort_rows([bags.gid[ent]], [img], [np.arange(ent.shape[0]) - (np.cumsum(per_img) - per_img)[img]],
                              per_img)
        first = np.ones(gid.shape[0], bool)
        first[1:] = (gid[1:] != gid[:-1]) | (img[1:] != img[:-1])
        df = np.bincount(gid[first], minlength=bags.n_gid)
        present = np.flatnonzero(df)
        keys = miss_keys[present - self._df_table.size]
        self._init(keys, df[present].astype(np.float64), len(references), sigma, self._int_tokens)
        return self

    # ---- scoring --------------------------------------------------------------------------------------------
    def __call__(self, candidates: Sequence[Caption], references: Sequence[Sequence[Caption]]) -> np.ndarray:
        """CIDEr-D of ``candidates[i]`` against its references ``references[i]``; float64 array.

        Candidates that are given the same list object of references share its merged reference vectors (pass
        ``[refs_of_image[b] for b in image_of_candidate]``); equal copies give the same scores, a bit slower."""
        if len(candidates) != len(references):
            raise ValueError(f"candidates has {len(candidates)} captions but references has {len(references)} "
                             f"lists of references")
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
                raise ValueError(f"group[{bad[0]}] = {group_idx[bad[0]]} is not an image index (0..{n_img - 1})")
        ref_lists = [refs if type(refs) in (list, tuple) else list(refs) for refs in references_per_image]
        return self._score(*_index_captions(self, ref_lists, candidates), group_idx)

    # ---- internals ------------------------------------------------------------------------------------------
    def _canon(self, caption, where: str = "caption") -> tuple:
        """A caption as a hashable tuple of tokens (ints for an id scorer, words otherwise)."""
        t = type(caption)
        if t is tuple or t is list:
            if self._int_tokens is None and caption:
                self._int_tokens = _is_id_token(caption[0])
            return tuple(caption)
        if t is str or isinstance(caption, str):
            tokens = caption.split()
            if self._int_tokens is None and tokens:
                self._int_tokens = tokens[0].isdecimal()
            return tuple(tokens)
        if isinstance(caption, np.ndarray):
            if caption.ndim != 1:
                raise ValueError(f"{where}: a caption must be 1-D, got an array of shape {caption.shape}")
            return self._canon(caption.tolist(), where)
        if isinstance(caption, Sequence):
            return self._canon(list(caption), where)
        raise TypeError(f"{where}: a caption must be a str or a sequence of tokens, got {t.__name__}")

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
        # 1. dense n-gram rows per caption length: [captions of length L, 4L - 6] keys
        buckets = []
        for seg in np.split(by_len, cuts):
            L = int(lengths[seg[0]]) if seg.size else 0
            if L == 0:
                continue
            tok = fields[tok_start[seg][:, None] + np.arange(L)]
            cols, orders, cur = [tok], [np.zeros(L, np.int64)], tok
            for k in range(1, min(N_MAX, L)):
                cur = cur[:, :-1] | (tok[:, k:] << np.uint64(_TOKEN_BITS * k))
                cols.append(cur)
                orders.append(np.full(L - k, k, np.int64))
            buckets.append((seg, np.hstack(cols), np.concatenate(orders)))
        all_keys = np.concatenate([b[1].reshape(-1) for b in buckets]) if buckets else np.zeros(0, np.uint64)
        # 2. n-gram ids: the df table slot, or a per-call id for n-grams the table does not hold
        gid = self._df_table.lookup(all_keys)
        miss = gid < 0
        miss_table = _HashTable(int(miss.sum()))
        gid[miss] = self._df_table.size + miss_table.get_or_insert(all_keys[miss])
        n_gid = self._df_table.size + miss_table.size
        # 3. term frequencies: sort each caption's row of ids, count runs
        u_gid, u_order, u_tf, u_text = [], [], [], []
        offset = 0
        for seg, keys, orders in buckets:
            n, w = keys.shape
            v = (gid[offset : offset + n * w].reshape(n, w) << 2) | orders  # id and order sort together
            offset += n * w
            v.sort(axis=1)
            first = np.ones((n, w), bool)
            first[:, 1:] = v[:, 1:] != v[:, :-1]
            pos = np.flatnonzero(first)
            u_tf.append(np.diff(np.append(pos, n * w)))
            v = v.reshape(-1)[pos]
            u_gid.append(v >> 2)
            u_order.append(v & 3)
            u_text.append(seg[pos // w])
        bags = _Bags()
        empty = np.zeros(0, np.int64)
        bags.gid = np.concatenate(u_gid) if u_gid else empty
        bags.order = np.concatenate(u_order) if u_order else empty
        bags.tf_int = np.concatenate(u_tf) if u_tf else empty
        bags.tf = bags.tf_int.astype(np.float64)
        text = np.concatenate(u_text) if u_text else empty
        bags.count = np.bincount(text, minlength=n_text)
        in_order = bags.count[by_len]  # entries are laid out in by_len order of captions
        bags.start = np.empty(n_text, np.int64)
        bags.start[by_len] = np.cumsum(in_order) - in_order
        in_df = bags.gid < self._df_table.size  # other ids: n-grams without a document frequency, full idf
        bags.idf = np.where(in_df, self._df_idf[np.where(in_df, bags.gid, 0)], self._log_ref_len)
        bags.n_gid = n_gid
        bags.w = w = bags.tf * bags.idf
        norms = np.bincount(text * N_MAX + bags.order, w * w, minlength=(n_text + 1) * N_MAX)
        bags.norms = np.sqrt(norms).reshape(n_text + 1, N_MAX)  # row n_text: padding reference, norm 0
        bags.bigram_len = np.append(np.maximum(lengths - 1, 0), 0).astype(np.float64)
        if return_miss_keys:
            return bags, miss_table.keys
        return bags

    @staticmethod
    def _image_entries(bags: _Bags, ref_text: list[list[int]]):
        """For every reference of every image (image-major): its caption, image and column; and for every
        entry of those references: its image, column and entry index."""
        n_refs = np.fromiter(map(len, ref_text), np.int64, len(ref_text))
        occ_text = np.fromiter(chain.from_iterable(ref_text), np.int64, int(n_refs.sum()))
        occ_img = np.repeat(np.arange(len(ref_text)), n_refs)
        occ_col = np.arange(occ_text.shape[0]) - np.repeat(np.cumsum(n_refs) - n_refs, n_refs)
        owner, ent = _expand(bags.start[occ_text], bags.count[occ_text])
        return (occ_text, occ_img, occ_col), (occ_img[owner], occ_col[owner], ent)

    def _score(self, texts: list[tuple], ref_text: list[list[int]], cand_text: np.ndarray, group: np.ndarray):
        n_cand, n_img = cand_text.shape[0], len(ref_text)
        if n_cand == 0:
            return np.zeros(0)
        n_refs = np.fromiter(map(len, ref_text), np.int64, n_img)
        if (n_refs[group] == 0).any():
            i = int(np.flatnonzero(n_refs[group] == 0)[0])
            raise ValueError(f"candidate {i} has an empty list of references (CIDEr-D needs at least one)")
        bags = self._bags(texts)
        n_text = len(texts)
        r_max = int(n_refs.max())

        # One row per image: the entries of its references (flag 0), then those of its candidates (flag 1).
        # Sorting each row by (n-gram id, flag) puts, for every n-gram, the references holding it right before
        # the candidates holding it: a run of equal ids is one n-gram of one image.
        (occ_text, occ_img, occ_col), (r_img, r_col, r_ent) = self._image_entries(bags, ref_text)
        by_img = np.argsort(group, kind="stable")
        c_owner, c_ent = _expand(bags.start[cand_text[by_img]], bags.count[cand_text[by_img]])
        c_owner = by_img[c_owner]
        c_img = group[c_owner]
        n_r, n_c = np.bincount(r_img, minlength=n_img), np.bincount(c_img, minlength=n_img)
        c_first = np.cumsum(n_c) - n_c
        r_local = np.arange(r_ent.shape[0]) - (np.cumsum(n_r) - n_r)[r_img]
        c_local = np.arange(c_ent.shape[0]) - c_first[c_img]
        row_len = n_r + n_c
        # low bits of a sort key: a reference entry's (tf, column), a candidate entry's position in its row
        r_tf = bags.tf_int[r_ent]
        col_bits = max(r_max - 1, 1).bit_length()
        low = max(max(int(row_len.max()) - 1, 1).bit_length(), int(r_tf.max()).bit_length() + col_bits)
        if (int(bags.n_gid) << (low + 1)) >= 1 << 62:
            raise ValueError("CiderD: call too large to pack into int64 keys (split it into smaller calls)")
        packed, row = _sort_rows(
            [(bags.gid[r_ent] << (low + 1)) | (r_tf << col_bits) | r_col,
             (bags.gid[c_ent] << (low + 1)) | (1 << low) | c_local],
            [r_img, c_img], [r_local, n_r[c_img] + c_local], row_len)
        gram = packed >> (low + 1)
        is_cand = ((packed >> low) & 1).astype(bool)
        run_start = np.ones(packed.shape[0], bool)
        run_start[1:] = (gram[1:] != gram[:-1]) | (row[1:] != row[:-1])
        run_id = np.cumsum(run_start) - 1
        starts = np.flatnonzero(run_start)
        refs_in_run = np.bincount(run_id, weights=~is_cand, minlength=starts.shape[0]).astype(np.int64)

        # every candidate entry against every reference entry of its run (the references come first)
        pos = np.flatnonzero(is_cand)
        cnt = refs_in_run[run_id[pos]]
        keep = cnt > 0
        pos, cnt = pos[keep], cnt[keep]
        c_i = c_first[row[pos]] + (packed[pos] & ((1 << low) - 1))
        e = c_ent[c_i]
        base = c_owner[c_i] * (r_max * N_MAX) + bags.order[e]
        ref_pos = np.repeat(starts[run_id[pos]] - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        payload = packed[ref_pos]
        r = ((payload >> col_bits) & ((1 << (low - col_bits)) - 1)) * np.repeat(bags.idf[e], cnt)
        h = np.repeat(bags.w[e], cnt)
        slot = np.repeat(base, cnt) + (payload & ((1 << col_bits) - 1)) * N_MAX
        num = np.bincount(slot, np.minimum(h, r) * r, minlength=n_cand * r_max * N_MAX)
        num = num.reshape(n_cand, r_max, N_MAX)

        # cosine with the reference's zero-norm rule, length penalty, means
        ref_table = np.full((n_img, r_max), n_text, np.int64)  # caption n_text: padding, norm 0
        ref_table[occ_img, occ_col] = occ_text
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


def _is_id_token(t) -> bool:
    return (isinstance(t, (int, np.integer)) and not isinstance(t, bool)) or (isinstance(t, str) and t.isdecimal())


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
