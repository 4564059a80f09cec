"""The compiled load generator: built from its Go source, driving the real bare chain.

The tests that run it need Debian's golang-go and golang-google-grpc-dev (``.ci/run`` installs
them); without them they skip, naming what to install, unless ``CI=true``: then they fail. The
tests of what needs no Go always run.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from imgsearch_tools.bench import go_load
from imgsearch_tools.bench import load as bench
from imgsearch_tools.bench.bare_chain import TIERS, BareChain, write_payloads
from imgsearch_tools.bench.processes import LOADGEN, CpuMeter, free_port
from imgsearch_tools.bench.queries import sample_queries


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    try:
        return go_load.build(tmp_path_factory.mktemp("loadgen-cache"))
    except go_load.GoUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the compiled load generator cannot be built: {exc}")
        pytest.skip(f"the compiled load generator cannot be built here: {exc}")


@pytest.fixture(scope="module")
def queries(artifact_root):
    return sample_queries(artifact_root, n=50, seed=1)


@pytest.fixture(scope="module")
def chain(artifact_root, tmp_path_factory):
    """The bare chain, its gateway answering a degraded search (to read the flag back)."""
    from imgsearch.search.v1 import search_service_pb2 as pb

    folder = tmp_path_factory.mktemp("bare-chain")
    payloads = write_payloads(artifact_root, folder / "payloads")
    answer = payloads / "search_response.bin"
    response = pb.SearchResponse.FromString(answer.read_bytes())
    response.degraded = True
    response.degraded_reason = "ranking timed out after 312 ms"
    answer.write_bytes(response.SerializeToString())
    chain = BareChain(payloads, folder / "logs")
    chain.start_all()
    yield chain
    chain.stop_all()


def run(spec, queries, binary, meter=None):
    start = meter.start if meter is not None else None
    return asyncio.run(go_load.run_load(spec, queries, start, binary=binary))


def test_closed_loop_reads_the_replies_and_counts_its_own_cpu(binary, chain, queries):
    spec = bench.LoadSpec(
        target=chain.address("gateway"),
        concurrency=2,
        duration_s=0.5,
        warmup_s=0.1,
        load_generator="go",
    )
    meter = CpuMeter(chain)
    result = run(spec, queries, binary, meter)
    meter.record(result)
    ok = result["ok"]
    assert ok > 0 and result["error_count"] == 0 and result["sent"] == result["completed"]
    assert result["results_per_response"] == {"10": ok}
    # The flag and the reason of every reply, read from its bytes by field number.
    assert result["degraded"] == ok and result["full"] == 0
    assert result["degraded_reasons"] == {"ranking timed out after N ms": ok}
    assert result["latency_ms"]["p50"] > 0
    assert sum(s["degraded"] for s in result["timeline"]) == ok
    cost = result["cpu_ms_per_search"]
    assert all(cost[tier] > 0 for tier in TIERS)
    # The load generator's CPU is the Go process's, not this one's (which only waited).
    assert result["loadgen_cpu_s"] > 0
    assert cost[LOADGEN] == pytest.approx(1000 * result["loadgen_cpu_s"] / ok, abs=0.002)
    assert result["load"] == "closed c=2 from Go"


def test_open_loop_sends_on_the_clock(binary, chain, queries):
    spec = bench.LoadSpec(
        target=chain.address("gateway"), qps=100, duration_s=0.5, warmup_s=0.1, load_generator="go"
    )
    result = run(spec, queries, binary)
    assert result["sent"] == 50 and result["ok"] == 50
    assert result["latency_from_schedule_ms"]["p50"] >= result["latency_ms"]["p50"] > 0


def test_a_server_that_is_not_there_is_counted_by_status_code(binary, queries):
    spec = bench.LoadSpec(
        target=f"127.0.0.1:{free_port()}",
        concurrency=1,
        duration_s=0.3,
        warmup_s=0,
        load_generator="go",
    )
    result = run(spec, queries, binary)
    assert result["ok"] == 0 and result["completed"] > 0
    assert result["errors"] == {"UNAVAILABLE": result["completed"]}


def test_the_build_is_reused_until_the_source_changes(binary):
    built = binary.stat().st_mtime_ns
    assert go_load.build(binary.parent) == binary
    assert binary.stat().st_mtime_ns == built
    assert binary.name.startswith("loadgen-")


# ------------------------------------------------------------------------- without Go
def test_without_go_the_error_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(go_load.GoUnavailable, match="apt install golang-go"):
        go_load.build(tmp_path)
    said = []
    assert go_load.resolve("auto", tmp_path, said.append) == "python"
    assert "using the Python one" in said[0]
    assert go_load.resolve("python", tmp_path, said.append) == "python"
    with pytest.raises(go_load.GoUnavailable):
        go_load.resolve("go", tmp_path, said.append)
    with pytest.raises(ValueError, match="one of auto, go, python"):
        go_load.resolve("rust", tmp_path, said.append)


def test_the_request_file_holds_every_unique_query_a_run_sends(tmp_path, queries):
    from imgsearch.search.v1 import search_service_pb2 as pb

    spec = bench.LoadSpec(
        target="", qps=200, duration_s=1.0, warmup_s=0.5, unique_share=1.0, load_generator="go"
    )
    path = tmp_path / "requests.bin"
    n = go_load.write_requests(path, spec, queries)
    assert n == 301  # 200/s over 1.5 s, and one spare
    data, sent = path.read_bytes(), []
    while data:
        size = int.from_bytes(data[:4], "little")
        sent.append(pb.SearchRequest.FromString(data[4 : 4 + size]))
        data = data[4 + size :]
    assert len(sent) == n and len({r.query for r in sent}) == n
    assert {r.user_id for r in sent} <= {q.user_id for q in queries}
    assert all(r.k == spec.k and r.candidates_k == spec.candidates_k for r in sent)
    # Without unique queries the sample itself, cycled by the load generator.
    same = bench.LoadSpec(target="", concurrency=2, load_generator="go")
    assert go_load.write_requests(path, same, queries) == len(queries)


def test_tls_and_lists_of_gateways_are_refused_before_anything_starts(queries, tmp_path):
    from imgsearch.security import ClientSecurity

    spec = bench.LoadSpec(target="127.0.0.1:1", concurrency=1, load_generator="go")
    with pytest.raises(ValueError, match="plaintext only"):
        asyncio.run(go_load.run_load(spec, queries, security=ClientSecurity(ca="ca.pem")))
    listed = bench.LoadSpec(target="127.0.0.1:1,127.0.0.1:2", concurrency=1, load_generator="go")
    with pytest.raises(ValueError, match="one gateway"):
        asyncio.run(go_load.run_load(listed, queries, binary=tmp_path / "unused"))
    # The Python load generator never sends a load meant for Go.
    with pytest.raises(ValueError, match="go_load.send_load"):
        asyncio.run(bench.run_load(spec, queries))
    with pytest.raises(ValueError, match="python or go"):
        bench.LoadSpec(target="", concurrency=1, load_generator="rust")


def test_the_floor_section_sends_both_sides_from_go(binary, artifact_root, tmp_path, monkeypatch):
    import json

    from imgsearch_tools.cli import main

    monkeypatch.setattr(go_load, "default_cache", lambda: binary.parent)
    out = tmp_path / "bench"
    args = ["bench-suite", "--artifacts", str(artifact_root), "--out", str(out), "--no-build"]
    args += ["--only", "floor", "--duration", "0.5", "--warmup", "0.1", "--requests", "50"]
    assert main(args + ["--in-process-requests", "10", "--floor-load-generator", "go"]) == 0
    floor = json.loads((out / "bench.json").read_text())["floor"]
    assert floor["load_generator"] == "go"
    for key in ("chain", "imgsearch", "chain_at_imgsearch_rate"):
        assert floor[key]["error_count"] == 0 and floor[key]["completed"] > 0
        assert floor[key]["loadgen_cpu_ms_per_search"] > 0
        assert all(r["cpu_ms_per_search"]["total"] > 0 for r in floor[key]["rounds"])
    assert "the compiled grpc-go client" in (out / "bench.md").read_text()


def test_bench_sends_from_go_to_a_real_gateway(binary, stack, artifact_root, tmp_path, monkeypatch):
    import json

    from imgsearch_tools.cli import main

    monkeypatch.setattr(go_load, "default_cache", lambda: binary.parent)
    report = tmp_path / "go.json"
    argv = ["bench", "--target", stack.target, "--qps", "20", "--duration", "0.5", "--warmup",
            "0", "--artifacts", str(artifact_root), "--no-in-process", "--json", str(report),
            "--queries", "unique", "--load-generator", "go"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(report.read_text())["result"]
    assert result["load"] == "open 20 qps from Go, unique queries"
    assert result["ok"] == result["sent"] == 10 and result["error_count"] == 0
    assert result["degraded"] == 0 and result["results_per_response"] == {"10": 10}
    assert result["loadgen_cpu_s"] > 0
