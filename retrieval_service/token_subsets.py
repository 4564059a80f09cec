"""Exact top-k token matching by the set of tokens a photo holds, over per-token bitsets.

A photo's token-match score is the sum of its confidences for the query tokens it holds, over
the number of tokens. Photos that hold the same subset S of the query's matched tokens can score
at most the sum of those tokens' best confidences (over the token count), so the subsets are
visited best bound first and the visit stops once the k-th score found beats every bound left:
usually after the photos holding every token (the intersection, one AND of the tokens' bitsets),
or, when few photos hold them all, after the best photos of each token that hold no other.

* ``|S| >= 2``: the photos are the AND of the tokens in S without the other tokens (bitsets,
  one word per 64 photos), each scored exactly: a token's confidence is read at the photo's rank
  in that token's photo list, counted with a per-word prefix of bits. A subset no photo holds
  is dropped with all its parts after that one AND (most subsets of three or more common tokens
  hold no photo). Each token also keeps its levels, the bits of its photos cut by rank of
  confidence at :data:`LEVEL_CUTS` (the first, its best ``1 / BAND_SHARE``, is its band). Two
  tokens' photos are read a cell of levels at a time (a level of each token: both bands, one
  band and the other's rest, both rests), best cell bound first, so that photos high in one
  token and low in the other are bounded by both; tokens whose photos rise together usually
  settle the top from their best cell, a fraction of the photos holding both. Three or more
  tokens share few photos, and those are scored in one part (cutting them by band cost more
  passes over the words than it saved in scoring);
* ``|S| == 1``: the photos are read best confidence first from the token's list, skipping those
  holding another token, until the k-th (and every photo tied with it) is found.

Scores are summed in float64 in query order, as :func:`retrieval_service.token_match.score_all`
sums them, so the photos and scores are the reference's exactly, with no cap on the postings.
The cost is a few passes over ``photos / 64`` words plus the photos of the subsets (and cells)
visited, instead of every posting of every token.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

# Queries with more matched tokens than this go to the scatter (2**n - 1 subsets to bound).
MAX_TOKENS = 6
# A token whose photos fill at least 1/64 of its bitset keeps the bitset (it costs at most a
# third of the token's lists); a sparser token builds one per query.
CACHE_DENSITY = 1 / 64
# A token's band holds the best 1/BAND_SHARE of its photos by confidence: the photos two
# tokens share are read band first, and the rest only while it could still reach the top.
BAND_SHARE = 8
# Where a token's photos, by rank of confidence, are cut into levels (the first level is the
# band). Two tokens are read a cell (a level of each) at a time: a photo high in one token and
# low in the other, as a tagger's confusions are, is bounded by both. The last level, a token's
# worst eighth, holds its confusions (a tagger's low confidences): two tokens that a tagger
# confuses share many photos, each high in one and low in the other, and the cells of a
# token's last level are bounded below the top and never read. Finer cuts (1/8, 1/4, 1/2, 3/4:
# 25 cells) cost more per query than they saved at a million photos (each cell is an AND over
# every word), so three levels, nine cells.
LEVEL_CUTS = (1 / BAND_SHARE, 1 - 1 / BAND_SHARE)
# Photos read per step when walking one token's list best first (doubled each step).
FIRST_WALK = 1_024

_ONE = np.uint64(1)


@dataclass(frozen=True)
class Levels:
    """A token's photos cut by rank of confidence at :data:`LEVEL_CUTS`: the bits of each
    level (as Bitset.words), and the best confidence in each level."""

    words: tuple[np.ndarray, ...]
    tops: tuple[float, ...]

    @classmethod
    def of(cls, photos_by_conf: np.ndarray, conf_by_conf: np.ndarray) -> Levels | None:
        """The levels of a token's photos by descending confidence; None when there are too
        few photos to cut in two."""
        n = len(photos_by_conf)
        cuts = sorted({0, *(math.ceil(n * share) for share in LEVEL_CUTS)})
        cuts = [c for c in cuts if c < n] + [n]
        if len(cuts) < 3:
            return None
        words = tuple(Bitset.of(np.sort(photos_by_conf[a:b])).words for a, b in zip(cuts, cuts[1:]))
        tops = tuple(float(conf_by_conf[a]) for a in cuts[:-1])
        return cls(words, tops)


@dataclass(frozen=True)
class Bitset:
    """A token's photos as bits, and the number of bits set before each word (its rank)."""

    words: np.ndarray  # uint64, bit ``p % 64`` of word ``p // 64`` set when photo p holds it
    before: np.ndarray  # int64, bits set in the words before each word

    @classmethod
    def of(cls, photos: np.ndarray) -> Bitset:
        """The bitset of ascending, distinct photo indexes."""
        photos = np.asarray(photos, np.int64)
        width = int(photos[-1]) // 64 + 1 if len(photos) else 0
        words = np.zeros(width, np.uint64)
        if len(photos):
            word = photos >> 6
            starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
            bits = _ONE << (photos & 63).astype(np.uint64)
            words[word[starts]] = np.bitwise_or.reduceat(bits, starts)
        counts = np.bitwise_count(words).astype(np.int64)
        before = np.zeros(width, np.int64)
        np.cumsum(counts[:-1], out=before[1:])
        return cls(words, before)

    def rank(self, photos: np.ndarray) -> np.ndarray:
        """Position in the token's ascending photo list of each photo (all held by it)."""
        word = photos >> 6
        return self.rank_at(word, (_ONE << (photos & 63).astype(np.uint64)) - _ONE)

    def rank_at(self, word: np.ndarray, below: np.ndarray) -> np.ndarray:
        """:meth:`rank` of photos given as their word and the mask of the bits below theirs
        (computed once for every token of a query)."""
        return self.before[word] + np.bitwise_count(self.words[word] & below)

    def holds(self, photos: np.ndarray) -> np.ndarray:
        """Bool per photo: whether the token holds it."""
        word = photos >> 6
        inside = word < len(self.words)
        held = np.zeros(len(photos), bool)
        w, p = word[inside], photos[inside]
        held[inside] = (self.words[w] >> (p & 63).astype(np.uint64)) & _ONE != 0
        return held


def set_bits(words: np.ndarray) -> np.ndarray:
    """Ascending indexes of the set bits of ``words``.

    Only the bytes holding a set bit are unpacked, found word first, then byte: a query's
    photos are a few percent of the catalogue, and unpacking every bit (a million at a million
    photos) cost most of the query.
    """
    # (flatnonzero is several times faster on bools than on integers)
    nonzero = np.flatnonzero(words != 0)
    octets = words[nonzero].view(np.uint8)  # little-endian: byte j holds a word's bits 8j..8j+7
    held = np.flatnonzero(octets != 0)
    bits = np.flatnonzero(np.unpackbits(octets[held], bitorder="little").view(bool))
    octet = held[bits >> 3]
    return nonzero[octet >> 3] * 64 + ((octet & 7) * 8 + (bits & 7))


def by_subsets(
    postings: list,
    n_tokens: int,
    k: int,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The exact top ``k`` (photos, scores) of a token match, best first, ties by photo, and
    how many subsets of tokens were read (1: the photos holding every token settled it).

    Parameters
    ----------
    postings
        The matched tokens' :class:`~retrieval_service.token_match.TokenPostings`, in query
        order, at most :data:`MAX_TOKENS` of them.
    n_tokens
        The number of distinct tokens in the query (unknown ones count, scoring 0).
    k
        How many photos to return at most.
    allowed
        Bool per ``photo_idx``: photos that may be returned (None: all).
    """
    if k <= 0 or not postings:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), 0
    bitsets = [p.bitset() for p in postings]
    found_photos: list[np.ndarray] = []
    found_scores: list[np.ndarray] = []
    kth = None
    read: set[tuple[int, ...]] = set()
    # A subset's photos, for each of its parts (None: no photo holds exactly that subset).
    holding: dict[tuple[int, ...], np.ndarray | None] = {}
    for bound, subset, part in _parts(postings, n_tokens):
        if kth is not None and kth > bound:
            break  # no photo left can reach the k-th; a tie could (lower photo_idx first)
        if subset in holding and holding[subset] is None:
            continue  # no photo holds exactly this subset: none of its parts has a photo
        read.add(subset)
        others = [bitsets[t] for t in range(len(postings)) if t not in subset]
        if len(subset) == 1:
            photos, scores = _walk(postings[subset[0]], others, n_tokens, k, allowed)
        else:
            if subset not in holding:
                words = _holding([bitsets[t] for t in subset], others)
                holding[subset] = words if words.any() else None
                if holding[subset] is None:
                    continue  # and its other parts are skipped above
            photos, scores = _intersect(
                [postings[t] for t in subset],
                [bitsets[t] for t in subset],
                holding[subset],
                n_tokens,
                part,
            )
            if allowed is not None:
                kept = allowed[photos]
                photos, scores = photos[kept], scores[kept]
        if len(photos):
            found_photos.append(photos)
            found_scores.append(scores)
            count = sum(len(s) for s in found_scores)
            if count >= k:
                every = np.concatenate(found_scores)
                kth = np.partition(every, count - k)[count - k]
    if not found_photos:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), len(read)
    photos, scores = np.concatenate(found_photos), np.concatenate(found_scores)
    if kth is not None:
        # Order only the photos that reach the k-th score (ties included, so that the photo
        # order among them stays exact): a query's subsets can hold tens of thousands.
        best = scores >= kth
        photos, scores = photos[best], scores[best]
    order = np.lexsort((photos, -scores))[:k]
    return photos[order], scores[order], len(read)


def _parts(postings, n_tokens: int) -> list[tuple[np.float32, tuple[int, ...], tuple | None]]:
    """(bound, subset, part) to visit, best bound first.

    A subset of two tokens that both keep :class:`Levels` is visited a cell at a time:
    ``("cell", (words, words))``, its photos in one level of each token, under the bound of
    the two levels' best confidences. Otherwise the part is None: all the subset's photos.
    """
    best = [float(p.conf_by_conf[0]) if len(p) else 0.0 for p in postings]
    parts = []
    for size in range(len(postings), 0, -1):
        for subset in itertools.combinations(range(len(postings)), size):
            bound = _bound([best[t] for t in subset], n_tokens)
            if size == 2:
                levels = [postings[t].levels() for t in subset]
                if all(level is not None for level in levels):
                    first, second = levels
                    for a, top_a in zip(first.words, first.tops):
                        for b, top_b in zip(second.words, second.tops):
                            cell = ("cell", (a, b))
                            parts.append((_bound([top_a, top_b], n_tokens), subset, cell))
                    continue
            parts.append((bound, subset, None))
    return sorted(parts, key=lambda part: -part[0])


def _bound(confidences: list[float], n_tokens: int) -> np.float32:
    """The score of a photo with these confidences, computed as a photo's score is (float64
    sum in query order, then float32): so it bounds every photo whose confidences are lower."""
    return np.float32(sum(confidences) / n_tokens)


def _holding(bitsets, others) -> np.ndarray:
    """The words of the photos holding every token of ``bitsets`` and none of ``others``."""
    width = min(len(b.words) for b in bitsets)
    words = bitsets[0].words[:width].copy()
    for bitset in bitsets[1:]:
        words &= bitset.words[:width]
    for other in others:
        common = min(width, len(other.words))
        words[:common] &= ~other.words[:common]
    return words


def _intersect(postings, bitsets, holding, n_tokens, part=None) -> tuple[np.ndarray, np.ndarray]:
    """The photos of ``holding`` (:func:`_holding`; by ``part``, in a cell of the tokens'
    levels: :func:`_parts`), scored."""
    width = len(holding)
    words = holding
    if part is not None:
        words = holding.copy()
        for level in part[1]:
            common = min(width, len(level))
            words[:common] &= level[:common]
            words[common:] = 0
    photos = set_bits(words)
    word = photos >> 6
    below = (_ONE << (photos & 63).astype(np.uint64)) - _ONE
    total = np.zeros(len(photos), np.float64)
    for token, bitset in zip(postings, bitsets):
        total += token.conf[bitset.rank_at(word, below)]
    return photos, (total / n_tokens).astype(np.float32)


def _walk(token, others, n_tokens, k, allowed) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` photos (and those tied with the k-th) of ``token`` holding no other."""
    photos_by_conf, conf_by_conf = token.photos_by_conf, token.conf_by_conf
    kept_photos: list[np.ndarray] = []
    kept_conf: list[np.ndarray] = []
    count, start, step = 0, 0, max(FIRST_WALK, 2 * k)
    while start < len(photos_by_conf):
        photos = photos_by_conf[start : start + step]
        conf = conf_by_conf[start : start + step]
        start += step
        step *= 2
        keep = np.ones(len(photos), bool) if allowed is None else allowed[photos]
        for other in others:
            keep &= ~other.holds(photos)
        kept_photos.append(photos[keep])
        kept_conf.append(conf[keep])
        count += int(keep.sum())
        if count > k:
            scores = (np.concatenate(kept_conf).astype(np.float64) / n_tokens).astype(np.float32)
            if scores[-1] < scores[k - 1]:  # past every photo tied with the k-th
                break
    photos = np.concatenate(kept_photos) if kept_photos else np.zeros(0, np.int64)
    conf = np.concatenate(kept_conf) if kept_conf else np.zeros(0, np.float32)
    scores = (conf.astype(np.float64) / n_tokens).astype(np.float32)
    if len(scores) > k:
        keep = scores >= scores[k - 1]
        photos, scores = photos[keep], scores[keep]
    return photos, scores
