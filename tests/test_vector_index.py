"""FAISS vector index: factory strings, recall of ANN against exact search, save and load."""

from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from retrieval_service.vector_index import (  # noqa: E402
    VectorIndex,
    default_factory,
    exact_index,
    recall_at_k,
    time_search,
)


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    """L2-normalised vectors scattered around random centres (like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(6000, 32, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(200, 32, seed=1)


def test_default_factory_is_exact_for_small_catalogues_and_an_inverted_file_above():
    assert default_factory(5_000) == "Flat"
    assert default_factory(49_999) == "Flat"
    assert default_factory(50_000) == "IVF1024,SQfp16"
    assert default_factory(100_000) == "IVF1024,SQfp16"
    assert default_factory(1_000_000) == "IVF4096,SQfp16"


def test_ivf_lists_grow_with_the_square_root_and_never_outnumber_their_training_vectors():
    from retrieval_service.vector_index import ivf_lists

    assert [ivf_lists(n) for n in (25_000, 100_000, 1_000_000)] == [512, 1024, 4096]
    assert ivf_lists(1_000) == 1000 // 39 and ivf_lists(10) == 1


def test_a_shard_of_a_default_inverted_file_gets_fewer_lists_other_factories_are_kept():
    from retrieval_service.vector_index import shard_factory

    assert shard_factory("IVF4096,SQfp16", 250_000) == "IVF2048,SQfp16"
    assert shard_factory("IVF1024,SQfp16", 25_000) == "IVF512,SQfp16"
    # Sets built before half-precision lists keep float32 lists in their shards.
    assert shard_factory("IVF4096,Flat", 250_000) == "IVF2048,Flat"
    assert shard_factory("IVF1024,Flat", 25_000) == "IVF512,Flat"
    assert shard_factory("IVF64,Flat", 25_000) == "IVF64,Flat"  # already fewer
    assert shard_factory("HNSW32", 25_000) == "HNSW32"
    assert shard_factory("IVF256,PQ16", 1_000) == "IVF256,PQ16"


def test_an_ivf_index_trains_on_forty_vectors_a_list_when_it_has_them():
    """The training sample is at least 100,000 rows or 40 per list; at this size every row."""
    index = VectorIndex.build(clustered(3000, 8, seed=3), factory="IVF64,Flat", nprobe=64)
    assert index.index.is_trained and index.ntotal == 3000
    assert recall_at_k(index, exact_index(clustered(3000, 8, seed=3)), clustered(50, 8, 4)) == 1.0


def test_flat_is_exact_inner_product(vectors, queries):
    photo_idx = np.arange(len(vectors), dtype=np.int64) * 3 + 7
    index = VectorIndex.build(vectors, photo_idx, factory="Flat")
    scores, found = index.search(queries[:5], 10)
    brute = queries[:5] @ vectors.T
    expected = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(found, photo_idx[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), atol=1e-5)
    assert recall_at_k(index, exact_index(vectors), queries, k=10) == 1.0


@pytest.mark.parametrize(
    "factory, params",
    [
        ("HNSW32", {"efSearch": 128}),
        ("IVF64,Flat", {"nprobe": 16}),
        ("IVF64,SQfp16", {"nprobe": 16}),
    ],
)
def test_ann_recall_against_exact(vectors, queries, factory, params):
    index = VectorIndex.build(vectors, factory=factory, ef_search=128, nprobe=16)
    assert index.params == params
    assert index.index.metric_type == faiss.METRIC_INNER_PRODUCT
    recall = recall_at_k(index, exact_index(vectors), queries, k=10)
    assert recall >= 0.9, f"{factory} recall@10 {recall:.3f}"


def test_half_precision_lists_hold_the_vectors_in_half_the_bytes(tmp_path, vectors, queries):
    """The default inverted file's lists (IVF_STORAGE): the same photos found as float32 lists
    (nprobe 8), each score within 2**-10 of the float32 one, in half the file."""
    from retrieval_service.vector_index import IVF_STORAGE

    built = {
        storage: VectorIndex.build(vectors, factory=f"IVF64,{storage}", nprobe=8)
        for storage in ("Flat", IVF_STORAGE)
    }
    for storage, index in built.items():
        index.save(tmp_path / storage / "vector.faiss")
    sizes = {s: (tmp_path / s / "vector.faiss").stat().st_size for s in built}
    assert sizes[IVF_STORAGE] < 0.6 * sizes["Flat"]
    (flat_scores, flat_found), (half_scores, half_found) = (
        built[s].search(queries, 10) for s in ("Flat", IVF_STORAGE)
    )
    assert np.abs(half_scores - flat_scores).max() <= 2**-10
    assert np.mean(half_found == flat_found) >= 0.99


def test_search_parameters_change_recall(vectors, queries):
    index = VectorIndex.build(vectors, factory="IVF64,Flat", nprobe=1)
    low = recall_at_k(index, exact_index(vectors), queries)
    index.set_params(nprobe=64)
    assert recall_at_k(index, exact_index(vectors), queries) == pytest.approx(1.0)
    assert low < 1.0


def test_save_and_load_round_trip(tmp_path, vectors, queries):
    photo_idx = np.arange(len(vectors), dtype=np.int64)[::-1].copy()
    index = VectorIndex.build(vectors, photo_idx, factory="HNSW32", ef_search=64)
    sidecar = index.save(tmp_path / "vector.faiss")
    assert sidecar.name == "vector.json"
    loaded = VectorIndex.load(tmp_path / "vector.faiss")
    assert loaded.factory == "HNSW32" and loaded.params == {"efSearch": 64}
    assert loaded.ntotal == len(vectors) and loaded.dim == 32
    for a, b in zip(index.search(queries[:20], 10), loaded.search(queries[:20], 10)):
        np.testing.assert_array_equal(a, b)


def test_row_map_kept_elsewhere(tmp_path, vectors):
    photo_idx = np.arange(len(vectors), dtype=np.int64) + 100
    VectorIndex.build(vectors, photo_idx).save(tmp_path / "v.faiss", row_map="emb.npz:photo_idx")
    assert not (tmp_path / "v.rows.npy").exists()
    with pytest.raises(ValueError, match="no row map"):
        VectorIndex.load(tmp_path / "v.faiss")
    with pytest.raises(ValueError, match="row map has"):
        VectorIndex.load(tmp_path / "v.faiss", row_to_photo_idx=photo_idx[:10])
    loaded = VectorIndex.load(tmp_path / "v.faiss", row_to_photo_idx=photo_idx)
    _, found = loaded.search(vectors[:1], 1)
    assert found[0, 0] == 100


def test_search_more_than_the_index_holds():
    vectors = clustered(5, 8, seed=3)
    index = VectorIndex.build(vectors, np.array([5, 6, 7, 8, 9]))
    scores, found = index.search(vectors[0], 50)
    assert found.shape == (1, 5) and sorted(found[0].tolist()) == [5, 6, 7, 8, 9]
    assert found[0, 0] == 5 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    empty_scores, empty_found = index.search(vectors[0], 0)
    assert empty_found.shape == (1, 0)


def test_time_search_reports_percentiles(vectors, queries):
    figures = time_search(exact_index(vectors), queries[:20], k=10)
    assert figures["queries"] == 20
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]


def test_index_stats_command(tmp_path, vectors, capsys):
    from imgsearch_tools.cli import main

    np.savez(tmp_path / "e.npz", photo_idx=np.arange(1000), embeddings=vectors[:1000])
    status = main(["index-stats", "--embeddings", str(tmp_path / "e.npz"), "--factory",
                   "HNSW32", "--queries", "20", "--json"])  # fmt: skip
    assert status == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["factory"] == "HNSW32" and figures["ntotal"] == 1000
    assert figures["recall@10"] >= 0.9 and figures["index"]["queries"] == 20
