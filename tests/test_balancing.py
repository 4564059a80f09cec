"""Client-side balancing: round robin over healthy replicas, UNAVAILABLE retried elsewhere."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from imgsearch.balancing import RETRY_ATTEMPTS, channel_options, channel_target
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch_tools.bench.queries import BenchQuery

RETRIEVAL = "imgsearch.retrieval.v1.RetrievalService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "target, expected",
    [
        ("127.0.0.1:50052", "127.0.0.1:50052"),
        ("10.0.0.2:50052, 10.0.0.3:50052", "ipv4:10.0.0.2:50052,10.0.0.3:50052"),
        ("[::1]:50052,[fd00::2]:50052", "ipv6:[::1]:50052,[fd00::2]:50052"),
        ("dns:///retrieval.default.svc:50052", "dns:///retrieval.default.svc:50052"),
        ("ipv4:10.0.0.2:1,10.0.0.3:1", "ipv4:10.0.0.2:1,10.0.0.3:1"),
    ],
)
def test_targets_become_grpc_targets(target, expected):
    assert channel_target(target) == expected


@pytest.mark.parametrize(
    "target, message",
    [
        ("retrieval-0:50052,retrieval-1:50052", "dns:///retrieval-0:50052"),
        ("10.0.0.2:50052,[::1]:50052", "mixes IPv4 and IPv6"),
        ("10.0.0.2,10.0.0.3:1", "is not HOST:PORT"),
        ("  ", "empty target"),
    ],
)
def test_malformed_targets_are_refused_with_the_reason(target, message):
    with pytest.raises(ValueError, match=message):
        channel_target(target)


def test_the_gateway_refuses_bad_addresses_at_start():
    from imgsearch.config import GatewayConfig

    with pytest.raises(SystemExit, match="retrieval address: 'a:1'"):
        GatewayConfig(retrieval_addr="a:1,b:1")
    with pytest.raises(SystemExit, match="empty shard target"):
        GatewayConfig(retrieval_addr="127.0.0.1:1;;127.0.0.1:2")
    with pytest.raises(SystemExit, match="ranking is not sharded"):
        GatewayConfig(ranking_addr="127.0.0.1:1;127.0.0.1:2")


def test_the_gateway_checks_the_settings_every_server_shares():
    from imgsearch.config import GatewayConfig

    with pytest.raises(SystemExit, match="catalog poll must be positive, got 0"):
        GatewayConfig(catalog_poll_ms=0)
    with pytest.raises(SystemExit, match="in-flight limits must be at least 1"):
        GatewayConfig(min_inflight=0)
    with pytest.raises(SystemExit, match="concurrency limit must be one of"):
        GatewayConfig(concurrency_limit="unbounded")
    assert GatewayConfig(catalog_poll_ms=50).catalog_poll_ms == 50


class Replica(retr_grpc.RetrievalServiceServicer, pb_grpc.SearchServiceServicer):
    """One replica: answers with its name, or fails as a test sets (``mode``)."""

    def __init__(self, name: str):
        self.name = name
        self.mode = "answer"
        self.attempts = 0

    async def _behave(self, context):
        self.attempts += 1
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        if self.mode == "pushback-never":
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: do not retry")

    async def Retrieve(self, request, context):
        await self._behave(context)
        return retr_pb.RetrieveResponse(note=self.name)

    async def Search(self, request, context):
        await self._behave(context)
        return pb.SearchResponse(notes=[self.name])


@pytest.fixture
def replicas(loop_thread):
    """A factory of replica servers (real gRPC servers with health), stopped afterwards."""
    started = []

    def make(*names: str, status=SERVING):
        async def start(name):
            server = grpc.aio.server()
            replica = Replica(name)
            retr_grpc.add_RetrievalServiceServicer_to_server(replica, server)
            pb_grpc.add_SearchServiceServicer_to_server(replica, server)
            health = HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            for service in ("", RETRIEVAL, "imgsearch.search.v1.SearchService"):
                await health.set(service, status)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            started.append(server)
            replica.health, replica.port = health, port
            return replica

        return [loop_thread.run(start(name)) for name in names]

    yield make
    for server in started:
        loop_thread.run(server.stop(0))


def calls(loop_thread, replicas, n: int, target: str = "") -> list[str]:
    """``n`` Retrieve calls through one balanced channel over ``replicas`` (or ``target``);
    who answered."""
    target = channel_target(target or ",".join(f"127.0.0.1:{r.port}" for r in replicas))

    async def run():
        async with grpc.aio.insecure_channel(target, options=channel_options(RETRIEVAL)) as ch:
            stub = retr_grpc.RetrievalServiceStub(ch)
            return [
                (await stub.Retrieve(retr_pb.RetrieveRequest(), timeout=5)).note for _ in range(n)
            ]

    return loop_thread.run(run())


def test_calls_go_round_robin_to_serving_replicas_only(loop_thread, replicas):
    a, b = replicas("a", "b")
    (loading,) = replicas("loading", status=NOT_SERVING)
    answered = calls(loop_thread, [a, b, loading], 30)
    # Round robin once both are connected (the first calls may all find one of them ready).
    assert set(answered) == {"a", "b"} and min(answered.count("a"), answered.count("b")) >= 10
    assert loading.attempts == 0  # a replica that is not SERVING gets nothing


def test_unavailable_is_retried_on_another_replica(loop_thread, replicas):
    up, down = replicas("up", "down")
    down.mode = "unavailable"
    assert calls(loop_thread, [up, down], 20) == ["up"] * 20
    assert down.attempts > 0  # it was picked, failed, and the call went on to "up"


def test_a_dns_name_is_resolved_by_grpc_and_balanced_like_a_list(loop_thread, replicas):
    (up,) = replicas("up")
    # gRPC's own resolver; an address the name also has (::1) and no server listens on is
    # skipped by round robin like a replica that is down.
    assert calls(loop_thread, [], 5, target=f"dns:///localhost:{up.port}") == ["up"] * 5


def test_a_pushback_that_says_never_stops_the_retries(loop_thread, replicas):
    (refusing,) = replicas("refusing")
    (down,) = replicas("down")
    refusing.mode, down.mode = "pushback-never", "unavailable"
    for replica in (refusing, down):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            calls(loop_thread, [replica], 1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refusing.attempts == 1
    assert down.attempts == RETRY_ATTEMPTS


def test_bench_balances_over_every_gateway_it_is_given(loop_thread, replicas):
    from imgsearch_tools.bench.load import LoadSpec, run_load

    first, second = replicas("first", "second")
    spec = LoadSpec(
        target=f"127.0.0.1:{first.port},127.0.0.1:{second.port}",
        concurrency=2,
        duration_s=1.0,
        # round_robin sends on the first connection that is ready; on a busy machine the
        # second can take a while, so count only what is sent after the warm-up.
        warmup_s=1.0,
        channels=1,
    )
    before = {}

    def measure_starts():
        before.update(first=first.attempts, second=second.attempts)

    result = asyncio.run(run_load(spec, [BenchQuery("u", "red")], on_measure_start=measure_starts))
    assert result["error_count"] == 0
    counts = sorted([first.attempts - before["first"], second.attempts - before["second"]])
    assert counts[1] > 0 and counts[0] > 0.8 * counts[1]  # per request, not per connection


def test_the_gateway_keeps_answering_when_a_replica_of_each_stage_stops(loop_thread, artifact_root):
    from gateway.server import create_gateway_server
    from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig
    from ranking_service.server import create_ranking_server
    from retrieval_service.server import create_retrieval_server

    common = {"artifacts": str(artifact_root), "port": 0, "admin_port": 0}
    retrievals = [
        loop_thread.run(create_retrieval_server(RetrievalConfig(**common))) for _ in range(2)
    ]
    rankings = [loop_thread.run(create_ranking_server(RankingConfig(**common))) for _ in range(2)]
    gateway = loop_thread.run(
        create_gateway_server(
            GatewayConfig(
                **common,
                retrieval_addr=",".join(f"127.0.0.1:{s.port}" for s in retrievals),
                ranking_addr=",".join(f"127.0.0.1:{s.port}" for s in rankings),
            )
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.SearchServiceStub(channel)

            def search():
                request = pb.SearchRequest(query="red", k=5, ranker=3)
                return stub.Search(request, timeout=10)

            assert not search().degraded
            for stopped in (retrievals.pop(0), rankings.pop(1)):
                loop_thread.run(stopped.stop(0))
            answers = [search() for _ in range(20)]
        assert all(len(a.results) == 5 and not a.degraded for a in answers)
    finally:
        for service in [gateway, *retrievals, *rankings]:
            loop_thread.run(service.stop(0))
