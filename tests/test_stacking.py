"""The stacked ranker's training rows: scored once, sampled per out-of-fold fit."""

from __future__ import annotations

import numpy as np

from imgsearch.evaluation_protocol import temporal_split
from ranking_service.rankers.stack_features import StackFeatures
from ranking_service.rankers.stacked import QueryRows, sample_rows, stack_rows
from ranking_service.rankers.validation import ValidationSet
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
