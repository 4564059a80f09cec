"""The stacked ranker: training rows scored once, sampled per out-of-fold fit; its request
path (popularity counted once, remembered tastes, LightGBM's C entry point) as fast as it
can be without changing a score."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from imgsearch.evaluation_protocol import temporal_split
from ranking_service.rankers import create_ranker, load_ranker
from ranking_service.rankers.base import RankQuery
from ranking_service.rankers.booster_predict import predict_rows
from ranking_service.rankers.popularity import PopularityRanker
from ranking_service.rankers.stack_features import StackFeatures
from ranking_service.rankers.stacked import QueryRows, sample_rows, stack_rows
from ranking_service.rankers.validation import ValidationSet
from ranking_service.stacking import judge_stacker
from tests.test_rankers import EMBEDDINGS, fitted, make_catalogue, served


def _slice():
    """Bases fitted before a held-out slice, the slice's queries and the features."""
    catalogue = make_catalogue()
    parts = temporal_split(catalogue.conversions, 0.2)
    earlier = catalogue.with_conversions(parts.earlier)
    queries = ValidationSet.build(earlier, parts.later, served(earlier), candidates_k=100)
    bases = {name: fitted(name, earlier) for name in ("popularity", "als", "clip_profile")}
    return queries, bases, StackFeatures.fit(earlier, EMBEDDINGS)


def test_rows_scored_once_sample_as_rows_scored_per_fold():
    queries, bases, features = _slice()
    # Only queries with converted and unconverted candidates teach the stacker: a query with
    # nothing converted (appended last) is left out before its bases are scored.
    nothing = np.zeros(0, np.int64)
    every = QueryRows.score(
        queries.queries * 2, queries.relevant + [nothing] * len(queries), bases, features
    )
    scored = QueryRows.score(queries.queries, queries.relevant, bases, features)
    np.testing.assert_array_equal(every.index, scored.index)
    assert 0 < len(scored.index) <= len(queries)
    for i, label in zip(scored.index, scored.labels):
        assert label.any() and not label.all()
        assert np.array_equal(label, np.isin(queries.queries[i].candidates, queries.relevant[i]))
    fold = np.arange(len(queries)) % 3
    for held in range(3):
        inside = np.flatnonzero(fold != held)
        per_fold = stack_rows(
            [queries.queries[i] for i in inside],
            [queries.relevant[i] for i in inside],
            bases,
            features,
            seed=7,
        )
        from_scored = sample_rows(scored, inside, seed=7)
        assert from_scored[2] == per_fold[2]
        np.testing.assert_array_equal(from_scored[1], per_fold[1])
        np.testing.assert_array_equal(from_scored[0], per_fold[0])
    every = sample_rows(scored)
    assert len(every[2]) == len(scored.index)
    # Positives are all kept; negatives are sampled.
    assert every[1].sum() == sum(int(label.sum()) for label in scored.labels)


def test_the_configuration_reuses_the_bases_results_and_gets_the_same_figures():
    from imgsearch_tools.evaluation.configuration import _measure
    from imgsearch_tools.evaluation.queries import TestQueries

    queries, _, _ = _slice()
    earlier = make_catalogue()
    earlier = earlier.with_conversions(temporal_split(earlier.conversions, 0.2).earlier)
    stacked = fitted("stacked", earlier)
    picked = queries.queries[:60]
    tests = TestQueries(
        np.asarray([q.user_idx for q in picked]),
        np.asarray([q.keyword for q in picked]),
        queries.relevant[:60],
        [np.ones(len(r)) for r in queries.relevant[:60]],
        np.asarray([""] * len(picked)),
        [q.recent_photos for q in picked],
        len(picked),
    )
    lists = {q.keyword: (q.candidates, q.retrieval_scores) for q in picked}
    alone, _ = _measure(tests, lists, {"stacked": stacked}, {}, 10)
    # Its bases are these very models: their results for each request are reused.
    models = {**stacked.base_models, "stacked": stacked}
    shared, _ = _measure(tests, lists, models, {}, 10)
    assert list(shared) == list(models)
    np.testing.assert_array_equal(shared["stacked"], alone["stacked"])
    request = picked[0]
    known = {name: base.score(request) for name, base in stacked.base_models.items()}
    np.testing.assert_array_equal(
        stacked.score(request, known).scores, stacked.score(request).scores
    )


def _requests(queries, n: int = 40) -> list:
    """Slice requests, each also with its user's earlier photos sent as recent history."""
    picked = queries.queries[:n]
    return [
        *picked,
        *(
            RankQuery(q.user_idx, q.keyword, q.candidates, q.retrieval_scores, q.candidates[:5])
            for q in picked
        ),
    ]


def test_a_request_counts_its_popularity_once_and_scores_as_before(monkeypatch):
    queries, _, _ = _slice()
    earlier = make_catalogue()
    earlier = earlier.with_conversions(temporal_split(earlier.conversions, 0.2).earlier)
    stacked = fitted("stacked", earlier)
    popularity = stacked.base_models["popularity"]
    assert stacked.base_models["als"].popularity is popularity
    assert stacked.base_models["clip_profile"].popularity is popularity
    # The same ranker with priors of their own (as loaded before sharing) scores the same.
    apart = copy.deepcopy(stacked)
    for name in ("als", "clip_profile"):
        apart.base_models[name].popularity = copy.deepcopy(popularity)
    counted = []
    original = PopularityRanker._count_shares

    def counting(self, candidates, keyword, cold=None):
        counted.append(keyword)
        return original(self, candidates, keyword, cold)

    monkeypatch.setattr(PopularityRanker, "_count_shares", counting)
    for request in _requests(queries):
        counted.clear()
        shared = stacked.score(request).scores
        assert len(counted) == 1  # the base, both priors and the prior feature: one count
        np.testing.assert_array_equal(shared, apart.score(request).scores)


def test_a_remembered_taste_is_the_taste_computed_afresh():
    queries, bases, _ = _slice()
    ranker = bases["clip_profile"]
    fresh = copy.deepcopy(ranker)
    for request in _requests(queries):
        first = ranker.score(request).scores
        np.testing.assert_array_equal(first, ranker.score(request).scores)  # remembered
        np.testing.assert_array_equal(first, fresh.score(request).scores)
        fresh._profile_cache.clear()
    remembered = {user for user, _ in ranker._profile_cache}
    assert remembered >= {q.user_idx for q in queries.queries[:40]}
    # A recent photo the user never converted moves the taste away from the remembered one.
    user = queries.queries[0].user_idx
    lo, hi = ranker.user_history.indptr[user], ranker.user_history.indptr[user + 1]
    seen = set(ranker.user_history.indices[lo:hi].tolist())
    new = next(p for p in range(10, len(ranker.has_embedding)) if p not in seen)
    assert not np.allclose(ranker.profile(user, np.array([new])), ranker.profile(user, []))


def test_the_request_path_predicts_what_lightgbm_predicts():
    import lightgbm

    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 6))
    labels = (features[:, 0] + rng.normal(0, 0.5, 400) > 0.5).astype(int)
    data = lightgbm.Dataset(features, labels, group=[40] * 10)
    booster = lightgbm.train({"objective": "lambdarank", "verbose": -1}, data, 10)
    rows = rng.normal(size=(100, 6))
    rows[::7, 2] = np.nan  # missing values take the trees' default branches
    np.testing.assert_array_equal(predict_rows(booster, rows), booster.predict(rows))
    assert predict_rows(booster, rows[:0]).shape == (0,)
    np.testing.assert_array_equal(
        predict_rows(booster, np.asfortranarray(rows)), booster.predict(rows)
    )


def test_the_trees_serve_only_when_they_beat_their_best_base():
    rng = np.random.default_rng(0)
    popularity = rng.uniform(0, 1, 500)
    bases = {"popularity": popularity, "als": popularity - 0.05}
    above = judge_stacker(popularity + 0.01, bases)
    assert above["serves"] is None and above["best_base"] == "popularity"
    assert above["diff"] == pytest.approx(0.01) and "beat their best base" in above["reason"]
    # Level with the best base (not above it) or below: the base's order is served.
    for trees in (popularity, popularity - 0.01):
        judged = judge_stacker(trees, bases)
        assert judged["serves"] == "popularity", judged
        assert "serving popularity's order" in judged["reason"]
    assert judge_stacker(popularity - 0.01, {"als": popularity + 0.1})["serves"] == "als"


def test_a_stacker_serving_a_base_scores_as_that_base(tmp_path):
    queries, _, _ = _slice()
    earlier = make_catalogue()
    earlier = earlier.with_conversions(temporal_split(earlier.conversions, 0.2).earlier)
    stacked = fitted("stacked", earlier)
    stacked.serves = "als"
    stacked.save(tmp_path)
    loaded = load_ranker("stacked", tmp_path, earlier, EMBEDDINGS)
    assert loaded.serves == "als"
    for request in queries.queries[:20]:
        expected = stacked.base_models["als"].score(request)
        np.testing.assert_array_equal(loaded.score(request).scores, expected.scores)
    with pytest.raises(ValueError, match="serves must be one of the bases"):
        create_ranker("stacked", bases=("als",), serves="ease")
