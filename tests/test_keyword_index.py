"""Keyword index: exact matches by confidence, token fallback, save/load."""

import numpy as np
import pandas as pd
import pytest

from retrieval_service.keyword_index import KeywordIndex


@pytest.fixture
def index():
    keywords = pd.DataFrame(
        {
            "photo_idx": np.array([0, 1, 2, 0, 3, 2, 4, 1], dtype=np.int32),
            "keyword": ["red", "red", "red", "circle", "circle", "circle", "red car", "night"],
            "confidence": np.array([0.9, 0.5, 0.7, 0.8, 0.95, 0.6, 0.99, 0.4], dtype=np.float32),
        }
    )
    return KeywordIndex.from_keywords(keywords)


def test_exact_keyword_ranked_by_confidence(index):
    result = index.retrieve("red", 10)
    assert result.photo_idx.tolist() == [0, 2, 1]
    assert np.allclose(result.scores, [0.9, 0.7, 0.5])
    assert result.keyword == "red"
    assert result.note == ""
    assert np.allclose(result.source_scores["keyword"], result.scores)


def test_query_is_normalised_and_truncated_to_candidates_k(index):
    result = index.retrieve("  RED ", 2)
    assert result.photo_idx.tolist() == [0, 2]


def test_multi_word_query_falls_back_to_token_matching(index):
    result = index.retrieve("red circle", 10)
    assert result.keyword == ""
    assert "token match" in result.note
    # Photos tagged with both words come first: 0 (0.9 + 0.8) / 2, 2 (0.7 + 0.6) / 2.
    assert result.photo_idx[:2].tolist() == [0, 2]
    assert result.scores[0] == pytest.approx(0.85)
    # A photo matching one token scores at most half its confidence.
    assert set(result.photo_idx.tolist()) == {0, 1, 2, 3, 4}
    assert np.all(np.diff(result.scores) <= 0)


def test_unknown_tokens_are_reported_and_empty_results_are_not_errors(index):
    assert "unknown: zebra" in index.retrieve("red zebra", 10).note
    empty = index.retrieve("zebra", 10)
    assert len(empty.photo_idx) == 0
    assert "zebra" in empty.note


def test_save_and_load_round_trip(index, tmp_path):
    index.save(tmp_path / "kw.npz")
    loaded = KeywordIndex.load(tmp_path / "kw.npz")
    for query in ("red", "circle", "red circle", "night"):
        a, b = index.retrieve(query, 10), loaded.retrieve(query, 10)
        assert a.photo_idx.tolist() == b.photo_idx.tolist()
        assert np.allclose(a.scores, b.scores)
