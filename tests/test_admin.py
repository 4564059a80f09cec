"""The admin port: off the service port, Reload by set version only, serialised, tokens."""

from __future__ import annotations

import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from imgsearch import artifacts
from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
from tests.conftest import Stack


def reload(port: int, timeout: float = 60, metadata=(), **fields) -> admin_pb.ReloadResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return admin_grpc.AdminServiceStub(channel).Reload(
            admin_pb.ReloadRequest(**fields), timeout=timeout, metadata=metadata
        )


def refused(port: int, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        reload(port, **fields)
    return info.value


def bad_request_field(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    violation = error_details_pb2.BadRequest()
    status.details[0].Unpack(violation)
    return violation.field_violations[0].field


@pytest.fixture(scope="module")
def versioned_root(artifact_root, tmp_path_factory):
    """A private root holding the built set plus two more versions (hard-linked copies)."""
    root = tmp_path_factory.mktemp("versioned") / "root"
    shutil.copytree(artifact_root, root, symlinks=True)
    base = artifacts.resolve(root)
    for suffix in ("a", "b"):
        target = root / artifacts.SETS_DIR / f"{base.version}-{suffix}"
        artifacts.link_tree(base.path, target, skip=(artifacts.MANIFEST,))
        artifacts.write_manifest(target, {**base.manifest, "version": target.name})
    return root


@pytest.fixture(scope="module")
def versioned_stack(loop_thread, versioned_root):
    stack = Stack(loop_thread, versioned_root)
    yield stack
    stack.stop()


def test_admin_service_is_not_on_the_service_port(versioned_stack):
    for service in (versioned_stack.gateway, versioned_stack.retrieval, versioned_stack.ranking):
        assert service.admin_port != service.port
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                admin_grpc.AdminServiceStub(channel).GetStatus(
                    admin_pb.GetStatusRequest(), timeout=5
                )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as channel:
            status = admin_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb.GetStatusRequest(), timeout=5
            )
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert status.service == service.name
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_reload_with_a_path_is_invalid_argument_and_loads_nothing(versioned_stack, tmp_path):
    port = versioned_stack.retrieval.admin_port
    before = reload(port).version
    error = refused(port, artifacts=str(tmp_path))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(error) == "artifacts"
    assert reload(port).previous_version == before


@pytest.mark.parametrize("version", ["../x", "/etc", "a/b", ".hidden", "x" * 200, "sets"])
def test_reload_refuses_a_version_that_is_a_path_or_unknown(versioned_stack, version):
    error = refused(versioned_stack.ranking.admin_port, version=version)
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        assert bad_request_field(error) == "version"


def test_reload_by_version_switches_and_empty_goes_back_to_current(versioned_stack):
    current = artifacts.resolve(versioned_stack.artifacts).version
    for service in (versioned_stack.retrieval, versioned_stack.ranking, versioned_stack.gateway):
        reply = reload(service.admin_port, version=f"{current}-a")
        assert reply.version == f"{current}-a"
        back = reload(service.admin_port)
        assert (back.previous_version, back.version) == (f"{current}-a", current)


def test_concurrent_reloads_are_serialised_each_loading_what_it_asked(versioned_stack):
    current = artifacts.resolve(versioned_stack.artifacts).version
    wanted = [f"{current}-a", f"{current}-b"] * 4
    port = versioned_stack.gateway.admin_port
    initial = status(port).version
    with ThreadPoolExecutor(len(wanted)) as pool:
        replies = list(pool.map(lambda v: reload(port, version=v), wanted))
    assert [r.version for r in replies] == wanted
    final = status(port).version
    # One after the other: each reload replaced exactly the state the one before it left.
    assert Counter(r.previous_version for r in replies) + Counter([final]) == Counter(
        wanted
    ) + Counter([initial])
    reload(port)


def status(port: int) -> admin_pb.GetStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        return stub.GetStatus(admin_pb.GetStatusRequest(), timeout=5)


def test_a_server_given_one_set_folder_reloads_only_that_set(loop_thread, versioned_root):
    one_set = artifacts.resolve(versioned_root).path
    stack = Stack(loop_thread, one_set)
    try:
        port = stack.retrieval.admin_port
        version = artifacts.resolve(one_set).version
        assert reload(port, version=version).version == version
        assert reload(port).version == version
        error = refused(port, version=f"{version}-a")
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "only that set" in error.details()
    finally:
        stack.stop()


def test_admin_tokens_guard_reload_but_not_health(loop_thread, artifact_root, tmp_path):
    tokens = tmp_path / "admin-tokens"
    tokens.write_text("# operators\nfirst-admin-token\nsecond-admin-token\n")
    stack = Stack(
        loop_thread,
        artifact_root,
        stage_overrides={"admin_tokens_file": str(tokens)},
        admin_tokens_file=str(tokens),
    )
    try:
        port = stack.ranking.admin_port
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            error = refused(port, metadata=metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error.details() == "missing or invalid bearer token"
        reply = reload(port, metadata=(("authorization", "Bearer second-admin-token"),))
        assert reply.version
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # A rotated token file is picked up by a reload (what SIGHUP runs).
        tokens.write_text("third-admin-token\n")
        loop_thread.run(stack.ranking.reload())
        old = refused(port, metadata=(("authorization", "Bearer second-admin-token"),))
        assert old.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reload(port, metadata=(("authorization", "Bearer third-admin-token"),)).version
    finally:
        stack.stop()


def test_an_admin_port_off_loopback_without_tokens_refuses_to_start(loop_thread, artifact_root):
    from imgsearch.config import RankingConfig
    from imgsearch.security import SecurityConfigError
    from ranking_service.server import create_ranking_server

    config = RankingConfig(artifacts=str(artifact_root), port=0, admin_port=0, admin_host="0.0.0.0")
    with pytest.raises(SecurityConfigError, match="not loopback"):
        loop_thread.run(create_ranking_server(config))


def test_cli_reload_asks_each_admin_port_for_a_version(versioned_stack, capsys):
    from imgsearch_tools.cli import main

    current = artifacts.resolve(versioned_stack.artifacts).version
    targets = ",".join(
        f"127.0.0.1:{s.admin_port}"
        for s in (versioned_stack.retrieval, versioned_stack.ranking, versioned_stack.gateway)
    )
    assert main(["reload", "--targets", targets, "--version", f"{current}-b"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"-> {current}-b") == 3
    assert main(["reload", "--targets", targets, "--version", "../elsewhere"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert main(["reload", "--targets", targets]) == 0
    assert capsys.readouterr().out.count(f"-> {current} (") == 3
