"""Health Watch streams on a real server: bounded, and a closed stream frees its place."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_health_watch_streams_are_bounded(loop_thread):
    from imgsearch.health import MAX_HEALTH_WATCHES
    from imgsearch.serving.ports import new_server

    async def start():
        server, port, health = new_server("test", "127.0.0.1", 0)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    streams = []
    try:
        for i in range(MAX_HEALTH_WATCHES):
            stub = health_pb2_grpc.HealthStub(channels[i % len(channels)])
            stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
            streams.append(stream)
        stub = health_pb2_grpc.HealthStub(channels[0])
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Check is never refused, and a closed stream frees its place.
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        streams.pop().cancel()
        for _ in range(50):
            try:
                stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
                streams.append(stream)
                break
            except grpc.RpcError:
                time.sleep(0.05)
        else:
            pytest.fail("a cancelled Watch stream did not free its place")
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()
        loop_thread.run(server.stop(0))
