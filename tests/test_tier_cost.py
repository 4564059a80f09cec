"""The per-tier CPU harness: recorded requests, variant servers in turns, CPU from /proc."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch_tools.bench import tier_cost, tier_variants


@pytest.fixture(scope="module")
def recorded(artifact_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tier-cost")
    tier_cost.write_payloads(artifact_root, folder / "payloads")
    return tier_cost.record_requests(str(artifact_root), folder, n=20)


def test_recorded_requests_are_what_each_tier_receives(recorded, catalogue):
    retrieves = [
        retr_pb.RetrieveRequest.FromString(r)
        for r in tier_cost.read_requests(recorded, "retrieval")
    ]
    ranks = [
        rank_pb.RankRequest.FromString(r) for r in tier_cost.read_requests(recorded, "ranking")
    ]
    searches = [
        pb.SearchRequest.FromString(r) for r in tier_cost.read_requests(recorded, "gateway")
    ]
    assert len(searches) == len(retrieves) == len(ranks) == 20
    assert [s.query for s in searches] == [r.query for r in retrieves]
    known = set(catalogue.photos["photo_id"])
    for retrieve, rank in zip(retrieves, ranks):
        assert retrieve.retriever == retr_pb.RETRIEVER_KEYWORD and retrieve.candidates_k == 100
        assert rank.query == retrieve.query and rank.ranker == rank_pb.RANKER_ALS and rank.k == 10
        assert 0 < len(rank.candidate_photo_ids) == len(rank.retrieval_scores) <= 100
        assert set(rank.candidate_photo_ids) <= known


def quick_run(artifact_root, recorded, tier: str, variants: list[str]) -> dict:
    """One short round of ``variants`` at 2 clients, the in-process timing asked for."""
    args = Namespace(artifacts=str(artifact_root), tier=tier, out=recorded, variants=variants)
    args.__dict__.update(rounds=1, duration=0.5, clients=2, rate=None, in_process=True)
    return tier_cost.run(args)


def test_each_variant_serves_and_its_cpu_is_the_servers(recorded, artifact_root):
    variants = ["bare", "cached", "shipped", "no-score", "cached+no-interceptor"]
    report = quick_run(artifact_root, recorded, "ranking", variants)
    assert json.loads((recorded / "tier-cost-ranking.json").read_text()) == report
    for variant, figures in report["variants"].items():
        assert figures["errors"] == 0, variant
        assert figures["cpu_ms_per_call"] > 0, variant
    assert report["rounds"]["shipped"][0]["calls"] > 0
    timed = report["in_process_us"]
    assert timed["alone"] > 0 and timed["interleaved"] >= timed["stand_in"] > 0
    table = "\n".join(tier_cost.table(report))
    assert "| cached+no-interceptor |" in table and "shipped minus this" in table


def test_the_gateway_is_measured_against_bare_downstreams(recorded, artifact_root):
    report = quick_run(
        artifact_root, recorded, "gateway", ["bare", "cached", "shipped", "no-candidates"]
    )
    assert all(v["errors"] == 0 and v["cpu_ms_per_call"] > 0 for v in report["variants"].values())
    assert "in_process_us" not in report  # the gateway's method needs its downstreams


def test_open_loop_holds_the_asked_rate(recorded, artifact_root):
    server = tier_cost.VariantServer("retrieval", "shipped", str(artifact_root), recorded)
    try:
        server.wait_serving()
        requests = tier_cost.read_requests(recorded, "retrieval")
        figures = tier_cost.measure(server, requests, clients=1, seconds=1.0, rate=50)
    finally:
        server.stop()
    # 50 calls are due in the second (the 51st at its very end), late ones sent at once.
    assert figures["errors"] == 0 and figures["calls"] in (50, 51)


def test_a_variant_names_a_piece_the_tier_has():
    assert tier_cost.variants_of("ranking")[:3] == ["bare", "cached", "shipped"]
    assert "no-response" in tier_cost.variants_of("retrieval")
    assert "no-validate" in tier_cost.variants_of("gateway")
    with pytest.raises(KeyError):
        tier_variants.install_variant("ranking", "no-such-piece", None)
