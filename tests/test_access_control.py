"""Scoped tokens on a real gateway: each method needs its scope; invented paths grow nothing."""

from __future__ import annotations

import secrets

import grpc
import pytest
from prometheus_client import REGISTRY

from imgsearch.feedback.v1 import feedback_service_pb2 as fb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch.security import SecurityConfigError
from tests.test_feedback import Gateway, conversion

TOKENS = {
    "searcher": "search",
    "writer": "search feedback:write",
    "privacy": "feedback:delete",
    "operator": "admin",
}


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {name}-token"),)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    lines = ["# token  scopes", *(f"{name}-token  {s}" for name, s in TOKENS.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def gateway(loop_thread, artifact_root, tokens_file, tmp_path_factory):
    db = tmp_path_factory.mktemp("store") / "conversions.sqlite3"
    served = Gateway(
        loop_thread, artifact_root, conversions_db=str(db), auth_tokens_file=str(tokens_file)
    )
    yield served
    served.stop()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_a_token_without_feedback_delete_gets_permission_denied(gateway):
    request = fb.DeleteUserEventsRequest(user_id="alice")
    with grpc.insecure_channel(gateway.target) as channel:
        stub = fb_grpc.FeedbackServiceStub(channel)
        for name in ("searcher", "writer", "operator"):
            denied = code_of(lambda: stub.DeleteUserEvents(request, metadata=bearer(name)))
            assert denied == grpc.StatusCode.PERMISSION_DENIED, name
        unknown = bearer("nobody")
        assert code_of(lambda: stub.DeleteUserEvents(request, metadata=unknown)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(lambda: stub.DeleteUserEvents(request)) == grpc.StatusCode.UNAUTHENTICATED
        stub.DeleteUserEvents(request, metadata=bearer("privacy"), timeout=10)


def test_each_method_needs_its_own_scope(gateway, catalogue):
    photo = catalogue.photos["photo_id"].iloc[0]
    log = fb.LogConversionsRequest(events=[conversion(0, photo)])
    search = pb.SearchRequest(query="red", k=3)
    with grpc.insecure_channel(gateway.target) as channel:
        feedback = fb_grpc.FeedbackServiceStub(channel)
        searches = pb_grpc.SearchServiceStub(channel)
        for name in ("searcher", "privacy", "operator"):
            denied = code_of(lambda: feedback.LogConversions(log, metadata=bearer(name)))
            assert denied == grpc.StatusCode.PERMISSION_DENIED, name
        assert feedback.LogConversions(log, metadata=bearer("writer"), timeout=10).stored_count
        for name in ("privacy", "operator"):
            denied = code_of(lambda: searches.Search(search, metadata=bearer(name), timeout=10))
            assert denied == grpc.StatusCode.PERMISSION_DENIED, name
        # With a search scope the call goes through auth (the stages are not there: degraded
        # or unavailable, never refused for its token).
        for name in ("searcher", "writer"):
            try:
                searches.Search(search, metadata=bearer(name), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() not in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                )


def series(service: str) -> set[tuple[str, str]]:
    return {
        (sample.labels["method"], sample.labels["code"])
        for metric in REGISTRY.collect()
        if metric.name == "imgsearch_requests"
        for sample in metric.samples
        if sample.name == "imgsearch_requests_total" and sample.labels["service"] == service
    }


def test_refused_calls_to_invented_methods_add_no_metric_series(gateway):
    before = series("gateway")
    with grpc.insecure_channel(gateway.target) as channel:
        for start in range(0, 10_000, 250):
            calls = []
            for i in range(start, start + 250):
                service = ("SearchService", "FeedbackService")[i % 2]
                package = ("search", "feedback")[i % 2]
                method = f"/imgsearch.{package}.v1.{service}/{secrets.token_hex(6)}"
                metadata = () if i % 3 else bearer("nobody")
                calls.append(channel.unary_unary(method).future(b"", metadata=metadata))
            for call in calls:
                assert call.code() == grpc.StatusCode.UNAUTHENTICATED
    added = series("gateway") - before
    assert added <= {("other", "UNAUTHENTICATED")}


def test_token_files_name_scopes_and_the_old_format_reads_as_search_only(tmp_path, caplog):
    from imgsearch.tokens import SCOPES, TokenFileError, TokenSet

    path = tmp_path / "tokens"
    path.write_text("# comment\n\nscoped-token search,feedback:write\nold-token\n")
    tokens = TokenSet.from_file(path)
    assert tokens.scopes(bearer("scoped")) == {"search", "feedback:write"}
    assert tokens.scopes((("authorization", "Bearer old-token"),)) == {"search"}
    assert "without scopes" in caplog.text and str(path) in caplog.text
    admin = TokenSet.from_file(path, "admin_tokens_file", legacy_scopes=("admin",))
    assert admin.scopes((("authorization", "Bearer old-token"),)) == {"admin"}
    assert tokens.scopes((("authorization", "Bearer scoped"),)) is None
    path.write_text("a-token search\nb-token feedback:erase\n")
    with pytest.raises(TokenFileError, match=r"line 2: unknown scope 'feedback:erase'"):
        TokenSet.from_file(path)
    assert set(SCOPES) == {"search", "feedback:write", "feedback:delete", "catalog:write", "admin"}


def test_the_gateway_refuses_a_public_address_without_tokens_or_client_certificates(
    loop_thread, artifact_root, tokens_file
):
    with pytest.raises(SecurityConfigError, match="--insecure-public"):
        Gateway(loop_thread, artifact_root, host="0.0.0.0")
    for opened in ({"insecure_public": True}, {"auth_tokens_file": str(tokens_file)}):
        served = Gateway(loop_thread, artifact_root, host="0.0.0.0", **opened)
        served.stop()


def test_serve_passes_insecure_public_to_the_gateway_as_a_flag():
    import argparse

    from imgsearch_tools.serve import add_serve_arguments, resolve_configs, serve_command

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    gateway = resolve_configs(parser.parse_args(["all", "--insecure-public"]))["gateway"]
    assert gateway.insecure_public is True
    assert "--insecure-public" in serve_command("gateway", gateway)
    closed = resolve_configs(parser.parse_args(["all"]))["gateway"]
    assert "--insecure-public" not in serve_command("gateway", closed)
