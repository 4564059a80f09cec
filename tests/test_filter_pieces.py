"""Photo filters' pieces: orientation, filtered vector search, the reader's columns, colours."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb


def test_orientation_comes_from_width_and_height():
    from imgsearch.filters import orientation_of

    got = orientation_of([4000, 3000, 3000, 3010, 0, 5000], [3000, 4000, 3000, 3000, 100, 0])
    assert got.tolist() == [
        retr_pb.ORIENTATION_LANDSCAPE,
        retr_pb.ORIENTATION_PORTRAIT,
        retr_pb.ORIENTATION_SQUARE,
        retr_pb.ORIENTATION_SQUARE,  # within 1%
        0,  # size unknown: no orientation matches
        0,
    ]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,Flat"])
def test_filtered_vector_search_returns_min_k_allowed_photos(factory):
    from retrieval_service.filtered_search import search_allowed
    from retrieval_service.vector_index import VectorIndex

    rng = np.random.default_rng(0)
    n, dim, k = 20_000, 32, 100
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    photo_idx = rng.permutation(n).astype(np.int64)  # rows are not photo order
    # A graph built with FAISS's default effort: quicker, and a harder case for the filter.
    index = VectorIndex.build(vectors, photo_idx, factory=factory, ef_search=64, ef_construction=40)
    queries = rng.normal(size=(20, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for share in (0.5, 0.1, 0.01, 0.001, 0.0001):
        allowed = rng.random(n) < share
        hits = 0
        for query in queries:
            scores, found, how = search_allowed(index, query, k, allowed)
            assert len(found) == min(k, int(allowed.sum())), (factory, share, how)
            assert allowed[found].all()
            assert np.all(np.diff(scores) <= 1e-6)
            # The exact answer: every allowed photo scored.
            by_photo = np.empty((n, dim), np.float32)
            by_photo[photo_idx] = vectors
            exact = np.flatnonzero(allowed)[np.argsort(-(by_photo[allowed] @ query))][:10]
            hits += len(set(found[:10].tolist()) & set(exact.tolist()))
        recall = hits / (len(queries) * min(10, int(allowed.sum())))
        assert recall >= (1.0 if factory == "Flat" else 0.9), (share, recall)


@pytest.mark.parametrize("ef_search", [64, 8192])
def test_a_filtered_graph_search_never_searches_less_than_the_index(ef_search):
    """Raised as the allowed share drops, capped at MAX_EF_SEARCH, never below the index's
    own efSearch (a million-photo calibration may pick more than the cap)."""
    from retrieval_service.filtered_search import EXACT_ROWS, MAX_EF_SEARCH, search_allowed
    from retrieval_service.vector_index import VectorIndex

    rng = np.random.default_rng(1)
    n = 4 * EXACT_ROWS
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex.build(vectors, factory="HNSW16", ef_search=ef_search, ef_construction=16)
    allowed = rng.random(n) < 0.6  # too many for the exact path: the graph answers
    _, found, how = search_allowed(index, vectors[0], 10, allowed)
    assert how.path.startswith("graph") and allowed[found].all()
    expected = min(max(MAX_EF_SEARCH, ef_search), max(ef_search, int(np.ceil(ef_search / 0.6))))
    assert how.ef_search >= ef_search
    assert abs(how.ef_search - expected) <= 0.05 * expected  # the share drawn is about 0.6


@pytest.mark.parametrize("storage", ["Flat", "SQfp16"])
@pytest.mark.parametrize("nprobe", [2, 64])
def test_a_filtered_ivf_search_raises_nprobe_and_scans_every_list_when_few_are_allowed(
    nprobe, storage
):
    """An inverted file: nprobe raised by the allowed share (never below the index's own, at
    most every list); few allowed rows, or too few found, scan every list: the exact answer
    (float32 lists), or the photos of it that half-precision rounding cannot reorder, each
    scored within that rounding (SQfp16 lists, the default)."""
    from retrieval_service.filtered_search import EXACT_ROWS, search_allowed
    from retrieval_service.vector_index import VectorIndex

    rng = np.random.default_rng(2)
    n, dim = 4 * EXACT_ROWS, 16
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    photo_idx = rng.permutation(n).astype(np.int64)
    index = VectorIndex.build(vectors, photo_idx, factory=f"IVF128,{storage}", nprobe=nprobe)
    by_photo = np.empty_like(vectors)
    by_photo[photo_idx] = vectors
    query = by_photo[0]

    def exact(allowed, k):
        rows = np.flatnonzero(allowed)
        return rows[np.argsort(-(by_photo[rows] @ query), kind="stable")][:k]

    many = rng.random(n) < 0.6
    scores, found, how = search_allowed(index, query, 10, many)
    assert how.path.startswith("lists") and many[found].all()
    assert how.nprobe == min(128, max(nprobe, int(np.ceil(nprobe / (many.sum() / n)))))
    assert len(found) == 10
    few = np.zeros(n, bool)
    few[rng.choice(n, 300, replace=False)] = True
    scores, found, how = search_allowed(index, query, 50, few)
    assert (how.path, how.nprobe) == ("exact, every list", 128)
    if storage == "Flat":
        assert found.tolist() == exact(few, 50).tolist()
        np.testing.assert_allclose(scores, by_photo[found] @ query, rtol=1e-5)
    else:
        # Within 2**-10 of the exact cosine (vector_index.IVF_STORAGE); every photo of the
        # exact top 50 that beats the 51st by more than twice that is found.
        assert np.abs(scores - by_photo[found] @ query).max() <= 2**-10
        ranked = exact(few, 51)
        exact_scores = by_photo[ranked] @ query
        clear = ranked[:50][exact_scores[:50] > exact_scores[50] + 2 * 2**-10]
        assert len(clear) >= 40 and set(clear.tolist()) <= set(found.tolist())


def test_an_allowed_set_of_none_finds_nothing():
    from retrieval_service.filtered_search import search_allowed
    from retrieval_service.vector_index import VectorIndex

    index = VectorIndex.build(np.eye(4, dtype=np.float32))
    scores, found, _ = search_allowed(index, np.eye(4)[0], 3, np.zeros(4, bool))
    assert len(scores) == len(found) == 0


def test_the_reader_keeps_the_filter_columns_and_the_colors_table(demo_data):
    from imgsearch.unsplash import read_unsplash

    catalogue, report = read_unsplash(demo_data, show_progress=False)
    raw = pd.read_csv(next(demo_data.glob("photos.tsv*")), sep="\t", dtype=str)
    raw = raw.sort_values("photo_id").reset_index(drop=True)
    photos = catalogue.photos
    assert photos["photo_width"].tolist() == raw["photo_width"].astype(int).tolist()
    assert photos["photo_height"].tolist() == raw["photo_height"].astype(int).tolist()
    assert photos["photo_featured"].tolist() == (raw["photo_featured"] == "t").tolist()
    submitted = pd.to_datetime(raw["photo_submitted_at"])
    assert photos["photo_submitted_at"].tolist() == submitted.tolist()
    colors = catalogue.colors
    assert colors is not None and report.rows_kept["colors"] == len(colors)
    assert {"red", "navy", "beige"} <= set(colors["color"])
    assert colors.groupby("photo_idx").size().eq(2).all()  # the shape's and the scene's


def test_a_bad_featured_or_submitted_value_is_reported_with_file_and_line(demo_data, tmp_path):
    from imgsearch.data_report import DataError
    from imgsearch.unsplash import read_unsplash

    for column, bad in (("photo_featured", "maybe"), ("photo_submitted_at", "yesterday")):
        data = tmp_path / column
        shutil.copytree(demo_data, data)
        photos_file = next(data.glob("photos.tsv*"))
        table = pd.read_csv(photos_file, sep="\t", dtype=str, keep_default_na=False)
        table.loc[2, column] = bad
        table.to_csv(photos_file, sep="\t", index=False)
        with pytest.raises(DataError, match=rf"{photos_file.name}:4: column '{column}'"):
            read_unsplash(data, show_progress=False)


def test_dominant_colours_are_computed_from_images_without_a_colors_table(tmp_path):
    from imgsearch.unsplash import read_unsplash
    from imgsearch_tools.demo_data import generate
    from imgsearch_tools.dominant_colors import PALETTE, colors_from_images

    generate(tmp_path, n_photos=60, n_users=10, n_conversions=200, seed=5, show_progress=False)
    drawn = pd.read_csv(next(tmp_path.glob("colors.tsv*")), sep="\t")
    for path in tmp_path.glob("colors.tsv*"):
        path.unlink()
    catalogue, _ = read_unsplash(tmp_path, show_progress=False)
    assert catalogue.colors is None
    computed = colors_from_images(catalogue, show_progress=False)
    assert set(computed["color"]) <= set(PALETTE)
    # The drawn scene covers most of each image: its colour is found in nearly every photo.
    scene_colour = {"navy": "navy", "beige": "beige", "dark green": "dark green", "gray": "gray"}
    ids = catalogue.photos["photo_id"].tolist()
    found = computed.groupby("photo_idx")["color"].agg(set)
    main = drawn.groupby("photo_id").nth(1).set_index("photo_id")["keyword"]  # scene's row
    checked = agreed = 0
    for idx, photo_id in enumerate(ids):
        expected = scene_colour.get(main.get(photo_id, ""))
        if expected is not None:
            checked += 1
            agreed += expected in found.get(idx, set())
    assert checked >= 20 and agreed / checked >= 0.8, (agreed, checked)
