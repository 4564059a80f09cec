"""The bare gRPC chain: real payloads, three real server processes, CPU read from them."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from imgsearch_tools.bench import load as bench
from imgsearch_tools.bench.bare_chain import TIERS, BareChain, write_payloads
from imgsearch_tools.bench.processes import LOADGEN, CpuMeter
from imgsearch_tools.bench.queries import sample_queries
from imgsearch_tools.cli import main


@pytest.fixture(scope="module")
def chain(artifact_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bare-chain")
    chain = BareChain(write_payloads(artifact_root, folder / "payloads"), folder / "logs")
    chain.start_all()
    yield chain
    chain.stop_all()


def test_payloads_have_the_real_shapes(artifact_root, tmp_path, catalogue):
    from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
    from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
    from imgsearch.search.v1 import search_service_pb2 as pb

    folder = write_payloads(artifact_root, tmp_path)
    retrieved = retr_pb.RetrieveResponse.FromString((folder / "retrieve_response.bin").read_bytes())
    ranked = rank_pb.RankResponse.FromString((folder / "rank_response.bin").read_bytes())
    found = pb.SearchResponse.FromString((folder / "search_response.bin").read_bytes())
    assert len(retrieved.photo_ids) == len(retrieved.scores) == 100
    assert len(retrieved.source_scores[0].scores) == 100
    assert set(retrieved.photo_ids) <= set(catalogue.photos["photo_id"])
    assert len(ranked.results) == 10 and len(found.results) == 10
    assert all(r.photo.url and r.photo.keywords for r in found.results)


def test_the_chain_answers_searches_and_its_cpu_comes_from_the_server_processes(chain, queries):
    spec = bench.LoadSpec(
        target=chain.address("gateway"), concurrency=2, duration_s=0.5, warmup_s=0.1
    )
    meter = CpuMeter(chain)
    result = asyncio.run(bench.run_load(spec, queries, on_measure_start=meter.start))
    meter.record(result)
    assert result["ok"] > 0 and result["error_count"] == 0
    assert result["results_per_response"] == {"10": result["ok"]}
    cost = result["cpu_ms_per_search"]
    assert all(cost[tier] > 0 for tier in TIERS)
    assert LOADGEN in cost
    # Busy CPU in this process (the load generator's) never shows in the servers' figures.
    before = chain.cpu_seconds()
    spun = time.process_time()
    while time.process_time() - spun < 0.5:
        pass
    after = chain.cpu_seconds()
    assert set(after) == set(TIERS)
    assert sum(after.values()) - sum(before.values()) < 0.25


def test_bench_suite_reports_the_chain_against_imgsearch(artifact_root, tmp_path):
    out = tmp_path / "bench"
    args = ["bench-suite", "--artifacts", str(artifact_root), "--out", str(out), "--no-build"]
    args += ["--only", "floor", "--duration", "0.5", "--warmup", "0.1", "--requests", "50"]
    args += ["--floor-load-generator", "python"]
    assert main(args + ["--in-process-requests", "10"]) == 0
    floor = json.loads((out / "bench.json").read_text())["floor"]
    for key in ("chain", "imgsearch"):
        side = floor[key]
        assert len(side["rounds"]) == floor["rounds"] >= 2
        assert side["error_count"] == 0 and side["completed"] > 0
        cpu = side["server_cpu_ms_per_search"]
        assert all(cpu[tier] > 0 for tier in TIERS)
        assert cpu["total"] == pytest.approx(sum(cpu[t] for t in TIERS), abs=0.01)
        pooled = (
            sum(r["cpu_ms_per_search"]["gateway"] * r["completed"] for r in side["rounds"])
            / side["completed"]
        )
        assert cpu["gateway"] == pytest.approx(pooled, abs=0.002)
    ratio = floor["cpu_ratio"]["total"]
    chain_total = floor["chain"]["server_cpu_ms_per_search"]["total"]
    imgsearch_total = floor["imgsearch"]["server_cpu_ms_per_search"]["total"]
    assert ratio == pytest.approx(imgsearch_total / chain_total, abs=0.01)
    # The chain once more, open loop at the rate imgsearch reached: the same-rate ratio.
    at_rate = floor["chain_at_imgsearch_rate"]
    assert at_rate["error_count"] == 0 and at_rate["completed"] > 0
    assert len(at_rate["rounds"]) == 1
    at_rate_total = at_rate["server_cpu_ms_per_search"]["total"]
    assert at_rate_total > 0
    assert floor["cpu_ratio_at_same_rate"] == pytest.approx(
        imgsearch_total / at_rate_total, abs=0.01
    )
    markdown = (out / "bench.md").read_text()
    assert "| bare chain |" in markdown and "| imgsearch / chain |" in markdown
    assert "| bare chain, open loop at imgsearch's QPS |" in markdown


@pytest.fixture(scope="module")
def queries(artifact_root):
    return sample_queries(artifact_root, n=50, seed=1)


def test_a_results_page_of_one_section_is_titled_after_it():
    from imgsearch_tools.bench.report import page_title

    assert page_title("floor").startswith("The gRPC floor")
    assert page_title("json-door") == "The JSON door against gRPC"
    assert page_title("") == page_title("floor,json-door") == "Serving benchmark"
