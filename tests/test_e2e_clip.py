"""End to end with CLIP: hybrid retrieval through real servers on a set with a trained CLIP."""

from __future__ import annotations

import math

import grpc
import pytest

from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import CLIP_SET_TIMEOUT, Stack

pytestmark = CLIP_SET_TIMEOUT


@pytest.fixture(scope="module")
def clip_stack(loop_thread, clip_set):
    stack = Stack(loop_thread, clip_set)
    yield stack
    stack.stop()


def test_hybrid_results_carry_both_sources(clip_stack):
    with grpc.insecure_channel(clip_stack.target) as channel:
        response = pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(
                query="red", k=10, candidates_k=50, retriever=retr_pb.RETRIEVER_HYBRID
            ),
            timeout=30,
        )
    assert response.retriever == retr_pb.RETRIEVER_HYBRID
    assert len(response.results) == 10
    sources = {r.retrieval_source for r in response.results}
    assert sources <= {"keyword", "clip", "keyword+clip"}
    for result in response.results:
        names = result.retrieval_source.split("+")
        assert sorted(result.retrieval_source_scores) == sorted(names)
        assert all(not math.isnan(v) for v in result.retrieval_source_scores.values())


def test_clip_answers_queries_that_are_no_catalogue_keyword(clip_stack):
    with grpc.insecure_channel(clip_stack.target) as channel:
        response = pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(query="a red circle at night", k=5, retriever=retr_pb.RETRIEVER_CLIP),
            timeout=30,
        )
    assert len(response.results) == 5
    assert {r.retrieval_source for r in response.results} == {"clip"}


def test_retrieve_returns_aligned_parallel_arrays(clip_stack):
    with grpc.insecure_channel(f"127.0.0.1:{clip_stack.retrieval.port}") as channel:
        reply = retr_grpc.RetrievalServiceStub(channel).Retrieve(
            retr_pb.RetrieveRequest(query="blue", candidates_k=30, retriever=3), timeout=30
        )
    assert len(reply.photo_ids) == len(reply.scores) == 30
    assert {s.source for s in reply.source_scores} == {"keyword", "clip"}
    assert all(len(s.scores) == 30 for s in reply.source_scores)
    assert list(reply.scores) == sorted(reply.scores, reverse=True)


def test_rank_rejects_misaligned_scores(clip_stack):
    with grpc.insecure_channel(f"127.0.0.1:{clip_stack.ranking.port}") as channel:
        stub = rank_grpc.RankingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Rank(
                rank_pb.RankRequest(
                    query="red", k=2, candidate_photo_ids=["a", "b"], retrieval_scores=[1.0]
                ),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "retrieval_scores" in info.value.details()
        # Unknown ids without scores are kept, last, in retrieval order.
        reply = stub.Rank(
            rank_pb.RankRequest(query="red", k=2, candidate_photo_ids=["a", "b"]), timeout=10
        )
        assert [r.photo_id for r in reply.results] == ["a", "b"]


def test_unseen_queries_sent_together_are_all_answered(clip_stack):
    queries = [f"red circle number {i}" for i in range(12)] + ["red"]
    with grpc.insecure_channel(f"127.0.0.1:{clip_stack.retrieval.port}") as channel:
        stub = retr_grpc.RetrievalServiceStub(channel)
        calls = [
            stub.Retrieve.future(
                retr_pb.RetrieveRequest(query=q, candidates_k=20, retriever=retr_pb.RETRIEVER_CLIP),
                timeout=30,
            )
            for q in queries
        ]
        replies = [call.result() for call in calls]
    assert all(len(r.photo_ids) == 20 for r in replies)
    assert all(list(r.scores) == sorted(r.scores, reverse=True) for r in replies)
    # "red" is a catalogue keyword: its embedding comes from the build's table, so the served
    # answer is exactly the in-process one.
    from retrieval_service.server import load_retrieval_state

    state = load_retrieval_state(clip_stack.artifacts)
    expected = state.retrievers["clip"].retrieve("red", 20)
    assert list(replies[-1].photo_ids) == state.photo_ids[expected.photo_idx].tolist()
    assert state.retrievers["clip"].known_hits == 1


def test_the_served_configuration_is_recorded_served_and_said(clip_stack):
    from imgsearch import artifacts
    from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
    from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
    from imgsearch.names import retriever_value
    from retrieval_service.semantic import fusion_label

    manifest = artifacts.resolve(clip_stack.artifacts).manifest
    configuration = manifest["configuration"]
    # Retriever and ranker are chosen together; the grid holds both single sources.
    labels = [row["label"] for row in configuration["table"]]
    assert labels[0] == "keyword" and labels[-1] == "clip" and len(labels) >= 3
    assert manifest["default_ranker"] == configuration["ranker"]
    assert manifest["default_retriever"] == configuration["retriever"]
    served = next(row for row in configuration["table"] if row["label"] == configuration["label"])
    assert served["eligible"]
    if configuration["rule"] == "point-best":
        best = max(
            value
            for row in configuration["table"]
            if row["eligible"]
            for value in row["rankers"].values()
        )
        assert served["rankers"][configuration["ranker"]] == best
    elif configuration["rule"] == "learned":  # level with the point-best, its trees passed
        assert configuration["versus_point_best"]["ci"][1] >= 0
        assert manifest["rankers"]["stacked"]["rule"]["serves"] is None
    fusion = manifest["fusion"]
    assert fusion["ranker"] == manifest["default_ranker"]
    assert sum(fusion["weights"]) == pytest.approx(1.0)
    with grpc.insecure_channel(f"127.0.0.1:{clip_stack.retrieval.admin_port}") as channel:
        status = admin_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb.GetStatusRequest(), timeout=10
        )
    defaults = {d.kind: (d.name, d.reason) for d in status.defaults}
    assert defaults["retriever"] == (configuration["retriever"], configuration["reason"])
    with grpc.insecure_channel(clip_stack.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        default = stub.Search(pb.SearchRequest(query="red", k=5), timeout=30)
    assert default.retriever == retriever_value(configuration["retriever"])
    assert defaults["fusion"] == (fusion_label("rrf", fusion["weights"]), fusion["reason"])


def test_clip_profile_is_served_from_the_sets_embeddings(clip_stack):
    with grpc.insecure_channel(clip_stack.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        request = pb.SearchRequest(query="red", k=5, ranker=rank_pb.RANKER_CLIP_PROFILE)
        cold = stub.Search(request, timeout=30)
        ids = [r.photo_id for r in cold.results]
        request.recent_photo_ids.extend(ids[:3])
        warm = stub.Search(request, timeout=30)
    assert cold.ranker == warm.ranker == rank_pb.RANKER_CLIP_PROFILE
    assert "unknown user: popularity order" in cold.notes
    assert not any("unknown user" in note for note in warm.notes)


def test_a_clip_profile_saved_as_mean_profiles_is_skipped_not_fatal(
    clip_stack, loop_thread, tmp_path
):
    """A set whose clip_profile predates the Newton-step model still serves its other rankers."""
    import json
    import shutil

    from imgsearch import artifacts
    from imgsearch.config import RankingConfig
    from ranking_service.server import create_ranking_server

    old = tmp_path / "old-set"
    shutil.copytree(artifacts.resolve(clip_stack.artifacts).path, old)
    config_path = old / artifacts.RANKERS_DIR / "clip_profile" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("model")
    config_path.write_text(json.dumps(config))
    manifest = json.loads((old / artifacts.MANIFEST).read_text())
    manifest["default_ranker"] = "clip_profile"
    (old / artifacts.MANIFEST).write_text(json.dumps(manifest))
    server = loop_thread.run(create_ranking_server(RankingConfig(artifacts=str(old), port=0)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rank_grpc.RankingServiceStub(channel)
            request = rank_pb.RankRequest(
                user_id="someone", keyword="red", candidate_photo_ids=["a", "b"], k=2
            )
            served = stub.Rank(request, timeout=30)
            assert served.ranker == rank_pb.RANKER_POPULARITY
            reason = served.default_reason
            assert "clip_profile, which is not loaded" in reason and "earlier format" in reason
            request.ranker = rank_pb.RANKER_CLIP_PROFILE
            with pytest.raises(grpc.RpcError) as error:
                stub.Rank(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not loaded" in error.value.details() and "retrain" in error.value.details()
    finally:
        loop_thread.run(server.stop(0))


def test_the_image_embeddings_are_read_only_for_rankers_that_use_them(
    clip_set, tmp_path, monkeypatch
):
    import json
    import shutil

    from imgsearch import artifacts
    from imgsearch.image_embeddings import ImageEmbeddings
    from ranking_service.server import load_ranking_state

    reads = []
    load = ImageEmbeddings.load.__func__
    monkeypatch.setattr(
        ImageEmbeddings,
        "load",
        classmethod(lambda cls, path: reads.append(path) or load(cls, path)),
    )
    state = load_ranking_state(str(clip_set))  # clip_profile scores with them
    assert "clip_profile" in state.rankers and len(reads) == 1
    plain = tmp_path / "plain-set"
    shutil.copytree(artifacts.resolve(clip_set).path, plain)
    manifest = json.loads((plain / artifacts.MANIFEST).read_text())
    manifest["rankers"].pop("clip_profile")
    manifest["default_ranker"] = "popularity"
    (plain / artifacts.MANIFEST).write_text(json.dumps(manifest))
    state = load_ranking_state(str(plain))  # the same set without it: its embeddings unread
    assert len(reads) == 1 and "clip_profile" not in state.rankers and "als" in state.rankers
