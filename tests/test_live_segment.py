"""The live segment on its own: its keyword postings merged with a set's score every photo as
one index over all of them would."""

from __future__ import annotations

import numpy as np
import pandas as pd


def test_the_live_keyword_segment_scores_as_one_index_over_all_photos():
    from imgsearch.catalog_log import DELETE, UPSERT, PhotoChange
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.live_catalogue import (
        LiveCatalogue,
        LiveKeywordRetriever,
        LiveView,
        keyword_rows,
    )

    rng = np.random.default_rng(0)
    vocabulary = ["red car", "blue car", "red sky", "tree", "sea"]
    base_rows = [
        (i, k, float(rng.integers(0, 100)) / 100)
        for i in range(40)
        for k in rng.choice(vocabulary, 2, replace=False)
    ]
    base = KeywordIndex.from_keywords(
        pd.DataFrame(base_rows, columns=["photo_idx", "keyword", "confidence"]).astype(
            {"confidence": np.float32}
        )
    )
    ids = np.array([f"p{i}" for i in range(40)], dtype=object)
    catalogue = LiveCatalogue(ids)
    changes, seq = [], 0
    for i in range(40, 50):
        seq += 1
        keywords = [[k, float(rng.integers(0, 100))] for k in rng.choice(vocabulary + ["car"], 2)]
        changes.append(PhotoChange(f"p{i}", UPSERT, {"keywords": keywords}, seq=seq))
    seq += 1
    changes.append(PhotoChange("p3", DELETE, {"reason": "test"}, seq=seq))
    seq += 1
    changes.append(PhotoChange("p5", UPSERT, {"keywords": [["red car", 100.0]]}, seq=seq))
    catalogue.apply(changes)
    live = LiveKeywordRetriever(base, LiveView(catalogue))

    # One index over every live photo, as a rebuild would make it.
    rows = [r for r in base_rows if r[0] not in (3, 5)]
    for photo_idx, change in catalogue.current.items():
        rows += [(photo_idx, k, c) for k, c in keyword_rows(change.record)]
    whole = KeywordIndex.from_keywords(
        pd.DataFrame(rows, columns=["photo_idx", "keyword", "confidence"]).astype(
            {"confidence": np.float32}
        )
    )
    for query in ["red car", "car", "red", "sky tree", "car sea", "nothing"]:
        expected, got = whole.retrieve(query, 15), live.retrieve(query, 15)
        assert got.photo_idx.tolist() == expected.photo_idx.tolist(), query
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6)


def test_filters_test_live_photos_by_their_records():
    from google.protobuf.timestamp_pb2 import Timestamp

    from imgsearch.catalog_log import DELETE, UPSERT, PhotoChange
    from imgsearch.filters import PhotoAttributes
    from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.live_catalogue import LiveCatalogue, LiveKeywordRetriever, LiveView

    # Four set photos: landscape, by "ann" and "bob", p0 and p2 red; submitted in 2020.
    photos = pd.DataFrame(
        {
            "photo_id": ["p0", "p1", "p2", "p3"],
            "photo_width": [400, 400, 300, 400],
            "photo_height": [300, 300, 400, 300],
            "photographer_username": ["ann", "bob", "ann", "bob"],
            "stats_views": [10, 20, 30, 40],
            "stats_downloads": [1, 2, 3, 4],
            "photo_submitted_at": ["2020-01-01"] * 4,
        }
    )
    colors = pd.DataFrame({"photo_idx": [0, 2], "color": ["red", "red"]})
    base = PhotoAttributes.from_tables(photos, colors)
    index = KeywordIndex.from_keywords(
        pd.DataFrame(
            {"photo_idx": [0, 1, 2, 3], "keyword": ["cat"] * 4, "confidence": [0.9] * 4}
        ).astype({"confidence": np.float32})
    )
    catalogue = LiveCatalogue(np.array(photos["photo_id"], dtype=object), attributes=base)
    logged_2026 = 1_780_000_000 * 1_000_000

    def upsert(photo_id, seq, photographer, width, height, views):
        record = {
            "keywords": [["cat", 50.0]],
            "photographer": photographer,
            "width": width,
            "height": height,
            "views": views,
            "downloads": 0,
        }
        return PhotoChange(photo_id, UPSERT, record, seq=seq, logged_at_us=logged_2026)

    changes = [
        upsert("new-1", 1, "cleo", 300, 500, 500),  # portrait, a new photographer
        upsert("new-2", 2, "ann", 800, 600, 5),
        upsert("p0", 3, "bob", 500, 500, 100),  # a set photo replaced: square, by bob
        PhotoChange("p3", DELETE, {"reason": "test"}, seq=4),
    ]
    catalogue.apply(changes)
    # Every shard knows every live photographer, whichever shard holds the photo.
    for shard in range(2):
        sharded = LiveCatalogue(
            np.array(photos["photo_id"], dtype=object), shard=shard, shard_count=2, attributes=base
        )
        sharded.apply(changes)
        cleo = retr_pb.PhotoFilter(photographer_usernames=["cleo"])
        assert sharded.segment.attributes.mask(cleo).nonzero()[0].tolist() == [4]
    segment = catalogue.segment
    retriever = LiveKeywordRetriever(index, LiveView(catalogue))

    def found(**conditions) -> list[str]:
        photo_filter = retr_pb.PhotoFilter(**conditions)
        allowed = segment.attributes.mask(photo_filter)
        result = retriever.retrieve("cat", 10, allowed=allowed)
        return sorted(segment.photo_ids[result.photo_idx].tolist())

    assert found() == ["new-1", "new-2", "p0", "p1", "p2"]
    assert found(photographer_usernames=["cleo"]) == ["new-1"]
    assert found(photographer_usernames=["bob"]) == ["p0", "p1"]
    assert found(orientation=retr_pb.ORIENTATION_PORTRAIT) == ["new-1", "p2"]
    assert found(orientation=retr_pb.ORIENTATION_SQUARE) == ["p0"]
    assert found(min_views=100) == ["new-1", "p0"]
    # The replaced photo's colours went with its former image; live photos have none.
    assert found(colors=["red"]) == ["p2"]
    after_2025 = Timestamp(seconds=1_735_689_600)
    assert found(submitted_after=after_2025) == ["new-1", "new-2"]


def test_changes_applied_batch_by_batch_search_as_one_batch():
    """Applied in many small batches (many runs, merged as they come, with photos written
    again and taken down between them), the log gives the segment one batch would: the same
    keyword lists, CLIP lists and scores."""
    from imgsearch.catalog_log import DELETE, UPSERT, PhotoChange
    from retrieval_service import live_runs
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.live_catalogue import (
        LiveCatalogue,
        LiveClipRetriever,
        LiveKeywordRetriever,
        LiveView,
    )

    class SetClip:
        """The set's CLIP side: an exact index over the set's photos."""

        def __init__(self, vectors):
            import faiss

            self.index = faiss.IndexFlatIP(vectors.shape[1])
            self.index.add(vectors)

        def retrieve(self, query, candidates_k, allowed=None, query_embedding=None):
            from retrieval_service.retrievers import RetrievalResult

            scores, rows = self.index.search(query_embedding[None], self.index.ntotal)
            keep = allowed[rows[0]] if allowed is not None else np.ones(len(rows[0]), bool)
            idx, sc = rows[0][keep][:candidates_k], scores[0][keep][:candidates_k]
            return RetrievalResult(idx, sc, {"clip": sc})

    rng = np.random.default_rng(1)
    vocabulary = ["red car", "blue car", "red sky", "tree", "sea", "cat"]
    n_set, dim = 30, 8

    def unit(n):
        v = rng.normal(size=(n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    base_rows = [(i, k, 0.5) for i in range(n_set) for k in rng.choice(vocabulary, 2, False)]
    base = KeywordIndex.from_keywords(
        pd.DataFrame(base_rows, columns=["photo_idx", "keyword", "confidence"]).astype(
            {"confidence": np.float32}
        )
    )
    set_clip = SetClip(unit(n_set))
    ids = np.array([f"p{i}" for i in range(n_set)], dtype=object)
    changes = []
    for seq in range(1, 301):
        photo = f"p{rng.integers(0, n_set + 60)}"
        if rng.random() < 0.2:
            changes.append(PhotoChange(photo, DELETE, {"reason": "test"}, seq=seq))
            continue
        keywords = [[k, float(rng.integers(1, 100))] for k in rng.choice(vocabulary, 2, False)]
        embedding = unit(1)[0] if rng.random() < 0.8 else None
        changes.append(PhotoChange(photo, UPSERT, {"keywords": keywords}, embedding, seq=seq))
    whole = LiveCatalogue(ids)
    whole.apply(changes)
    small = LiveCatalogue(ids)
    live_runs_before = live_runs.MAX_MERGED_PHOTOS
    live_runs.MAX_MERGED_PHOTOS = 16  # merges stop early: many runs stay
    try:
        start = 0
        while start < len(changes):
            size = int(rng.integers(1, 9))
            small.apply(changes[start : start + size])
            start += size
    finally:
        live_runs.MAX_MERGED_PHOTOS = live_runs_before
    assert len(small.segment.runs) > 2
    queries = [*vocabulary, "car", "red", "sky tree", "nothing"]
    keyword_a = LiveKeywordRetriever(base, LiveView(whole))
    keyword_b = LiveKeywordRetriever(base, LiveView(small))
    clip_a = LiveClipRetriever(set_clip, LiveView(whole))
    clip_b = LiveClipRetriever(set_clip, LiveView(small))
    for query in queries:
        a, b = keyword_a.retrieve(query, 20), keyword_b.retrieve(query, 20)
        assert b.photo_idx.tolist() == a.photo_idx.tolist(), query
        np.testing.assert_array_equal(b.scores, a.scores)
        embedding = unit(1)[0]
        a = clip_a.retrieve(query, 25, query_embedding=embedding)
        b = clip_b.retrieve(query, 25, query_embedding=embedding)
        assert b.photo_idx.tolist() == a.photo_idx.tolist(), query
        np.testing.assert_array_equal(b.scores, a.scores)
    assert small.segment.live == whole.segment.live
