"""Sharded retrieval: 4 shards behind the gateway return exactly what the whole set returns."""

from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import numpy as np
import pandas as pd
import pytest

from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from retrieval_service.sharding import shard_of_id
from tests.conftest import CLIP_SET_SHARDS, CLIP_SET_TIMEOUT

SHARDS = CLIP_SET_SHARDS
pytestmark = CLIP_SET_TIMEOUT
RETRIEVERS = {
    "keyword": retr_pb.RETRIEVER_KEYWORD,
    "clip": retr_pb.RETRIEVER_CLIP,
    "hybrid": retr_pb.RETRIEVER_HYBRID,
    "default": retr_pb.RETRIEVER_UNSPECIFIED,
}


def serving_state(service):
    """The state an in-process server serves (the holder its reload hook swaps)."""
    return service.reload_hooks[0].__self__.state


class ShardedStack:
    """The same set served whole and in 4 shards, behind one gateway each (shared ranking)."""

    def __init__(self, loop_thread, root):
        from gateway.server import create_gateway_server
        from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig
        from ranking_service.server import create_ranking_server
        from retrieval_service.server import create_retrieval_server

        self.lt = loop_thread
        self.root = str(root)
        self.services = []

        def start(coro):
            service = loop_thread.run(coro)
            self.services.append(service)
            return service

        common = {"artifacts": self.root, "port": 0, "admin_port": 0}
        self.retrieval_config = lambda **kw: RetrievalConfig(**common, **kw)
        self.whole = start(create_retrieval_server(RetrievalConfig(**common)))
        self.shards = [
            start(create_retrieval_server(RetrievalConfig(**common, shard=i)))
            for i in range(SHARDS)
        ]
        self.ranking = start(create_ranking_server(RankingConfig(**common)))
        self.ranking_addr = f"127.0.0.1:{self.ranking.port}"
        self.gateway_config = lambda addr: GatewayConfig(
            **common, retrieval_addr=addr, ranking_addr=self.ranking_addr
        )
        self.gateway_whole = start(
            create_gateway_server(self.gateway_config(f"127.0.0.1:{self.whole.port}"))
        )
        self.gateway_sharded = start(
            create_gateway_server(
                self.gateway_config(";".join(f"127.0.0.1:{s.port}" for s in self.shards))
            )
        )

    def gateway(self, retrieval_addr: str):
        """Another gateway over ``retrieval_addr`` (stopped with the stack)."""
        from gateway.server import create_gateway_server

        service = self.lt.run(create_gateway_server(self.gateway_config(retrieval_addr)))
        self.services.append(service)
        return service

    def retrieval_shard(self, shard: int):
        """Another server of one shard (stopped with the stack)."""
        from retrieval_service.server import create_retrieval_server

        service = self.lt.run(create_retrieval_server(self.retrieval_config(shard=shard)))
        self.services.append(service)
        return service

    def stop(self):
        for service in reversed(self.services):
            self.lt.run(service.stop(0))


@pytest.fixture(scope="module")
def sharded(loop_thread, clip_set):
    """The session's set with images, a tiny CLIP and 4 shards, served both ways."""
    stack = ShardedStack(loop_thread, clip_set)
    yield stack
    stack.stop()


def search(
    port: int, query: str, retriever: int, ranker: int = 1, k: int = 50, candidates_k=50, **extra
):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(
                query=query,
                k=k,
                candidates_k=candidates_k,
                retriever=retriever,
                ranker=ranker,
                **extra,
            ),
            timeout=30,
        )


def answer(response):
    """What a search answers, to the bit: ids, every score, sources, notes."""
    return (
        response.retriever,
        response.ranker,
        response.degraded,
        list(response.notes),
        [
            (
                r.photo_id,
                r.score,
                r.retrieval_score,
                r.ranker_score,
                r.retrieval_source,
                sorted(r.retrieval_source_scores.items()),
            )
            for r in response.results
        ],
    )


def queries(root) -> list[str]:
    """Catalogue keywords, multi-word queries (token matching, unseen by CLIP) and unknowns."""
    from imgsearch import artifacts

    keywords = pd.read_parquet(
        artifacts.resolve(root).file(artifacts.CATALOGUE_DIR) / "keywords.parquet"
    )["keyword"]
    return sorted(keywords.unique())[:30] + [
        "red circle at night",
        "blue star",
        "a green square 17",
        "zebra unicorn",
    ]


@pytest.mark.parametrize("retriever", list(RETRIEVERS))
def test_four_shards_return_exactly_the_unsharded_results(sharded, retriever):
    shards_seen = set()
    for ranker in (1, 2):  # none (retrieval order), popularity
        for query in queries(sharded.root):
            whole = search(sharded.gateway_whole.port, query, RETRIEVERS[retriever], ranker)
            merged = search(sharded.gateway_sharded.port, query, RETRIEVERS[retriever], ranker)
            assert answer(merged) == answer(whole), (retriever, ranker, query)
            assert not merged.degraded
            shards_seen |= {shard_of_id(r.photo_id, SHARDS) for r in merged.results}
    assert shards_seen == set(range(SHARDS))  # every shard contributed


def test_hybrid_fuses_both_sources_across_shards(sharded):
    # The whole fused list (every candidate of either source), whatever fusion weights the
    # build's validation chose: photos both sources found, and photos only CLIP found.
    response = search(
        sharded.gateway_sharded.port, "red", RETRIEVERS["hybrid"], k=100, candidates_k=100
    )
    assert response.retriever == retr_pb.RETRIEVER_HYBRID
    assert {r.retrieval_source for r in response.results} >= {"keyword+clip", "clip"}


def test_the_query_is_encoded_once_per_search_and_the_encoding_shard_rotates(sharded):
    clips = [serving_state(s).retrievers["clip"] for s in sharded.shards]
    before = [c.cache_misses for c in clips]
    searches = 8
    for i in range(searches):
        for retriever in ("clip", "hybrid"):
            search(
                sharded.gateway_sharded.port,
                f"a red circle never seen {i} {retriever}",
                RETRIEVERS[retriever],
            )
    encoded = [c.cache_misses - b for c, b in zip(clips, before)]
    assert sum(encoded) == 2 * searches
    assert all(n > 0 for n in encoded)


def test_a_shard_searches_with_the_embedding_it_is_handed(sharded):
    version = serving_state(sharded.shards[0]).version
    with grpc.insecure_channel(f"127.0.0.1:{sharded.shards[0].port}") as channel:
        blue = retr_grpc.RetrievalServiceStub(channel).Retrieve(
            retr_pb.RetrieveRequest(
                query="blue", candidates_k=20, retriever=2, return_query_embedding=True
            ),
            timeout=30,
        )
    assert len(blue.query_embedding) > 0

    def retrieve(query, **extra):
        with grpc.insecure_channel(f"127.0.0.1:{sharded.shards[1].port}") as channel:
            return retr_grpc.RetrievalServiceStub(channel).Retrieve(
                retr_pb.RetrieveRequest(query=query, candidates_k=20, retriever=2, **extra),
                timeout=30,
            )

    handed = retrieve("red", query_embedding=blue.query_embedding, query_embedding_version=version)
    assert list(handed.photo_ids) == list(retrieve("blue").photo_ids)
    assert list(handed.photo_ids) != list(retrieve("red").photo_ids)
    # From a set of another version, the embedding is not trusted: the shard encodes itself.
    other = retrieve("red", query_embedding=blue.query_embedding, query_embedding_version="x")
    assert list(other.photo_ids) == list(retrieve("red").photo_ids)
    assert (handed.shard, handed.shard_count) == (1, SHARDS)
    for bad in ([1.0, 2.0], [float("nan")] * len(blue.query_embedding)):
        with pytest.raises(grpc.RpcError) as info:
            retrieve("red", query_embedding=bad, query_embedding_version=version)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "query_embedding" in info.value.details()


def test_a_shard_that_is_down_degrades_the_answer_and_names_the_shard(sharded):
    spare = sharded.retrieval_shard(2)
    ports = [s.port for s in sharded.shards]
    ports[2] = spare.port
    gateway = sharded.gateway(";".join(f"127.0.0.1:{p}" for p in ports))
    full = search(gateway.port, "red", RETRIEVERS["hybrid"])
    assert not full.degraded
    sharded.lt.run(spare.stop(0))
    for retriever in ("keyword", "clip", "hybrid"):
        response = search(gateway.port, "red", RETRIEVERS[retriever])
        assert response.degraded
        assert "retrieval shard 2 of 4 unavailable" in response.degraded_reason
        assert response.results
        assert all(shard_of_id(r.photo_id, SHARDS) != 2 for r in response.results)
    # Every shard down: retrieval is down, the search fails as it does unsharded.
    dead = sharded.gateway(f"127.0.0.1:{spare.port};127.0.0.1:{spare.port}")
    with pytest.raises(grpc.RpcError) as info:
        search(dead.port, "red", RETRIEVERS["keyword"])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_targets_that_do_not_match_the_shards_are_flagged_not_merged(sharded):
    one = sharded.gateway(f"127.0.0.1:{sharded.shards[0].port}")
    response = search(one.port, "red", RETRIEVERS["keyword"])
    assert response.degraded
    assert "serves shard 0 of 4 only" in response.degraded_reason
    ports = [s.port for s in sharded.shards]
    ports[0], ports[1] = ports[1], ports[0]
    swapped = sharded.gateway(";".join(f"127.0.0.1:{p}" for p in ports))
    response = search(swapped.port, "red", RETRIEVERS["keyword"])
    assert response.degraded
    assert "serves shard 1 of 4, not shard 0 of 4" in response.degraded_reason
    assert {shard_of_id(r.photo_id, SHARDS) for r in response.results} == {2, 3}


def test_a_bad_request_is_refused_as_it_is_unsharded(sharded):
    with pytest.raises(grpc.RpcError) as info:
        search(sharded.gateway_sharded.port, "x" * 300, RETRIEVERS["hybrid"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_keyword_is_exact_on_a_shard_without_its_photos():
    from retrieval_service.keyword_index import KeywordIndex

    keywords = pd.DataFrame(
        {
            "photo_idx": np.array([0, 2, 1, 3, 2], dtype=np.int32),
            "keyword": ["red", "red", "red car", "blue", "blue"],
            "confidence": np.array([0.9, 0.7, 0.8, 0.6, 0.6], dtype=np.float32),
        }
    )
    whole = KeywordIndex.from_keywords(keywords)
    odd = whole.shard(np.arange(4) % 2 == 1)
    result = odd.retrieve("red", 10)
    # Photos 0 and 2 hold "red"; shard 1 holds neither, and does not fall back to "red car".
    assert result.photo_idx.tolist() == [] and result.keyword == "red" and result.note == ""
    assert odd.retrieve("blue", 10).photo_idx.tolist() == [3]
    assert whole.shard(np.arange(4) % 2 == 0).retrieve("red", 10).photo_idx.tolist() == [0, 2]
    assert odd.retrieve("red car", 10).photo_idx.tolist() == [1]


def test_merge_breaks_ties_by_photo_index_as_one_index_does():
    from imgsearch.fusion import RetrievalResult, merge_shards

    a = RetrievalResult(np.array([4, 2]), np.zeros(0), {"clip": np.array([0.5, 0.5], np.float32)})
    b = RetrievalResult(np.array([3, 1]), np.zeros(0), {"clip": np.array([0.5, 0.9], np.float32)})
    merged = merge_shards([a, b], 3)
    assert merged.photo_idx.tolist() == [1, 2, 3]
    assert merged.scores.tolist() == pytest.approx([0.9, 0.5, 0.5])


def test_a_shard_of_a_set_that_has_none_is_refused(artifact_root):
    from retrieval_service.server import load_retrieval_state
    from retrieval_service.sharding import ShardError

    with pytest.raises(ShardError, match="no retrieval shards"):
        load_retrieval_state(str(artifact_root), shard=0)


def test_imgsearch_shard_publishes_a_sharded_version_sharing_the_rest(artifact_root, tmp_path):
    from imgsearch import artifacts
    from imgsearch.fusion import merge_shards
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.server import load_retrieval_state
    from retrieval_service.sharding import ShardError

    root = tmp_path / "root"
    shutil.copytree(artifact_root, root, symlinks=True)
    before = artifacts.resolve(root)

    def imgsearch(*args):
        return subprocess.run(
            [sys.executable, "-m", "imgsearch_tools.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    refused = imgsearch("shard", "--artifacts", str(root), "--shards", "1", "--quiet")
    assert refused.returncode == 2 and "--shards must be between 2" in refused.stderr
    done = imgsearch("shard", "--artifacts", str(root), "--shards", "3", "--quiet")
    assert done.returncode == 0, done.stderr
    after = artifacts.resolve(root)
    assert after.manifest["parent_version"] == before.version
    assert after.manifest["shards"]["count"] == 3
    assert sum(after.manifest["shards"]["photos"]) == before.manifest["counts"]["photos"]
    assert (
        after.file(artifacts.KEYWORD_INDEX).stat().st_ino
        == before.file(artifacts.KEYWORD_INDEX).stat().st_ino
    )
    whole = KeywordIndex.load(after.file(artifacts.KEYWORD_INDEX))
    states = [load_retrieval_state(str(root), shard=i) for i in range(3)]
    assert [(s.shard, s.shard_count) for s in states] == [(0, 3), (1, 3), (2, 3)]
    for query in ["red", "red circle", "night", "zebra"]:
        lists = [s.retrievers["keyword"].retrieve(query, 50) for s in states]
        merged, expected = merge_shards(lists, 50), whole.retrieve(query, 50)
        assert merged.photo_idx.tolist() == expected.photo_idx.tolist()
        assert merged.scores.tolist() == expected.scores.tolist()
    with pytest.raises(ShardError, match="has 3 shards, not shard 3"):
        load_retrieval_state(str(root), shard=3)


def test_bench_shards_checks_exactness_and_measures_each_layout(artifact_root, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsearch_tools.cli",
            "bench-shards",
            "--artifacts",
            str(artifact_root),
            "--out",
            str(out),
            "--shards",
            "1,2",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--qps",
            "50",
            "--unseen-queries",
            "120",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads((out / "shards.json").read_text())
    one, two = report["layouts"]
    assert two["processes"][:2] == ["retrieval-0", "retrieval-1"]
    assert two["exact"]["identical"] == two["exact"]["searches"] > 100
    for layout in (one, two):
        assert [run["error_count"] for run in layout["scenarios"]] == [0, 0]
        assert all(run["ok"] > 0 for run in layout["scenarios"])
    assert "2 shards: " in (out / "shards.md").read_text()
    assert "and 120 unseen queries" in (out / "shards.md").read_text()


def test_bench_shards_without_load_checks_the_answers_only(artifact_root, tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "imgsearch_tools.cli", "bench-shards", "--no-load"]
    command += ["--artifacts", str(artifact_root), "--out", str(out), "--shards", "1,2"]
    command += ["--unseen-queries", "40"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    one, two = json.loads((out / "shards.json").read_text())["layouts"]
    assert one["scenarios"] == two["scenarios"] == []
    assert two["exact"]["identical"] == two["exact"]["searches"] > 40
    # One count per retriever checked (a keyword-only set: every search keyword).
    assert two["exact"]["identical_by_retriever"] == {"keyword": two["exact"]["searches"]}
    assert f"keyword {two['exact']['searches']} of" in (out / "shards.md").read_text()
