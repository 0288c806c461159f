"""CIDEr-D: the SCST reward (ruotianluo/cider ``CiderD``) and the n-gram document-frequency file.

Document frequencies
--------------------
``document_frequency(refs)`` counts, for every 1..4-gram, the number of images whose references contain it (the
set union over one image's references, so one count per image). ``save_document_frequency`` /
``load_document_frequency`` store it as gzip-compressed JSON (no pickle), tagged
``{"format": "aoanet-ngram-df", "version": 1}``. The n-grams are grouped by their token type: int-token n-grams
are stored as flat integer arrays, str-token n-grams as strings joined with a unit separator, so that a tuple of
ints comes back as a tuple of ints and a tuple of str as a tuple of str.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

N_MAX = 4
SIGMA = 6.0
DF_FORMAT = "aoanet-ngram-df"
DF_VERSION = 1
_SEP = "\x1f"  # ASCII unit separator: never part of a word token

Token = int | str
Caption = Sequence[Token] | str


def _tokens(caption: Caption) -> tuple:
    """A caption as a tuple of tokens: a str is split on whitespace; numpy ints become Python ints."""
    if isinstance(caption, str):
        return tuple(caption.split())
    if isinstance(caption, np.ndarray):
        return tuple(caption.tolist())
    return tuple(int(t) if isinstance(t, np.integer) else t for t in caption)


def _ngram_set(tokens: tuple, n_max: int = N_MAX) -> set:
    out = set()
    for k in range(1, n_max + 1):
        for i in range(len(tokens) - k + 1):
            out.add(tokens[i : i + k])
    return out


def document_frequency(refs: Iterable[Sequence[Caption]], n_max: int = N_MAX) -> dict[tuple, int]:
    """Document frequency of every 1..n_max-gram: ``refs`` has one entry per image (its list of reference
    captions); each n-gram counts at most once per image."""
    df: dict[tuple, int] = {}
    for image_refs in refs:
        seen: set = set()
        for ref in image_refs:
            seen |= _ngram_set(_tokens(ref), n_max)
        for g in seen:
            df[g] = df.get(g, 0) + 1
    return df


def save_document_frequency(path: str | os.PathLike, df: dict[tuple, int], ref_len: int) -> None:
    """Write ``df`` and ``ref_len`` (the number of images it was counted over) as tagged gzip JSON."""
    ints: dict[int, tuple[list[int], list[int]]] = {}  # n -> (flat tokens, counts)
    strs: dict[int, tuple[list[str], list[int]]] = {}  # n -> (joined n-grams, counts)
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
    text = json.dumps(payload, separators=(",", ":"))  # one dumps + one write: json.dump to a stream is ~5x slower
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=3) as f:
        f.write(text)


def load_document_frequency(path: str | os.PathLike) -> tuple[dict[tuple, int], int]:
    """Read a file written by :func:`save_document_frequency`; returns ``(df, ref_len)``."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            payload = json.loads(f.read())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a gzip JSON n-gram document-frequency file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != DF_FORMAT:
        raise ValueError(f"{path}: field 'format' is {payload.get('format') if isinstance(payload, dict) else None!r}, "
                         f"expected {DF_FORMAT!r}")
    if payload.get("version") != DF_VERSION:
        raise ValueError(f"{path}: field 'version' is {payload.get('version')!r}, expected {DF_VERSION}")
    if not isinstance(payload.get("ref_len"), int) or payload["ref_len"] < 1:
        raise ValueError(f"{path}: field 'ref_len' must be a positive integer, got {payload.get('ref_len')!r}")
    df: dict[tuple, int] = {}
    for n_str, block in payload.get("int_ngrams", {}).items():
        n = int(n_str)
        flat, counts = block["tokens"], block["counts"]
        if len(flat) != n * len(counts):
            raise ValueError(f"{path}: field 'int_ngrams.{n_str}.tokens' has {len(flat)} tokens, "
                             f"expected {n} x {len(counts)}")
        df.update(zip(zip(*(flat[i::n] for i in range(n))), counts))
    for n_str, block in payload.get("str_ngrams", {}).items():
        grams, counts = block["ngrams"], block["counts"]
        if len(grams) != len(counts):
            raise ValueError(f"{path}: field 'str_ngrams.{n_str}' has {len(grams)} n-grams "
                             f"but {len(counts)} counts")
        df.update(zip((tuple(g.split(_SEP)) for g in grams), counts))
    return df, payload["ref_len"]
