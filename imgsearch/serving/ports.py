"""One listening ``grpc.aio`` server: its options, TLS or plaintext, health registered."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from imgsearch.health import BoundedHealthServicer

# The shortest keepalive interval a client may use on an idle connection without strikes.
MIN_PING_INTERVAL_MS = 10_000


def new_server(
    name: str,
    host: str,
    port: int,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    credentials: grpc.ServerCredentials | None = None,
    max_connection_age_s: float = 0.0,
    grace_s: float = 5.0,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """An aio server bound to ``host:port`` (0 = ephemeral) with health registered.

    With ``credentials`` the port serves TLS, else plaintext. With ``max_connection_age_s``
    each client connection is closed (GOAWAY) after that long, its calls in flight given
    ``grace_s`` to finish, so that clients balancing over DNS resolve again and find new
    replicas.
    """
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC servers count a ping less than 5 minutes after the last one on an idle
        # connection as a strike, and close it (GOAWAY "too_many_pings") at the third; the
        # gateway pings its stages every 30 s to notice a dead peer, so accept that.
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ]
    if max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
        ]
    server = grpc.aio.server(interceptors=interceptors or (), options=options)
    health = BoundedHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise SystemExit(f"error: {name} cannot listen on {host}:{port} (address in use?)")
    return server, bound, health
