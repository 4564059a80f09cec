"""The live catalogue when its store is down: a retrieval server that must replay the log waits
NOT_SERVING (saying why) and serves once the store answers; the gateway's searches never need
the store; CatalogService says UNAVAILABLE naming the store, or FAILED_PRECONDITION when the
live catalogue is off."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.admin.v1 import admin_service_pb2, admin_service_pb2_grpc
from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb
from imgsearch.catalog.v1 import catalog_service_pb2_grpc as cat_grpc
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.test_cli import free_ports

# Nothing listens on port 1: connections are refused at once.
UNREACHABLE_DSN = "postgresql://imgsearch:secret-4417@127.0.0.1:1/imgsearch"


def health(target: str) -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=2)
                .status
            )
        except grpc.RpcError:
            return None


def test_retrieval_waits_not_serving_for_the_log_and_serves_once_the_store_answers(
    loop_thread, artifact_root, tmp_path
):
    from imgsearch.config import RetrievalConfig
    from retrieval_service.server import create_retrieval_server

    # A SQLite file under a regular file cannot be created: the store is down until the file
    # makes way for a folder.
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")
    port, admin_port = free_ports(2)
    config = RetrievalConfig(
        artifacts=str(artifact_root),
        port=port,
        admin_port=admin_port,
        conversions_db=str(blocker / "log.sqlite3"),
        live_catalogue=True,
        image_worker_at_start=False,
    )
    starting = asyncio.run_coroutine_threadsafe(create_retrieval_server(config), loop_thread.loop)
    service = None
    try:
        target, admin = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 60
        reason = ""
        while not reason and time.monotonic() < deadline:
            with grpc.insecure_channel(admin) as channel:
                try:
                    reason = (
                        admin_service_pb2_grpc.AdminServiceStub(channel)
                        .GetStatus(admin_service_pb2.GetStatusRequest(), timeout=2)
                        .not_serving_reason
                    )
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        assert "catalogue log" in reason and "log.sqlite3" in reason, reason
        assert health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                retr_grpc.RetrievalServiceStub(channel).Retrieve(
                    retr_pb.RetrieveRequest(query="red", candidates_k=5), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "catalogue log" in refused.value.details()
        assert not starting.done()

        blocker.unlink()
        blocker.mkdir()
        service = starting.result(timeout=60)
        assert health(target) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(target) as channel:
            reply = retr_grpc.RetrievalServiceStub(channel).Retrieve(
                retr_pb.RetrieveRequest(query="red", candidates_k=5), timeout=10
            )
        assert len(reply.photo_ids) == 5
    finally:
        if service is None and not starting.done():
            if blocker.is_file():  # let the wait end, so the server can be stopped
                blocker.unlink()
                blocker.mkdir()
            service = starting.result(timeout=60)
        if service is not None:
            loop_thread.run(service.stop(0))


def test_searches_never_need_the_store_and_catalog_says_why_it_cannot_write(loop_thread, stack):
    from gateway.server import create_gateway_server
    from imgsearch.config import GatewayConfig

    gateway = loop_thread.run(
        create_gateway_server(
            GatewayConfig(
                artifacts=stack.artifacts,
                port=0,
                admin_port=0,
                retrieval_addr=f"127.0.0.1:{stack.retrieval.port}",
                ranking_addr=f"127.0.0.1:{stack.ranking.port}",
                conversions_dsn=UNREACHABLE_DSN,
                live_catalogue=True,
            )
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            reply = pb_grpc.SearchServiceStub(channel).Search(
                pb.SearchRequest(query="red", k=5), timeout=30
            )
            assert len(reply.results) == 5
            catalog = cat_grpc.CatalogServiceStub(channel)
            for call in (
                lambda: catalog.GetPhoto(cat_pb.GetPhotoRequest(photo_id="p1"), timeout=30),
                lambda: catalog.DeletePhotos(
                    cat_pb.DeletePhotosRequest(request_id=str(uuid.uuid4()), photo_ids=["p1"]),
                    timeout=30,
                ),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                details = refused.value.details()
                assert "catalogue log" in details and "127.0.0.1" in details, details
                assert "secret-4417" not in details
    finally:
        loop_thread.run(gateway.stop(0))

    # The stack's gateway serves without the live catalogue: writes are refused, saying so.
    with grpc.insecure_channel(stack.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            cat_grpc.CatalogServiceStub(channel).DeletePhotos(
                cat_pb.DeletePhotosRequest(request_id=str(uuid.uuid4()), photo_ids=["p1"]),
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--live-catalogue" in refused.value.details()
