"""Overload control: the adaptive limit, deadline-aware admission, and stages under it."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
from imgsearch.admission import (
    NO_RETRY,
    PUSHBACK_KEY,
    Admission,
    AdmissionSettings,
    GradientLimit,
    Refusal,
    Ticket,
    report_downstream_overload,
)
from imgsearch.request_kinds import kind_reader, request_kind
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.test_ranking_faults import FakeClock


def shed(service: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "imgsearch_shed_total", {"service": service, "reason": reason}
    )
    return value or 0.0


def queue_waits(service: str, queue: str) -> float:
    value = REGISTRY.get_sample_value(
        "imgsearch_queue_wait_seconds_count", {"service": service, "queue": queue}
    )
    return value or 0.0


def pushback(exc: grpc.RpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get(PUSHBACK_KEY)


# ---------------------------------------------------------------------- the limit itself
def window(
    limit: GradientLimit, now: float, latency: float, offered: int, capacity: int = 0
) -> float:
    """One window of ``offered`` requests arriving together, each taking ``latency``; past
    ``capacity`` requests at once (0: no bound), they queue and take proportionally longer."""
    admitted = 0
    while admitted < offered and limit.try_acquire(now):
        admitted += 1
    crowd = limit.inflight
    if capacity:
        latency *= max(1.0, admitted / capacity)
    for _ in range(admitted):
        limit.release(now, now + latency, crowd=crowd)
    return now + latency + limit.window_s  # the next window's releases close this one


def test_the_limit_grows_while_latency_holds_and_shrinks_when_a_queue_builds():
    limit = GradientLimit(min_limit=4, max_limit=40, buffer=0.25, window_s=0.1)
    now = 0.0
    for _ in range(3):  # light load: the baseline (minRTT) is 10 ms
        now = window(limit, now, 0.010, offered=3)
    assert limit.min_rtt == pytest.approx(0.010)
    assert limit.limit == 6  # app-limited: 3 in flight grow it to twice that, no further
    grown = []
    for _ in range(10):  # a crowd, and latency stays at the baseline: the limit grows
        now = window(limit, now, 0.011, offered=100)
        grown.append(limit.limit)
    assert grown == sorted(grown) and grown[-1] == 40  # up to the maximum, never past it
    # The stage can now run only 5 at once: more queue, and take longer. The limit comes
    # down to where queueing adds about the buffer (plus the square-root headroom).
    limits = []
    for _ in range(20):
        now = window(limit, now, 0.010, offered=100, capacity=5)
        limits.append(limit.limit)
    assert all(5 <= x <= 15 for x in limits[-10:])  # around 9, give or take a window's lag
    assert limit.min_rtt == pytest.approx(0.010)  # queued requests never raise the baseline


def test_a_stale_baseline_corrects_itself_once_the_limit_is_at_its_minimum():
    limit = GradientLimit(min_limit=4, max_limit=40, buffer=0.25, window_s=0.1)
    now = 0.0
    for _ in range(3):
        now = window(limit, now, 0.010, offered=3)
    limit.limit = 40.0
    # The work got slower for good (a heavier model), whatever the concurrency: the limit
    # falls to its minimum, never below, where requests run uncontended and become the new
    # baseline; then it grows again.
    limits = []
    for _ in range(30):
        now = window(limit, now, 0.050, offered=100)
        limits.append(limit.limit)
    assert min(limits) == 4
    assert limit.min_rtt == pytest.approx(0.050)
    assert limits[-1] > 4


def test_the_floor_takes_a_burst_and_only_few_in_flight_set_the_baseline():
    limit = GradientLimit()  # the served defaults: floor 20, baseline measured at <= 8
    now = 0.0
    for _ in range(3):  # light load: 10 ms
        now = window(limit, now, 0.010, offered=2)
    assert limit.limit == 20  # light load never takes the limit below its floor
    # A burst, as a restarted replica gets: the floor's worth is admitted, the rest refused.
    admitted = sum(limit.try_acquire(now) for _ in range(25))
    assert admitted == 20
    # They queue and take three times as long; the baseline does not move (more than 8 were
    # in flight), so the limit comes back down to its floor, not below.
    for _ in range(admitted):
        limit.release(now, now + 0.030, crowd=admitted)
    now = window(limit, now + 0.030 + limit.window_s, 0.030, offered=20)
    assert limit.min_rtt == pytest.approx(0.010)
    assert limit.limit == 20


def test_a_slack_keeps_a_short_queue_of_fast_requests_admitted():
    # 2 ms requests; 30 at once take 10 ms: 400% above the baseline, but 8 ms of queue.
    tight = GradientLimit(min_limit=4, max_limit=40)
    slack = GradientLimit(min_limit=4, max_limit=40, slack_s=0.050)
    for limit in (tight, slack):
        now = 0.0
        for _ in range(3):
            now = window(limit, now, 0.002, offered=3)
        for _ in range(20):
            now = window(limit, now, 0.002, offered=30, capacity=6)
    assert tight.limit < 15  # the buffer alone: shrinks to where the queue adds ~25%
    assert slack.limit >= 30  # within the slack: the whole crowd is admitted


def test_a_downstream_refusal_backs_the_limit_off_at_once():
    limit = GradientLimit(min_limit=4, max_limit=40)
    limit.limit = 20.0
    limit.on_drop()
    assert limit.limit == pytest.approx(18.0)
    for _ in range(50):
        limit.on_drop()
    assert limit.limit == 4


# ------------------------------------------------------------------------------ admission
def test_request_kinds_name_the_retriever_and_ranker():
    search = pb.SearchRequest(query="x", retriever=retr_pb.RETRIEVER_HYBRID, ranker=3)
    assert request_kind(search).startswith("hybrid+")
    assert request_kind(retr_pb.RetrieveRequest(query="x")) == "default"
    assert request_kind(admin_pb.GetStatusRequest()) == ""


def test_a_kind_reader_built_from_one_request_names_every_request_of_its_type_alike():
    from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb

    requests = [
        *(
            pb.SearchRequest(query="x", retriever=r, ranker=k)
            for r in (0, 1, 3, 77)
            for k in (0, 3, 99)
        ),
        *(retr_pb.RetrieveRequest(query="x", retriever=r) for r in (0, 2, 55)),
        *(rank_pb.RankRequest(ranker=k) for k in (0, 3, 42)),
        rank_pb.RecommendRequest(user_id="u"),
        admin_pb.GetStatusRequest(),
        object(),  # not a protobuf message: the generic reading
    ]
    for request in requests:
        read = kind_reader(request)
        assert read(request) == request_kind(request), request


def test_a_deadline_shorter_than_the_work_is_refused_at_once_unless_the_stage_is_idle():
    clock = FakeClock()
    admission = Admission("test-deadline", AdmissionSettings(min_inflight=4), clock=clock)
    request = retr_pb.RetrieveRequest(query="x", retriever=retr_pb.RETRIEVER_KEYWORD)
    first = admission.admit("Retrieve", request, remaining_s=5.0)
    clock.now += 0.200
    admission.finish(first, "OK")  # keyword retrievals take 200 ms now
    busy = admission.admit("Retrieve", request, remaining_s=5.0)
    before = shed("test-deadline", "deadline")
    refused = admission.admit("Retrieve", request, remaining_s=0.1)
    assert isinstance(refused, Refusal) and refused.reason == "deadline"
    assert dict(refused.metadata)[PUSHBACK_KEY] == NO_RETRY  # a retry cannot have more time
    assert "200 ms" in refused.message
    assert shed("test-deadline", "deadline") == before + 1
    other_kind = retr_pb.RetrieveRequest(query="x", retriever=retr_pb.RETRIEVER_CLIP)
    unknown = admission.admit("Retrieve", other_kind, 0.1)
    assert isinstance(unknown, Ticket)  # nothing known of that kind yet
    admission.finish(unknown, "CANCELLED")
    admission.finish(busy, "OK")
    # Idle, the stage tries anyway: that is how a stale estimate learns otherwise.
    assert isinstance(admission.admit("Retrieve", request, remaining_s=0.1), Ticket)


def test_past_the_limit_requests_are_refused_with_a_pushback_and_errors_teach_no_times():
    clock = FakeClock()
    settings = AdmissionSettings(adaptive=False, max_inflight=2)
    admission = Admission("test-limit", settings, clock=clock)
    request = retr_pb.RetrieveRequest(query="x")
    held = [admission.admit("Retrieve", request, None) for _ in range(2)]
    clock.now += 0.030
    refused = admission.admit("Retrieve", request, None)
    assert isinstance(refused, Refusal) and refused.reason == "limit"
    assert int(dict(refused.metadata)[PUSHBACK_KEY]) >= 1
    admission.finish(held[0], "DEADLINE_EXCEEDED")
    assert admission.times.expected(("Retrieve", "default")) is None
    admission.finish(held[1], "OK")
    assert admission.times.expected(("Retrieve", "default")) == pytest.approx(0.030)
    assert isinstance(admission.admit("Retrieve", request, None), Ticket)


def test_a_downstream_overload_reported_during_a_request_backs_its_limit_off():
    admission = Admission("test-drop", AdmissionSettings(min_inflight=2, max_inflight=64))
    request = pb.SearchRequest(query="x")
    admission.limit_of("Search").limit = 30.0

    def handle():  # what the gateway does when retrieval refuses, in the request's context
        ticket = admission.admit("Search", request, 2.0)
        report_downstream_overload()
        admission.finish(ticket, "RESOURCE_EXHAUSTED")

    worker = threading.Thread(target=handle)  # a context of its own, like an RPC's task
    worker.start()
    worker.join(10)
    assert admission.limit_of("Search").limit == pytest.approx(27.0)
    assert admission.limit_of("Search").inflight == 0


# ------------------------------------------------------------------- a real retrieval server
class GatedRetriever:
    """The keyword retriever behind a gate and a delay: a test double of the timing only."""

    def __init__(self, real):
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.calls = 0
        self.lock = threading.Lock()

    def cheap(self, query: str) -> bool:
        return False  # runs on the server's executor, behind its queue

    def retrieve(self, query: str, candidates_k: int):
        with self.lock:
            self.calls += 1
        self.gate.wait(30)
        time.sleep(self.delay_s)
        return self.real.retrieve(query, candidates_k)


@pytest.fixture
def gated_retrieval(loop_thread, artifact_root, monkeypatch):
    """A real retrieval server whose keyword retriever is gated; yields (double, service)."""
    from imgsearch.config import RetrievalConfig
    from retrieval_service import server as retrieval_server

    doubles = []
    real_loader = retrieval_server.load_retrieval_state

    def load(*args, **kwargs):
        state = real_loader(*args, **kwargs)
        double = GatedRetriever(state.retrievers["keyword"])
        state.retrievers["keyword"] = double
        doubles.append(double)
        return state

    monkeypatch.setattr(retrieval_server, "load_retrieval_state", load)
    config = RetrievalConfig(
        artifacts=str(artifact_root), port=0, concurrency_limit="fixed", max_inflight=4
    )
    service = loop_thread.run(retrieval_server.create_retrieval_server(config))
    yield doubles[0], service
    doubles[0].gate.set()
    loop_thread.run(service.stop(0))


def retrieve_future(channel, timeout: float):
    return retr_grpc.RetrievalServiceStub(channel).Retrieve.future(
        retr_pb.RetrieveRequest(query="red", retriever=retr_pb.RETRIEVER_KEYWORD),
        timeout=timeout,
    )


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_work_whose_deadline_passed_in_the_queue_is_dropped_before_it_runs(gated_retrieval):
    double, service = gated_retrieval
    target = f"127.0.0.1:{service.port}"
    dropped, waited = shed("retrieval", "expired"), queue_waits("retrieval", "executor")
    double.gate.clear()
    with grpc.insecure_channel(target) as channel:
        running = [retrieve_future(channel, timeout=30) for _ in range(2)]
        wait_for(lambda: double.calls == 2)  # both executor threads are held at the gate
        queued = [retrieve_future(channel, timeout=0.3) for _ in range(2)]
        for call in queued:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        double.gate.set()
        assert all(len(call.result().photo_ids) for call in running)
        wait_for(lambda: shed("retrieval", "expired") == dropped + 2)
    assert double.calls == 2  # the two queued behind them never ran
    assert queue_waits("retrieval", "executor") == waited + 4


def test_a_full_stage_refuses_at_once_but_health_and_admin_still_answer(gated_retrieval):
    double, service = gated_retrieval
    target = f"127.0.0.1:{service.port}"
    double.gate.clear()
    with grpc.insecure_channel(target) as channel:
        held = [retrieve_future(channel, timeout=30) for _ in range(4)]  # its fixed limit
        wait_for(lambda: double.calls == 2)  # two run, two wait for a thread: all admitted
        with pytest.raises(grpc.RpcError) as info:
            retrieve_future(channel, timeout=30).result()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(pushback(info.value)) >= 1
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as admin:
            status = admin_grpc.AdminServiceStub(admin).GetStatus(
                admin_pb.GetStatusRequest(), timeout=5
            )
        assert status.service == "retrieval"
        double.gate.set()
        assert all(call.result().photo_ids for call in held)


def test_a_deadline_the_stage_cannot_meet_is_refused_without_running(gated_retrieval):
    double, service = gated_retrieval
    target = f"127.0.0.1:{service.port}"
    double.delay_s = 0.5
    with grpc.insecure_channel(target) as channel:
        retrieve_future(channel, timeout=30).result()  # teaches it: such a request takes 0.5 s
        double.gate.clear()
        busy = retrieve_future(channel, timeout=30)
        wait_for(lambda: double.calls == 2)
        with pytest.raises(grpc.RpcError) as info:
            retrieve_future(channel, timeout=0.2).result()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert pushback(info.value) == NO_RETRY
        assert double.calls == 2  # refused at the door
        double.gate.set()
        busy.result()
        # Idle, the stage tries the same short deadline (and learns if it got faster).
        with pytest.raises(grpc.RpcError) as info:
            retrieve_future(channel, timeout=0.2).result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert double.calls == 3


# ---------------------------------------------------------------- the gateway's first door
class RefusingRetrieval(retr_grpc.RetrievalServiceServicer):
    """A retrieval server that sheds every request with a given pushback."""

    def __init__(self, pushback_ms: str):
        self.pushback_ms = pushback_ms
        self.calls = 0

    async def Retrieve(self, request, context):
        self.calls += 1
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "retrieval sheds load",
            trailing_metadata=((PUSHBACK_KEY, self.pushback_ms),),
        )


@pytest.mark.parametrize("pushback_ms", ["25", NO_RETRY])
def test_the_gateway_refuses_a_search_retrieval_refused_with_its_pushback(
    loop_thread, stack, pushback_ms
):
    from gateway.server import create_gateway_server
    from imgsearch.config import with_overrides

    async def start_refusing():
        server = grpc.aio.server()
        refusing = RefusingRetrieval(pushback_ms)
        retr_grpc.add_RetrievalServiceServicer_to_server(refusing, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port, refusing

    server, port, refusing = loop_thread.run(start_refusing())
    config = with_overrides(stack.gateway_config, retrieval_addr=f"127.0.0.1:{port}", port=0)
    gateway = loop_thread.run(create_gateway_server(config))
    before = shed("gateway", "downstream")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(query="red"), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retrieval is overloaded" in info.value.details()
        assert pushback(info.value) == pushback_ms  # the client's retry policy honours it
        assert shed("gateway", "downstream") == before + 1
        assert refusing.calls == 1
    finally:
        loop_thread.run(gateway.stop(0))
        loop_thread.run(server.stop(0))
