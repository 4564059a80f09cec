"""The Prometheus metrics every server exports, and the HTTP endpoint that serves them."""

from __future__ import annotations

import gc
import logging
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger("imgsearch")

REQUESTS = Counter(
    "imgsearch_requests_total", "RPCs handled, by final status code.", ["service", "method", "code"]
)
LATENCY = Histogram(
    "imgsearch_latency_seconds",
    "Latency per stage inside a service.",
    ["service", "stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
INFLIGHT = Gauge("imgsearch_inflight_requests", "RPCs being handled now.", ["service"])
DEGRADED = Counter(
    "imgsearch_degraded_total",
    "Searches answered degraded, by reason (unavailable, overloaded, timeout, no_budget, "
    "circuit_open, shard_unavailable).",
    ["reason"],
)
GC_PAUSES = Histogram(
    "imgsearch_gc_pause_seconds",
    "Collections of Python's cyclic garbage collector in this process, by the generation "
    "collected (2: a full collection); each holds the GIL, so every request waits it out.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
ARTIFACT_INFO = Gauge(
    "imgsearch_artifact_loaded_timestamp_seconds",
    "When the serving artifact set was loaded, by version.",
    ["service", "version"],
)


class RequestCounts:
    """``imgsearch_requests_total`` of one service, its children looked up once per label set."""

    def __init__(self, service: str):
        self.service = service
        self._children: dict[tuple[str, str], object] = {}

    def child(self, method: str, code: str):
        """The counter of ``method``'s RPCs that ended with ``code``."""
        child = self._children.get((method, code))
        if child is None:
            child = self._children[(method, code)] = REQUESTS.labels(self.service, method, code)
        return child

    def count(self, method: str, code: str) -> None:
        """One more RPC of ``method`` ended with ``code``."""
        self.child(method, code).inc()


class InFlight:
    """RPCs a service is handling now: a plain count, read by its gauge when scraped.

    Requests are handled on the server's event loop, one at a time: counting them needs no
    lock, and the gauge (``imgsearch_inflight_requests``) reads the count when collected.
    """

    __slots__ = ("count",)

    def __init__(self):
        self.count = 0


_INFLIGHT: dict[str, InFlight] = {}


def inflight_of(service: str) -> InFlight:
    """The in-flight count of ``service`` (one per service, whatever its ports)."""
    inflight = _INFLIGHT.get(service)
    if inflight is None:
        inflight = _INFLIGHT[service] = InFlight()
        INFLIGHT.labels(service).set_function(lambda: inflight.count)
    return inflight


class CollectorPauses:
    """A ``gc.callbacks`` hook timing each collection into ``imgsearch_gc_pause_seconds``.

    A full collection at a million photos stopped a server's event loop for 25-260 ms
    (``docs/guides/scale.md``): the histogram shows in production how often that happens.
    """

    def __init__(self):
        self._started = 0.0
        self._pauses = [GC_PAUSES.labels(str(generation)) for generation in range(3)]

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses[info["generation"]].observe(time.perf_counter() - self._started)


def watch_collector_pauses() -> None:
    """Time this process's garbage collections (once per process, however often called)."""
    if not any(isinstance(callback, CollectorPauses) for callback in gc.callbacks):
        gc.callbacks.append(CollectorPauses())


def start_metrics(port: int, host: str) -> None:
    """Expose Prometheus metrics over HTTP on ``port`` (0 disables)."""
    if port:
        start_http_server(port, addr=host)
        logger.info("metrics on http://%s:%d/metrics", host, port)
