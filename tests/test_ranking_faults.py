"""The gateway's ranking breaker and two-step under faults; slow work kept off event loops."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from gateway import server as gateway_server
from gateway.breaker import CircuitBreaker, Verdict, verdict
from imgsearch.balancing import RETRY_ATTEMPTS
from imgsearch.config import with_overrides
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from tests.conftest import start_ranking_server

SKIPPED = "skipped after repeated failures"
TWO_STEP = rank_pb.RANKER_TWO_STEP


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_failures_and_half_opens_with_one_probe():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=1.0, clock=clock)
    for _ in range(3):
        breaker.record(breaker.acquire(), Verdict.FAILED)
    assert breaker.acquire() is None
    clock.now += 1.0
    probe = breaker.acquire()
    assert probe == "probe"
    assert [breaker.acquire() for _ in range(5)] == [None] * 5  # only one probe at a time
    breaker.record(probe, Verdict.NONE)  # its client gave up: the next call probes instead
    probe = breaker.acquire()
    assert probe == "probe" and breaker.acquire() is None
    breaker.record(probe, Verdict.FAILED)  # still down: another cooldown
    assert breaker.acquire() is None
    clock.now += 1.0
    breaker.record(breaker.acquire(), Verdict.ANSWERED)
    assert [breaker.acquire() for _ in range(3)] == ["call"] * 3


def test_only_failures_of_ranking_itself_count():
    assert verdict(grpc.StatusCode.UNAVAILABLE, 0.5, 0.3) is Verdict.FAILED
    assert verdict(grpc.StatusCode.INTERNAL, 0.5, 0.3) is Verdict.FAILED
    assert verdict(grpc.StatusCode.UNKNOWN, 0.5, 0.3) is Verdict.FAILED
    # Ranking out of time with its full budget is ranking's fault; with less, the client's.
    assert verdict(grpc.StatusCode.DEADLINE_EXCEEDED, 0.3, 0.3) is Verdict.FAILED
    assert verdict(grpc.StatusCode.DEADLINE_EXCEEDED, 0.05, 0.3) is Verdict.NONE
    # Load shedding and refusals of the request are answers from a ranking that is up.
    assert verdict(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.5, 0.3) is Verdict.ANSWERED
    assert verdict(grpc.StatusCode.INVALID_ARGUMENT, 0.5, 0.3) is Verdict.ANSWERED
    breaker = CircuitBreaker(threshold=2)
    for outcome in (Verdict.FAILED, Verdict.NONE, Verdict.ANSWERED, Verdict.FAILED):
        breaker.record(breaker.acquire(), outcome)
    assert breaker.acquire() == "call"  # an answer between failures resets the count


class FakeRanking(rank_grpc.RankingServiceServicer):
    """A ranking server whose behaviour a test sets: answer, refuse, hang, or wait for a gate."""

    def __init__(self):
        self.mode = "answer"
        self.calls = {"Rank": 0, "Recommend": 0}
        # Every attempt: the gateway's channel retries UNAVAILABLE (imgsearch.balancing).
        self.attempts = {"Rank": 0, "Recommend": 0}
        self.arrived = threading.Event()
        self.gate = asyncio.Event()  # bound to the servers' loop when first awaited there
        self.time_remaining: list[float] = []
        self.cancelled_with: list[float] = []

    async def _behave(self, method: str, context):
        self.attempts[method] += 1
        retry = any(key == "grpc-previous-rpc-attempts" for key, _ in context.invocation_metadata())
        if not retry:
            self.calls[method] += 1
        self.time_remaining.append(context.time_remaining())
        self.arrived.set()
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
        if self.mode == "shedding":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "saturated")
        if self.mode == "pause":  # shedding, and asking for a minute's pause
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "saturated",
                trailing_metadata=(("grpc-retry-pushback-ms", "60000"),),
            )
        if self.mode in ("hang", "gate"):
            try:
                if self.mode == "gate":
                    await self.gate.wait()
                else:
                    await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled_with.append(context.time_remaining())
                raise

    async def Rank(self, request, context):
        await self._behave("Rank", context)
        return rank_pb.RankResponse(
            results=[
                rank_pb.RankedPhoto(photo_id=pid, score=1.0 / (i + 1))
                for i, pid in enumerate(request.candidate_photo_ids[: request.k])
            ],
            ranker=rank_pb.RANKER_POPULARITY,
        )

    async def Recommend(self, request, context):
        await self._behave("Recommend", context)
        return rank_pb.RecommendResponse()


@pytest.fixture
def fake_gateway(loop_thread, stack, monkeypatch):
    """A FakeRanking server and a gateway in front of it (real retrieval); yields a factory."""
    from gateway.server import create_gateway_server

    started = []

    def make(cooldown_s: float = 60.0, **overrides):
        # Long by default, so a test sees the breaker open however slowly the machine runs.
        monkeypatch.setattr(gateway_server, "BREAKER_COOLDOWN_S", cooldown_s)
        fake = FakeRanking()
        server, port = start_ranking_server(loop_thread, fake)
        config = with_overrides(
            stack.gateway_config, ranking_addr=f"127.0.0.1:{port}", port=0, **overrides
        )
        gateway = loop_thread.run(create_gateway_server(config))
        started.extend([gateway, server])
        return fake, f"127.0.0.1:{gateway.port}"

    yield make
    for service in started:
        loop_thread.run(service.stop(0))


def search(target: str, timeout: float | None = 5.0, **fields) -> pb.SearchResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(**{"query": "red", "k": 5, **fields}), timeout=timeout
        )


def test_tight_client_deadlines_do_not_open_the_breaker(fake_gateway):
    # Each client's deadline leaves ranking about 0.4 s of its 5 s budget: a timeout is the
    # client's doing, not ranking's, however many there are.
    fake, target = fake_gateway(timeout_ms=5000, ranking_budget_ms=5000)
    fake.mode = "hang"
    outcomes = []
    for _ in range(5):
        try:
            outcomes.append(search(target, timeout=0.8).degraded_reason)
        except grpc.RpcError as exc:
            # The gateway answers 20 ms before the client's deadline; a machine too busy to
            # keep that margin lets the client's own deadline pass first.
            outcomes.append(f"client: {exc.code().name}")
    assert all("timed out" in o or o == "client: DEADLINE_EXCEEDED" for o in outcomes), outcomes
    assert fake.calls["Rank"] == 5  # every search still asked ranking
    fake.mode = "answer"
    assert not search(target).degraded  # and the breaker is closed


def test_a_ranking_timeout_with_its_full_budget_opens_the_breaker(fake_gateway):
    fake, target = fake_gateway(timeout_ms=500, ranking_budget_ms=100)
    fake.mode = "hang"
    reasons = [search(target, timeout=None).degraded_reason for _ in range(4)]
    assert all("timed out" in r for r in reasons[:3]), reasons
    assert SKIPPED in reasons[3]
    assert fake.calls["Rank"] == 3


def test_load_shedding_by_ranking_does_not_open_the_breaker(fake_gateway):
    fake, target = fake_gateway()
    fake.mode = "shedding"
    reasons = [search(target).degraded_reason for _ in range(5)]
    assert all("RESOURCE_EXHAUSTED" in r for r in reasons), reasons
    fake.mode = "answer"
    assert not search(target).degraded


def test_ranking_asking_for_a_pause_is_left_alone_and_searches_degrade_meanwhile(fake_gateway):
    fake, target = fake_gateway()
    fake.mode = "pause"
    first = search(target)
    assert first.degraded and "ranking overloaded" in first.degraded_reason
    assert len(first.results) == 5  # retrieval order, not a failed search
    later = [search(target) for _ in range(3)]
    assert all("asks for a pause" in r.degraded_reason for r in later)
    assert fake.calls["Rank"] == 1  # not called again while the pause lasts


def test_half_open_breaker_lets_exactly_one_probe_through(fake_gateway, loop_thread):
    cooldown_s = 1.0
    fake, target = fake_gateway(cooldown_s=cooldown_s, timeout_ms=20_000)
    fake.mode = "unavailable"
    opened = time.monotonic()
    for _ in range(3):
        assert "UNAVAILABLE" in search(target).degraded_reason
    if time.monotonic() - opened < cooldown_s:
        assert SKIPPED in search(target).degraded_reason
    assert fake.calls["Rank"] == 3
    assert fake.attempts["Rank"] == 3 * RETRY_ATTEMPTS  # each one retried, then given up
    time.sleep(cooldown_s + 0.1)

    fake.mode, fake.arrived = "gate", threading.Event()
    channel = grpc.insecure_channel(target)
    try:
        probe = pb_grpc.SearchServiceStub(channel).Search.future(
            pb.SearchRequest(query="red", k=5), timeout=10
        )
        assert fake.arrived.wait(10), "the probe never reached ranking"
        # While the probe is out, every other search degrades at once without calling ranking.
        others = [search(target) for _ in range(3)]
        assert all(SKIPPED in r.degraded_reason for r in others)
        assert fake.calls["Rank"] == 4
        loop_thread.loop.call_soon_threadsafe(fake.gate.set)
        assert not probe.result(10).degraded
    finally:
        channel.close()
    assert not search(target).degraded  # the probe's answer closed the breaker
    assert fake.calls["Rank"] == 5


def test_two_step_honours_the_breaker(fake_gateway):
    fake, target = fake_gateway()
    fake.mode = "unavailable"
    for _ in range(3):
        assert "UNAVAILABLE" in search(target, ranker=TWO_STEP).degraded_reason
    skipped = search(target, ranker=TWO_STEP)
    assert skipped.degraded and SKIPPED in skipped.degraded_reason
    assert len(skipped.results) == 5  # in retrieval order
    assert fake.calls["Recommend"] == 3
    # Failures of either ranking call open the breaker for both.
    assert SKIPPED in search(target).degraded_reason
    assert fake.calls["Rank"] == 0


def test_two_step_recommend_gets_the_search_budget_not_the_whole_deadline(fake_gateway):
    fake, target = fake_gateway(timeout_ms=5000)
    fake.mode = "hang"
    response = search(target, timeout=0.5, ranker=TWO_STEP)
    assert response.degraded and "timed out" in response.degraded_reason
    # Recommend was given the search's deadline less the margin kept to answer in time.
    assert fake.time_remaining and 0 < fake.time_remaining[0] < 0.49


def test_two_step_is_cancelled_when_the_client_cancels(fake_gateway, monkeypatch):
    from retrieval_service import keyword_index
    from retrieval_service.keyword_index import KeywordIndex

    # A token fallback large enough to run beside the event loop.
    monkeypatch.setattr(keyword_index, "INLINE_POSTINGS", 0)
    monkeypatch.setattr(keyword_index, "INLINE_TOKENS", 0)
    # Retrieval is still busy when the client cancels; Recommend started beside it.
    retrieving, release = threading.Event(), threading.Event()
    original = KeywordIndex.retrieve

    def slow_retrieve(self, query, candidates_k):
        retrieving.set()
        release.wait(20)
        return original(self, query, candidates_k)

    monkeypatch.setattr(KeywordIndex, "retrieve", slow_retrieve)
    fake, target = fake_gateway(timeout_ms=30_000)
    fake.mode = "hang"
    try:
        with grpc.insecure_channel(target) as channel:
            call = pb_grpc.SearchServiceStub(channel).Search.future(
                pb.SearchRequest(query="red blue", k=5, ranker=TWO_STEP), timeout=30
            )
            assert fake.arrived.wait(10) and retrieving.wait(10)
            call.cancel()
        deadline = time.monotonic() + 10
        while not fake.cancelled_with and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        release.set()
    # Cancelled at once, with most of its 30 s deadline left (not when the deadline passed).
    assert fake.cancelled_with and fake.cancelled_with[0] > 20


def test_keyword_token_fallback_runs_off_the_event_loop(stack, monkeypatch):
    from retrieval_service import keyword_index
    from retrieval_service.keyword_index import KeywordIndex

    # A fallback over more postings and tokens than the event loop may scan (common tokens).
    monkeypatch.setattr(keyword_index, "INLINE_POSTINGS", 0)
    monkeypatch.setattr(keyword_index, "INLINE_TOKENS", 0)
    entered, release = threading.Event(), threading.Event()
    original = KeywordIndex.retrieve

    def slow_fallback(self, query, candidates_k):
        if query == "red blue":  # not a keyword: the token fallback
            entered.set()
            release.wait(20)
        return original(self, query, candidates_k)

    monkeypatch.setattr(KeywordIndex, "retrieve", slow_fallback)
    target = f"127.0.0.1:{stack.retrieval.port}"
    keyword = retr_pb.RETRIEVER_KEYWORD
    with grpc.insecure_channel(target) as channel:
        stub = retr_grpc.RetrievalServiceStub(channel)
        slow = stub.Retrieve.future(
            retr_pb.RetrieveRequest(query="red blue", retriever=keyword), timeout=30
        )
        try:
            assert entered.wait(10)
            # The server still answers while the fallback is busy.
            fast = stub.Retrieve(retr_pb.RetrieveRequest(query="red", retriever=keyword), timeout=5)
            assert fast.photo_ids
        finally:
            release.set()
        assert slow.result(10).photo_ids


def test_recommend_runs_off_the_event_loop(stack, monkeypatch, catalogue):
    from ranking_service.rankers.als import ALSRanker

    entered, release = threading.Event(), threading.Event()
    original = ALSRanker.recommend

    def slow_recommend(self, user_idx, n, recent_photos=None):
        entered.set()
        release.wait(20)
        return original(self, user_idx, n, recent_photos)

    monkeypatch.setattr(ALSRanker, "recommend", slow_recommend)
    photo_ids = catalogue.photos["photo_id"].astype(str).tolist()[:20]
    with grpc.insecure_channel(f"127.0.0.1:{stack.ranking.port}") as channel:
        stub = rank_grpc.RankingServiceStub(channel)
        slow = stub.Recommend.future(rank_pb.RecommendRequest(k=10), timeout=30)
        try:
            assert entered.wait(10)
            ranked = stub.Rank(
                rank_pb.RankRequest(candidate_photo_ids=photo_ids, k=5, query="red"), timeout=5
            )
            assert len(ranked.results) == 5
        finally:
            release.set()
        assert len(slow.result(10).results) == 10
