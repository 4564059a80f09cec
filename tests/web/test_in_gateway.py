"""The door inside the gateway's process: the gateway's own tokens, checks, errors and deadline."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys

import grpc
import pytest

from tests.conftest import Stack
from tests.web.conftest import RunningDoor, door_config, in_gateway
from tests.web.test_api import call

SEARCH_ONLY = "search-only-token"
WRITER = "writer-token"


@pytest.fixture(scope="module")
def guarded_stack(loop_thread, web_artifacts, tmp_path_factory):
    """A gateway whose port asks for scoped tokens, with its stages and a fresh store."""
    folder = tmp_path_factory.mktemp("in-gateway")
    tokens = folder / "tokens"
    tokens.write_text(f"{SEARCH_ONLY} search\n{WRITER} search feedback:write\n")
    stack = Stack(
        loop_thread,
        web_artifacts,
        store={"conversions_db": str(folder / "conversions.sqlite3")},
        auth_tokens_file=str(tokens),
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def inside(loop_thread, guarded_stack, web_artifacts, web_data):
    """The door on the guarded gateway's loop, calling its servicers in-process."""
    config = door_config(guarded_stack, web_artifacts, web_data)
    running = RunningDoor(loop_thread, config, gateway=in_gateway(guarded_stack))
    yield running
    running.stop()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_search_through_the_gateway_in_its_process(inside, guarded_stack):
    from gateway.client import search
    from imgsearch.security import ClientSecurity

    status, _, reply = call(
        inside.url, "/v1/search", {"query": "red", "k": 4, "ranker": "RANKER_ALS"}, bearer(WRITER)
    )
    assert status == 200, reply
    assert len(reply["results"]) == 4
    assert reply["artifact_versions"]["gateway"]
    # The same answer as a gRPC call on the gateway's port with the same token.
    security = ClientSecurity(token_file=guarded_stack.gateway_config.auth_tokens_file)
    direct = search(guarded_stack.target, "red", k=4, ranker="als", security=security)
    assert [r["photo_id"] for r in reply["results"]] == [r.photo_id for r in direct.results]


@pytest.mark.parametrize(
    "body, field",
    [({"query": "red", "candidates_k": 5000}, "candidates_k"), ({"query": " "}, "query")],
)
def test_the_gateways_own_checks_answer_400_naming_the_field(inside, body, field):
    status, _, reply = call(inside.url, "/v1/search", body, bearer(SEARCH_ONLY))
    assert status == 400, reply
    assert reply["error"]["status"] == "INVALID_ARGUMENT"
    assert reply["error"]["field"] == field
    assert reply["error"]["details"][0]["fieldViolations"][0]["field"] == field


def test_tokens_are_the_gateways_with_their_scopes(inside, guarded_stack):
    from imgsearch.serving.auth import read_tokens

    status, head, reply = call(inside.url, "/v1/search", {"query": "red"})
    assert status == 401 and head["WWW-Authenticate"] == "Bearer"
    assert call(inside.url, "/v1/search", {"query": "red"}, bearer("nope"))[0] == 401
    events = {"events": [{"event_id": "in-1", "user_id": "u", "photo_id": "p", "query": "red"}]}
    status, _, reply = call(inside.url, "/v1/conversions", events, bearer(SEARCH_ONLY))
    assert status == 403 and reply["error"]["status"] == "PERMISSION_DENIED"
    status, _, reply = call(inside.url, "/v1/conversions", events, bearer(WRITER))
    # Past the token check, the gateway judges the event itself (it has no time).
    assert status == 200 and reply["results"][0]["status"] == "EVENT_STATUS_REJECTED"
    # The port's tokens as they are now: a file re-read (SIGHUP) applies to the door at once.
    interceptor = guarded_stack.gateway.interceptor
    kept = interceptor.tokens
    rotated = guarded_stack.gateway_config.auth_tokens_file + ".rotated"
    with open(rotated, "w") as f:
        f.write("rotated-token search\n")
    interceptor.tokens = read_tokens(rotated, "auth_tokens_file")
    try:
        assert call(inside.url, "/v1/search", {"query": "red"}, bearer(WRITER))[0] == 401
        assert call(inside.url, "/v1/search", {"query": "red"}, bearer("rotated-token"))[0] == 200
    finally:
        interceptor.tokens = kept


def test_a_call_past_its_deadline_is_deadline_exceeded(loop_thread):
    """The context's deadline bounds the servicer, as a stub's timeout bounds a call."""
    from imgsearch.search.v1 import search_service_pb2 as pb
    from imgsearch.serving.interceptor import ServiceInterceptor
    from imgsearch_tools.web.gateways import SEARCH_METHOD
    from imgsearch_tools.web.in_process import InProcessMethod

    seen = {}

    async def slow_search(request, context):
        seen["remaining"] = context.time_remaining()
        await asyncio.sleep(5)
        return pb.SearchResponse()

    service = SEARCH_METHOD.split("/")[1]
    method = InProcessMethod(
        ServiceInterceptor("test", {service}),
        SEARCH_METHOD,
        slow_search,
        pb.SearchRequest,
        pb.SearchResponse,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        loop_thread.run(method(pb.SearchRequest(query="red"), timeout=0.2))
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < seen["remaining"] <= 0.2


def test_serve_gateway_with_a_web_port_prints_the_page_and_stops_on_sigterm(web_artifacts):
    """`imgsearch serve gateway --web-port 0`: the page it prints answers; SIGTERM ends both."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgsearch_tools.cli", "serve", "gateway", "--port", "0",
         "--admin-port", "0", "--web-port", "0", "--artifacts", str(web_artifacts),
         "--retrieval-addr", "127.0.0.1:1", "--ranking-addr", "127.0.0.1:1",
         "--log-level", "WARNING"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        found = None
        for line in proc.stderr:
            found = re.search(r"web page at (http://127\.0\.0\.1:\d+/)", line)
            if found:
                break
        assert found, "no page address printed"
        status, _, spec = call(found.group(1), "/openapi.json")
        assert status == 200 and spec["info"]["title"] == "imgsearch JSON door"
        status, _, reply = call(found.group(1), "/v1/search", {"query": "red"})
        assert status == 503 and reply["error"]["status"] == "UNAVAILABLE"  # no retrieval
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
