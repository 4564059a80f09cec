"""The served configuration: (retriever, fusion weights, ranker) chosen together on validation.

Every combination is scored on the same validation queries, evaluated as ``imgsearch eval``
evaluates test queries: every (user, keyword) pair with at least one conversion in the
validation slice whose user converted before it, except the pairs that tuned parameters
(the ``tuning`` part); the retriever's top candidates minus the user's earlier photos, in the
ranker's order; every photo the user converted with the keyword relevant (NDCG@10).

* **Retrievers.** CLIP's share of hybrid's reciprocal-rank weights runs over
  :data:`CLIP_SHARES`; share 0 is the keyword retriever alone and share 1 CLIP alone, served as
  those retrievers. A catalogue without CLIP has the keyword retriever only.
* **Tag guard.** When the catalogue says what each photo shows (``labels.tsv``), a retriever
  whose tag P@10 on the validation keywords falls more than :data:`TAG_TOLERANCE` below the
  better single source is not eligible: it would serve photos that do not show what was asked.
  Against keywords (no labels) keyword retrieval scores 1 by construction, so the guard does
  not apply. The better single source always passes, so the guard can never force a
  weighting worse than both sources.
* **The rule** (:mod:`~imgsearch_tools.evaluation.served_rule`). With at least
  :data:`MIN_POINT_BEST` queries the validation point-best, or a learned ranker whose trees
  passed their own rule when it is within noise of the point-best; with fewer, the best only
  when it is significantly above popularity. Below :data:`MIN_SELECTION_QUERIES`, nothing is
  chosen: popularity with the default retriever.
* **Folds.** When the validation slice gives fewer than :data:`MIN_POINT_BEST` selection
  queries, the time slice before it (the same share of the conversions before the validation
  slice) is a second fold: every ranker refitted on the conversions before that slice with the
  validation slice's choices (:mod:`ranking_service.earlier_fold`), its pairs scored like the
  slice's, and the rule applied to the queries of both folds pooled; ``folds`` records each
  fold's count. A slice with enough queries keeps one fold (no refit, no extra build time).
"""

from __future__ import annotations

import numpy as np

from imgsearch.catalogue import Catalogue, normalise_keyword
from imgsearch.evaluation_protocol import Split
from imgsearch.ranking_metrics import metrics_from_hits, rank_by_scores
from imgsearch_tools.evaluation.queries import (
    KeywordTags,
    TestQueries,
    build_test_queries,
    user_photos,
)
from imgsearch_tools.evaluation.served_rule import MIN_POINT_BEST, apply_rule
from ranking_service.rankers.base import RankQuery
from ranking_service.selection import BASELINE, MIN_SELECTION_QUERIES
from retrieval_service.semantic import HybridRetriever, fuse, fusion_label

# CLIP's share of hybrid's weights: 0 is the keyword retriever alone, 1 CLIP alone.
CLIP_SHARES = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
# How far below the better single source a retriever's tag P@10 may fall.
TAG_TOLERANCE = 0.02
# Selection queries drawn (seeded) when the slice gives more.
MAX_SELECTION_QUERIES = 3000
# The time-ordered folds, most recent first (the second only below MIN_POINT_BEST queries).
FOLD_NAMES = ("validation slice", "slice before it")


def selection_queries(validation, max_queries: int = MAX_SELECTION_QUERIES, seed: int = 0):
    """Every pair with a conversion in the slice, minus the tuning pairs (module docstring)."""
    tuned = {(q.user_idx, normalise_keyword(q.keyword)) for q in validation.tuning.queries}
    return slice_queries(validation.catalogue, validation.later, tuned, max_queries, seed)


def slice_queries(
    before: Catalogue, later, tuned: set, max_queries: int = MAX_SELECTION_QUERIES, seed: int = 0
) -> TestQueries:
    """Every pair with a conversion in ``later`` whose user converted in ``before``, minus the
    ``tuned`` (user, keyword) pairs; a seeded draw of ``max_queries`` when there are more."""
    return build_test_queries(
        Split(before.conversions, later, 0.0),
        min_pair=1,
        max_queries=max_queries,
        seed=seed,
        exclude=tuned,
    )


def retriever_grid(has_clip: bool) -> list[dict]:
    """The retrievers tried: ``name``, ``weights`` (keyword, clip; None alone), ``label``."""
    if not has_clip:
        return [{"retriever": "keyword", "weights": None, "label": "keyword"}]
    grid = []
    for share in CLIP_SHARES:
        if share == 0.0:
            grid.append({"retriever": "keyword", "weights": None, "label": "keyword"})
        elif share == 1.0:
            grid.append({"retriever": "clip", "weights": None, "label": "clip"})
        else:
            weights = [round(1.0 - share, 4), share]
            label = f"hybrid ({fusion_label('rrf', weights)})"
            grid.append({"retriever": "hybrid", "weights": weights, "label": label})
    return grid


def choose_configuration(
    catalogue: Catalogue,
    validation,
    models: dict,
    keyword_retriever,
    clip_retriever=None,
    candidates_k: int = 100,
    k: int = 10,
    max_queries: int = MAX_SELECTION_QUERIES,
    seed: int = 0,
    n_bootstrap: int = 1000,
    second_fold=None,
) -> dict:
    """Score every (retriever, ranker) on the selection queries and apply the rule.

    Parameters
    ----------
    catalogue:
        The catalogue being built (its labels, when it has them, are the tag truth).
    validation:
        The slice (``ranking_service.validation_slice.Validation``).
    models:
        Ranker name to its model fitted on the conversions before the slice.
    keyword_retriever, clip_retriever:
        The sources (``clip_retriever`` None without CLIP).
    candidates_k, k:
        Candidates per query and the metric's cut-off.
    max_queries, seed, n_bootstrap:
        The draw of selection queries and the intervals.
    second_fold:
        Called when the slice gives fewer than :data:`MIN_POINT_BEST` selection queries: the
        slice before it and the models fitted before that
        (:class:`~ranking_service.earlier_fold.EarlierFold`); None keeps one fold.

    Returns
    -------
    dict
        ``retriever``, ``weights``, ``label``, ``ranker``, ``rule``, ``reason``,
        ``versus_popularity`` and ``versus_point_best`` (paired figures, when they apply),
        ``n_queries`` (all folds), ``folds`` (each fold's count), ``tag_guard`` and ``table``
        (per retriever: tag figures, eligibility and each ranker's NDCG@k), plus ``fusion``
        (hybrid's best weights for the chosen ranker).
    """
    has_clip = clip_retriever is not None
    if validation is None or not validation.usable:
        reason = validation.skipped if validation is not None else "no validation slice"
        return fallback_configuration(has_clip, reason)
    queries = selection_queries(validation, max_queries, seed)
    folds = [(queries, models, validation.catalogue)]
    if len(queries) < MIN_POINT_BEST and second_fold is not None:
        fold = second_fold()
        earlier = slice_queries(fold.catalogue, fold.later, set(), max_queries, seed)
        folds.append((earlier, fold.models, fold.catalogue))
    n_queries = sum(len(fold[0]) for fold in folds)
    if n_queries < MIN_SELECTION_QUERIES:
        return fallback_configuration(
            has_clip,
            f"{_fold_counts(folds)}, fewer than the {MIN_SELECTION_QUERIES} a comparison needs",
        )
    truth, truth_source = catalogue.truth_tags()
    tags = KeywordTags(truth, catalogue.n_photos)
    keywords = sorted({str(w) for fold in folds for w in fold[0].keyword.tolist()})
    sources = {
        keyword: (
            keyword_retriever.retrieve(keyword, candidates_k),
            clip_retriever.retrieve(keyword, candidates_k) if has_clip else None,
        )
        for keyword in keywords
    }
    table, per_query = [], {}
    seen = [user_photos(before.conversions) for _, _, before in folds]
    for entry in retriever_grid(has_clip):
        lists = {w: _lists_of(pair, entry, candidates_k) for w, pair in sources.items()}
        # Each fold's queries scored by its own models; the choice pools them.
        measured = [
            _measure(fold_queries, lists, fold_models, fold_seen, k)
            for (fold_queries, fold_models, _), fold_seen in zip(folds, seen)
        ]
        ndcg = {name: np.concatenate([m[0][name] for m in measured]) for name in models}
        recall = sum(m[1] * len(f[0]) for m, f in zip(measured, folds)) / n_queries
        precision = [tags.precision(lists[w][0], [w], k) for w in keywords if w in tags]
        per_query[entry["label"]] = ndcg
        table.append(
            {
                **entry,
                f"tag_p@{k}": float(np.mean(precision)) if precision else None,
                "candidate_recall": recall,
                "rankers": {name: float(values.mean()) for name, values in ndcg.items()},
            }
        )
    guard = _tag_guard(table, truth_source, k)
    eligible = [row["label"] for row in table if row["eligible"]]
    chosen = apply_rule(
        per_query, eligible, n_bootstrap=n_bootstrap, seed=seed, learned=_learned(models)
    )
    if len(folds) > 1:
        chosen["reason"] += (
            f"; two time-ordered folds ({_fold_counts(folds)}): the validation slice gave "
            f"fewer than {MIN_POINT_BEST}"
        )
    row = next(r for r in table if r["label"] == chosen["label"])
    return {
        "retriever": row["retriever"],
        "weights": row["weights"],
        "label": row["label"],
        "ranker": chosen["ranker"],
        "rule": chosen["rule"],
        "reason": chosen["reason"],
        "versus_popularity": chosen.get("versus_popularity"),
        "versus_point_best": chosen.get("versus_point_best"),
        "n_queries": n_queries,
        "pairs_in_slice": queries.n_pairs_total,
        "folds": [
            {
                "slice": name,
                "queries": len(fold_queries),
                "pairs_in_slice": fold_queries.n_pairs_total,
                "conversions_before": len(before.conversions),
            }
            for name, (fold_queries, _, before) in zip(FOLD_NAMES, folds)
        ],
        "tuning_queries": len(validation.tuning),
        "tag_guard": guard,
        "table": table,
        "fusion": _best_fusion(table, chosen["ranker"]),
    }


def _learned(models: dict) -> str | None:
    """The stacking ranker whose trees passed their own rule (they serve), else None."""
    for name, model in models.items():
        if hasattr(model, "base_models") and getattr(model, "serves", "") is None:
            return name
    return None


def _fold_counts(folds: list) -> str:
    """The selection queries of each fold, in words."""
    return " and ".join(
        f"{len(fold[0])} selection queries from the {name}" for name, fold in zip(FOLD_NAMES, folds)
    )


def fallback_configuration(has_clip: bool, why: str) -> dict:
    """What is served when validation cannot choose: popularity with the default retriever."""
    retriever = "hybrid" if has_clip else "keyword"
    weights = [0.5, 0.5] if has_clip else None
    label = f"hybrid ({fusion_label('rrf', weights)})" if has_clip else "keyword"
    return {
        "retriever": retriever,
        "weights": weights,
        "label": label,
        "ranker": BASELINE,
        "rule": "fallback",
        "reason": f"selection skipped: {why}; serving {BASELINE} with {label}",
        "skipped": why,
        "table": [],
    }


def _lists_of(pair, entry: dict, candidates_k: int) -> tuple[np.ndarray, np.ndarray]:
    """One retriever's (photos, scores) for a keyword from the two sources' lists."""
    keyword_result, clip_result = pair
    if entry["retriever"] == "keyword":
        result = keyword_result
    elif entry["retriever"] == "clip":
        result = clip_result
    else:
        result = fuse(
            pair, HybridRetriever.SOURCES, candidates_k, "rrf", weights=tuple(entry["weights"])
        )
    return np.asarray(result.photo_idx, np.int64), np.asarray(result.scores, np.float32)


def _measure(
    queries: TestQueries, lists: dict, models: dict, seen: dict, k: int
) -> tuple[dict[str, np.ndarray], float]:
    """Per ranker, per-query NDCG@k over one retriever's lists; and the candidate recall."""
    requests, recall = [], np.zeros(len(queries))
    none = np.zeros(0, np.int64)
    for q in range(len(queries)):
        user, keyword = int(queries.user_idx[q]), str(queries.keyword[q])
        photo_idx, scores = lists[keyword]
        keep = ~np.isin(photo_idx, seen.get(user, none))
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
    n_relevant = np.asarray([len(r) for r in queries.relevant], dtype=np.int64)
    out, results_of = {}, {}
    # A stacking ranker last, reusing the results of its bases that are these very models.
    for name, model in sorted(models.items(), key=lambda item: hasattr(item[1], "base_models")):
        score_batch = getattr(model, "score_batch", None)
        bases = getattr(model, "base_models", {})
        shared = [b for b, base in bases.items() if models.get(b) is base and b in results_of]
        if shared:
            results = [
                model.score(r, {b: results_of[b][q] for b in shared})
                for q, r in enumerate(requests)
            ]
        else:
            results = score_batch(requests) if score_batch else [model.score(r) for r in requests]
        results_of[name] = results
        hits = np.zeros((len(queries), k), dtype=bool)
        for q, (request, result) in enumerate(zip(requests, results)):
            top = rank_by_scores(request.candidates, result.scores)[:k]
            hits[q, : len(top)] = np.isin(top, queries.relevant[q])
        out[name] = np.asarray(metrics_from_hits(hits, n_relevant)["ndcg"], dtype=np.float64)
    return {name: out[name] for name in models}, float(recall.mean())


def _tag_guard(table: list[dict], truth_source: str, k: int) -> dict:
    """Mark each retriever eligible or not by the tag guard; describe the guard."""
    key = f"tag_p@{k}"
    singles = [r[key] for r in table if r["weights"] is None and r[key] is not None]
    if truth_source != "labels" or len(singles) < 2:
        for row in table:
            row["eligible"] = True
        why = (
            "not applied: the tags are the keywords, which keyword retrieval matches by "
            "construction"
            if truth_source != "labels"
            else "not applied: one source only"
        )
        return {"applied": False, "reason": why}
    floor = max(singles) - TAG_TOLERANCE
    for row in table:
        row["eligible"] = row[key] is None or row[key] >= floor - 1e-12
    return {
        "applied": True,
        "tolerance": TAG_TOLERANCE,
        "floor": floor,
        "reason": f"tag P@{k} at least {floor:.3f}: the better single source's "
        f"{max(singles):.3f} minus {TAG_TOLERANCE}",
    }


def _best_fusion(table: list[dict], ranker: str) -> dict:
    """Hybrid's best eligible weights for ``ranker`` (what an explicit hybrid request gets)."""
    hybrids = [r for r in table if r["retriever"] == "hybrid" and r["eligible"]]
    if not hybrids:
        hybrids = [r for r in table if r["retriever"] == "hybrid"]
    if not hybrids:
        return {}
    best = max(hybrids, key=lambda row: row["rankers"].get(ranker, 0.0))
    return {
        "method": "rrf",
        "weights": best["weights"],
        "label": fusion_label("rrf", best["weights"]),
        "ranker": ranker,
        "reason": f"the best hybrid weighting with {ranker} on validation (NDCG@10 "
        f"{best['rankers'].get(ranker, 0.0):.4f}) among those passing the tag guard",
    }


def served_configuration(
    catalogue, training, keyword_retriever, clip_retriever=None, candidates_k: int = 100
) -> dict:
    """The (retriever, fusion weights, ranker) validation chooses for a trained set.

    ``training`` is the :class:`~ranking_service.training.TrainingReport` (its slice and
    validation models); see :mod:`imgsearch_tools.evaluation.configuration`.
    """

    def second_fold():
        from ranking_service.earlier_fold import earlier_fold

        params = {name: entry.get("params", {}) for name, entry in training.rankers.items()}
        return earlier_fold(
            training.validation,
            training.validation_models,
            params,
            training.candidates,
            training.embeddings,
        )

    return choose_configuration(
        catalogue,
        training.validation,
        training.validation_models,
        keyword_retriever,
        clip_retriever,
        candidates_k=candidates_k,
        second_fold=second_fold,
    )


def configuration_entries(configuration: dict) -> dict:
    """The manifest entries of a chosen configuration, read by the servers and ``eval``."""
    entries = {
        "configuration": configuration,
        "default_retriever": configuration["retriever"],
        "default_ranker": configuration["ranker"],
        "default_ranker_reason": configuration["reason"],
    }
    fusion = configuration.get("fusion")
    if not fusion and configuration.get("weights"):
        weights = configuration["weights"]
        fusion = {
            "method": "rrf",
            "weights": weights,
            "label": fusion_label("rrf", weights),
            "ranker": configuration["ranker"],
            "reason": configuration["reason"],
        }
    if fusion:
        entries["fusion"] = fusion
    return entries
