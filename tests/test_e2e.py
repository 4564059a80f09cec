"""End to end through real servers: search, validation errors, health and reflection."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(stack):
    channel = grpc.insecure_channel(stack.target)
    yield pb_grpc.SearchServiceStub(channel)
    channel.close()


def active_user(catalogue) -> str:
    top = int(catalogue.conversions["user_idx"].value_counts().idxmax())
    return catalogue.users["anonymous_user_id"].iloc[top]


def test_search_returns_k_results_with_metadata_and_timings(stub, catalogue, artifact_root):
    from imgsearch import artifacts
    from imgsearch.names import ranker_value

    user = active_user(catalogue)
    response = stub.Search(pb.SearchRequest(user_id=user, query="red", k=7), timeout=10)
    assert len(response.results) == 7
    assert not response.degraded
    for result in response.results:
        assert result.photo.photo_id == result.photo_id
        assert result.photo.url.startswith("https://")
        assert "red" in result.photo.keywords
        assert result.retrieval_source == "keyword"
        assert result.retrieval_source_scores["keyword"] == pytest.approx(result.retrieval_score)
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    assert response.timings.retrieval_ms > 0
    assert response.timings.ranking_ms > 0
    assert response.timings.total_ms >= response.timings.retrieval_ms
    # The ranker the set's validation chose (see test_selection.py for the rule).
    served = artifacts.resolve(artifact_root).manifest["default_ranker"]
    assert response.ranker == ranker_value(served)
    assert set(response.artifact_versions) == {"gateway", "retrieval", "ranking"}


def test_rankers_reorder_the_same_candidates(stub, catalogue):
    user = active_user(catalogue)
    orders = {}
    for ranker in (1, 2, 3):  # none, popularity, als
        response = stub.Search(
            pb.SearchRequest(user_id=user, query="blue", k=20, candidates_k=20, ranker=ranker),
            timeout=10,
        )
        orders[ranker] = [r.photo_id for r in response.results]
    assert set(orders[1]) == set(orders[2]) == set(orders[3])
    assert orders[1] != orders[3]


def test_unknown_user_falls_back_and_says_so(stub):
    request = pb.SearchRequest(user_id="nobody", query="green", k=5, ranker=rank_pb.RANKER_ALS)
    response = stub.Search(request, timeout=10)
    assert len(response.results) == 5
    assert not response.degraded
    assert any("unknown user" in note for note in response.notes)


def test_multi_word_query_uses_token_matching(stub):
    response = stub.Search(pb.SearchRequest(query="red circle", k=5, ranker=1), timeout=10)
    assert len(response.results) == 5
    assert any("token match" in note for note in response.notes)
    top = response.results[0].photo.keywords
    assert "red" in top and "circle" in top


def bad_request_field(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return ""


@pytest.mark.parametrize(
    "request_fields, field",
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x" * 300}, "query"),
        ({"query": "red", "k": -1}, "k"),
        ({"query": "red", "k": 10**6}, "k"),
        ({"query": "red", "k": 20, "candidates_k": 10}, "candidates_k"),
        ({"query": "red", "candidates_k": 5000}, "candidates_k"),
        ({"query": "red", "ranker": 99}, "ranker"),
        ({"query": "red", "retriever": 42}, "retriever"),
        ({"query": "red", "user_id": "u" * 1000}, "user_id"),
        ({"query": "red", "retriever": 2}, "retriever"),  # CLIP not in this artifact set
        ({"query": "red", "ranker": 5}, "ranker"),  # DeepFM not trained in this set
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(stub, request_fields, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(pb.SearchRequest(**request_fields), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert bad_request_field(info.value) == field
    # ...and the server keeps serving.
    assert len(stub.Search(pb.SearchRequest(query="red", k=3), timeout=10).results) == 3


def test_k_zero_means_default_of_ten(stub):
    assert len(stub.Search(pb.SearchRequest(query="red", k=0), timeout=10).results) == 10


def test_health_reports_serving_for_every_service(stack):
    for port, name in [
        (stack.gateway.port, "imgsearch.search.v1.SearchService"),
        (stack.retrieval.port, "imgsearch.retrieval.v1.RetrievalService"),
        (stack.ranking.port, "imgsearch.ranking.v1.RankingService"),
    ]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", name):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_resolves_method_symbols(stack):
    """ghz without --proto asks for the method's full name; it must resolve."""
    with grpc.insecure_channel(stack.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="imgsearch.search.v1.SearchService.Search"
            ),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="imgsearch.search.v1.SearchService.NoSuchMethod"
            ),
        ]
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    services = {s.name for s in replies[0].list_services_response.service}
    assert "imgsearch.search.v1.SearchService" in services
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert files, replies[1]
    from google.protobuf import descriptor_pb2

    names = {descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files}
    assert "imgsearch/search/v1/search_service.proto" in names
    assert replies[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_two_step_ranking_votes_als_recommendations_with_retrieval(stub, catalogue):
    user = active_user(catalogue)
    response = stub.Search(
        pb.SearchRequest(user_id=user, query="red", k=8, ranker=rank_pb.RANKER_TWO_STEP),
        timeout=10,
    )
    assert response.ranker == rank_pb.RANKER_TWO_STEP
    assert len(response.results) == 8
    assert len({r.photo_id for r in response.results}) == 8
    retrieved = stub.Search(
        pb.SearchRequest(query="red", k=100, candidates_k=100, ranker=rank_pb.RANKER_NONE),
        timeout=10,
    )
    assert {r.photo_id for r in response.results} <= {r.photo_id for r in retrieved.results}


def test_recent_photos_personalize_a_user_the_model_has_not_seen(stub, catalogue):
    user_idx = int(catalogue.conversions["user_idx"].value_counts().idxmax())
    history = catalogue.conversions.loc[catalogue.conversions["user_idx"] == user_idx]
    recent = catalogue.photo_ids(history["photo_idx"].to_numpy()[-20:])
    request = pb.SearchRequest(user_id="brand-new-user", query="blue", k=10, ranker=3)
    cold = stub.Search(request, timeout=10)
    assert any("unknown user" in note for note in cold.notes)
    request.recent_photo_ids.extend(recent)
    warm = stub.Search(request, timeout=10)
    assert not any("unknown user" in note for note in warm.notes)
    assert [r.photo_id for r in warm.results] != [r.photo_id for r in cold.results]


def test_request_id_crosses_all_three_services_in_the_access_log(stub, monkeypatch, caplog):
    import logging

    from imgsearch.serving import pipeline

    monkeypatch.setattr(pipeline, "ACCESS_LOG", True)
    with caplog.at_level(logging.INFO, logger="imgsearch"):
        stub.Search(
            pb.SearchRequest(query="red", k=3), timeout=10, metadata=(("x-request-id", "rq-42"),)
        )
    seen = {
        (r.service, r.method, r.code)
        for r in caplog.records
        if r.getMessage() == "rpc" and getattr(r, "request_id", "") == "rq-42"
    }
    assert seen == {
        ("gateway", "Search", "OK"),
        ("retrieval", "Retrieve", "OK"),
        ("ranking", "Rank", "OK"),
    }


def test_a_search_without_a_request_id_gets_one_id_in_every_service(stub, monkeypatch, caplog):
    import logging

    from imgsearch.serving import pipeline

    monkeypatch.setattr(pipeline, "ACCESS_LOG", True)
    with caplog.at_level(logging.INFO, logger="imgsearch"):
        stub.Search(pb.SearchRequest(query="red", k=3), timeout=10)
    lines = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert {(r.service, r.method) for r in lines} == {
        ("gateway", "Search"),
        ("retrieval", "Retrieve"),
        ("ranking", "Rank"),
    }
    ids = {getattr(r, "request_id", "") for r in lines}
    assert len(ids) == 1 and "" not in ids, ids


def test_prometheus_metrics_count_requests_by_code_per_service(stub):
    from prometheus_client import REGISTRY

    def value(service, method, code):
        labels = {"service": service, "method": method, "code": code}
        return REGISTRY.get_sample_value("imgsearch_requests_total", labels) or 0.0

    before = (value("gateway", "Search", "OK"), value("ranking", "Rank", "OK"))
    bad_before = value("gateway", "Search", "INVALID_ARGUMENT")
    stub.Search(pb.SearchRequest(query="red", k=3), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Search(pb.SearchRequest(query=""), timeout=10)
    assert value("gateway", "Search", "OK") == before[0] + 1
    assert value("ranking", "Rank", "OK") == before[1] + 1
    # An abort reaches the client before the server's handler has finished counting it.
    deadline = time.monotonic() + 2
    while value("gateway", "Search", "INVALID_ARGUMENT") < bad_before + 1:
        assert time.monotonic() < deadline, "INVALID_ARGUMENT not counted"
        time.sleep(0.01)
    assert value("gateway", "Search", "INVALID_ARGUMENT") == bad_before + 1
    assert REGISTRY.get_sample_value(
        "imgsearch_latency_seconds_count", {"service": "retrieval", "stage": "retrieve"}
    )


def test_search_results_as_an_html_page(stack, tmp_path):
    from gateway.client import search, to_html

    images = tmp_path / "images"
    images.mkdir()
    response = search(stack.target, "red <b>", "someone", k=4)
    (images / f"{response.results[0].photo_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0fake")
    page = to_html(response, "red <b>", "someone", str(images))
    assert page.count("<figure>") == 4
    assert "red &lt;b&gt;" in page and "red <b>" not in page
    assert "data:image/jpeg;base64," in page  # embedded from disk
    assert response.results[1].photo.url in page  # linked when not on disk
    for result in response.results:
        assert result.photo_id in page


def test_rank_puts_unknown_candidates_last_in_retrieval_order(stack, catalogue):
    from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc

    user = active_user(catalogue)
    known = list(catalogue.photos["photo_id"].iloc[:6])
    mixed = [known[0], "no-such-a", known[1], known[2], "no-such-b", *known[3:]]
    scores = [float(len(mixed) - i) for i in range(len(mixed))]
    with grpc.insecure_channel(f"127.0.0.1:{stack.ranking.port}") as channel:
        stub = rank_grpc.RankingServiceStub(channel)
        for ranker in (rank_pb.RANKER_NONE, rank_pb.RANKER_POPULARITY, rank_pb.RANKER_ALS):
            request = rank_pb.RankRequest(
                user_id=user,
                keyword="red",
                candidate_photo_ids=mixed,
                retrieval_scores=scores,
                k=len(mixed),
                ranker=ranker,
            )
            every = stub.Rank(request, timeout=10)
            ids = [r.photo_id for r in every.results]
            assert sorted(ids[:6]) == sorted(known) and ids[6:] == ["no-such-a", "no-such-b"]
            assert [r.score for r in every.results] == sorted(
                (r.score for r in every.results), reverse=True
            )
            assert "2 unknown photo id(s) ranked last" in every.fallback_reason
            # The known candidates alone come back in the same order, with no note.
            request.ClearField("candidate_photo_ids")
            request.ClearField("retrieval_scores")
            request.candidate_photo_ids.extend(p for p in mixed if p in known)
            request.retrieval_scores.extend(s for p, s in zip(mixed, scores) if p in known)
            request.k = len(known)
            alone = stub.Rank(request, timeout=10)
            assert [r.photo_id for r in alone.results] == ids[:6]
            assert "unknown photo" not in alone.fallback_reason


def test_rank_reads_the_packed_candidate_indices_of_its_own_set(stack, catalogue):
    import numpy as np

    from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
    from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
    from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc

    with (
        grpc.insecure_channel(f"127.0.0.1:{stack.retrieval.port}") as retrieval_channel,
        grpc.insecure_channel(f"127.0.0.1:{stack.ranking.port}") as ranking_channel,
    ):
        retrieved = retr_grpc.RetrievalServiceStub(retrieval_channel).Retrieve(
            retr_pb.RetrieveRequest(query="red", candidates_k=50, return_packed_photo_indices=True),
            timeout=10,
        )
        packed = np.frombuffer(retrieved.packed_photo_indices, "<i4")
        # Aligned with the ids: each candidate's catalogue index, 4 bytes each.
        assert packed.tolist() == catalogue.photo_idx_list(retrieved.photo_ids)
        rank = rank_grpc.RankingServiceStub(ranking_channel).Rank

        def ranked(**fields):
            request = rank_pb.RankRequest(
                user_id=active_user(catalogue),
                keyword=retrieved.keyword,
                candidate_photo_ids=retrieved.photo_ids,
                retrieval_scores=retrieved.scores,
                k=10,
                ranker=rank_pb.RANKER_ALS,
                **fields,
            )
            return [(r.photo_id, r.score) for r in rank(request, timeout=10).results]

        by_ids = ranked()
        version = retrieved.artifact_version
        assert (
            ranked(
                packed_candidate_indices=retrieved.packed_photo_indices,
                candidate_indices_version=version,
            )
            == by_ids
        )
        # Indexes are read, not only carried: reversed, they score other photos.
        reversed_indices = packed[::-1].astype("<i4").tobytes()
        assert (
            ranked(packed_candidate_indices=reversed_indices, candidate_indices_version=version)
            != by_ids
        )
        # Another set's numbering, or an index beyond the catalogue: the ids decide.
        assert (
            ranked(packed_candidate_indices=reversed_indices, candidate_indices_version="other")
            == by_ids
        )
        beyond = np.full(len(packed), 10**9, "<i4").tobytes()
        assert ranked(packed_candidate_indices=beyond, candidate_indices_version=version) == by_ids
        with pytest.raises(grpc.RpcError) as error:
            ranked(packed_candidate_indices=b"\x00" * 6, candidate_indices_version=version)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "packed_candidate_indices" in error.value.details()
