"""One retriever measured with every ranker over the same test queries: quality, tag figures
and per-stage latency (the rows of ``imgsearch eval``'s table)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from imgsearch.latency import percentiles_ms
from imgsearch.ranking_metrics import (
    bootstrap_ci,
    metrics_from_hits,
    rank_by_scores,
    seed_ndcg,
)
from imgsearch_tools.evaluation.options import EvalConfig
from imgsearch_tools.evaluation.queries import (
    KeywordTags,
    TestQueries,
)


@dataclass
class _Collected:
    """Per-query outcomes of one retriever x ranker."""

    top: list[np.ndarray] = field(default_factory=list)
    seed: list[float] = field(default_factory=list)
    ranking_s: list[float] = field(default_factory=list)
    fallbacks: Counter = field(default_factory=Counter)


def _retrieved_order_scores(
    relevant: np.ndarray, retrieved: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Relevant photos in retrieval order (missed ones last) with retrieval-like scores."""
    position = {p: i for i, p in enumerate(retrieved.tolist())}
    floor = (float(np.min(scores)) - 1.0) if len(scores) else 0.0
    keyed = sorted(relevant.tolist(), key=lambda p: (position.get(p, len(position)), p))
    photos = np.asarray(keyed, dtype=np.int64)
    rscores = np.asarray(
        [float(scores[position[p]]) if p in position else floor for p in keyed], dtype=np.float32
    )
    return photos, rscores


def evaluate_retriever(
    retriever_name: str,
    retriever,
    rankers: dict,
    queries: TestQueries,
    seen: dict[int, np.ndarray],
    no_photos: np.ndarray,
    tags: KeywordTags,
    pairs: list[tuple[str, str, str]],
    config: EvalConfig,
    keyword_tags: KeywordTags | None = None,
) -> list[dict]:
    """All rows of one retriever: every ranker over the same retrieved candidates.

    ``tags`` is the truth of the tag figures; ``keyword_tags``, when given, the catalogue's
    keywords for the same figures against them (``*_keywords``).
    """
    from tqdm import tqdm

    from ranking_service.rankers.base import RankQuery

    k = config.k
    collected = {name: _Collected() for name in rankers}
    retrieval_s = np.zeros(len(queries))
    candidate_recall = np.zeros(len(queries))
    tag_precisions, keyword_tag_precisions = [], []
    if len(queries):
        # One untimed warm-up per stage: first calls pay for lazy loading and allocation.
        _warm = retriever.retrieve(str(queries.keyword[0]), config.candidates_k)
        for ranker in rankers.values():
            ranker.score(
                RankQuery(
                    int(queries.user_idx[0]),
                    str(queries.keyword[0]),
                    _warm.photo_idx.astype(np.int64),
                    _warm.scores.astype(np.float32),
                )
            )
    progress = tqdm(
        range(len(queries)),
        desc=f"evaluating {retriever_name}",
        unit="query",
        file=sys.stderr,
        disable=not config.show_progress,
    )
    for q in progress:
        user, keyword = int(queries.user_idx[q]), str(queries.keyword[q])
        start = time.perf_counter()
        result = retriever.retrieve(keyword, config.candidates_k)
        retrieval_s[q] = time.perf_counter() - start
        retrieved = np.asarray(result.photo_idx, dtype=np.int64)
        scores = np.asarray(result.scores, dtype=np.float32)
        if keyword in tags:
            tag_precisions.append(tags.precision(retrieved, [keyword], k))
            if keyword_tags is not None:
                keyword_tag_precisions.append(keyword_tags.precision(retrieved, [keyword], k))
        candidates, cand_scores = retrieved, scores
        if config.filter_train:
            keep = ~np.isin(retrieved, seen.get(user, no_photos), assume_unique=True)
            candidates, cand_scores = retrieved[keep], scores[keep]
        n_rel = len(queries.relevant[q])
        candidate_recall[q] = np.isin(queries.relevant[q], candidates).sum() / n_rel
        relevant_photos, relevant_scores = _retrieved_order_scores(
            queries.relevant[q], retrieved, scores
        )
        gains = queries.counts[q][np.searchsorted(queries.relevant[q], relevant_photos)]

        def ask(photos: np.ndarray, photo_scores: np.ndarray) -> RankQuery:
            return RankQuery(
                user_idx=user,
                keyword=keyword,
                candidates=photos,
                retrieval_scores=photo_scores,
                recent_photos=queries.recent[q],
                country=str(queries.country[q]),
            )

        for name, ranker in rankers.items():
            out = collected[name]
            request = ask(candidates, cand_scores)
            start = time.perf_counter()
            ranked = ranker.score(request)
            top = rank_by_scores(candidates, ranked.scores)[:k]
            out.ranking_s.append(time.perf_counter() - start)
            out.top.append(top)
            if ranked.fallback_reason:
                out.fallbacks[ranked.fallback_reason] += 1
            own = ranker.score(ask(relevant_photos, relevant_scores))
            out.seed.append(seed_ndcg(own.scores, gains))

    pair_precisions, keyword_pair_precisions = [], []
    for query, first, second in pairs:
        result = retriever.retrieve(query, config.candidates_k)
        pair_precisions.append(tags.precision(result.photo_idx, [first, second], k))
        if keyword_tags is not None:
            keyword_pair_precisions.append(
                keyword_tags.precision(result.photo_idx, [first, second], k)
            )

    def mean_of(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    tag_p, pair_p = mean_of(tag_precisions), mean_of(pair_precisions)

    rows = []
    for name, out in collected.items():
        hits = np.zeros((len(queries), k), dtype=bool)
        for q, top in enumerate(out.top):
            hits[q, : len(top)] = np.isin(top, queries.relevant[q])
        n_relevant = np.asarray([len(r) for r in queries.relevant], dtype=np.int64)
        per_query = metrics_from_hits(hits, n_relevant)
        per_query["seed"] = np.asarray(out.seed)
        ranking_s = np.asarray(out.ranking_s)
        row = {"retriever": retriever_name, "ranker": name, "queries": len(queries)}
        for key, values in (
            (f"ndcg@{k}", per_query["ndcg"]),
            (f"p@{k}", per_query["precision"]),
            (f"recall@{k}", per_query["recall"]),
            ("seed_ndcg", per_query["seed"]),
        ):
            mean, lo, hi = bootstrap_ci(values, n=config.bootstrap, seed=config.seed)
            row[key] = mean
            row[f"{key}_ci"] = [lo, hi]
        row["candidate_recall"] = float(candidate_recall.mean())
        # The same NDCG over the queries with at least one relevant candidate: what the rankers
        # can change (the rankers' own validation NDCG is computed this way).
        reachable = candidate_recall > 0
        row["reachable_queries"] = int(reachable.sum())
        row[f"ndcg@{k}_reachable"] = (
            float(per_query["ndcg"][reachable].mean()) if reachable.any() else float("nan")
        )
        row[f"tag_p@{k}"] = tag_p
        row["tag_queries"] = len(tag_precisions)
        row[f"pair_tag_p@{k}"] = pair_p
        row["pair_queries"] = len(pair_precisions)
        if keyword_tags is not None:
            row[f"tag_p@{k}_keywords"] = mean_of(keyword_tag_precisions)
            row[f"pair_tag_p@{k}_keywords"] = mean_of(keyword_pair_precisions)
        row["latency_ms"] = {
            "retrieval": percentiles_ms(retrieval_s),
            "ranking": percentiles_ms(ranking_s),
            "total": percentiles_ms(retrieval_s + ranking_s),
        }
        row["fallbacks"] = int(sum(out.fallbacks.values()))
        row["fallback_reasons"] = dict(out.fallbacks.most_common(3))
        row["_per_query_ndcg"] = per_query["ndcg"]
        row["_per_query_tags"] = (np.asarray(tag_precisions), np.asarray(pair_precisions))
        rows.append(row)
    return rows
