"""TLS, mutual TLS and bearer tokens on real servers with certificates made in the test."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch.security import ClientSecurity
from imgsearch.tokens import TokenSet
from imgsearch_tools import certs
from imgsearch_tools.bench.reflection_check import reflection_client_check
from tests.conftest import Stack

UNAUTHENTICATED = "missing or invalid bearer token"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    """`make certs`'s files, and a client certificate signed by another CA."""
    folder = tmp_path_factory.mktemp("certs")
    written = certs.write_dev_certs(folder)
    assert {p.name for p in written} == set(certs.FILES)
    other_key, other_ca = certs.make_ca("another CA")
    key, cert = certs.issue(other_key, other_ca, "intruder", server=False)
    (folder / "intruder.pem").write_bytes(certs.cert_pem(cert))
    (folder / "intruder-key.pem").write_bytes(certs.key_pem(key))
    return folder


@pytest.fixture(scope="module")
def secure_stack(loop_thread, artifact_root, cert_dir):
    overrides, _ = certs.dev_tls_settings(cert_dir)
    stack = Stack(
        loop_thread,
        artifact_root,
        stage_overrides=overrides["all"],
        **{**overrides["all"], **overrides["gateway"], "reflection": "auto"},
    )
    yield stack
    stack.stop()


def client(cert_dir, token: str | None = "file", cert: str = "client") -> ClientSecurity:
    """What ghz gets with --cacert ca.pem --cert client.pem --key client-key.pem."""
    return ClientSecurity(
        ca=str(cert_dir / certs.CA_CERT),
        cert=str(cert_dir / f"{cert}.pem") if cert else "",
        key=str(cert_dir / f"{cert}-key.pem") if cert else "",
        token_file=str(cert_dir / certs.TOKEN) if token == "file" else "",
    )


def search(target: str, security: ClientSecurity, metadata=None) -> pb.SearchResponse:
    with security.channel(target) as channel:
        return pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(query="red", k=5, user_id="someone"),
            timeout=10,
            metadata=security.metadata() if metadata is None else metadata,
        )


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_without_a_token_unauthenticated_with_one_served_through_mtls_stages(
    secure_stack, cert_dir
):
    target = secure_stack.target
    for metadata in ((), (("authorization", "Bearer not-the-token"),), (("authorization", "x"),)):
        error = refused(lambda: search(target, client(cert_dir), metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == UNAUTHENTICATED  # the same whatever was wrong: no hint
    response = search(target, client(cert_dir))
    # Served in full: the gateway reached both stages over mutual TLS.
    assert len(response.results) == 5 and not response.degraded
    assert set(response.artifact_versions) == {"gateway", "retrieval", "ranking"}


def test_health_is_open_and_every_other_path_needs_the_token(secure_stack, cert_dir):
    security = client(cert_dir, token=None)
    with security.channel(secure_stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        unknown = channel.unary_unary("/imgsearch.search.v1.SearchService/Nope")
        error = refused(lambda: unknown(b"\x00\x01", timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        error = refused(lambda: list(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # Reflection is off by default on a TLS port: with the token, it is not there at all.
    with client(cert_dir).channel(secure_stack.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        error = refused(
            lambda: list(
                reflection.ServerReflectionInfo(
                    iter([request]), timeout=5, metadata=client(cert_dir).metadata()
                )
            )
        )
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_probes_get_plaintext_health_on_the_admin_port(secure_stack):
    for service in (secure_stack.gateway, secure_stack.retrieval, secure_stack.ranking):
        with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def retrieve(port: int, security: ClientSecurity) -> retr_pb.RetrieveResponse:
    with security.channel(f"127.0.0.1:{port}") as channel:
        return retr_grpc.RetrievalServiceStub(channel).Retrieve(
            retr_pb.RetrieveRequest(query="red", candidates_k=5), timeout=5
        )


def test_stages_refuse_clients_without_a_certificate_of_their_ca(secure_stack, cert_dir):
    port = secure_stack.retrieval.port
    assert len(retrieve(port, client(cert_dir, token=None)).photo_ids) == 5
    for security in (
        client(cert_dir, token=None, cert="intruder"),  # a certificate from another CA
        client(cert_dir, token=None, cert=""),  # TLS, but no client certificate
        ClientSecurity(),  # plaintext
    ):
        error = refused(lambda: retrieve(port, security))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The gateway's port too: a valid token does not make up for a foreign certificate.
    error = refused(lambda: search(secure_stack.target, client(cert_dir, cert="intruder")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_is_refused(secure_stack, cert_dir):
    security = ClientSecurity(
        ca=str(cert_dir / "intruder.pem"),
        cert=str(cert_dir / certs.CLIENT_CERT),
        key=str(cert_dir / certs.CLIENT_KEY),
        token_file=str(cert_dir / certs.TOKEN),
    )
    error = refused(lambda: search(secure_stack.target, security))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_only_client_with_token_calls_like_ghz(
    loop_thread, artifact_root, cert_dir, tmp_path
):
    """ghz --cacert/--cert/--key --metadata/--reflect-metadata, without --proto."""

    overrides, security = certs.dev_tls_settings(cert_dir)
    stack = Stack(
        loop_thread,
        artifact_root,
        stage_overrides=overrides["all"],
        **overrides["all"],
        **overrides["gateway"],
    )
    try:
        requests = [{"query": "red", "k": 3, "user_id": "u"}] * 5
        check = reflection_client_check(stack.target, requests, security=security)
        assert check["ok"] == 5 and check["errors"] == {}
        with pytest.raises(grpc.RpcError) as info:
            reflection_client_check(stack.target, requests, security=client(cert_dir, token=None))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stack.stop()


def test_cli_search_uses_the_tls_flags_and_token_file(secure_stack, cert_dir, capsys):
    from imgsearch_tools.cli import main

    base = [
        "search",
        "red",
        "-k",
        "3",
        "--target",
        secure_stack.target,
        "--cacert",
        str(cert_dir / certs.CA_CERT),
        "--cert",
        str(cert_dir / certs.CLIENT_CERT),
        "--key",
        str(cert_dir / certs.CLIENT_KEY),
    ]
    assert main(base) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*base, "--token-file", str(cert_dir / certs.TOKEN), "--json"]) == 0
    assert '"photo_id"' in capsys.readouterr().out


def test_token_sets_match_whole_tokens_only(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nalpha-token\n  beta-token  \n")
    tokens = TokenSet.from_file(path)
    assert tokens.accepts((("authorization", "Bearer alpha-token"),))
    assert tokens.accepts((("authorization", "bearer beta-token"),))
    for value in ("Bearer alpha", "Bearer alpha-token-x", "alpha-token", "Basic alpha-token", ""):
        assert not tokens.accepts((("authorization", value),))
    assert not tokens.accepts((("x-other", "Bearer alpha-token"),))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no token"):
        TokenSet.from_file(empty)


def test_make_certs_never_overwrites_files_it_did_not_make(tmp_path):
    from imgsearch_tools.outputs import RefusedFolder

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / certs.SERVER_CERT).write_bytes(b"someone else's certificate")
    (foreign / "notes.txt").write_bytes(b"keep me")
    with pytest.raises(RefusedFolder, match="--force"):
        certs.write_dev_certs(foreign)
    with pytest.raises(RefusedFolder, match="server.pem"):
        certs.write_dev_certs(foreign, force=True)
    assert (foreign / certs.SERVER_CERT).read_bytes() == b"someone else's certificate"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "server.pem"]
    (foreign / certs.SERVER_CERT).unlink()
    assert len(certs.write_dev_certs(foreign, force=True)) == len(certs.FILES)  # beside them
    assert (foreign / "notes.txt").read_bytes() == b"keep me"

    own = tmp_path / "own"
    certs.write_dev_certs(own)
    before = {name: (own / name).read_bytes() for name in certs.FILES}
    assert certs.write_dev_certs(own) == []  # complete and ours: left as it is
    assert {name: (own / name).read_bytes() for name in certs.FILES} == before
    assert len(certs.write_dev_certs(own, renew=True)) == len(certs.FILES)
    assert (own / certs.CA_CERT).read_bytes() != before[certs.CA_CERT]
    assert (own / certs.CA_KEY).stat().st_mode & 0o077 == 0  # keys readable by the owner only
    assert (own / certs.TOKEN).stat().st_mode & 0o077 == 0
