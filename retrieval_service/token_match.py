"""Top-k token matching over per-token posting lists: one scatter per token, capped per token.

A multi-word or unseen query scores each photo by the mean, over the query's tokens, of its best
confidence for a keyword holding the token. The fallback used to concatenate every token's
postings and sort them by photo to add them up (:func:`score_all`, kept as the reference): a
sort of the summed posting lists, per query. :func:`top_k` adds each token's confidences into a
per-thread accumulator indexed by photo instead (no sort; only the touched entries are reset),
then selects the top k with a partial sort, which gives the same photos and scores.

The read is bounded: a token contributes at most :data:`MAX_DEPTH` postings, its best by
confidence. A query whose token holds more photos than that returns the best photos among those
read and says so (``complete`` is False), so no query's cost grows past a fixed number of
postings per token however large the catalogue grows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from retrieval_service.token_subsets import (
    CACHE_DENSITY,
    MAX_TOKENS,
    Bitset,
    Levels,
    by_subsets,
)

# The most postings one token contributes to one query: what bounds the work of a query.
MAX_DEPTH = 262_144


@dataclass(frozen=True)
class TokenPostings:
    """One token's photos with their best confidence, by photo and by confidence."""

    photos: np.ndarray  # ascending photo_idx
    conf: np.ndarray  # best confidence of each photo in ``photos``
    photos_by_conf: np.ndarray  # the same photos by descending confidence, then photo_idx
    conf_by_conf: np.ndarray  # their confidences, descending
    # The best MAX_DEPTH of a longer list again by photo: a query reads them in ascending
    # photo order, so its scatter into the accumulator walks memory forwards (at a million
    # photos the accumulator is far larger than the cache, and random order cost 3-4x more).
    capped: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_best(cls, photos: np.ndarray, conf: np.ndarray) -> TokenPostings:
        """Build from photos (ascending) and their best confidences."""
        order = np.lexsort((photos, -conf))
        capped = None
        if len(photos) > MAX_DEPTH:
            best = np.sort(order[:MAX_DEPTH])
            capped = (photos[best], conf[best])
        return cls(photos, conf, photos[order], conf[order], capped)

    def __len__(self) -> int:
        return len(self.photos)

    def best(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The photos (each once) and confidences read at most ``depth`` deep."""
        if len(self.photos) <= depth:
            return self.photos, self.conf
        if depth == MAX_DEPTH and self.capped is not None:
            return self.capped
        return self.photos_by_conf[:depth], self.conf_by_conf[:depth]

    def bitset(self) -> Bitset:
        """The photos as a bitset: kept when dense enough to cost little, else built anew."""
        cached = self.__dict__.get("_bitset")
        if cached is not None:
            return cached
        bitset = Bitset.of(self.photos)
        if len(self.photos) >= CACHE_DENSITY * 64 * len(bitset.words):
            object.__setattr__(self, "_bitset", bitset)  # a cache: equal either way
        return bitset

    def levels(self) -> Levels | None:
        """The token's photos cut by rank of confidence at ``LEVEL_CUTS``, as bits, kept beside
        a kept bitset; None when the bitset is not kept (few photos: a query reads them all
        cheaply) or the token has too few photos to cut."""
        cached = self.__dict__.get("_levels")
        if cached is not None:
            return cached
        self.bitset()
        if "_bitset" not in self.__dict__:
            return None
        levels = Levels.of(self.photos_by_conf, self.conf_by_conf)
        if levels is None:
            return None
        object.__setattr__(self, "_levels", levels)  # a cache, as the bitset
        return levels


@dataclass(frozen=True)
class TokenMatch:
    """The best photos of a token match, and whether every posting was read."""

    photos: np.ndarray
    scores: np.ndarray
    complete: bool  # True when the photos are exactly the top k over all postings
    # Subsets of tokens read (by_subsets; 1: the photos holding every token settled it), 0: scatter.
    subsets_read: int = 0


class _Scratch(threading.local):
    """Per-thread accumulators indexed by photo, zero between queries."""

    def __init__(self) -> None:
        self.total = np.zeros(0, np.float64)
        self.seen = np.zeros(0, bool)

    def sized(self, photo_count: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.total) < photo_count:
            self.total = np.zeros(photo_count, np.float64)
            self.seen = np.zeros(photo_count, bool)
        return self.total, self.seen


_SCRATCH = _Scratch()


def match(
    postings: list[TokenPostings], n_tokens: int, k: int, allowed: np.ndarray | None = None
) -> TokenMatch:
    """The exact top ``k`` of a token match: by the subsets of tokens photos hold
    (:mod:`retrieval_service.token_subsets`) for up to ``MAX_TOKENS`` matched tokens, by the
    capped scatter (:func:`top_k`) for more."""
    if len(postings) <= MAX_TOKENS:
        photos, scores, read = by_subsets(postings, n_tokens, k, allowed)
        return TokenMatch(photos, scores, True, read)
    return top_k(postings, n_tokens, k, allowed)


def top_k(
    postings: list[TokenPostings],
    n_tokens: int,
    k: int,
    allowed: np.ndarray | None = None,
    max_depth: int = MAX_DEPTH,
) -> TokenMatch:
    """The ``k`` photos with the best mean confidence over ``n_tokens`` tokens, best first.

    Parameters
    ----------
    postings
        The matched tokens' postings, in query order (unknown tokens are absent but counted in
        ``n_tokens``, so they pull every score down alike).
    n_tokens
        The number of distinct tokens in the query.
    k
        How many photos to return at most.
    allowed
        Bool per ``photo_idx``: photos that may be returned (None: all).
    max_depth
        Postings read per token at most, its best by confidence.

    Returns
    -------
    TokenMatch
        Photos ordered by descending score, then ascending ``photo_idx``; ``complete`` is False
        when a token held more than ``max_depth`` photos.
    """
    read = [p.best(max_depth) for p in postings]
    photo_count = max((int(p.photos[-1]) + 1 for p in postings if len(p)), default=0)
    total, seen = _SCRATCH.sized(photo_count)
    found = []
    try:
        # Each token's photos are distinct, so a fancy-indexed add adds each once; in token
        # order and in float64, as the sorted sum does, so the scores are identical.
        for photos, conf in read:
            total[photos] += conf
            new = photos[~seen[photos]]
            seen[new] = True
            found.append(new)
        candidates = np.concatenate(found) if found else np.zeros(0, np.int64)
        scores = (total[candidates] / n_tokens).astype(np.float32)
    finally:
        for new in found:
            total[new] = 0.0
            seen[new] = False
    if allowed is not None:
        kept = allowed[candidates]
        candidates, scores = candidates[kept], scores[kept]
    if len(candidates) > k:
        # Keep every photo tied with the k-th score, so the photo_idx tie-break stays exact.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        best = scores >= kth
        candidates, scores = candidates[best], scores[best]
    order = np.lexsort((candidates, -scores))[:k]
    complete = all(len(p) <= max_depth for p in postings)
    return TokenMatch(candidates[order], scores[order], complete)


def score_all(
    postings: list[TokenPostings], n_tokens: int, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` by sorting every posting by photo and summing: the reference
    :func:`top_k` must equal, and what the fallback cost before it."""
    photos = np.concatenate([p.photos for p in postings])
    conf = np.concatenate([p.conf for p in postings]).astype(np.float64)
    if allowed is not None:
        kept = allowed[photos]
        photos, conf = photos[kept], conf[kept]
    if len(photos) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    by_photo = photos.argsort(kind="stable")
    photos = photos[by_photo]
    starts = np.r_[True, photos[1:] != photos[:-1]].nonzero()[0]
    scores = (np.add.reduceat(conf[by_photo], starts) / n_tokens).astype(np.float32)
    photos = photos[starts]
    order = np.lexsort((photos, -scores))[:k]
    return photos[order], scores[order]
