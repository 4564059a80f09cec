"""The load benchmark against real servers, and a reflection-only client the way ghz calls."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from imgsearch_tools.bench import load as bench
from imgsearch_tools.bench.in_process import InProcessPipeline
from imgsearch_tools.bench.processes import free_port
from imgsearch_tools.bench.queries import (
    BenchQuery,
    is_unique,
    query_mix,
    read_query_file,
    sample_queries,
)
from imgsearch_tools.bench.reflection_check import reflection_client_check, resolve_method
from imgsearch_tools.cli import main
from imgsearch_tools.results_page import parse_header


@pytest.fixture(scope="module")
def queries(artifact_root):
    return sample_queries(artifact_root, n=60, seed=3)


def assert_consistent(result: dict) -> None:
    """Counts add up and percentiles are ordered."""
    assert result["sent"] == result["completed"]
    assert result["completed"] == result["ok"] + result["error_count"]
    assert sum(result["codes"].values()) == result["completed"]
    assert result["error_count"] == sum(result["errors"].values())
    assert result["full"] + result["degraded"] == result["ok"]
    timeline = result["timeline"]
    assert sum(r["full"] + r["degraded"] + r["errors"] for r in timeline) == result["completed"]
    latency = result["latency_ms"]
    if result["ok"]:
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    else:
        assert set(latency.values()) == {None}


def test_sampled_queries_are_real_users_and_keywords(queries, catalogue):
    users = set(catalogue.users["anonymous_user_id"])
    keywords = set(catalogue.conversions["keyword"])
    assert len(queries) == 60
    assert all(q.user_id in users and q.query in keywords for q in queries)


def test_sampling_is_deterministic_for_a_seed(artifact_root, queries):
    assert sample_queries(artifact_root, n=60, seed=3) == queries
    assert sample_queries(artifact_root, n=60, seed=4) != queries


def test_a_share_of_queries_is_made_unique_and_never_repeats(queries):
    catalogue_texts = {q.query for q in queries}
    mixed = query_mix(queries, 100, 0.2)
    unique = [q for q in mixed if q.query not in catalogue_texts]
    assert len(unique) == 20 and len({q.query for q in unique}) == 20
    assert [is_unique(i, 0.2) for i in range(5)] == [False] * 4 + [True]  # evenly spread
    assert all(q.query.split()[0] in catalogue_texts for q in unique)  # a real keyword first
    assert {q.user_id for q in unique} <= {q.user_id for q in queries}
    again = query_mix(queries, 100, 1.0)
    assert not {q.query for q in again} & {q.query for q in mixed}  # none sent twice
    assert query_mix(queries, 60, 0.0) == queries
    with pytest.raises(ValueError, match="unique share"):
        bench.LoadSpec(target="x", qps=1, unique_share=1.5)


def test_queries_from_a_file_take_the_sampled_users(queries, tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("red circle\n\n  blue star at night \n")
    read = read_query_file(path, queries)
    assert [q.query for q in read] == ["red circle", "blue star at night"]
    assert [q.user_id for q in read] == [queries[0].user_id, queries[1].user_id]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no query"):
        read_query_file(path, queries)


def test_bench_sends_unique_queries(stack, artifact_root, tmp_path):
    report = tmp_path / "unique.json"
    argv = ["bench", "--target", stack.target, "--qps", "20", "--duration", "0.5", "--warmup",
            "0", "--artifacts", str(artifact_root), "--in-process-requests", "5", "--json",
            str(report)]  # fmt: skip
    assert main([*argv, "--queries", "unique"]) == 0
    written = json.loads(report.read_text())
    result = written["result"]
    assert_consistent(result)
    assert result["ok"] == result["sent"] == 10 and result["unique_share"] == 1.0
    assert result["load"] == "open 20 qps, unique queries"
    assert written["in_process"]["requests"] == 5
    assert main([*argv, "--queries", str(tmp_path / "missing.txt")]) == 2


def test_open_loop_sends_on_the_clock_and_counts_every_reply(stack, queries):
    spec = bench.LoadSpec(
        stack.target, qps=40, duration_s=1.0, warmup_s=0.2, k=5, candidates_k=50, channels=2
    )
    result = stack.lt.run(bench.run_load(spec, queries))
    assert_consistent(result)
    assert result["mode"] == "open"
    assert result["sent"] == 40
    assert result["error_count"] == 0
    assert result["degraded"] == 0
    assert result["results_per_response"] == {"5": result["ok"]}
    sched = result["latency_from_schedule_ms"]
    assert sched["p50"] >= result["latency_ms"]["p50"] - 1e-6
    assert 0 <= result["late_sends"] <= result["sent"]
    versions = list(result["artifact_versions"])
    assert len(versions) == 1 and "ranking=" in versions[0]


def test_closed_loop_workers_wait_for_their_replies(stack, queries):
    spec = bench.LoadSpec(
        stack.target, concurrency=3, duration_s=0.8, warmup_s=0.1, ranker="none", channels=1
    )
    result = stack.lt.run(bench.run_load(spec, queries))
    assert_consistent(result)
    assert result["mode"] == "closed"
    assert result["ok"] >= 3
    assert result["error_count"] == 0
    assert "latency_from_schedule_ms" not in result


def test_nothing_listening_counts_unavailable_without_crashing(loop_thread, queries):
    target = f"127.0.0.1:{free_port()}"
    open_spec = bench.LoadSpec(target, qps=20, duration_s=0.5, warmup_s=0)
    result = loop_thread.run(bench.run_load(open_spec, queries))
    assert_consistent(result)
    assert result["codes"] == {"UNAVAILABLE": 10}
    assert result["ok"] == 0 and result["achieved_qps"] == 0
    closed_spec = bench.LoadSpec(target, concurrency=2, duration_s=0.3, warmup_s=0)
    result = loop_thread.run(bench.run_load(closed_spec, queries))
    assert_consistent(result)
    assert set(result["codes"]) == {"UNAVAILABLE"}


def test_in_process_pipeline_returns_what_the_servers_return(stack, artifact_root, queries):
    from gateway.client import search

    pipeline = InProcessPipeline(artifact_root)
    for query in queries[:5]:
        ids, _, _ = pipeline.search(query, "keyword", "als", 5, 50)
        served = search(
            stack.target, query.query, query.user_id, k=5, candidates_k=50, ranker="als"
        )
        assert ids == [r.photo_id for r in served.results]
    measured = pipeline.measure(queries[:20], "keyword", "als", 5, 50, warmup=2)
    latency = measured["latency_ms"]
    assert measured["requests"] == 20
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    with pytest.raises(ValueError, match="two_step"):
        pipeline.measure(queries[:2], "keyword", "two_step")


def test_reflection_only_client_calls_search_without_generated_code(stack, queries):
    """What ghz does without --proto: method symbol -> descriptors -> dynamic messages."""
    spec = bench.LoadSpec(stack.target, concurrency=1, k=5, candidates_k=50)
    requests = [bench.request_fields(q, spec) for q in queries[:8]]
    script = f"""
import json, sys
import grpc
from google.protobuf import json_format
from imgsearch_tools.bench.reflection_check import resolve_method, reflection_client_check

with grpc.insecure_channel({stack.target!r}) as channel:
    path, request_class, response_class = resolve_method(channel)
    call = channel.unary_unary(
        path,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = json_format.ParseDict({requests[0]!r}, request_class())
    reply = call(request, timeout=10)
response = json_format.MessageToDict(reply, preserving_proto_field_name=True)
check = reflection_client_check({stack.target!r}, {requests!r})
generated = sorted(m for m in sys.modules if m.startswith("imgsearch.search"))
print(json.dumps({{"path": path, "response": response, "check": check, "generated": generated}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["generated"] == []
    assert out["path"] == "/imgsearch.search.v1.SearchService/Search"
    assert len(out["response"]["results"]) == 5
    assert out["response"]["ranker"] == "RANKER_ALS"
    check = out["check"]
    assert check["calls"] == check["ok"] == 8
    assert check["errors"] == {} and check["empty_responses"] == 0


def test_reflection_reports_an_unknown_method(stack):
    with grpc.insecure_channel(stack.target) as channel:
        with pytest.raises(LookupError, match="NoSuchMethod"):
            resolve_method(channel, "imgsearch.search.v1.SearchService.NoSuchMethod")


def test_bench_command_writes_json_and_fails_when_nothing_answers(artifact_root, tmp_path):
    report = tmp_path / "bench.json"
    status = main(
        [
            "bench",
            "--target",
            f"127.0.0.1:{free_port()}",
            "--qps",
            "20",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--artifacts",
            str(artifact_root),
            "--no-in-process",
            "--json",
            str(report),
        ]
    )
    assert status == 1
    written = json.loads(report.read_text())
    assert written["result"]["errors"] == {"UNAVAILABLE": 6}
    assert written["machine"]["cpu_count"] >= 1
    assert written["e2e_over_in_process_p50"] is None


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_bench_suite_runs_services_scenarios_and_a_hot_reload(artifact_root, tmp_path, tls):
    """Three `imgsearch serve` processes; with --tls every link is TLS (mutual between
    gateway and stages) and every search carries the token, reflection and reload included."""
    out = tmp_path / "bench"
    tls_flags = []
    if tls:
        from imgsearch_tools.certs import write_dev_certs

        write_dev_certs(tmp_path / "certs")
        tls_flags = ["--tls", str(tmp_path / "certs")]
    # The door inside the gateway under TLS (mutual, with the token); `imgsearch web` plain.
    deployment = "in-gateway" if tls else "standalone"
    status = main(
        [
            "bench-suite",
            *tls_flags,
            "--artifacts",
            str(artifact_root),
            "--out",
            str(out),
            "--no-build",
            "--only",
            "keyword+als closed c=1,json-door,reflection,reload",
            "--json-qps",
            "30",
            "--json-rounds",
            "1",
            "--json-duration",
            "0.5",
            "--json-door-deployment",
            deployment,
            "--duration",
            "0.5",
            "--warmup",
            "0.1",
            "--fault-qps",
            "30",
            "--reload-duration",
            "3",
            "--requests",
            "100",
            "--in-process-requests",
            "20",
            "--results-page",
            str(tmp_path / "site" / "bench.md"),
        ]
    )
    assert status == 0
    report = json.loads((out / "bench.json").read_text())
    page = (tmp_path / "site" / "bench.md").read_text()
    assert parse_header(page).command.startswith("imgsearch bench-suite")
    assert "| keyword+als closed c=1 |" in page
    (run,) = report["scenarios"]
    assert run["name"] == "keyword+als closed c=1"
    assert_consistent(run)
    assert run["error_count"] == 0 and run["ok"] > 0
    assert run["e2e_over_in_process_p50"] > 0
    assert set(run["cpu_percent"]) >= {"gateway", "retrieval", "ranking"}
    assert run["other_processes_cores"] >= 0
    assert all(r["p50_ms"] <= r["p99_ms"] for r in run["timeline"] if r["full"] + r["degraded"])
    cost = run["cpu_ms_per_search"]
    assert cost["total"] == pytest.approx(sum(v for k, v in cost.items() if k != "total"), abs=0.01)
    assert report["reflection_client"]["ok"] == report["reflection_client"]["calls"] > 0
    # The JSON door: the same searches over HTTP through the door (HTTPS with the token under
    # --tls) and over gRPC into the same gateway, every one answered.
    door = report["json_door"]
    assert door["deployment"] == deployment
    door_process = "gateway" if tls else "web"
    assert [r["path"] for r in door["runs"]] == ["grpc", "http"]
    for door_run in door["runs"]:
        assert_consistent(door_run)
        assert door_run["error_count"] == 0 and door_run["ok"] > 0
        # The same requests on both paths: the same numbers of results came back.
        assert door_run["results_per_response"] == door["runs"][0]["results_per_response"]
    assert door["runs"][1]["cpu_percent"][door_process] > 0
    assert ("web" in door["runs"][1]["cpu_percent"]) == (not tls)
    # One round (--json-rounds 1): its added p99 is the median.
    assert door["rounds_p99_added_ms"] == [door["p99_added_ms"]]
    assert door["p99_added_ms"] == pytest.approx(
        door["paths"]["http"]["p99_ms"] - door["paths"]["grpc"]["p99_ms"], abs=0.002
    )
    assert door["paths"]["http"]["cpu_ms_per_search"][door_process] > 0
    assert len(door["load_average"]["start"]) == 3
    reload = report["hot_reload"]
    assert_consistent(reload)
    assert reload["failed_requests"] == 0
    assert reload["responses_on_new_version"] > 0
    assert set(report["exit_codes"].values()) == {0}
    markdown = (out / "bench.md").read_text()
    assert "| keyword+als closed c=1 |" in markdown
    assert "Failed requests: 0" in markdown
    assert "### JSON door" in markdown and "the door adds" in markdown
    assert ("inside the gateway's process" in markdown) == tls
    assert report["settings"]["tls"] == tls
    assert ("mutual TLS between gateway and stages" in markdown) == tls
    assert report["machine"]["cpu_model"] in markdown
    ghz_data = json.loads((out / "ghz-data.json").read_text())
    assert ghz_data[0]["ranker"] == "RANKER_ALS" and ghz_data[0]["query"]


def test_the_shipped_ghz_config_resolves_and_calls_with_zero_errors(stack):
    """bench/ghz.json's call and data, sent the way ghz sends them with reflection only."""
    from pathlib import Path

    config = json.loads((Path(__file__).parents[1] / "bench" / "ghz.json").read_text())
    check = reflection_client_check(stack.target, config["data"], symbol=config["call"])
    assert check["ok"] == len(config["data"]) and check["errors"] == {}


def test_an_unloadable_set_skips_the_in_process_baseline_but_keeps_the_figures(tmp_path):
    from imgsearch_tools.bench.scenarios import add_in_process

    run = {"retriever": "keyword", "ranker": "als", "k": 10, "candidates_k": 100}
    report = {"scenarios": [{**run, "latency_ms": {"p50": 5.0}}]}
    add_in_process(report, tmp_path / "missing", [BenchQuery("u", "red")])
    (measured,) = report["scenarios"]
    assert "cannot load" in measured["in_process"]["skipped"]
    assert measured["e2e_over_in_process_p50"] is None


def test_bench_suite_says_which_service_could_not_load_the_set(artifact_root, tmp_path, capsys):
    import shutil

    from imgsearch import artifacts

    broken = tmp_path / "broken-root"
    shutil.copytree(artifacts.resolve(artifact_root).path, broken / "sets" / "v1")
    shutil.rmtree(broken / "sets" / "v1" / artifacts.RANKERS_DIR / "als")
    artifacts.publish(broken, broken / "sets" / "v1")
    status = main(
        ["bench-suite", "--artifacts", str(broken), "--out", str(tmp_path / "out"), "--no-build"]
    )
    assert status == 1
    assert "ranking exited with code" in capsys.readouterr().err
