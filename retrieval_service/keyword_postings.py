"""The keyword index's posting lists from a keywords table, in linear time and cache-sized pieces.

A posting list holds one keyword's photos by descending confidence, then ascending photo. The
rows are ordered without comparing strings and without passes over the whole table in a
shuffled order (at a million photos the table is larger than the cache, and every such pass
missed it once per row):

1. the keywords are numbered by one dictionary encoding (Arrow's, chunk by chunk) and the
   numbers remapped so that they follow the keywords' sorted order;
2. each row becomes one 64-bit key, its confidence's bits turned so that a larger confidence
   gives a smaller number, then its photo: sorting keys orders a keyword's rows exactly;
3. the keys are moved to their keyword's place (a counting sort by keyword), a chunk of rows
   at a time, so that each chunk's work stays in the cache and the writes go forwards;
4. runs of consecutive keywords of about :data:`BLOCK` rows are sorted as one array of keys
   with the keyword's number in the bits the photo leaves free.

Every pass is linear in the rows, and each piece's work is the same size at any catalogue size
until one keyword alone holds more than :data:`BLOCK` rows (its sort is then that keyword's).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Rows moved to their keyword's place per step: small enough that a step's arrays stay in the
# cache of one core.
CHUNK = 65_536
# Rows of consecutive keywords sorted together (the keys of a block, 8 bytes each, fit in the
# cache of one core).
BLOCK = 131_072
_LOW32 = np.uint64(0xFFFFFFFF)


def keyword_codes(keywords: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row's keyword as a number, and the keywords in sorted order.

    Returns
    -------
    (codes, vocabulary)
        ``codes`` (int32 per row) indexes ``vocabulary`` (sorted, unique keyword strings), as
        ``pandas.factorize(keywords, sort=True)`` gives them.
    """
    encoded = pc.dictionary_encode(pa.chunked_array(_arrow_chunks(keywords)))
    if encoded.null_count:
        row = int(np.flatnonzero(encoded.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"keywords row {row}: the keyword is missing")
    encoded = encoded.unify_dictionaries()
    if encoded.num_chunks == 0:
        return np.zeros(0, np.int32), np.zeros(0, dtype=object)
    first_seen = np.asarray(encoded.chunk(0).dictionary.to_pylist(), dtype=object)
    order = np.argsort(first_seen.astype(str), kind="stable")
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    codes = np.empty(len(encoded), np.int32)
    start = 0
    for chunk in encoded.chunks:
        indices = chunk.indices.to_numpy(zero_copy_only=False)
        np.take(rank, indices, out=codes[start : start + len(indices)])
        start += len(indices)
    return codes, first_seen[order]


def _arrow_chunks(keywords: pd.Series) -> list[pa.Array]:
    """The keyword column as Arrow string arrays, without a copy when it is one already."""
    array = pa.array(keywords.array) if hasattr(keywords.array, "__arrow_array__") else None
    if array is None:
        array = pa.array(np.asarray(keywords, dtype=object), type=pa.large_string())
    return list(array.chunks) if isinstance(array, pa.ChunkedArray) else [array]


def descending_bits(conf: np.ndarray) -> np.ndarray:
    """uint32 per float32 confidence, ordered opposite to the confidences (larger: smaller),
    -0.0 as 0.0."""
    # Adding 0.0 turns -0.0 into 0.0, so that the two tie as they compare.
    bits = (np.asarray(conf, np.float32) + np.float32(0.0)).view(np.uint32)
    # The sign bit flipped for positive floats and all bits for negative ones order as the
    # floats do; the complement reverses that.
    flip = np.where(bits >> 31 == 1, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return ~(bits ^ flip)


def _confidences(descending: np.ndarray) -> np.ndarray:
    """The float32 confidences :func:`descending_bits` turned into ``descending``."""
    flipped = ~np.asarray(descending, np.uint32)
    was_positive = flipped >> 31 == 1
    bits = np.where(was_positive, flipped ^ np.uint32(0x80000000), ~flipped)
    return bits.view(np.float32)


def posting_lists(
    codes: np.ndarray, conf: np.ndarray, photo_idx: np.ndarray, n_keywords: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows as CSR posting lists: per keyword, photos by descending confidence, then photo.

    Parameters
    ----------
    codes
        Each row's keyword number, in ``[0, n_keywords)``.
    conf, photo_idx
        Each row's confidence (float32) and photo (in ``[0, 2**32)``).
    n_keywords
        The number of keywords.

    Returns
    -------
    (offsets, photos, confidences)
        Keyword ``i``'s photos are ``photos[offsets[i]:offsets[i + 1]]`` (int64) with their
        ``confidences`` (float32); the same rows, in the order of a stable sort by keyword,
        descending confidence, then photo.
    """
    codes = np.asarray(codes)
    photo_idx = np.asarray(photo_idx)
    rows = len(codes)
    if rows and (int(photo_idx.min()) < 0 or int(photo_idx.max()) >= 1 << 32):
        raise ValueError("keywords: photo_idx must lie in [0, 2**32)")
    counts = np.bincount(codes, minlength=n_keywords)
    offsets = np.zeros(n_keywords + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    photo_bits = max(int(photo_idx.max(initial=0)).bit_length(), 1)
    keys = _grouped_keys(codes, conf, photo_idx, offsets, photo_bits)
    for lo, hi, first, last in _blocks(offsets, 32 - photo_bits):
        block = keys[lo:hi]
        if first + 1 < last:  # several keywords: their numbers above the photo's bits
            local = np.repeat(np.arange(last - first, dtype=np.uint64), counts[first:last])
            block |= local << np.uint64(32 + photo_bits)
            block.sort()
            block &= np.uint64((1 << (32 + photo_bits)) - 1)
        else:
            block.sort()
    # The keys become the photos in place: one array of the table's size less to allocate.
    confidences = np.empty(rows, np.float32)
    for lo in range(0, rows, CHUNK):
        key = keys[lo : lo + CHUNK]
        confidences[lo : lo + CHUNK] = _confidences((key >> np.uint64(photo_bits)) & _LOW32)
        key &= np.uint64((1 << photo_bits) - 1)
    return offsets, keys.view(np.int64), confidences


def _grouped_keys(codes, conf, photo_idx, offsets, photo_bits) -> np.ndarray:
    """Each row's key (descending confidence bits, then photo) at its keyword's place.

    A counting sort by keyword, a chunk of rows at a time: within a chunk the rows are ordered
    by keyword (a 16-bit radix sort) and written after the rows earlier chunks gave the same
    keyword.
    """
    rows = len(codes)
    keys = np.empty(rows, np.uint64)
    cursor = offsets[:-1].copy()
    wide = len(offsets) - 1 > 1 << 16
    for lo in range(0, rows, CHUNK):
        code = np.asarray(codes[lo : lo + CHUNK], np.int64)
        key = descending_bits(conf[lo : lo + CHUNK]).astype(np.uint64) << np.uint64(photo_bits)
        key |= np.asarray(photo_idx[lo : lo + CHUNK]).astype(np.uint64)
        if wide:
            by_code = np.argsort(code, kind="stable")
        else:
            by_code = np.argsort(code.astype(np.uint16), kind="stable")
        code = code[by_code]
        starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
        lengths = np.diff(np.r_[starts, len(code)])
        within = np.arange(len(code)) - np.repeat(starts, lengths)
        keys[cursor[code] + within] = key[by_code]
        cursor[code[starts]] += lengths
    return keys


def _blocks(offsets: np.ndarray, code_bits: int):
    """(lo, hi, first keyword, end keyword) of runs of consecutive keywords: about
    :data:`BLOCK` rows each (one keyword alone when it holds more) and at most
    ``2**code_bits`` keywords, so that a key holds the keyword's number within its run."""
    n_keywords = len(offsets) - 1
    most = 1 << max(code_bits, 0)
    first = 0
    while first < n_keywords:
        last = int(np.searchsorted(offsets, offsets[first] + BLOCK, side="right")) - 1
        last = min(max(last, first + 1), first + most, n_keywords)
        if offsets[last] > offsets[first]:
            yield int(offsets[first]), int(offsets[last]), first, last
        first = last
