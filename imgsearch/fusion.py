"""Ranked candidate lists: the retrieval result, hybrid fusion of sources, the merge of shards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RetrievalResult:
    """Candidates for one query, best first.

    Attributes
    ----------
    photo_idx:
        Candidate photo indexes (int64, the catalogue's: global across shards), best first.
    scores:
        The retriever's score per candidate (float32), descending.
    source_scores:
        Per source name ("keyword", "clip"), the score that source gave each candidate
        (NaN where that source did not find it).
    keyword:
        The catalogue keyword the query resolved to, "" when it matched none exactly.
    note:
        A human-readable note on fallbacks taken, "" when none.
    """

    photo_idx: np.ndarray
    scores: np.ndarray
    source_scores: dict[str, np.ndarray] = field(default_factory=dict)
    keyword: str = ""
    note: str = ""

    @classmethod
    def empty(cls, keyword: str = "", note: str = "") -> RetrievalResult:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), {}, keyword, note)

    def sources(self, i: int) -> str:
        """The names of the sources that found candidate ``i``, joined by '+'."""
        names = [n for n, s in self.source_scores.items() if not np.isnan(s[i])]
        return "+".join(names)


@dataclass(frozen=True)
class FusionSpec:
    """How hybrid retrieval fuses its sources (see :func:`fuse`).

    Attributes
    ----------
    method:
        ``"rrf"`` or ``"weighted"``.
    sources:
        The fused sources' names, in fusion order.
    weights:
        One weight per source.
    rrf_k:
        RRF's damping constant.
    depth:
        Candidates taken from each source, as a multiple of ``candidates_k``
        (see :func:`source_depth`).
    """

    method: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    rrf_k: int = 60
    depth: float = 1.0


def source_depth(candidates_k: int, depth: float) -> int:
    """How many candidates hybrid takes from each source for ``candidates_k`` fused ones."""
    return max(candidates_k, int(math.ceil(candidates_k * depth)))


def _minmax(scores: np.ndarray) -> np.ndarray:
    if len(scores) == 0:
        return scores.astype(np.float64)
    low, high = float(scores.min()), float(scores.max())
    if high - low <= 1e-12:
        return np.ones(len(scores))
    return (scores.astype(np.float64) - low) / (high - low)


def fuse(
    results: tuple[RetrievalResult, ...] | list[RetrievalResult],
    names: tuple[str, ...],
    candidates_k: int | None,
    method: str = "rrf",
    rrf_k: int = 60,
    weights: tuple[float, ...] | None = None,
) -> RetrievalResult:
    """Fuse ranked lists into one.

    ``"rrf"``: reciprocal-rank fusion, score = sum over sources of ``w / (rrf_k + rank)`` (rank
    from 1; Cormack et al. 2009), blind to the sources' score scales; ``w`` is the source's
    weight over the mean weight (1 for equal weights). ``"weighted"``:
    ``sum(weight * score)`` on scores min-max normalised per source within this query's
    candidates; a source that did not find a photo contributes 0.

    Ties are broken by ``photo_idx`` so the order is deterministic. ``source_scores[name]``
    holds each source's own score for every fused candidate, NaN where it did not find it.
    ``candidates_k`` None keeps every candidate of every source (the union, fused).
    """
    weights = weights or tuple(1.0 for _ in names)
    mean_weight = sum(weights) / len(weights) if sum(weights) > 0 else 1.0
    lists = [np.asarray(r.photo_idx, np.int64) for r in results]
    # Each candidate's row in the union: the inverse of np.unique, cut per source.
    union, rows_of = np.unique(np.concatenate(lists), return_inverse=True)
    ends = np.cumsum([len(photos) for photos in lists])
    fused = np.zeros(len(union), np.float64)
    per_source = {}
    for name, result, weight, rows in zip(names, results, weights, np.split(rows_of, ends[:-1])):
        own = np.full(len(union), np.nan, np.float32)
        own[rows] = result.scores
        per_source[name] = own
        if method == "rrf":
            fused[rows] += (weight / mean_weight) / (rrf_k + np.arange(1, len(rows) + 1))
        else:
            fused[rows] += weight * _minmax(np.asarray(result.scores))
    order = np.lexsort((union, -fused))
    if candidates_k is not None:
        order = order[: max(0, candidates_k)]
    return RetrievalResult(
        union[order],
        fused[order].astype(np.float32),
        {name: scores[order] for name, scores in per_source.items()},
    )


def ranked_source(shards: list[RetrievalResult], source: str) -> RetrievalResult:
    """One source's candidates over every shard, best first: by its own score, then by
    ``photo_idx`` (the order every retriever gives its own list)."""
    photo_idx, scores = [], []
    for shard in shards:
        own = shard.source_scores.get(source)
        if own is None:
            continue
        own = np.asarray(own, np.float32)
        found = ~np.isnan(own)
        photo_idx.append(np.asarray(shard.photo_idx, np.int64)[found])
        scores.append(own[found])
    if not photo_idx:
        return RetrievalResult.empty()
    photo_idx_all, scores_all = np.concatenate(photo_idx), np.concatenate(scores)
    order = np.lexsort((photo_idx_all, -scores_all))
    ranked = scores_all[order]
    return RetrievalResult(photo_idx_all[order], ranked, {source: ranked})


def merge_shards(
    shards: list[RetrievalResult], candidates_k: int, fusion: FusionSpec | None = None
) -> RetrievalResult:
    """The exact merge of per-shard candidates: what one retriever over every photo returns.

    Each shard's result holds, for its own photos, every source's top candidates uncut (a
    shard asked for source lists: ``source_scores`` per source, NaN where a source did not
    find the photo). Per source the shards' lists are merged by raw score (ties by
    ``photo_idx``) and cut where the unsharded retriever cuts them; with ``fusion`` (hybrid)
    the merged lists are then fused exactly as the unsharded hybrid fuses its sources, so the
    ids and scores are the unsharded ones. Without ``fusion`` the shards ran one source.

    Raises
    ------
    ValueError
        Without ``fusion``, when the shards name more than one source.
    """
    if fusion is None:
        names = sorted({name for shard in shards for name in shard.source_scores})
        if len(names) > 1:
            raise ValueError(f"several sources ({', '.join(names)}) and no fusion to merge them")
        if not names:
            return RetrievalResult.empty()
        merged = ranked_source(shards, names[0])
        top = slice(0, max(0, candidates_k))
        scores = merged.scores[top]
        return RetrievalResult(merged.photo_idx[top], scores, {names[0]: scores})
    depth = slice(0, source_depth(candidates_k, fusion.depth))
    lists = []
    for source in fusion.sources:
        merged = ranked_source(shards, source)
        lists.append(RetrievalResult(merged.photo_idx[depth], merged.scores[depth]))
    return fuse(
        lists, fusion.sources, candidates_k, fusion.method, fusion.rrf_k, list(fusion.weights)
    )
