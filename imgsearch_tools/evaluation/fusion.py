"""Hybrid retrieval's fusion weights, chosen on the validation slice with the default ranker.

Reciprocal-rank fusion with equal weights gives the keyword list half of the candidate slots,
although it holds fewer of the photos users convert than CLIP's; weighting CLIP's ranks up
gives its photos more of the slots (recall), while photos both sources found still come first
(what the words say: tag precision). :func:`choose_fusion` tries CLIP's share of the weight in
:data:`CLIP_SHARES` on the validation slice's (user, keyword) queries, evaluated as
``imgsearch eval`` evaluates test queries (candidates minus the user's earlier photos, the
default ranker's order, every converted photo relevant), and keeps the share with the best
NDCG@10 among those whose tag P@10 (and two-word tag P@10) is at least that of either source
alone on the slice's keywords.
"""

from __future__ import annotations

import numpy as np

from imgsearch.catalogue import Catalogue
from imgsearch.metrics import metrics_from_hits, rank_by_scores
from imgsearch.protocol import Split
from imgsearch_tools.evaluation.queries import (
    KeywordTags,
    build_test_queries,
    pair_queries,
    user_photos,
)
from ranking_service.rankers.base import RankQuery
from retrieval_service.semantic import HybridRetriever, fuse, fusion_label

# CLIP's share of the reciprocal-rank weights; 0.5 is equal-weight fusion.
CLIP_SHARES = (0.5, 0.6, 0.7, 0.8, 0.9)
MAX_FUSION_QUERIES = 3000


def choose_fusion(
    catalogue: Catalogue,
    validation,
    ranker,
    ranker_name: str,
    keyword_retriever,
    clip_retriever,
    candidates_k: int = 100,
    k: int = 10,
    max_queries: int = MAX_FUSION_QUERIES,
    seed: int = 0,
) -> dict:
    """Choose hybrid's fusion weights on the validation slice (module docstring).

    Parameters
    ----------
    catalogue:
        The catalogue being built (photos and tags; its labels when it has them).
    validation:
        The slice (``ranking_service.training.Validation``), with its earlier catalogue and
        its conversions.
    ranker, ranker_name:
        The default ranker as fitted on the conversions before the slice, and its name.
    keyword_retriever, clip_retriever:
        The two sources.
    candidates_k, k:
        Candidates per query and the metrics' cut-off.
    max_queries:
        Validation (user, keyword) pairs used (a seeded draw).
    seed:
        Seed of the draw.

    Returns
    -------
    dict
        ``method``, ``weights`` (keyword, clip), ``label``, ``reason``, ``ranker`` and
        ``table`` (per share: NDCG@k, candidate recall, tag P@k, pair tag P@k), plus the single
        sources' figures; ``{"skipped": reason}`` when the slice has no query.
    """
    if validation is None or validation.later is None or len(validation.later) == 0:
        return {"skipped": "no validation slice"}
    split = Split(validation.catalogue.conversions, validation.later, 0.0)
    queries = build_test_queries(
        split, min_pair=validation.min_pair, max_queries=max_queries, seed=seed
    )
    if len(queries) == 0:
        return {"skipped": "no validation query with a user seen before the slice"}
    truth, _ = catalogue.truth_tags()
    tags = KeywordTags(truth, catalogue.n_photos)
    keywords = sorted(set(queries.keyword.tolist()))
    pairs, _ = pair_queries(tags, validation.later, keywords, k)
    asked = sorted(set(keywords) | {query for query, _, _ in pairs})
    sources = {
        keyword: (
            keyword_retriever.retrieve(keyword, candidates_k),
            clip_retriever.retrieve(keyword, candidates_k),
        )
        for keyword in asked
    }
    seen = user_photos(validation.catalogue.conversions)

    def measure(lists: dict) -> dict:
        """NDCG@k with the ranker, candidate recall and tag figures for one way of fusing."""
        hits = np.zeros((len(queries), k), dtype=bool)
        recall = np.zeros(len(queries))
        requests = []
        for q in range(len(queries)):
            user, keyword = int(queries.user_idx[q]), str(queries.keyword[q])
            photo_idx, scores = lists[keyword]
            keep = ~np.isin(photo_idx, seen.get(user, np.zeros(0, np.int64)))
            requests.append(
                RankQuery(
                    user,
                    keyword,
                    photo_idx[keep],
                    scores[keep],
                    queries.recent[q],
                    str(queries.country[q]),
                )
            )
            recall[q] = np.isin(queries.relevant[q], photo_idx[keep]).mean()
        score_batch = getattr(ranker, "score_batch", None)
        results = score_batch(requests) if score_batch else [ranker.score(r) for r in requests]
        for q, (request, result) in enumerate(zip(requests, results)):
            top = rank_by_scores(request.candidates, result.scores)[:k]
            hits[q, : len(top)] = np.isin(top, queries.relevant[q])
        n_relevant = np.asarray([len(r) for r in queries.relevant], dtype=np.int64)
        ndcg = metrics_from_hits(hits, n_relevant)["ndcg"]
        single = [tags.precision(lists[w][0], [w], k) for w in keywords if w in tags]
        double = [tags.precision(lists[query][0], [a, b], k) for query, a, b in pairs]
        return {
            f"ndcg@{k}": float(np.mean(ndcg)),
            "candidate_recall": float(recall.mean()),
            f"tag_p@{k}": float(np.mean(single)) if single else None,
            f"pair_tag_p@{k}": float(np.mean(double)) if double else None,
        }

    def as_lists(results: dict) -> dict:
        return {
            w: (np.asarray(r.photo_idx, np.int64), np.asarray(r.scores)) for w, r in results.items()
        }

    singles = {
        name: measure(as_lists({w: pair[i] for w, pair in sources.items()}))
        for i, name in enumerate(HybridRetriever.SOURCES)
    }
    table = []
    for share in CLIP_SHARES:
        weights = (round(1.0 - share, 4), share)
        fused = {
            w: fuse(pair, HybridRetriever.SOURCES, candidates_k, "rrf", weights=weights)
            for w, pair in sources.items()
        }
        table.append({"weights": list(weights), **measure(as_lists(fused))})
    chosen, why = _choose(table, singles, k)
    weights = tuple(chosen["weights"])
    return {
        "method": "rrf",
        "weights": list(weights),
        "label": fusion_label("rrf", weights),
        "reason": why,
        "ranker": ranker_name,
        "n_queries": len(queries),
        "tag_queries": sum(w in tags for w in keywords),
        "pair_queries": len(pairs),
        "table": table,
        "sources": singles,
    }


def _choose(table: list[dict], singles: dict, k: int) -> tuple[dict, str]:
    """The best NDCG@k among the weights as precise as either source alone; and why."""
    ndcg, tag, pair = f"ndcg@{k}", f"tag_p@{k}", f"pair_tag_p@{k}"

    def floor(key: str) -> float | None:
        values = [s[key] for s in singles.values() if s[key] is not None]
        return max(values) if values else None

    floors = {key: floor(key) for key in (tag, pair)}

    def precise(row: dict) -> bool:
        return all(
            row[key] is None or floors[key] is None or row[key] >= floors[key] - 1e-12
            for key in (tag, pair)
        )

    eligible = [row for row in table if precise(row)]
    if not eligible:
        best = max(table, key=lambda row: (row[tag] or 0.0, row[ndcg]))
        return best, (
            f"no weighting kept tag P@{k} at either source's level on the validation "
            f"keywords; the most precise one is kept (NDCG@{k} {best[ndcg]:.4f})"
        )
    best = max(eligible, key=lambda row: row[ndcg])
    equal = table[0]
    return best, (
        f"validation NDCG@{k} {best[ndcg]:.4f} with the default ranker (equal weights "
        f"{equal[ndcg]:.4f}), candidate recall {best['candidate_recall']:.3f}; the best of the "
        f"weightings whose tag P@{k} ({best[tag] if best[tag] is not None else float('nan'):.3f})"
        f" is at least either source's ({floors[tag] or float('nan'):.3f})"
    )
