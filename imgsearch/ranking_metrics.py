"""Ranking metrics for offline evaluation: NDCG, precision and recall at k, CIs.

Conventions shared by every function here:

* A ranking is a sequence of photo indexes, best first. Where a ranking comes from scores,
  :func:`rank_by_scores` sorts by descending score and breaks ties by the candidates' input
  order, i.e. by retrieval order (a stable sort), so equal scores never reorder candidates and
  every metric is deterministic. NaN scores rank last.
* Gains are binary (relevant or not) for :func:`ndcg_at_k`; the discount is ``1 / log2(rank + 1)``
  with ranks starting at 1. The ideal DCG places ``min(k, |relevant|)`` relevant photos first.
* Precision at k always divides by ``k``, also when fewer than ``k`` candidates were ranked:
  an engine that returns 4 photos, 2 of them relevant, has P@10 = 0.2, not 0.5.
* A query with no relevant photo scores 0 on every metric (it cannot be answered well).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_BOOTSTRAP_CHUNK = 2_000_000  # resample indexes drawn per batch, bounds memory at ~16 MB


def _discounts(k: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` for ranks 1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def rank_by_scores(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Order candidates by descending score, ties broken by their input (retrieval) order.

    Parameters
    ----------
    candidates:
        Photo indexes in retrieval order.
    scores:
        One score per candidate, higher is better; NaN ranks last.

    Returns
    -------
    numpy.ndarray
        The candidates reordered, best first.
    """
    candidates = np.asarray(candidates)
    scores = np.asarray(scores, dtype=np.float64)
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    keyed = np.where(np.isnan(scores), np.inf, -scores)
    return candidates[np.argsort(keyed, kind="stable")]


def hit_matrix(rankings: Iterable[np.ndarray], relevant: Iterable[Iterable[int]], k: int = 10):
    """Relevance of the top ``k`` of many rankings at once.

    Parameters
    ----------
    rankings:
        One ranking (photo indexes, best first) per query.
    relevant:
        One collection of relevant photo indexes per query.
    k:
        Cut-off.

    Returns
    -------
    hits : numpy.ndarray
        Boolean ``(queries, k)``; ``hits[q, i]`` is True when the photo at rank ``i + 1`` of
        query ``q`` is relevant (False past the end of a short ranking).
    n_relevant : numpy.ndarray
        Number of distinct relevant photos per query.
    """
    rows, counts = [], []
    for ranked, rel in zip(rankings, relevant, strict=True):
        rel = np.unique(np.asarray(list(rel) if not isinstance(rel, np.ndarray) else rel))
        top = np.asarray(ranked)[:k]
        row = np.zeros(k, dtype=bool)
        row[: len(top)] = np.isin(top, rel)
        rows.append(row)
        counts.append(len(rel))
    hits = np.vstack(rows) if rows else np.zeros((0, k), dtype=bool)
    return hits, np.asarray(counts, dtype=np.int64)


def metrics_from_hits(hits: np.ndarray, n_relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query NDCG, precision and recall at ``k = hits.shape[1]``, vectorised.

    Parameters
    ----------
    hits:
        Boolean ``(queries, k)`` from :func:`hit_matrix`.
    n_relevant:
        Number of relevant photos per query.

    Returns
    -------
    dict
        ``{"ndcg": ..., "precision": ..., "recall": ...}``, each a float array, one per query.
    """
    hits = np.asarray(hits, dtype=bool)
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    k = hits.shape[1]
    disc = _discounts(k)
    dcg = hits @ disc
    ideal_len = np.minimum(n_relevant, k)
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[ideal_len]
    n_hits = hits.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndcg = np.where(ideal > 0, dcg / ideal, 0.0)
        recall = np.where(n_relevant > 0, n_hits / np.maximum(n_relevant, 1), 0.0)
    precision = n_hits / k
    return {"ndcg": ndcg, "precision": precision.astype(np.float64), "recall": recall}


def _one(ranked: np.ndarray, relevant: Iterable[int], k: int) -> dict[str, float]:
    hits, n_rel = hit_matrix([ranked], [relevant], k)
    return {name: float(v[0]) for name, v in metrics_from_hits(hits, n_rel).items()}


def ndcg_at_k(ranked: np.ndarray, relevant: Iterable[int], k: int = 10) -> float:
    """NDCG at ``k`` with binary gains.

    Parameters
    ----------
    ranked:
        Photo indexes, best first (already ordered; see :func:`rank_by_scores`).
    relevant:
        Relevant photo indexes (duplicates ignored).
    k:
        Cut-off.

    Returns
    -------
    float
        ``DCG@k / IDCG@k`` where IDCG puts ``min(k, |relevant|)`` ones first; 0 when there is
        no relevant photo.
    """
    return _one(ranked, relevant, k)["ndcg"]


def precision_at_k(ranked: np.ndarray, relevant: Iterable[int], k: int = 10) -> float:
    """Share of the top ``k`` that is relevant; the denominator is always ``k``.

    Parameters
    ----------
    ranked:
        Photo indexes, best first.
    relevant:
        Relevant photo indexes.
    k:
        Cut-off (also the denominator, even with fewer than ``k`` candidates).

    Returns
    -------
    float
        Precision at ``k``.
    """
    return _one(ranked, relevant, k)["precision"]


def recall_at_k(ranked: np.ndarray, relevant: Iterable[int], k: int = 10) -> float:
    """Share of the relevant photos found in the top ``k``; 0 when there is none.

    Parameters
    ----------
    ranked:
        Photo indexes, best first.
    relevant:
        Relevant photo indexes (duplicates ignored).
    k:
        Cut-off.

    Returns
    -------
    float
        Recall at ``k``.
    """
    return _one(ranked, relevant, k)["recall"]


def seed_ndcg(
    scores_by_photo: np.ndarray, conversion_counts: np.ndarray, k: int | None = None
) -> float:
    """The seed study's NDCG: a ranker's scores over the user's own converted photos.

    The seed study scored only the photos a user actually converted and asked whether the
    model orders them by how often the user converted each one: gains are the conversion
    counts (linear gains, as ``sklearn.metrics.ndcg_score``), the ranking is by descending
    score. Unlike :func:`ndcg_at_k` it never looks at photos the user did not convert, so it
    is much higher than NDCG@10 and is reported only for comparison with that study. A user
    with a single converted photo (or equal counts everywhere) scores 1.

    Parameters
    ----------
    scores_by_photo:
        The ranker's score for each converted photo. Ties are broken by this array's order
        (the caller passes the photos in retrieval order), NaN ranks last.
    conversion_counts:
        How many times the user converted each photo (the gains), same length.
    k:
        Optional cut-off; all photos when None.

    Returns
    -------
    float
        NDCG in [0, 1]; 0 when there is no photo or every count is 0.
    """
    scores = np.asarray(scores_by_photo, dtype=np.float64)
    gains = np.asarray(conversion_counts, dtype=np.float64)
    if scores.shape != gains.shape:
        raise ValueError(f"{len(scores)} scores but {len(gains)} conversion counts")
    if len(gains) == 0:
        return 0.0
    n = len(gains) if k is None else min(k, len(gains))
    order = rank_by_scores(np.arange(len(gains)), scores)[:n]
    disc = _discounts(n)
    dcg = float(gains[order] @ disc)
    ideal = float(np.sort(gains)[::-1][:n] @ disc)
    return dcg / ideal if ideal > 0 else 0.0


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for n < 2."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def bootstrap_ci(
    values: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap confidence interval over queries.

    Parameters
    ----------
    values:
        One value per query.
    n:
        Number of bootstrap resamples.
    seed:
        Seed of the resampling (deterministic for a seed).
    level:
        Confidence level of the interval.

    Returns
    -------
    tuple of float
        ``(mean, lo, hi)``; all NaN for no values.
    """
    values = np.asarray(values, dtype=np.float64)
    m = len(values)
    if m == 0:
        return (float("nan"),) * 3
    mean = float(values.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n, dtype=np.float64)
    per_chunk = max(1, _BOOTSTRAP_CHUNK // m)
    for start in range(0, n, per_chunk):
        rows = min(per_chunk, n - start)
        idx = rng.integers(0, m, size=(rows, m))
        means[start : start + rows] = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    # The percentile interval of a constant sample can miss the mean by rounding; clamp it.
    return mean, float(min(lo, mean)), float(max(hi, mean))


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean difference ``a - b`` over the same queries, with a paired bootstrap interval.

    Parameters
    ----------
    a, b:
        Per-query values of two systems on the same queries, same order.
    n, seed, level:
        As in :func:`bootstrap_ci`.

    Returns
    -------
    tuple of float
        ``(mean difference, lo, hi)``; an interval above 0 means ``a`` beats ``b``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired values must have the same length")
    return bootstrap_ci(a - b, n=n, seed=seed, level=level)


def percentiles_ms(seconds) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of durations given in seconds, in milliseconds (3 decimals).

    Every value is None when there are no durations.
    """
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(values.max()), 3),
        "mean": round(float(values.mean()), 3),
    }
