"""What a client is told: no file path, database host or user, or exception text."""

from __future__ import annotations

import grpc
import pytest

from imgsearch.feedback.v1 import feedback_service_pb2 as fb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import Stack
from tests.test_feedback import Gateway, conversion

# A store nobody can reach, whose DSN names a user and host that must stay in the log.
UNREACHABLE = "postgresql://secret_db_user@127.0.0.1:1/private_db"
SECRETS = ("secret_db_user", "127.0.0.1:1", "private_db")


def test_log_conversions_does_not_tell_where_the_store_is(loop_thread, artifact_root, catalogue):
    gateway = Gateway(loop_thread, artifact_root, conversions_dsn=UNREACHABLE)
    photo = catalogue.photos["photo_id"].iloc[0]
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = fb_grpc.FeedbackServiceStub(channel)
            for call in (
                lambda: stub.LogConversions(
                    fb.LogConversionsRequest(events=[conversion(0, photo)]), timeout=10
                ),
                lambda: stub.DeleteUserEvents(fb.DeleteUserEventsRequest(user_id="a"), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "retry" in info.value.details()
                assert not any(s in info.value.details() for s in SECRETS), info.value.details()
    finally:
        gateway.stop()


def test_search_notes_do_not_tell_where_the_store_is(loop_thread, artifact_root):
    stack = Stack(loop_thread, artifact_root, store={"conversions_dsn": UNREACHABLE})
    try:
        with grpc.insecure_channel(stack.target) as channel:
            response = pb_grpc.SearchServiceStub(channel).Search(
                pb.SearchRequest(
                    query="red", k=3, user_id="someone-never-seen", ranker=rank_pb.RANKER_ALS
                ),
                timeout=10,
            )
        notes = " | ".join(response.notes)
        assert "conversion store unavailable" in notes  # the reason is still said
        assert not any(s in notes for s in SECRETS), notes
    finally:
        stack.stop()


def test_internal_errors_give_the_request_id_not_the_exception_text(loop_thread):
    from imgsearch.serving.interceptor import ServiceInterceptor

    async def explode(request, context):
        raise RuntimeError("cannot open /srv/private/users.db as admin@db-host")

    async def start():
        interceptor = ServiceInterceptor("test", {"test.v1.TestService"})
        server = grpc.aio.server(interceptors=[interceptor])
        handler = grpc.method_handlers_generic_handler(
            "test.v1.TestService", {"Explode": grpc.unary_unary_rpc_method_handler(explode)}
        )
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.v1.TestService/Explode")
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10, metadata=(("x-request-id", "rid-42"),))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "rid-42" in info.value.details()
        assert "/srv/private" not in info.value.details()
        assert "db-host" not in info.value.details()
    finally:
        loop_thread.run(server.stop(0))
