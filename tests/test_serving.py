"""Serving under failure: ranking fallback, deadline propagation, load shedding, hot reload."""

from __future__ import annotations

import asyncio
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from imgsearch import artifacts
from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import Stack, start_ranking_server


def search(target: str, timeout: float = 5.0, **fields) -> pb.SearchResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(**{"query": "red", "k": 5, **fields}), timeout=timeout
        )


def test_ranking_down_degrades_to_retrieval_order_then_recovers(loop_thread, artifact_root):
    stack = Stack(loop_thread, artifact_root)
    try:
        healthy = search(stack.target)
        assert not healthy.degraded
        loop_thread.run(stack.ranking.stop(0))
        degraded = search(stack.target)
        assert degraded.degraded
        assert "ranking unavailable" in degraded.degraded_reason
        assert degraded.ranker == rank_pb.RANKER_NONE
        # After repeated failures the gateway stops waiting on ranking for a moment.
        for _ in range(3):
            search(stack.target)
        skipped = search(stack.target)
        assert skipped.degraded and "skipped after repeated failures" in skipped.degraded_reason
        retrieval_order = search(stack.target, ranker=rank_pb.RANKER_NONE)
        # Retrieval order, k results, metadata intact.
        assert [r.photo_id for r in degraded.results] == [
            r.photo_id for r in retrieval_order.results
        ]
        assert all(r.photo.url for r in degraded.results)
        # Restart ranking on the same port: the gateway's channel reconnects by itself.
        stack.restart_ranking()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recovered = search(stack.target)
            if not recovered.degraded:
                break
            time.sleep(0.2)
        assert not recovered.degraded
        assert recovered.ranker == healthy.ranker != rank_pb.RANKER_NONE
    finally:
        stack.stop()


class SlowRanking(rank_grpc.RankingServiceServicer):
    """A ranking server that records the deadline it was given and never answers in time."""

    def __init__(self):
        self.time_remaining: list[float] = []

    async def Rank(self, request, context):
        self.time_remaining.append(context.time_remaining())
        await asyncio.sleep(5)
        return rank_pb.RankResponse()


def start_slow_ranking(loop_thread):
    """A real gRPC server running :class:`SlowRanking` on an ephemeral port."""
    slow = SlowRanking()
    server, port = start_ranking_server(loop_thread, slow)
    return slow, server, port


def test_client_deadline_propagates_and_slow_ranking_degrades_within_it(loop_thread, artifact_root):
    stack = Stack(loop_thread, artifact_root)
    slow, slow_server, slow_port = start_slow_ranking(loop_thread)
    from gateway.server import create_gateway_server
    from imgsearch.config import with_overrides

    config = with_overrides(
        stack.gateway_config, ranking_addr=f"127.0.0.1:{slow_port}", port=0, timeout_ms=5000
    )
    gateway = loop_thread.run(create_gateway_server(config))
    target = f"127.0.0.1:{gateway.port}"
    client_timeout = 1.0  # well inside the 5 s default and the slow ranking's 5 s
    try:
        # Connect and warm both channels first, so that the timed search below spends its
        # deadline on ranking, not on first connections under a loaded CI machine.
        try:
            search(target, timeout=2 * client_timeout)
        except grpc.RpcError as error:  # late under load: the channels are connected all the same
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        slow.time_remaining.clear()
        started = time.perf_counter()
        response = search(target, timeout=client_timeout)
        elapsed = time.perf_counter() - started
        assert response.degraded
        assert "timed out" in response.degraded_reason
        assert len(response.results) == 5
        assert elapsed < client_timeout
        # The ranking call carried a deadline inside the client's, not the 5 s default.
        assert slow.time_remaining and 0 < slow.time_remaining[0] < client_timeout
    finally:
        loop_thread.run(gateway.stop(0))
        loop_thread.run(slow_server.stop(0))
        stack.stop()


def test_saturated_gateway_sheds_load_with_resource_exhausted(loop_thread, artifact_root):
    stack = Stack(loop_thread, artifact_root)
    slow, slow_server, slow_port = start_slow_ranking(loop_thread)
    from gateway.server import create_gateway_server
    from imgsearch.config import with_overrides

    config = with_overrides(
        stack.gateway_config,
        ranking_addr=f"127.0.0.1:{slow_port}",
        port=0,
        max_inflight=2,
        ranking_budget_ms=1000,
    )
    gateway = loop_thread.run(create_gateway_server(config))
    target = f"127.0.0.1:{gateway.port}"

    def one(_):
        started = time.perf_counter()
        try:
            search(target, timeout=1.0)
            return "OK", time.perf_counter() - started
        except grpc.RpcError as exc:
            return exc.code().name, time.perf_counter() - started

    try:
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(one, range(12)))
        codes = [code for code, _ in outcomes]
        assert codes.count("RESOURCE_EXHAUSTED") >= 6, codes
        assert codes.count("OK") >= 1, codes
        # Shed requests are refused at once, not after queueing for the deadline.
        shed = [t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert max(shed) < 0.5
    finally:
        loop_thread.run(gateway.stop(0))
        loop_thread.run(slow_server.stop(0))
        stack.stop()


def test_hot_reload_under_load_fails_no_request_and_switches_version(
    loop_thread, artifact_root, demo_data, tmp_path
):
    # A private copy of the root so the shared fixture keeps its version.
    root = tmp_path / "root"
    shutil.copytree(artifact_root, root, symlinks=True)
    old_version = artifacts.resolve(root).version
    stack = Stack(loop_thread, root)
    from imgsearch_tools.build import build_artifacts

    build_artifacts(str(demo_data), str(root), ["none", "popularity", "als"], show_progress=False)
    new_version = artifacts.resolve(root).version
    assert new_version != old_version

    stop = {"flag": False}
    failures: list[str] = []
    versions: set[tuple] = set()

    def load():
        count = 0
        with grpc.insecure_channel(stack.target) as channel:
            stub = pb_grpc.SearchServiceStub(channel)
            while not stop["flag"]:
                try:
                    r = stub.Search(pb.SearchRequest(query="red", k=5, user_id="x"), timeout=5)
                    versions.add(tuple(sorted(r.artifact_versions.items())))
                    if r.degraded or len(r.results) != 5:
                        failures.append(f"degraded or short: {r.degraded_reason}")
                except grpc.RpcError as exc:
                    failures.append(exc.code().name)
                count += 1
        return count

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load) for _ in range(4)]
            time.sleep(0.5)
            for service in (stack.retrieval, stack.ranking, stack.gateway):
                with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as channel:
                    reply = admin_grpc.AdminServiceStub(channel).Reload(
                        admin_pb.ReloadRequest(), timeout=60
                    )
                    assert reply.previous_version == old_version
                    assert reply.version == new_version
            time.sleep(0.5)
            stop["flag"] = True
            total = sum(f.result() for f in futures)
        assert total > 20
        assert failures == []
        seen = {v for pair in versions for _, v in pair}
        assert seen == {old_version, new_version}
        after = search(stack.target)
        assert set(after.artifact_versions.values()) == {new_version}
    finally:
        stop["flag"] = True
        stack.stop()


def test_reload_to_a_broken_set_keeps_serving_the_old_one(loop_thread, artifact_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(artifact_root, root, symlinks=True)
    # A set whose manifest is there but whose files are not.
    broken = root / artifacts.SETS_DIR / "broken"
    broken.mkdir()
    (broken / artifacts.MANIFEST).write_text('{"version": "broken"}')
    stack = Stack(loop_thread, root)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{stack.retrieval.admin_port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                admin_grpc.AdminServiceStub(channel).Reload(
                    admin_pb.ReloadRequest(version="broken"), timeout=30
                )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "still serving" in info.value.details()
        assert len(search(stack.target).results) == 5
    finally:
        stack.stop()


def test_a_server_still_loading_answers_unavailable_not_internal(loop_thread):
    from imgsearch.admission import Admission
    from imgsearch.serving import Reloadable
    from imgsearch.serving.interceptor import ServiceInterceptor
    from ranking_service.server import SERVICE_NAME, RankingServicer

    async def start():
        holder = Reloadable(lambda path: None)  # never loaded: state stays None
        interceptor = ServiceInterceptor("ranking", {SERVICE_NAME}, holder, Admission("ranking"))
        server = grpc.aio.server(interceptors=[interceptor])
        rank_grpc.add_RankingServiceServicer_to_server(RankingServicer(holder), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                rank_grpc.RankingServiceStub(channel).Rank(
                    rank_pb.RankRequest(user_id="u", query="red", k=3), timeout=5
                )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in info.value.details()
    finally:
        loop_thread.run(server.stop(0))


def test_max_connection_age_closes_connections_and_clients_reconnect():
    """A client balancing over DNS re-resolves only when a connection closes: the server's
    connection age makes that happen, and the next call simply connects again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from imgsearch.serving.ports import new_server

    async def scenario() -> list[grpc.ChannelConnectivity]:
        server, port, _ = new_server("aged", "127.0.0.1", 0, max_connection_age_s=0.3, grace_s=1)
        await server.start()
        states = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                state = channel.get_state()
                states.append(state)
                while state == grpc.ChannelConnectivity.READY:
                    await channel.wait_for_state_change(state)
                    state = channel.get_state()
                states.append(state)
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        finally:
            await server.stop(0)
        return states

    states = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert states[0] == grpc.ChannelConnectivity.READY
    assert states[1] in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


def _stays_connected_while_pinged(min_ping_interval_ms: int, monkeypatch) -> bool:
    """Whether an idle channel pinging every 300 ms keeps its connection for 6 s."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from imgsearch.serving import ports

    monkeypatch.setattr(ports, "MIN_PING_INTERVAL_MS", min_ping_interval_ms)
    options = [
        ("grpc.keepalive_time_ms", 300),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]

    async def scenario() -> bool:
        server, port, _ = ports.new_server("pinged", "127.0.0.1", 0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                try:
                    await asyncio.wait_for(
                        channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 6.0
                    )
                except asyncio.TimeoutError:
                    return True
                return False
        finally:
            await server.stop(0)

    return asyncio.run(asyncio.wait_for(scenario(), 30))


def test_keepalive_pings_of_idle_clients_are_accepted(monkeypatch):
    """The gateway pings idle stages; a server at gRPC's default (5 min) would GOAWAY them."""
    from gateway.server import CHANNEL_OPTIONS
    from imgsearch.serving.ports import MIN_PING_INTERVAL_MS

    assert dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"] >= MIN_PING_INTERVAL_MS
    assert _stays_connected_while_pinged(200, monkeypatch)
    # The control: gRPC's default minimum interval drops the same client ("too_many_pings").
    assert not _stays_connected_while_pinged(300_000, monkeypatch)


def test_a_loaded_state_is_frozen_out_of_collections_and_a_replaced_one_is_collected():
    """Each swap settles the heap: the state loaded is frozen (a full collection no longer
    walks it), and the state it replaced, reference cycles included, is collected."""
    import asyncio
    import gc
    import weakref

    from imgsearch.serving import Reloadable

    class State:
        def __init__(self, path):
            self.version = path
            self.tables = {"rows": [[i] for i in range(1000)]}
            self.tables["owner"] = self  # a reference cycle, as real states can hold

    async def scenario():
        holder = Reloadable(State, "first")
        first = await holder.load()
        frozen = {id(o) for o in gc.get_objects()}
        assert id(first.tables) not in frozen and gc.get_freeze_count() > 0
        gone = weakref.ref(first)
        del first
        await holder.load("second")
        await asyncio.sleep(0)  # the settling runs once the caller let go of the old state
        return holder, gone

    try:
        holder, gone = asyncio.run(scenario())
        assert gone() is None, "the replaced state's cycle was kept frozen"
        assert holder.state.version == "second"
        assert id(holder.state.tables) not in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()


def test_settling_the_heap_hands_the_memory_freed_so_far_back_to_the_kernel():
    """What a load freed goes back when the heap settles, not at whichever later ``free``
    happens to trim the C heap (at a million photos: a full collection mid-load-test)."""
    import gc
    import os

    from imgsearch.serving.reload import _malloc_trim, settle_heap

    if _malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")

    def resident_mib() -> float:
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [bytearray(8192) for _ in range(20_000)]  # 160 MiB from malloc, not pymalloc
    above = bytearray(8192)  # allocated after them: the heap cannot shrink from its top
    del blocks
    freed_but_resident = resident_mib()
    try:
        settle_heap()
    finally:
        gc.unfreeze()
    assert freed_but_resident - resident_mib() > 100
    assert len(above) == 8192


def test_a_serving_process_times_each_garbage_collection_into_a_histogram():
    """imgsearch_gc_pause_seconds{generation}: one observation per collection, the hook
    installed once however many services start in the process."""
    import gc

    from prometheus_client import REGISTRY

    from imgsearch.serving.metrics import CollectorPauses, watch_collector_pauses

    def full_collections() -> float:
        labels = {"generation": "2"}
        return REGISTRY.get_sample_value("imgsearch_gc_pause_seconds_count", labels) or 0.0

    watch_collector_pauses()
    watch_collector_pauses()
    assert sum(isinstance(c, CollectorPauses) for c in gc.callbacks) == 1
    before = full_collections()
    gc.collect()
    gc.collect()
    assert full_collections() == before + 2
