"""CLIP and hybrid retrievers on hand-made inputs: fusion order, per-source scores, the cache."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_service.retrievers import RetrievalResult, Retriever
from retrieval_service.semantic import ClipRetriever, HybridRetriever, fuse


class Fixed(Retriever):
    """A retriever that always answers the same list."""

    def __init__(self, name, photo_idx, scores, keyword="", note=""):
        self.name = name
        self.result = RetrievalResult(
            np.asarray(photo_idx, np.int64),
            np.asarray(scores, np.float32),
            {name: np.asarray(scores, np.float32)},
            keyword=keyword,
            note=note,
        )
        self.calls = []

    def retrieve(self, query, candidates_k):
        self.calls.append((query, candidates_k))
        r = self.result
        top = slice(0, candidates_k)
        return RetrievalResult(
            r.photo_idx[top], r.scores[top], {self.name: r.scores[top]}, r.keyword, r.note
        )


@pytest.fixture
def sources():
    keyword = Fixed("keyword", [10, 20, 30], [0.9, 0.8, 0.7], keyword="red", note="")
    clip = Fixed("clip", [30, 40, 10, 50], [0.5, 0.4, 0.3, 0.2])
    return keyword, clip


def test_rrf_order_and_scores(sources):
    keyword, clip = sources
    result = HybridRetriever(keyword, clip, rrf_k=60).retrieve("Red", 10)
    rrf = {
        10: 1 / 61 + 1 / 63,
        30: 1 / 63 + 1 / 61,
        20: 1 / 62,
        40: 1 / 62,
        50: 1 / 64,
    }
    # 10 and 30 tie, 20 and 40 tie: ties go to the smaller photo_idx.
    assert result.photo_idx.tolist() == [10, 30, 20, 40, 50]
    np.testing.assert_allclose(result.scores, [rrf[p] for p in result.photo_idx], rtol=1e-6)
    assert result.keyword == "red"
    assert keyword.calls == [("red", 10)] and clip.calls == [("red", 10)]


def test_per_source_scores_with_nan_for_missing(sources):
    result = HybridRetriever(*sources).retrieve("red", 10)
    kw = dict(zip(result.photo_idx.tolist(), result.source_scores["keyword"].tolist()))
    cl = dict(zip(result.photo_idx.tolist(), result.source_scores["clip"].tolist()))
    assert kw[10] == pytest.approx(0.9) and cl[10] == pytest.approx(0.3)
    assert kw[20] == pytest.approx(0.8) and np.isnan(cl[20])
    assert np.isnan(kw[40]) and cl[40] == pytest.approx(0.4)
    sources_of = [result.sources(i) for i in range(len(result.photo_idx))]
    assert sources_of == ["keyword+clip", "keyword+clip", "keyword", "clip", "clip"]


def test_candidates_k_truncates(sources):
    result = HybridRetriever(*sources).retrieve("red", 2)
    assert result.photo_idx.tolist() == [10, 30]
    assert len(result.source_scores["clip"]) == 2


def test_weighted_fusion(sources):
    keyword, clip = sources
    result = HybridRetriever(keyword, clip, method="weighted", weights=(0.3, 0.7)).retrieve(
        "red", 10
    )
    # Min-max per source: keyword 10:1, 20:.5, 30:0; clip 30:1, 40:2/3, 10:1/3, 50:0.
    expected = {10: 0.3 + 0.7 / 3, 20: 0.15, 30: 0.7, 40: 0.7 * 2 / 3, 50: 0.0}
    assert result.photo_idx.tolist() == [30, 10, 40, 20, 50]
    np.testing.assert_allclose(result.scores, [expected[p] for p in result.photo_idx], atol=1e-6)


def test_one_source_empty_keeps_the_other():
    keyword = Fixed("keyword", [], [], note="no keyword matches any of: zebra")
    clip = Fixed("clip", [4, 2], [0.6, 0.5])
    result = HybridRetriever(keyword, clip).retrieve("zebra", 5)
    assert result.photo_idx.tolist() == [4, 2]
    assert np.isnan(result.source_scores["keyword"]).all()
    assert "no keyword matches" in result.note
    assert result.keyword == ""


def test_empty_query_and_unknown_method(sources):
    assert len(HybridRetriever(*sources).retrieve("   ", 10).photo_idx) == 0
    with pytest.raises(ValueError, match="unknown fusion method"):
        HybridRetriever(*sources, method="max")


def test_fuse_more_than_two_sources():
    lists = [
        RetrievalResult(np.array([1, 2]), np.array([0.9, 0.1], np.float32)),
        RetrievalResult(np.array([2]), np.array([0.5], np.float32)),
        RetrievalResult(np.array([3, 2]), np.array([0.7, 0.6], np.float32)),
    ]
    result = fuse(lists, ("a", "b", "c"), 10)
    assert result.photo_idx[0] == 2  # found by all three


class CountingEncoder:
    """A text encoder that maps each text to a fixed unit vector and counts its calls."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def encode_text(self, texts):
        self.calls += 1
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


@pytest.fixture
def clip_parts():
    faiss = pytest.importorskip("faiss")
    images = np.eye(4, dtype=np.float32)
    images[3] = np.array([0.6, 0.8, 0, 0], np.float32)
    index = faiss.IndexFlatIP(4)
    index.add(images)
    table = {
        "red": np.array([1, 0, 0, 0], np.float32),
        "blue": np.array([0, 1, 0, 0], np.float32),
        "green": np.array([0, 0, 1, 0], np.float32),
    }
    return CountingEncoder(table), index, np.array([100, 101, 102, 103])


def test_clip_retriever_scores_are_cosines(clip_parts):
    encoder, index, rows = clip_parts
    retriever = ClipRetriever(encoder, index, rows)
    assert retriever.name == "clip"
    result = retriever.retrieve("  RED ", 3)
    assert result.photo_idx.tolist()[:2] == [100, 103]  # then 101 and 102 tie at 0
    np.testing.assert_allclose(result.scores, [1.0, 0.6, 0.0], atol=1e-6)
    np.testing.assert_allclose(result.source_scores["clip"], result.scores)
    assert len(retriever.retrieve("red", 50).photo_idx) == 4


def test_clip_query_cache_is_lru(clip_parts):
    encoder, index, rows = clip_parts
    retriever = ClipRetriever(encoder, index, rows, cache_size=2)
    retriever.retrieve("red", 2)
    retriever.retrieve("Red", 2)  # normalised to the same key
    assert encoder.calls == 1 and retriever.cache_hits == 1
    retriever.retrieve("blue", 2)
    retriever.retrieve("red", 2)  # refreshes red
    retriever.retrieve("green", 2)  # evicts blue, the least recently used
    assert encoder.calls == 3
    retriever.retrieve("red", 2)
    assert encoder.calls == 3
    retriever.retrieve("blue", 2)
    assert encoder.calls == 4


def test_clip_retriever_needs_a_row_map_for_a_bare_index(clip_parts):
    encoder, index, _ = clip_parts
    with pytest.raises(ValueError, match="row_to_photo_idx"):
        ClipRetriever(encoder, index)
    assert len(ClipRetriever(encoder, index, np.arange(4)).retrieve("", 5).photo_idx) == 0


def test_known_queries_skip_the_encoder_and_round_trip(clip_parts, tmp_path):
    from retrieval_service.semantic import KnownQueries

    encoder, index, rows = clip_parts
    table = KnownQueries(["red", "blue"], np.stack([encoder.table["red"], encoder.table["blue"]]))
    table.save(tmp_path / "known.npz")
    loaded = KnownQueries.load(tmp_path / "known.npz")  # allow_pickle=False
    assert loaded.keywords == ["red", "blue"] and len(loaded) == 2
    retriever = ClipRetriever(encoder, index, rows, known_queries=loaded)
    assert retriever.retrieve(" Red ", 2).photo_idx.tolist() == [100, 103]
    assert encoder.calls == 0 and retriever.known_hits == 1
    retriever.retrieve("green", 2)  # not a known keyword: encoded, then cached
    retriever.retrieve("green", 2)
    assert encoder.calls == 1 and retriever.cache_hits == 1
    with pytest.raises(ValueError, match="2 keywords but 1 embeddings"):
        KnownQueries(["a", "b"], np.zeros((1, 4)))


def test_concurrent_misses_are_encoded_in_one_batch(clip_parts):
    import asyncio

    encoder, index, rows = clip_parts
    retriever = ClipRetriever(encoder, index, rows, max_batch=8, max_wait_ms=20)

    async def three_at_once():
        return await asyncio.gather(
            *(retriever.embed_query_async(q) for q in ("red", "blue", "green"))
        )

    embeddings = asyncio.run(three_at_once())
    assert encoder.calls == 1 and retriever.batcher.largest_batch == 3
    np.testing.assert_array_equal(embeddings[1], encoder.table["blue"])
    result = retriever.retrieve("blue", 2)  # from the LRU now
    assert encoder.calls == 1 and result.photo_idx.tolist() == [101, 103]
    retriever.batcher.close()


def test_a_cheap_encoder_idle_leaves_the_miss_to_the_search_job_with_the_same_answer(
    clip_parts,
):
    import asyncio

    encoder, index, rows = clip_parts
    retriever = ClipRetriever(encoder, index, rows, max_wait_ms=20)
    batched = asyncio.run(retriever.embed_query_async("red", inline=True))
    assert batched is not None and retriever.batcher.batches == 1  # its cost not known yet
    # Now known to be cheap, with no batch forming: the caller's job encodes "blue".
    assert asyncio.run(retriever.embed_query_async("blue", inline=True)) is None
    assert retriever.batcher.inlined == 1 and encoder.calls == 1
    inline = retriever.retrieve("blue", 2)  # encodes it, as the server's search job does
    assert encoder.calls == 2 and retriever.batcher.batches == 1
    np.testing.assert_array_equal(retriever.embed_query("blue"), encoder.table["blue"])
    assert inline.photo_idx.tolist() == [101, 103]
    # Without inline (the server asked for the embedding back) a miss is still batched.
    assert asyncio.run(retriever.embed_query_async("green")) is not None
    assert retriever.batcher.batches == 2
    retriever.batcher.close()


def test_weighted_rrf_leans_toward_the_heavier_source(sources):
    keyword, clip = sources
    equal = HybridRetriever(keyword, clip, weights=(0.5, 0.5)).retrieve("red", 10)
    leaning = HybridRetriever(keyword, clip, weights=(0.25, 0.75)).retrieve("red", 10)
    # Equal weights are the paper's RRF, whatever their sum.
    np.testing.assert_allclose(
        equal.scores, HybridRetriever(keyword, clip, weights=(2, 2)).retrieve("red", 10).scores
    )
    # Relative to the mean weight: keyword counts 0.5, CLIP 1.5.
    expected = {
        10: 0.5 / 61 + 1.5 / 63,
        30: 0.5 / 63 + 1.5 / 61,
        20: 0.5 / 62,
        40: 1.5 / 62,
        50: 1.5 / 64,
    }
    assert leaning.photo_idx.tolist() == [30, 10, 40, 50, 20]
    np.testing.assert_allclose(leaning.scores, [expected[p] for p in leaning.photo_idx], rtol=1e-6)
