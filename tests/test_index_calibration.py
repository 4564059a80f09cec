"""Search effort calibrated at build: the smallest efSearch / nprobe reaching a target recall."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from retrieval_service.index_calibration import (  # noqa: E402
    EF_SEARCH_STEPS,
    NPROBE_STEPS,
    calibrate,
    nprobe_steps,
    split_families,
)
from retrieval_service.vector_index import VectorIndex, exact_index, recall_at_k  # noqa: E402
from tests.test_vector_index import clustered  # noqa: E402


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(8000, 32, seed=0, clusters=400)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    """Queries away from every vector, as text queries are from images."""
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((300, 32)).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_hnsw_gets_the_smallest_ef_search_reaching_the_target_on_every_family(vectors, queries):
    # A weakly built graph, so that the calibration has to raise efSearch; queries far from
    # the vectors and ones among them are two families, and both must reach the target.
    index = VectorIndex.build(vectors, factory="HNSW16", ef_construction=16, ef_search=16)
    near = clustered(200, 32, seed=3, clusters=400)
    families = {"far": queries, "near": near}
    record = calibrate(index, vectors, families, target=0.97)
    assert record["parameter"] == "efSearch" and record["reached"]
    assert record["queries"] == {"far": 150, "near": 100}
    tried = record["tried"]
    assert [t["value"] for t in tried] == list(EF_SEARCH_STEPS[: len(tried)])
    assert len(tried) >= 2, "the first step already reached the target: the test checks nothing"
    for step in tried:
        assert step["recall"] == min(step["far"], step["near"])
    assert all(t["recall"] < 0.97 for t in tried[:-1]) and tried[-1]["recall"] >= 0.97
    assert record["value"] == tried[-1]["value"] == index.params["efSearch"]
    assert index.index.hnsw.efSearch == record["value"]
    # The halves it did not tune on, measured by the index's own recall function.
    tuning, unseen = split_families(families)
    exact = exact_index(vectors)
    for name in families:
        assert record["unseen_by_family"][name] == pytest.approx(
            recall_at_k(index, exact, unseen[name]), abs=1e-4
        )
        assert not {tuple(q) for q in tuning[name]} & {tuple(q) for q in unseen[name]}
    assert record["unseen_recall"] == min(record["unseen_by_family"].values())


def test_an_unreachable_target_keeps_the_best_effort_and_says_so(vectors, queries):
    index = VectorIndex.build(vectors[:2000], factory="HNSW16", ef_construction=16)
    record = calibrate(index, vectors[:2000], {"far": queries[:40]}, target=1.01)
    assert not record["reached"]
    assert len(record["tried"]) == len(EF_SEARCH_STEPS)
    best = max(t["recall"] for t in record["tried"])
    assert record["recall"] == best
    cheapest = min(t["value"] for t in record["tried"] if t["recall"] == best)
    assert record["value"] == cheapest == index.params["efSearch"]


def test_ivf_calibrates_nprobe_and_flat_needs_nothing(vectors, queries):
    ivf = VectorIndex.build(vectors, factory="IVF64,Flat", nprobe=1)
    record = calibrate(ivf, vectors, {"far": queries})
    assert record["parameter"] == "nprobe" and record["reached"]
    assert record["value"] in NPROBE_STEPS and ivf.params["nprobe"] == record["value"]
    assert record["unseen_recall"] >= 0.9
    flat = VectorIndex.build(vectors, factory="Flat")
    record = calibrate(flat, vectors, {"far": queries})
    assert record["parameter"] is None and record["recall"] == 1.0
    assert record["unseen_recall"] == 1.0 and record["tried"] == []


def test_nprobe_goes_on_doubling_up_to_every_list_where_the_target_needs_it():
    assert nprobe_steps(0) == NPROBE_STEPS
    assert nprobe_steps(64) == (1, 2, 4, 8, 16, 32, 64)
    assert nprobe_steps(4096)[-5:] == (256, 512, 1024, 2048, 4096)
    assert nprobe_steps(600)[-3:] == (256, 512, 600)
    # Uniform vectors in 64 dimensions, 1,024 lists of about 8: a query's nearest 10 lie in
    # lists all over, and recall 1.0 needs every list (0.90 at 256, where the ladder used to
    # stop short, 0.98 at 512); there an inverted file of uncompressed vectors is exact.
    rng = np.random.default_rng(0)
    vectors, queries = (rng.standard_normal((n, 64)).astype(np.float32) for n in (8000, 100))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ivf = VectorIndex.build(vectors, factory="IVF1024,Flat", nprobe=1)
    record = calibrate(ivf, vectors, {"far": queries}, target=1.0)
    assert record["reached"] and record["recall"] == 1.0
    tried = [t["value"] for t in record["tried"]]
    assert tried == list(nprobe_steps(1024)[: len(tried)])
    assert record["value"] > 256 and ivf.params["nprobe"] == record["value"]
    assert record["unseen_recall"] == 1.0


def test_hnsw_is_built_with_the_given_ef_construction(vectors):
    from retrieval_service.vector_index import EF_CONSTRUCTION

    assert VectorIndex.build(vectors[:300], factory="HNSW16").index.hnsw.efConstruction == (
        EF_CONSTRUCTION
    )
    built = VectorIndex.build(vectors[:300], factory="HNSW16", ef_construction=24)
    assert built.index.hnsw.efConstruction == 24


def test_each_query_class_gets_the_effort_its_own_families_need_and_keeps_it_when_loaded(
    tmp_path, vectors, queries
):
    # Queries among the vectors find their neighbours in the first lists probed; queries far
    # from every vector need many more. Served as one value, the easy class would pay the
    # hard one's nprobe.
    ivf = VectorIndex.build(vectors, factory="IVF64,Flat", nprobe=1)
    rng = np.random.default_rng(5)
    near = vectors[rng.choice(len(vectors), 200, replace=False)]
    near = near + 0.05 * rng.standard_normal(near.shape).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    classes = {"hard": ("far",), "easy": ("near",)}
    record = calibrate(ivf, vectors, {"far": queries, "near": near}, target=0.97, classes=classes)
    by_query = record["by_query"]
    assert by_query["easy"]["value"] < by_query["hard"]["value"] == record["value"]
    for name, figures in by_query.items():
        first = next(t for t in record["tried"] if t[classes[name][0]] >= 0.97)
        assert figures["value"] == first["value"]
        assert ivf.params_by_query[name] == {"nprobe": figures["value"]}
    # The served recall is each class's own, on the halves it did not tune on.
    tuning, unseen = split_families({"far": queries, "near": near})
    exact = exact_index(vectors)
    served = []
    for name, (family,) in classes.items():
        single = VectorIndex.build(vectors, factory="IVF64,Flat", nprobe=1)
        single.index = faiss.clone_index(ivf.index)
        single.set_params(nprobe=by_query[name]["value"])
        recall = recall_at_k(single, exact, unseen[family])
        assert by_query[name]["unseen_by_family"] == {family: pytest.approx(recall, abs=1e-4)}
        served.append(recall)
        # A search of the class probes the class's lists: its answer is that index's.
        for query in unseen[family][:20]:
            assert np.array_equal(ivf.search(query, 10, name)[1], single.search(query, 10)[1])
    assert record["unseen_recall"] == pytest.approx(min(served), abs=1e-4)
    # Unclassed searches keep the index's own value; the classes survive a save and a load.
    assert ivf.index.nprobe == record["value"] and ivf.effort(None) == ivf.params
    ivf.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert loaded.params_by_query == ivf.params_by_query
    assert loaded.effort("easy") == {"nprobe": by_query["easy"]["value"]}
    assert loaded.effort("unknown class") == loaded.params == {"nprobe": record["value"]}
