"""A real TLS server's certificate: rotated on reload and on file change, watched for expiry."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from imgsearch.security import ClientSecurity
from imgsearch_tools import certs


def write_server_pair(folder, days: int = 365):
    """A new CA and a server certificate it signed, in ``folder``; returns the CA's path."""
    ca_key, ca_cert = certs.make_ca(days=days)
    key, cert = certs.issue(ca_key, ca_cert, "server", certs.DEFAULT_HOSTS, client=False, days=days)
    ca = folder / f"ca-{time.monotonic_ns()}.pem"
    ca.write_bytes(certs.cert_pem(ca_cert))
    (folder / "server-key.pem").write_bytes(certs.key_pem(key))
    (folder / "server.pem").write_bytes(certs.cert_pem(cert))
    return ca


def handshake_ok(port: int, ca) -> bool:
    with ClientSecurity(ca=str(ca)).channel(f"localhost:{port}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return True


def admin_health(service) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


def eventually(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def tls_server(loop_thread, artifact_root, tmp_path):
    from imgsearch.config import RetrievalConfig
    from retrieval_service.server import create_retrieval_server

    started = []

    def start(days: int = 365, **settings):
        ca = write_server_pair(tmp_path, days)
        config = RetrievalConfig(
            artifacts=str(artifact_root),
            port=0,
            admin_port=0,
            tls_cert=str(tmp_path / "server.pem"),
            tls_key=str(tmp_path / "server-key.pem"),
            **settings,
        )
        started.append(loop_thread.run(create_retrieval_server(config)))
        return started[-1], ca

    yield start
    for service in started:
        loop_thread.run(service.stop(0))


def test_a_reload_serves_the_rotated_certificate_to_new_connections(
    tls_server, loop_thread, tmp_path
):
    service, first_ca = tls_server()  # files checked every 30 s: the reload comes first
    assert handshake_ok(service.port, first_ca)
    second_ca = write_server_pair(tmp_path)
    assert not handshake_ok(service.port, second_ca)  # not read before the reload
    loop_thread.run(service.reload())  # what SIGHUP runs
    assert handshake_ok(service.port, second_ca)
    assert not handshake_ok(service.port, first_ca)


def test_changed_files_are_picked_up_without_a_signal(tls_server, tmp_path):
    service, first_ca = tls_server(tls_watch_s=0.2)
    assert handshake_ok(service.port, first_ca)
    second_ca = write_server_pair(tmp_path)
    assert eventually(lambda: handshake_ok(service.port, second_ca))


def test_health_is_not_serving_within_the_expiry_margin_and_a_metric_says_why(tls_server, tmp_path):
    service, _ = tls_server(days=1, tls_expiry_margin_s=2 * 86_400, tls_watch_s=0.2)
    assert eventually(lambda: admin_health(service) == health_pb2.HealthCheckResponse.NOT_SERVING)
    left = REGISTRY.get_sample_value(
        "imgsearch_tls_certificate_expiry_seconds", {"service": "retrieval"}
    )
    assert 0 < left <= 86_400
    write_server_pair(tmp_path, days=365)  # rotated: serving again
    assert eventually(lambda: admin_health(service) == health_pb2.HealthCheckResponse.SERVING)


def test_make_certs_gives_the_server_certificate_server_authentication_only(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    certs.write_dev_certs(tmp_path)

    def usages(name: str) -> set:
        cert = x509.load_pem_x509_certificate((tmp_path / name).read_bytes())
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert usages(certs.SERVER_CERT) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert usages(certs.CLIENT_CERT) == {ExtendedKeyUsageOID.CLIENT_AUTH}
