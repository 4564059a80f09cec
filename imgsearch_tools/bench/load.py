"""Load generator of SearchService: open/closed-loop gRPC load and its report.

The load generator is a ``grpc.aio`` client that sends the queries of
:mod:`imgsearch_tools.bench.queries`. Open-loop mode sends on a fixed clock and never waits
for replies (late sends are counted, and latency is also reported from the scheduled send time,
so a slow server cannot hide behind a slow sender); closed-loop mode runs N workers that each
wait for their reply before sending the next request. The report sets the figures beside the
in-process baseline of :mod:`imgsearch_tools.bench.in_process`.

Heavy imports (grpc, numpy, pandas, the models) stay inside functions.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from imgsearch.latency import percentiles_ms
from imgsearch.names import (
    RANKER_CHOICES,
    RETRIEVER_CHOICES,
    check_names,
    ranker_value,
    retriever_value,
)
from imgsearch_tools.bench.in_process import network_ratio
from imgsearch_tools.bench.queries import BenchQuery, is_unique, unique_query

if TYPE_CHECKING:
    from imgsearch.security import ClientSecurity

SEARCH_SERVICE = "imgsearch.search.v1.SearchService"
SEARCH_METHOD_SYMBOL = f"{SEARCH_SERVICE}.Search"
SEARCH_METHOD_PATH = f"/{SEARCH_SERVICE}/Search"
# An open-loop send more than this behind its slot on the clock counts as late.
LATE_SEND_MS = 2.0


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, and how.

    Exactly one of ``qps`` (open loop) and ``concurrency`` (closed loop) is set.
    """

    target: str
    qps: float | None = None
    concurrency: int | None = None
    duration_s: float = 10.0
    warmup_s: float = 1.0
    retriever: str = "keyword"
    ranker: str = "als"
    k: int = 10
    candidates_k: int = 100
    channels: int = 2
    timeout_s: float = 2.0
    unique_share: float = 0.0
    load_generator: str = "python"  # or "go": imgsearch_tools.bench.go_load

    def __post_init__(self) -> None:
        from imgsearch.balancing import channel_target

        if self.target:  # "" for a spec that only shapes requests (ghz data)
            channel_target(self.target)  # a malformed list of gateways fails here, naming it
        if not 0.0 <= self.unique_share <= 1.0:
            raise ValueError(f"unique share must be between 0 and 1, got {self.unique_share}")
        if (self.qps is None) == (self.concurrency is None):
            raise ValueError("set exactly one of qps (open loop) and concurrency (closed loop)")
        if self.qps is not None and self.qps <= 0:
            raise ValueError(f"qps must be positive, got {self.qps}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.load_generator not in ("python", "go"):
            raise ValueError(f"load generator must be python or go, got {self.load_generator!r}")
        # Normalised as the CLI and the evaluation read names ("ALS" is "als").
        object.__setattr__(
            self, "retriever", check_names(self.retriever, RETRIEVER_CHOICES, "retriever")[0]
        )
        object.__setattr__(self, "ranker", check_names(self.ranker, RANKER_CHOICES, "ranker")[0])

    @property
    def mode(self) -> str:
        return "open" if self.qps is not None else "closed"

    def describe(self) -> str:
        """``open 400 qps`` or ``closed c=10`` (``from Go`` when the compiled load generator
        sends it), and the share of unique queries if any."""
        load = f"open {self.qps:g} qps" if self.qps is not None else f"closed c={self.concurrency}"
        if self.load_generator == "go":
            load += " from Go"
        if self.unique_share >= 1.0:
            return f"{load}, unique queries"
        if self.unique_share > 0.0:
            return f"{load}, {100 * self.unique_share:g}% unique queries"
        return load


# ------------------------------------------------------------------------------ requests
def request_fields(query: BenchQuery, spec: LoadSpec) -> dict:
    """The SearchRequest of ``query`` as proto3 JSON (enum names), as ghz and grpcurl take it."""
    fields: dict = {"user_id": query.user_id, "query": query.query, "k": spec.k}
    if spec.candidates_k:
        fields["candidates_k"] = spec.candidates_k
    if spec.retriever != "default":
        fields["retriever"] = f"RETRIEVER_{spec.retriever.upper()}"
    if spec.ranker != "default":
        fields["ranker"] = f"RANKER_{spec.ranker.upper()}"
    return fields


def _search_requests(queries: list[BenchQuery], spec: LoadSpec) -> list:
    from imgsearch.search.v1 import search_service_pb2 as pb

    return [
        pb.SearchRequest(
            user_id=q.user_id,
            query=q.query,
            k=spec.k,
            candidates_k=spec.candidates_k,
            retriever=retriever_value(spec.retriever),
            ranker=ranker_value(spec.ranker),
            filter=q.photo_filter,
        )
        for q in queries
    ]


# ---------------------------------------------------------------------------- statistics
def _reason_bucket(reason: str) -> str:
    # "ranking timed out after 312 ms" and "... 298 ms" are one reason; so are two
    # connection failures that differ only in the address after the ';'.
    return re.sub(r"\d+(\.\d+)?", "N", reason.split(";")[0].split(" (")[0])[:100]


class LoadRecorder:
    """Collects what one measured phase saw; :meth:`summary` turns it into the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last_done = self.start
        self.sent = 0
        self.late = 0
        self.lags: list[float] = []
        self.latencies: list[float] = []  # OK responses, from the actual send
        self.from_schedule: list[float] = []  # OK responses, from the slot on the clock
        self.error_latencies: dict[str, list[float]] = {}  # the other replies, by status code
        self.last_send = self.start
        self.codes: Counter = Counter()
        self.degraded = 0
        self.last_degraded_s: float | None = None  # offset of the last degraded reply
        self.degraded_reasons: Counter = Counter()
        self.versions: Counter = Counter()
        self.result_counts: Counter = Counter()
        # second -> [full, degraded, errors, latencies of the OK replies that second]
        self.timeline: dict[int, list] = {}

    def on_send(self, lag_s: float = 0.0) -> None:
        self.sent += 1
        self.last_send = time.perf_counter()
        self.lags.append(lag_s)
        if lag_s * 1000.0 > LATE_SEND_MS:
            self.late += 1

    def on_done(self, sent_at: float, scheduled: float, code: str, response=None) -> None:
        done = time.perf_counter()
        self.last_done = max(self.last_done, done)
        self.codes[code] += 1
        bucket = self.timeline.setdefault(int(done - self.start), [0, 0, 0, []])
        if response is None:
            bucket[2] += 1
            self.error_latencies.setdefault(code, []).append(done - sent_at)
            return
        self.latencies.append(done - sent_at)
        self.from_schedule.append(done - scheduled)
        bucket[3].append(done - sent_at)
        self.result_counts[len(response.results)] += 1
        versions = response.artifact_versions
        self.versions[",".join(f"{k}={versions[k]}" for k in sorted(versions))] += 1
        if response.degraded:
            self.degraded += 1
            self.last_degraded_s = done - self.start
            self.degraded_reasons[_reason_bucket(response.degraded_reason)] += 1
            bucket[1] += 1
        else:
            bucket[0] += 1

    def summary(self, spec: LoadSpec, loadgen_cpu_s: float | None = None) -> dict:
        """The phase as a JSON-ready dict (latencies in ms)."""
        ok = self.codes.get("OK", 0)
        completed = sum(self.codes.values())
        window = max(spec.duration_s, self.last_done - self.start)
        errors = {code: n for code, n in sorted(self.codes.items()) if code != "OK"}
        result = {
            "target": spec.target,
            "mode": spec.mode,
            "load": spec.describe(),
            "target_qps": spec.qps,
            "concurrency": spec.concurrency,
            "duration_s": spec.duration_s,
            "warmup_s": spec.warmup_s,
            "retriever": spec.retriever,
            "ranker": spec.ranker,
            "k": spec.k,
            "candidates_k": spec.candidates_k,
            "channels": spec.channels,
            "timeout_s": spec.timeout_s,
            "unique_share": spec.unique_share,
            "sent": self.sent,
            "completed": completed,
            "ok": ok,
            "full": ok - self.degraded,
            "degraded": self.degraded,
            "errors": errors,
            "error_count": completed - ok,
            "codes": dict(sorted(self.codes.items())),
            "achieved_qps": round(ok / window, 1),
            "send_qps": round(self.sent / spec.duration_s, 1),
            "late_sends": self.late,
            "send_lag_ms": percentiles_ms(self.lags),
            "latency_ms": percentiles_ms(self.latencies),
            "error_latency_ms": {
                code: percentiles_ms(ms) for code, ms in sorted(self.error_latencies.items())
            },
            "last_send_s": round(self.last_send - self.start, 3),
            "last_degraded_s": (
                None if self.last_degraded_s is None else round(self.last_degraded_s, 3)
            ),
            "degraded_reasons": dict(self.degraded_reasons.most_common()),
            "artifact_versions": dict(self.versions.most_common()),
            "results_per_response": {str(n): c for n, c in sorted(self.result_counts.items())},
            "timeline": [
                {
                    "second": s,
                    "full": v[0],
                    "degraded": v[1],
                    "errors": v[2],
                    "p50_ms": percentiles_ms(v[3])["p50"],
                    "p99_ms": percentiles_ms(v[3])["p99"],
                }
                for s, v in sorted(self.timeline.items())
            ],
        }
        if spec.mode == "open":
            result["latency_from_schedule_ms"] = percentiles_ms(self.from_schedule)
        if loadgen_cpu_s is not None:
            result["loadgen_cpu_percent"] = round(100.0 * loadgen_cpu_s / window, 1)
        return result


# ------------------------------------------------------------------------- load generator
def _pushback_s(exc) -> float:
    """The pushback a refusal carried, in seconds (0: none, or "do not retry")."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0, int(value)) / 1000.0
            except ValueError:
                return 0.0
    return 0.0


class _Driver:
    """Sends requests round-robin over several channels and records every outcome."""

    def __init__(self, spec: LoadSpec, calls: list, queries: list[BenchQuery], metadata=()):
        self.spec = spec
        self.calls = calls  # one bound Search multicallable per channel
        self.queries = queries
        self.requests = _search_requests(queries, spec)
        self.words = sorted({q.query for q in queries})
        self.metadata = metadata  # the bearer token, when the gateway asks for one
        self.next = 0

    def request(self, i: int):
        """The ``i``-th request: the next sampled one, or a unique copy of it."""
        request = self.requests[i % len(self.requests)]
        if self.spec.unique_share and is_unique(i, self.spec.unique_share):
            unique = type(request)()
            unique.CopyFrom(request)
            unique.query = unique_query(self.queries[i % len(self.queries)], self.words).query
            return unique
        return request

    async def _one(self, recorder: LoadRecorder, scheduled: float) -> float:
        """Send one request and record its outcome; returns the seconds the server asked the
        client to wait before its next try (``grpc-retry-pushback-ms``; 0 when none)."""
        import grpc

        i = self.next
        self.next += 1
        call = self.calls[i % len(self.calls)]
        request = self.request(i)
        sent_at = time.perf_counter()
        try:
            response = await call(request, timeout=self.spec.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            recorder.on_done(sent_at, scheduled, exc.code().name)
            return _pushback_s(exc)
        except Exception as exc:  # noqa: BLE001 - a client-side failure is a counted outcome
            recorder.on_done(sent_at, scheduled, f"CLIENT_{type(exc).__name__}")
            return 0.0
        recorder.on_done(sent_at, scheduled, "OK", response)
        return 0.0

    async def open_loop(self, recorder: LoadRecorder, duration_s: float) -> None:
        """Send on a fixed clock without waiting for replies, then wait for the stragglers."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.spec.qps
        start = time.perf_counter()
        pending: set[asyncio.Task] = set()
        n_sends = max(1, int(round(duration_s * self.spec.qps)))
        for i in range(n_sends):
            scheduled = start + i * interval
            delay = scheduled - time.perf_counter()
            # Yield even when behind, so replies are processed while catching up.
            await asyncio.sleep(delay if delay > 0 else 0)
            recorder.on_send(max(0.0, time.perf_counter() - scheduled))
            task = loop.create_task(self._one(recorder, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)

    async def closed_loop(self, recorder: LoadRecorder, duration_s: float) -> None:
        """N workers, each sending its next request when its previous reply arrives.

        A worker refused with a pushback waits that long first, as gRPC's retry policy would.
        """
        end = time.perf_counter() + duration_s

        async def worker() -> None:
            while time.perf_counter() < end:
                recorder.on_send()
                pause = await self._one(recorder, time.perf_counter())
                if pause > 0:
                    await asyncio.sleep(min(pause, max(0.0, end - time.perf_counter())))

        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))

    async def run(self, recorder: LoadRecorder, duration_s: float) -> None:
        if self.spec.mode == "open":
            await self.open_loop(recorder, duration_s)
        else:
            await self.closed_loop(recorder, duration_s)


async def run_load(
    spec: LoadSpec,
    queries: list[BenchQuery],
    on_measure_start: Callable[[], None] | None = None,
    security: ClientSecurity | None = None,
) -> dict:
    """Drive ``spec`` against its target: a warm-up phase, then the measured phase.

    Parameters
    ----------
    spec:
        Target, mode, rate or concurrency, duration and request shape.
    queries:
        The requests to cycle through (see :func:`sample_queries`).
    on_measure_start:
        Called once, right before the measured phase starts (fault-injection scenarios
        time their events from it).
    security:
        TLS files and bearer token of the channels (default: plaintext, no token).

    This is the Python load generator; :func:`imgsearch_tools.bench.go_load.send_load` sends
    a spec from the load generator it names (the compiled one gives the same report).

    Returns
    -------
    dict
        The measured phase: counts by status code, degraded count, achieved QPS, latency
        percentiles (ms), late sends, a per-second timeline, the load generator's CPU share.
    """
    from imgsearch.balancing import channel_options, channel_target
    from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
    from imgsearch.security import ClientSecurity

    if spec.load_generator != "python":
        raise ValueError(
            f"run_load sends from Python; a {spec.load_generator} load goes through "
            "imgsearch_tools.bench.go_load.send_load"
        )
    if not queries:
        raise ValueError("no queries to send")
    security = security or ClientSecurity()
    metadata = security.metadata()
    # A local subchannel pool gives each channel its own connections (else they share them);
    # each channel balances over every gateway the target names and retries UNAVAILABLE.
    options = channel_options(SEARCH_SERVICE, [("grpc.use_local_subchannel_pool", 1)])
    target = channel_target(spec.target)
    channels = [security.aio_channel(target, options) for _ in range(max(1, spec.channels))]
    try:
        calls = [pb_grpc.SearchServiceStub(c).Search for c in channels]
        return await drive(spec, calls, queries, metadata, on_measure_start)
    finally:
        for channel in channels:
            await channel.close()


async def drive(
    spec: LoadSpec,
    calls: list,
    queries: list[BenchQuery],
    metadata=(),
    on_measure_start: Callable[[], None] | None = None,
) -> dict:
    """Warm up, then measure ``spec``'s load sent round-robin through ``calls``.

    Each call takes ``(SearchRequest, timeout=, metadata=)`` and returns a reply with
    ``results``, ``degraded``, ``degraded_reason`` and ``artifact_versions``, or raises
    ``grpc.aio.AioRpcError`` (a gRPC stub's ``Search``, or the JSON door's client).
    """
    driver = _Driver(spec, calls, queries, metadata)
    if spec.warmup_s > 0:
        await driver.run(LoadRecorder(), spec.warmup_s)
    if on_measure_start is not None:
        on_measure_start()
    recorder = LoadRecorder()
    cpu_start = time.process_time()
    await driver.run(recorder, spec.duration_s)
    cpu = time.process_time() - cpu_start
    return recorder.summary(spec, loadgen_cpu_s=cpu)


# -------------------------------------------------------------------------- reporting
def format_result(result: dict, in_process: dict | None = None) -> str:
    """A few readable lines for one load phase."""
    lat = result["latency_ms"]

    def ms(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"{result['retriever']}+{result['ranker']} k={result['k']} of {result['candidates_k']}, "
        f"{result['load']} for {result['duration_s']:g}s -> {result['target']}",
        f"  achieved {result['achieved_qps']:.1f} qps (sent {result['sent']}, ok {result['ok']}, "
        f"degraded {result['degraded']}, errors {result['error_count']}"
        + (f": {result['errors']}" if result["errors"] else "")
        + ")",
        f"  latency ms  p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  "
        f"max {ms(lat['max'])}",
    ]
    if result["mode"] == "open":
        sched = result["latency_from_schedule_ms"]
        lines.append(
            f"  from the scheduled send: p50 {ms(sched['p50'])}  p99 {ms(sched['p99'])}; "
            f"late sends {result['late_sends']} (> {LATE_SEND_MS:g} ms behind the clock)"
        )
    if "loadgen_cpu_percent" in result:
        lines.append(f"  load generator CPU {result['loadgen_cpu_percent']:.0f}% of one core")
    if in_process and "latency_ms" in in_process:
        ratio = network_ratio(result, in_process)
        local = in_process["latency_ms"]
        lines.append(
            f"  in-process pipeline p50 {ms(local['p50'])} ms, p99 {ms(local['p99'])} ms "
            f"(retrieve p50 {ms(in_process['retrieve_ms']['p50'])}, rank p50 "
            f"{ms(in_process['rank_ms']['p50'])}); e2e p50 / in-process p50 = "
            + ("-" if ratio is None else f"{ratio:.1f}x")
        )
    return "\n".join(lines)


def as_dict(spec: LoadSpec) -> dict:
    """A LoadSpec as a plain dict (for the JSON report)."""
    return asdict(spec)
