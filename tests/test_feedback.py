"""FeedbackService through a real gRPC server: per-event checks, idempotency, bad requests."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from imgsearch.conversion_store import open_store
from imgsearch.feedback.v1 import feedback_service_pb2 as pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from tests.test_e2e import bad_request_field


def timestamp(seconds_from_now: float = 0.0) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns() + int(seconds_from_now * 1e9))
    return stamp


def conversion(i: int, photo_id: str, **fields) -> pb.ConversionEvent:
    values = {
        "event_id": f"ev-{i}",
        "user_id": "new-user",
        "photo_id": photo_id,
        "query": "  Red   Circle ",
        "converted_at": timestamp(-60),
        "country": " FR ",
    }
    values.update(fields)
    return pb.ConversionEvent(**values)


class Gateway:
    """The real gateway on an ephemeral port; FeedbackService needs no downstream."""

    def __init__(self, loop_thread, artifacts, **store):
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig

        self.lt = loop_thread
        config = GatewayConfig(
            artifacts=str(artifacts),
            port=0,
            admin_port=0,
            retrieval_addr="127.0.0.1:1",
            ranking_addr="127.0.0.1:1",
            **store,
        )
        self.service = self.lt.run(create_gateway_server(config))
        self.target = f"127.0.0.1:{self.service.port}"

    def stop(self):
        self.lt.run(self.service.stop(0))


@pytest.fixture
def location(tmp_path) -> dict:
    return {"db": tmp_path / "conversions.sqlite3"}


@pytest.fixture
def feedback(loop_thread, artifact_root, location):
    gateway = Gateway(loop_thread, artifact_root, conversions_db=str(location["db"]))
    channel = grpc.insecure_channel(gateway.target)
    yield pb_grpc.FeedbackServiceStub(channel)
    channel.close()
    gateway.stop()


@pytest.fixture
def photo_ids(catalogue) -> list[str]:
    return catalogue.photos["photo_id"].tolist()[:10]


def stored_events(location: dict) -> dict:
    with open_store(**location) as store:
        return {e.event_id: e for e in store.scan()}


def test_a_valid_batch_is_stored_normalised_and_a_retry_counts_once(feedback, photo_ids, location):
    request = pb.LogConversionsRequest(
        events=[conversion(i, photo_ids[i]) for i in range(5)]
        + [conversion(5, photo_ids[5], conversion_type=pb.CONVERSION_TYPE_DOWNLOAD)]
    )
    response = feedback.LogConversions(request, timeout=10)
    assert [r.status for r in response.results] == [pb.EVENT_STATUS_STORED] * 6
    assert [r.event_id for r in response.results] == [f"ev-{i}" for i in range(6)]
    assert (response.stored_count, response.duplicate_count, response.rejected_count) == (6, 0, 0)
    stored = stored_events(location)
    assert set(stored) == {f"ev-{i}" for i in range(6)}
    first = stored["ev-0"]
    sent = request.events[0].converted_at
    assert first.keyword == "red circle"
    assert first.country == "FR"
    assert first.conversion_type == "download"
    assert first.user_id == "new-user" and first.photo_id == photo_ids[0]
    assert first.converted_at_us == sent.seconds * 1_000_000 + sent.nanos // 1000

    retry = feedback.LogConversions(request, timeout=10)
    assert [r.status for r in retry.results] == [pb.EVENT_STATUS_DUPLICATE] * 6
    assert (retry.stored_count, retry.duplicate_count) == (0, 6)
    assert len(stored_events(location)) == 6


def test_bad_events_are_rejected_one_by_one_and_never_stored(feedback, photo_ids, location):
    feedback.LogConversions(pb.LogConversionsRequest(events=[conversion(0, photo_ids[0])]))
    bad = {
        "unknown photo": conversion(1, "no-such-photo"),
        "empty user": conversion(2, photo_ids[2], user_id="  "),
        "future": conversion(3, photo_ids[3], converted_at=timestamp(600)),
        "no time": pb.ConversionEvent(event_id="ev-4", user_id="u", photo_id=photo_ids[4]),
        "before 1970": conversion(5, photo_ids[5], converted_at=Timestamp(seconds=-5)),
        "no id": conversion(6, photo_ids[6], event_id=""),
        "conflict": conversion(0, photo_ids[1]),
        "unknown type": conversion(8, photo_ids[8], conversion_type=42),
    }
    good = [conversion(9, photo_ids[9]), conversion(10, photo_ids[1], converted_at=timestamp(240))]
    request = pb.LogConversionsRequest(events=[*bad.values(), *good])
    response = feedback.LogConversions(request, timeout=10)
    reasons = [r.rejection_reason for r in response.results]
    assert reasons == [
        pb.REJECTION_REASON_UNKNOWN_PHOTO,
        pb.REJECTION_REASON_EMPTY_USER,
        pb.REJECTION_REASON_FUTURE_TIME,
        pb.REJECTION_REASON_MISSING_TIME,
        pb.REJECTION_REASON_INVALID_TIME,
        pb.REJECTION_REASON_MISSING_EVENT_ID,
        pb.REJECTION_REASON_CONFLICTING_DUPLICATE,
        pb.REJECTION_REASON_UNKNOWN_CONVERSION_TYPE,
        pb.REJECTION_REASON_UNSPECIFIED,
        pb.REJECTION_REASON_UNSPECIFIED,
    ]
    statuses = [r.status for r in response.results]
    assert statuses == [pb.EVENT_STATUS_REJECTED] * 8 + [pb.EVENT_STATUS_STORED] * 2
    assert all(r.detail for r in response.results[:8])
    assert "no-such-photo" in response.results[0].detail
    assert (response.stored_count, response.rejected_count) == (2, 8)
    stored = stored_events(location)
    # Only the first ev-0 and the two good events: nothing rejected went in.
    assert set(stored) == {"ev-0", "ev-9", "ev-10"}
    assert stored["ev-0"].photo_id == photo_ids[0]


@pytest.mark.parametrize(
    "events, field",
    [
        ([], "events"),
        ([{}] * 1001, "events"),
        ([{}, {}, {"query": "q" * 300}], "events[2].query"),
        ([{"event_id": "e" * 200}], "events[0].event_id"),
        ([{"user_id": "u" * 300}], "events[0].user_id"),
        ([{"photo_id": "p" * 200}], "events[0].photo_id"),
        ([{"country": "c" * 100}], "events[0].country"),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(feedback, location, events, field):
    request = pb.LogConversionsRequest(events=[pb.ConversionEvent(**e) for e in events])
    with pytest.raises(grpc.RpcError) as info:
        feedback.LogConversions(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == field


def test_delete_user_events_removes_that_users_events(feedback, photo_ids, location):
    events = [conversion(i, photo_ids[i], user_id="alice" if i < 3 else "bob") for i in range(5)]
    feedback.LogConversions(pb.LogConversionsRequest(events=events), timeout=10)
    deleted = feedback.DeleteUserEvents(pb.DeleteUserEventsRequest(user_id="alice"), timeout=10)
    assert {e.user_id for e in stored_events(location).values()} == {"bob"}
    again = feedback.DeleteUserEvents(pb.DeleteUserEventsRequest(user_id="alice"), timeout=10)
    assert again == deleted  # the same answer: it tells nothing of what the user had
    with pytest.raises(grpc.RpcError) as info:
        feedback.DeleteUserEvents(pb.DeleteUserEventsRequest(user_id=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == "user_id"


def test_a_store_that_is_down_gives_unavailable_not_a_crash(loop_thread, artifact_root, photo_ids):
    gateway = Gateway(
        loop_thread, artifact_root, conversions_dsn="postgresql://nobody@127.0.0.1:1/x"
    )
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            request = pb.LogConversionsRequest(events=[conversion(0, photo_ids[0])])
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    stub.LogConversions(request, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "retry" in info.value.details()
            # Events rejected before the store is reached still get their answer.
            rejected = stub.LogConversions(
                pb.LogConversionsRequest(events=[conversion(1, "no-such-photo")]), timeout=10
            )
            assert rejected.results[0].status == pb.EVENT_STATUS_REJECTED
    finally:
        gateway.stop()


def test_the_gateway_reports_feedback_health_and_reflection(loop_thread, artifact_root, location):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    gateway = Gateway(loop_thread, artifact_root, conversions_db=str(location["db"]))
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="imgsearch.feedback.v1.FeedbackService"),
                timeout=5,
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            symbol = "imgsearch.feedback.v1.FeedbackService.LogConversions"
            (answer,) = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]),
                timeout=5,
            )
            assert answer.HasField("file_descriptor_response")
    finally:
        gateway.stop()
