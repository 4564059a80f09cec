"""The JSON door against real servers: Search and LogConversions as JSON, errors, tokens, files."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.web.conftest import HOSTILE, RunningDoor, door_config


def call(url: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or bytes) of one request with the standard library."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method="POST" if data is not None else "GET",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, head, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, head, payload = exc.code, exc.headers, exc.read()
    if head.get("Content-Type", "").startswith("application/json"):
        return status, head, json.loads(payload)
    return status, head, payload


def test_search_answers_in_the_proto_json_mapping(door, web_stack):
    status, head, reply = call(
        door.url, "/v1/search", {"query": "red", "userId": "", "k": 5, "ranker": "RANKER_NONE"}
    )
    assert status == 200, reply
    assert len(reply["results"]) == 5
    first = reply["results"][0]
    assert {"photo_id", "score", "retrieval_score", "retrieval_source", "photo"} <= set(first)
    assert reply["ranker"] == "RANKER_NONE"
    assert set(reply["timings"]) == {"retrieval_ms", "ranking_ms", "total_ms"}
    assert head["Cache-Control"] == "no-store"
    # The same search over gRPC gives the same photos in the same order.
    from gateway.client import search

    direct = search(web_stack.target, "red", k=5, ranker="none")
    assert [r["photo_id"] for r in reply["results"]] == [r.photo_id for r in direct.results]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"query": ""}, "query"),
        ({"query": "red", "k": 5000}, "k"),
        ({"query": "red", "k": "many"}, "k"),
        ({"query": "red", "ranker": "RANKER_NOPE"}, "ranker"),
        ({"query": "red", "colour": "blue"}, "colour"),
        ({"query": 7}, "query"),
        ([1, 2], "body"),
    ],
)
def test_bad_search_input_is_400_naming_the_field(door, body, field):
    status, _, reply = call(door.url, "/v1/search", body)
    assert status == 400, reply
    error = reply["error"]
    assert error["code"] == 400
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["field"] == field
    violation = error["details"][0]["fieldViolations"][0]
    assert violation["field"] == field
    assert error["message"] == f"{field}: {violation['description']}"


def test_a_body_that_is_not_json_is_400_naming_the_body(door):
    status, _, reply = call(door.url, "/v1/search", raw=b"{not json")
    assert status == 400
    assert reply["error"]["field"] == "body"


def test_conversions_are_logged_and_their_user_is_offered_first(door, catalogue_photo_ids):
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
    # Each deployment's door logs into the same store: ids of its own (its port).
    events = [
        {"event_id": f"api-1-{door.port}", "user_id": "api-user",
         "photo_id": catalogue_photo_ids[0], "query": "red", "converted_at": now},
        {"event_id": f"api-2-{door.port}", "user_id": "api-user", "photo_id": "no-such-photo",
         "query": "red", "converted_at": now},
    ]  # fmt: skip
    status, _, reply = call(door.url, "/v1/conversions", {"events": events})
    assert status == 200, reply
    assert [r["status"] for r in reply["results"]] == [
        "EVENT_STATUS_STORED",
        "EVENT_STATUS_REJECTED",
    ]
    assert reply["results"][1]["rejection_reason"] == "REJECTION_REASON_UNKNOWN_PHOTO"
    status, _, users = call(door.url, "/v1/users?limit=5")
    assert status == 200
    assert users["users"][0]["user_id"] == "api-user"
    assert users["users"][0]["conversions"] == 1
    assert len(users["users"]) == 5
    assert all(u["source"] == "catalogue" for u in users["users"][1:])


@pytest.mark.parametrize(
    "events, field",
    [
        ([], "events"),
        ([{"event_id": "x", "converted_at": "yesterday"}], "events[0].converted_at"),
        ([{"event_id": "x"}, {"event_id": "y", "photo": "p"}], "events[1].photo"),
        ([{"event_id": "x" * 200, "user_id": "u"}], "events[0].event_id"),
    ],
)
def test_bad_conversions_are_400_naming_the_field(door, events, field):
    status, _, reply = call(door.url, "/v1/conversions", {"events": events})
    assert status == 400, reply
    assert reply["error"]["field"] == field


@pytest.mark.parametrize("limit", ["0", "abc", "100000"])
def test_a_bad_user_limit_is_400(door, limit):
    status, _, reply = call(door.url, f"/v1/users?limit={limit}")
    assert status == 400
    assert reply["error"]["field"] == "limit"


def test_images_of_known_photos_only(door, catalogue_photo_ids, web_data):
    photo_id = catalogue_photo_ids[1]
    status, head, body = call(door.url, f"/images/{photo_id}.jpg")
    assert status == 200
    assert head["Content-Type"] == "image/jpeg"
    assert body == (web_data / "images" / f"{photo_id}.jpg").read_bytes()
    # A file beside the images that no photo id names stays out of reach.
    (web_data / "images" / "secret.jpg").write_bytes(b"not a photo")
    for path in (
        "/images/secret.jpg",
        "/images/..%2Fphotos.tsv000.jpg",
        "/images/%2e%2e/photos.tsv000",
        "/images/../photos.tsv000",
        f"/images/{photo_id}.png",
    ):
        status, _, _ = call(door.url, path)
        assert status == 404, path


def test_page_and_its_files_carry_a_content_security_policy(door):
    for path in ("/", "/static/app.js", "/static/app.css", "/v1/choices", "/nowhere"):
        _, head, _ = call(door.url, path)
        policy = head["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy, path
        assert head["X-Content-Type-Options"] == "nosniff"
    status, _, page = call(door.url, "/")
    assert status == 200
    assert b'<script src="/static/app.js"' in page
    assert b"http://" not in page and b"https://" not in page  # nothing from elsewhere
    status, _, _ = call(door.url, "/static/../conftest.py")
    assert status == 404


def test_openapi_describes_every_endpoint_from_the_protos(door):
    status, _, spec = call(door.url, "/openapi.json")
    assert status == 200
    assert spec["openapi"].startswith("3.1")
    assert {"/v1/search", "/v1/conversions", "/v1/users", "/v1/choices"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    request = schemas["imgsearch.search.v1.SearchRequest"]["properties"]
    assert set(request) == {
        "user_id", "query", "k", "candidates_k", "retriever", "ranker", "recent_photo_ids", "filter"
    }  # fmt: skip
    assert "RANKER_ALS" in request["ranker"]["enum"]
    event = schemas["imgsearch.feedback.v1.ConversionEvent"]["properties"]
    assert event["converted_at"] == {"type": "string", "format": "date-time"}


def test_hostile_catalogue_text_comes_back_as_data(door, hostile_query):
    status, _, reply = call(
        door.url, "/v1/search", {"query": hostile_query, "k": 10, "ranker": "RANKER_NONE"}
    )
    assert status == 200
    assert HOSTILE in [r["photo"]["description"] for r in reply["results"]]


def test_tokens_guard_the_data_paths_and_reach_the_gateway(
    loop_thread, web_stack, web_artifacts, web_data, tmp_path
):
    tokens = tmp_path / "tokens"
    tokens.write_text("# web\nsecret-token-1\nwriter-token-2 search feedback:write\n")
    config = door_config(web_stack, web_artifacts, web_data, auth_tokens_file=str(tokens))
    running = RunningDoor(loop_thread, config)
    try:
        status, head, reply = call(running.url, "/v1/search", {"query": "red"})
        assert status == 401
        assert reply["error"]["status"] == "UNAUTHENTICATED"
        assert head["WWW-Authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer nope"}
        assert call(running.url, "/v1/users", headers=wrong)[0] == 401
        assert call(running.url, "/images/x.jpg")[0] == 401
        # The page itself holds no data and no token: it loads, then asks for one.
        status, _, page = call(running.url, "/")
        assert status == 200 and b"secret-token-1" not in page
        good = {"Authorization": "Bearer secret-token-1"}
        status, _, reply = call(running.url, "/v1/search", {"query": "red", "k": 3}, good)
        assert status == 200 and len(reply["results"]) == 3
        # Least privilege: a token of the older format grants `search` alone, so it may not
        # log conversions; one with `feedback:write` gets past the door's check.
        events = {"events": [{"user_id": "u", "photo_id": "p", "keyword": "red"}]}
        status, _, reply = call(running.url, "/v1/conversions", events, good)
        assert status == 403 and reply["error"]["status"] == "PERMISSION_DENIED"
        writer = {"Authorization": "Bearer writer-token-2"}
        assert call(running.url, "/v1/conversions", events, writer)[0] != 403
    finally:
        running.stop()


def test_gateway_errors_keep_their_code(loop_thread, web_stack, web_artifacts, web_data):
    from imgsearch.security import ClientSecurity

    config = door_config(web_stack, web_artifacts, web_data, gateway_addr="127.0.0.1:1")
    running = RunningDoor(loop_thread, config, ClientSecurity())
    try:
        status, _, reply = call(running.url, "/v1/search", {"query": "red"})
        assert status == 503
        assert reply["error"]["status"] == "UNAVAILABLE"
    finally:
        running.stop()


@pytest.fixture(scope="module")
def catalogue_photo_ids(web_artifacts) -> list[str]:
    import pandas as pd

    from imgsearch import artifacts

    catalogue_dir = artifacts.resolve(web_artifacts).file(artifacts.CATALOGUE_DIR)
    return pd.read_parquet(catalogue_dir / "photos.parquet")["photo_id"].tolist()


def test_https_with_client_certificates_as_the_gateway_reads_them(
    loop_thread, web_stack, web_artifacts, web_data, tmp_path
):
    import ssl

    from imgsearch_tools.certs import (
        CA_CERT,
        CLIENT_CERT,
        CLIENT_KEY,
        SERVER_CERT,
        SERVER_KEY,
        write_dev_certs,
    )

    certs = tmp_path / "certs"
    write_dev_certs(certs)
    config = door_config(
        web_stack,
        web_artifacts,
        web_data,
        tls_cert=str(certs / SERVER_CERT),
        tls_key=str(certs / SERVER_KEY),
        tls_client_ca=str(certs / CA_CERT),
    )
    running = RunningDoor(loop_thread, config)
    try:
        assert running.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(certs / CA_CERT))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(running.url + "v1/choices", timeout=10, context=trusting)
        trusting.load_cert_chain(str(certs / CLIENT_CERT), str(certs / CLIENT_KEY))
        request = urllib.request.Request(
            running.url + "v1/search",
            data=json.dumps({"query": "red", "k": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10, context=trusting) as response:
            assert len(json.loads(response.read())["results"]) == 2
    finally:
        running.stop()


def test_a_half_tls_setting_fails_at_start_naming_it(web_stack, web_artifacts, web_data):
    from imgsearch.security import SecurityConfigError
    from imgsearch_tools.web.commands import ssl_context

    config = door_config(web_stack, web_artifacts, web_data, tls_cert="cert.pem")
    with pytest.raises(SecurityConfigError, match="tls_cert and tls_key go together"):
        ssl_context(config)


def test_wrong_method_and_oversized_body_are_json_errors(door):
    status, _, reply = call(door.url, "/v1/search")  # a GET
    assert status == 405
    assert reply["error"]["status"] == "UNIMPLEMENTED"
    big = json.dumps({"query": "red", "user_id": "x" * (2 << 20)}).encode()
    status, _, reply = call(door.url, "/v1/search", raw=big)
    assert status == 400
    assert reply["error"]["field"] == "body"


def test_the_command_prints_its_address_serves_and_stops_on_sigterm(tmp_path):
    """`imgsearch web` as a process: the address it prints answers; SIGTERM ends it cleanly."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "imgsearch_tools.cli", "web", "--port", "0", "--target",
         "127.0.0.1:1", "--artifacts", "", "--log-level", "WARNING"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        found = re.search(r"web page at (http://127\.0\.0\.1:\d+/)", line)
        assert found, line
        status, _, spec = call(found.group(1), "/openapi.json")
        assert status == 200 and spec["info"]["title"] == "imgsearch JSON door"
        status, _, reply = call(found.group(1), "/v1/search", {"query": "red"})
        assert status == 503  # nothing listens where the gateway should be
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
