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


def test_a_token_fallback_over_few_postings_or_tokens_is_cheap_and_a_large_one_is_not(
    index, monkeypatch
):
    from retrieval_service import keyword_index

    assert index.cheap("red") and index.cheap("red circle")
    monkeypatch.setattr(keyword_index, "INLINE_POSTINGS", 0)
    # Two known tokens (and any unknown words) are read a cell at a time: cheap however common.
    assert index.cheap("red") and index.cheap("red circle") and index.cheap("red circle zzz")
    assert not index.cheap("red circle night")
    monkeypatch.setattr(keyword_index, "INLINE_TOKENS", 0)
    assert index.cheap("red") and not index.cheap("red circle")


def test_the_token_fallback_sums_each_photos_best_confidence_per_token(index):
    first = index.retrieve("red circle zzz", 10)
    again = index.retrieve("red circle zzz", 10)  # from the per-token cache
    assert first.photo_idx.tolist() == again.photo_idx.tolist() == [0, 2, 4, 3, 1]
    assert first.scores.tolist() == again.scores.tolist()
    # Photo 4's best "red" keyword is "red car" (0.99); photo 0 has red 0.9 and circle 0.8.
    expected = [(0.9 + 0.8) / 3, (0.7 + 0.6) / 3, 0.99 / 3, 0.95 / 3, 0.5 / 3]
    assert np.allclose(first.scores, expected)


def _sorted_like_the_table(table: pd.DataFrame) -> pd.DataFrame:
    """The rows as a stable sort of the table orders them: keyword, confidence down, photo."""
    return table.sort_values(
        ["keyword", "confidence", "photo_idx"], ascending=[True, False, True], kind="stable"
    )


@pytest.mark.parametrize("block, chunk", [(131_072, 65_536), (700, 256), (1, 1)])
def test_the_built_index_orders_postings_as_sorting_the_table_does(monkeypatch, block, chunk):
    from retrieval_service import keyword_postings

    # Small blocks and chunks: keywords sorted alone and together, chunks split mid-keyword.
    monkeypatch.setattr(keyword_postings, "BLOCK", block)
    monkeypatch.setattr(keyword_postings, "CHUNK", chunk)
    rng = np.random.default_rng(0)
    rows = 20_000 if block > 1 else 2_000
    table = pd.DataFrame(
        {
            # Not in photo order, as a catalogue read from shards in any order may be.
            "photo_idx": rng.integers(0, 200_000, rows).astype(np.int32),
            "keyword": rng.choice(["sea", "red car", "night", "b", "a", "zz top"], rows),
            # Coarse, negative and zero confidences: ties and the sign bit.
            "confidence": (rng.integers(-4, 9, rows) / 8).astype(np.float32),
        }
    ).drop_duplicates(["photo_idx", "keyword"])
    table.loc[table.index[:5], "confidence"] = np.float32(-0.0)
    index = KeywordIndex.from_keywords(table)
    expected = _sorted_like_the_table(table)
    assert index.vocabulary.tolist() == sorted(set(table["keyword"]))
    assert index.photo_idx.tolist() == expected["photo_idx"].tolist()
    # -0.0 ties with 0.0 (and is kept as 0.0).
    assert index.conf.tolist() == expected["confidence"].tolist()
    assert index.offsets[-1] == len(table)
    for row, keyword in enumerate(index.vocabulary):
        lo, hi = index.offsets[row], index.offsets[row + 1]
        assert set(index.photo_idx[lo:hi]) == set(table.photo_idx[table.keyword == keyword])


def test_photo_numbers_of_every_width_and_a_vocabulary_past_16_bits():
    from retrieval_service.keyword_postings import posting_lists

    # Photo numbers of 32 bits leave no bit for a keyword's number within a block.
    wide = np.array([2**32 - 1, 3, 70_000, 2**32 - 1]), np.array([0.5, 0.5, 0.5, 0.7], np.float32)
    offsets, photos, conf = posting_lists(np.array([1, 0, 0, 1]), wide[1], wide[0], 2)
    assert offsets.tolist() == [0, 2, 4]
    assert photos.tolist() == [3, 70_000, 2**32 - 1, 2**32 - 1]
    assert conf.tolist() == np.array([0.5, 0.5, 0.7, 0.5], np.float32).tolist()
    with pytest.raises(ValueError, match="photo_idx"):
        posting_lists(np.array([0]), np.array([0.5], np.float32), np.array([2**32]), 1)
    # More keywords than a 16-bit number holds.
    rng = np.random.default_rng(1)
    table = pd.DataFrame(
        {
            "photo_idx": rng.integers(0, 1_000, 100_000),
            "keyword": [f"k{i:06d}" for i in rng.permutation(100_000)],
            "confidence": rng.random(100_000).astype(np.float32),
        }
    )
    index = KeywordIndex.from_keywords(table)
    expected = _sorted_like_the_table(table)
    assert len(index.vocabulary) > 2**16
    assert index.photo_idx.tolist() == expected["photo_idx"].tolist()
    assert index.conf.tolist() == expected["confidence"].tolist()


@pytest.mark.parametrize("dtype", ["str", "object", "category", "string[python]"])
def test_the_keyword_column_may_be_of_any_string_type(dtype):
    table = pd.DataFrame(
        {
            "photo_idx": np.array([2, 0, 1], np.int64),
            "keyword": pd.Series(["sea", "night", "sea"], dtype=dtype),
            "confidence": [0.5, 0.25, 0.75],
        }
    )
    index = KeywordIndex.from_keywords(table)
    assert index.vocabulary.tolist() == ["night", "sea"]
    assert index.photo_idx.tolist() == [0, 1, 2]
    assert index.offsets.tolist() == [0, 1, 3]
    empty = KeywordIndex.from_keywords(table.iloc[:0])
    assert len(empty.vocabulary) == 0 and empty.offsets.tolist() == [0]
    assert empty.retrieve("sea", 10).photo_idx.tolist() == []


def test_a_missing_keyword_names_its_row():
    from retrieval_service.keyword_postings import keyword_codes

    with pytest.raises(ValueError, match="row 1"):
        keyword_codes(pd.Series(["sea", None, "night"], dtype="str"))


def test_a_shard_answers_a_multi_word_query_whose_token_has_no_photo_there(index):
    # Photo 1 holds the only "night": the shard without it keeps the keyword, with no photos.
    shard = index.shard(np.array([True, False, True, True, True]))
    result = shard.retrieve("red night", 10)
    assert "token match" in result.note
    assert result.photo_idx.tolist() == [4, 0, 2]  # "red car" 0.99, then "red" 0.9, 0.7
    assert shard.retrieve("night", 10).photo_idx.tolist() == []


def test_loading_builds_the_common_tokens_and_leaves_the_rare_ones_lazy(tmp_path):
    photos = np.arange(25_000)
    table = pd.DataFrame(
        {
            "photo_idx": np.r_[photos, photos[:10]],
            "keyword": ["red car"] * 25_000 + ["blue"] * 10,
            "confidence": np.r_[(photos % 100) / 100, np.full(10, 0.5)].astype(np.float32),
        }
    )
    KeywordIndex.from_keywords(table).save(tmp_path / "keywords.npz")
    lazy = KeywordIndex.load(tmp_path / "keywords.npz", warm=False)
    assert lazy._token_best == {}
    warm = KeywordIndex.load(tmp_path / "keywords.npz")
    # "red" and "car" hold 25,000 postings each, over the 20,000 a cheap fallback reads.
    assert sorted(warm._token_best) == ["car", "red"]
    assert warm.token_photos("red").levels() is not None
    assert "_levels" in warm.token_photos("red").__dict__
    for query in ("red blue", "car blue zzz", "blue"):
        assert (
            warm.retrieve(query, 50).photo_idx.tolist()
            == lazy.retrieve(query, 50).photo_idx.tolist()
        )
