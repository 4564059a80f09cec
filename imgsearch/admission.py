"""Overload control for every stage: deadline-aware admission and an adaptive concurrency limit.

Each server's interceptor asks :class:`Admission` before a request of its API runs. A request
is refused at once with RESOURCE_EXHAUSTED when its method already has as many requests in
flight as its concurrency limit allows, or when its remaining deadline is shorter than the
time such requests have recently taken (so it would be worked on for a caller who is gone).
Work that waits in a queue inside a stage (the text encoder's micro-batches, the threads beside
the event loop) is dropped before it runs once its deadline has passed (:func:`run_live`).

Refusals carry ``grpc-retry-pushback-ms`` in their trailing metadata, the key gRPC's retry
policy honours: how long to wait before trying again, or -1 (do not retry) when the deadline
is what is too short.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.request_kinds import request_kind

PUSHBACK_KEY = "grpc-retry-pushback-ms"
# gRPC's retry policy reads a negative pushback as "do not retry this call".
NO_RETRY = "-1"
# Why a request was not worked on: refused at the door by the concurrency limit or for its
# deadline, dropped from a queue after its deadline passed, or refused because the stage it
# needs refused it (the gateway, when retrieval sheds).
SHED_REASONS = ("limit", "deadline", "expired", "downstream")
# Seconds before a request's deadline within which its caller's cancellation counts as the
# deadline passing (the request's own arrival may have lagged behind the cancellation's).
CANCEL_TRANSIT_SLACK = 0.05

SHED = Counter(
    "imgsearch_shed_total",
    "Requests refused at a stage's door or dropped before their work ran, by reason "
    "(limit, deadline, expired, downstream).",
    ["service", "reason"],
)
QUEUE_WAIT = Histogram(
    "imgsearch_queue_wait_seconds",
    "Time work waited in a stage's queue before it ran (encoder: the text encoder's "
    "micro-batches; executor: the threads beside the event loop).",
    ["service", "queue"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
CONCURRENCY_LIMIT = Gauge(
    "imgsearch_concurrency_limit", "Requests a method admits at once now.", ["service", "method"]
)

_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("admission_ticket")


class DeadlineExpired(Exception):
    """Queued work whose deadline passed before it ran; it was dropped without running."""


# -------------------------------------------------------------------------- service times
class ServiceTimes:
    """How long each kind of request has recently taken: an EWMA per key.

    Parameters
    ----------
    alpha:
        Weight of the newest observation (0.1: about the last ten requests dominate).
    """

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self._mean: dict[Any, float] = {}

    def observe(self, key, seconds: float) -> None:
        """Fold one completed request's time into its key's average."""
        mean = self._mean.get(key)
        self._mean[key] = seconds if mean is None else mean + self.alpha * (seconds - mean)

    def expected(self, key) -> float | None:
        """The key's average in seconds; None before its first observation."""
        return self._mean.get(key)


# ---------------------------------------------------------------------------------- limits
class FixedLimit:
    """A constant number of requests in flight (no adaptation)."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.inflight = 0

    def try_acquire(self, now: float) -> bool:
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True

    def release(self, started: float, now: float, sample: bool = True, crowd: int = 0) -> None:
        self.inflight -= 1

    def on_drop(self) -> None:
        """A downstream refusal: nothing to adapt."""


class GradientLimit:
    """An adaptive concurrency limit that follows the latency a stage really delivers.

    The gradient controller of Envoy's adaptive concurrency filter, in small:

    - every ``window_s``, **sampleRTT** is the median latency of the window's requests and
      ``gradient = clamp(max(minRTT * (1 + buffer), minRTT + slack) / sampleRTT, 0.5, 2)``;
      ``limit = gradient * limit + sqrt(gradient * limit)``: the square root is the headroom
      that lets the limit grow while latency stays near minRTT, and shrinking stops where
      queueing adds more than ``buffer`` (or, for fast requests, ``slack``) to minRTT;
    - **minRTT**, the latency without a queue, is the median of ``min_rtt_samples`` latencies
      of requests that started and ended with at most ``uncontended`` in flight.

    Envoy pins the limit to its minimum for a while every minute to measure minRTT, refusing
    whatever else arrives meanwhile. Here minRTT is measured from live requests that ran with
    few others in flight (Envoy's variant with a separate minimum limit also measures from
    live traffic): nothing is refused to measure it, a queue never raises it (queued requests
    run with more in flight), and a stale value corrects itself once load falls to that level.

    Two rules from Netflix's concurrency-limits: the limit never grows past twice the most
    requests seen in flight in the window (Gradient2 does not grow an app-limited limit), and
    a downstream refusal (:meth:`on_drop`) cuts it by 10% at once (its AIMD limit's backoff),
    so a stage in front of an overloaded one sheds at its own door. Like Gradient2 (whose
    minimum and initial limit are 20) the limit never goes below a floor sized for ordinary
    bursts: a stage that just started, or one whose replica peer just died, takes the burst
    instead of refusing work it has the capacity for.

    Parameters
    ----------
    min_limit, max_limit:
        Bounds of the limit (``max_limit`` wins if they cross); it starts at ``min_limit``.
    buffer:
        Latency above minRTT accepted before the limit shrinks, as a fraction of minRTT.
    slack_s:
        Latency above minRTT always accepted, in seconds: for requests of a few milliseconds a
        fraction of minRTT is less than a millisecond of queue, and refusing work to save it
        only costs goodput (clients sent again at once, each refusal costing the gateway CPU).
    window_s:
        How often the limit is recalculated from the latest latencies.
    min_rtt_samples:
        How many of the latest uncontended requests minRTT is the median of.
    uncontended:
        Requests in flight at or below which a latency counts as uncontended (at most
        ``min_limit``).
    """

    GRADIENT_RANGE = (0.5, 2.0)
    DROP_BACKOFF = 0.9

    def __init__(
        self,
        min_limit: int = 20,
        max_limit: int = 64,
        buffer: float = 0.25,
        slack_s: float = 0.0,
        window_s: float = 0.1,
        min_rtt_samples: int = 50,
        uncontended: int = 8,
    ):
        self.max_limit = max(1, int(max_limit))
        self.min_limit = min(self.max_limit, max(1, int(min_limit)))
        self.uncontended = min(self.min_limit, max(1, int(uncontended)))
        self.buffer = float(buffer)
        self.slack_s = float(slack_s)
        self.window_s = float(window_s)
        self.inflight = 0
        self.limit = float(self.min_limit)
        self._min_rtt: float | None = None
        self._min_rtt_stale = False
        self.sample_rtt: float | None = None
        self._uncontended: deque[float] = deque(maxlen=max(1, int(min_rtt_samples)))
        self._samples: list[float] = []
        self._window_start: float | None = None
        self._peak = 0

    def try_acquire(self, now: float) -> bool:
        """Admit one request if the limit allows it."""
        if self.inflight >= int(self.limit):
            return False
        self.inflight += 1
        self._peak = max(self._peak, self.inflight)
        return True

    def release(self, started: float, now: float, sample: bool = True, crowd: int = 0) -> None:
        """The request admitted at ``started`` ended at ``now``.

        ``sample``: its latency counts (False for a request its caller cancelled, or one a
        downstream refused); ``crowd``: requests in flight when it started, itself included.
        """
        if sample:
            latency = now - started
            if max(crowd, self.inflight) <= self.uncontended:
                self._uncontended.append(latency)
                self._min_rtt_stale = True  # the median is taken when it is read
            self._samples.append(latency)
        self.inflight -= 1
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= self.window_s and self._samples:
            self._update(now)

    @property
    def min_rtt(self) -> float | None:
        """The median of the latest uncontended latencies (None before the first one)."""
        if self._min_rtt_stale:
            self._min_rtt, self._min_rtt_stale = _median(self._uncontended), False
        return self._min_rtt

    def on_drop(self) -> None:
        """A stage this one depends on refused a request: back off at once."""
        self.limit = max(float(self.min_limit), self.limit * self.DROP_BACKOFF)

    def _update(self, now: float) -> None:
        self.sample_rtt = _median(self._samples)
        if self.min_rtt is not None:
            low, high = self.GRADIENT_RANGE
            buffered = max(self.min_rtt * (1 + self.buffer), self.min_rtt + self.slack_s)
            gradient = min(high, max(low, buffered / max(self.sample_rtt, 1e-9)))
            scaled = gradient * self.limit
            limit = scaled + math.sqrt(scaled)
            if limit > self.limit:
                limit = min(limit, max(self.limit, 2.0 * self._peak))
            self.limit = min(float(self.max_limit), max(float(self.min_limit), limit))
        self._samples.clear()
        self._window_start = now
        self._peak = self.inflight


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


# ------------------------------------------------------------------------------- admission
@dataclass(frozen=True)
class AdmissionSettings:
    """How a server limits the requests it works on at once.

    ``adaptive``: a :class:`GradientLimit` per method between ``min_inflight`` and
    ``max_inflight``; otherwise a fixed ``max_inflight``.
    """

    adaptive: bool = True
    max_inflight: int = 64
    min_inflight: int = 20
    buffer: float = 0.25
    slack_ms: float = 50.0

    @classmethod
    def from_config(cls, config) -> AdmissionSettings:
        """The settings of a server config (:class:`imgsearch.config.ServerConfig`)."""
        return cls(
            adaptive=config.concurrency_limit == "adaptive",
            max_inflight=config.max_inflight,
            min_inflight=config.min_inflight,
            buffer=config.limit_buffer,
            slack_ms=config.limit_slack_ms,
        )


class Ticket:
    """One admitted request: released by :meth:`Admission.finish`."""

    __slots__ = ("method", "kind", "limit", "started", "crowd", "deadline", "dropped")

    def __init__(self, method: str, kind: str, limit, started: float, deadline: float | None):
        self.method = method
        self.kind = kind
        self.limit = limit
        self.started = started
        self.crowd = limit.inflight  # in flight with it, itself included
        self.deadline = deadline
        self.dropped = False


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, and its trailing metadata (the pushback)."""

    reason: str
    message: str
    metadata: tuple[tuple[str, str], ...]


class Admission:
    """Deadline-aware admission and a concurrency limit per method, for one service.

    Parameters
    ----------
    service:
        The service's name in metrics and messages.
    settings:
        The limits (see :class:`AdmissionSettings`).
    clock:
        ``time.monotonic`` (replaceable in tests).
    """

    def __init__(
        self,
        service: str,
        settings: AdmissionSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.service = service
        self.settings = settings or AdmissionSettings()
        self.clock = clock
        self.times = ServiceTimes()
        self.limits: dict[str, GradientLimit | FixedLimit] = {}
        self._shed = {reason: SHED.labels(service, reason) for reason in SHED_REASONS}
        self._limit_gauges: dict[str, Any] = {}

    def limit_of(self, method: str) -> GradientLimit | FixedLimit:
        """The concurrency limit of ``method`` (created on first use)."""
        limit = self.limits.get(method)
        if limit is None:
            s = self.settings
            if s.adaptive:
                limit = GradientLimit(
                    s.min_inflight, s.max_inflight, s.buffer, slack_s=s.slack_ms / 1000
                )
            else:
                limit = FixedLimit(s.max_inflight)
            limit = self.limits[method] = limit
        return limit

    def admit(
        self, method: str, request, remaining_s: float | None, kind: str | None = None
    ) -> Ticket | Refusal:
        """Admit a request of ``method`` with ``remaining_s`` of its deadline left (None: no
        deadline), or say why not. An admitted request must be :meth:`finish`-ed. ``kind``:
        the request's :func:`request_kind` when the caller has it already."""
        now = self.clock()
        if kind is None:
            kind = request_kind(request)
        limit = self.limit_of(method)
        expected = self.times.expected((method, kind))
        if remaining_s is not None and expected is not None and limit.inflight > 0:
            # An idle stage tries anyway: that is how a stale estimate gets corrected.
            if remaining_s < expected:
                return self.refuse(
                    "deadline",
                    f"{self.service} sheds load: {1000 * remaining_s:.0f} ms left of the "
                    f"deadline, {kind or method} takes {1000 * expected:.0f} ms now",
                    NO_RETRY,
                )
        if not limit.try_acquire(now):
            return self.refuse(
                "limit",
                f"{self.service} sheds load: {limit.inflight} {method} requests in flight, "
                f"its limit now; retry with backoff",
                str(max(1, math.ceil(1000 * (expected or 0.001)))),
            )
        deadline = None if remaining_s is None else now + remaining_s
        ticket = Ticket(method, kind, limit, now, deadline)
        _ticket.set(ticket)
        return ticket

    def refuse(self, reason: str, message: str, pushback_ms: str) -> Refusal:
        """Count a refusal for ``reason`` and describe it."""
        self._shed[reason].inc()
        return Refusal(reason, message, ((PUSHBACK_KEY, pushback_ms),))

    def finish(self, ticket: Ticket, code: str) -> None:
        """Release ``ticket``'s place; its latency teaches the limit, and an OK one the
        service time of its kind."""
        now = self.clock()
        elapsed = now - ticket.started
        limit = ticket.limit
        if ticket.dropped:
            limit.release(ticket.started, now, sample=False)
            limit.on_drop()
        else:
            limit.release(ticket.started, now, code != "CANCELLED", ticket.crowd)
        if code == "OK":
            self.times.observe((ticket.method, ticket.kind), elapsed)
        if isinstance(limit, GradientLimit):
            value = int(limit.limit)
            shown = self._limit_gauges.get(ticket.method)
            if shown is None or shown[1] != value:
                # The gauge child is looked up once per method and set when the limit moves.
                gauge = shown[0] if shown else CONCURRENCY_LIMIT.labels(self.service, ticket.method)
                gauge.set(value)
                self._limit_gauges[ticket.method] = (gauge, value)


def current_deadline() -> float | None:
    """The ``time.monotonic()`` deadline of the request this task is handling (None: none)."""
    ticket = _ticket.get(None)
    return None if ticket is None else ticket.deadline


def report_downstream_overload() -> None:
    """The request this task handles was refused by a stage it depends on (shedding load).

    Its latency then says nothing about this stage, and this stage's limit backs off, so the
    next requests are refused at this door instead of costing the overloaded stage a call.
    """
    ticket = _ticket.get(None)
    if ticket is not None:
        ticket.dropped = True


# ---------------------------------------------------------------------------------- queues
async def run_live(
    executor: Executor, fn: Callable, *args, deadline: float | None, service: str
) -> Any:
    """``fn(*args)`` on ``executor``, unless its ``deadline`` passes while it waits for a thread.

    The wait is recorded in ``imgsearch_queue_wait_seconds{queue="executor"}``; work dropped
    unrun because its deadline passed (found expired when a thread was free, or its caller
    cancelled at the deadline while it waited) in ``imgsearch_shed_total{reason="expired"}``.

    Raises
    ------
    DeadlineExpired
        When the deadline (``time.monotonic()`` seconds) had passed when a thread was free;
        ``fn`` did not run.
    """
    submitted = time.monotonic()
    claim = threading.Lock()
    state = {"job": "queued"}

    def job():
        with claim:
            if state["job"] == "cancelled":
                return None
            state["job"] = "running"
        started = time.monotonic()
        QUEUE_WAIT.labels(service, "executor").observe(started - submitted)
        if deadline is not None and started >= deadline:
            SHED.labels(service, "expired").inc()
            raise DeadlineExpired(
                f"dropped before running: waited {1000 * (started - submitted):.0f} ms for a "
                f"thread, the deadline passed {1000 * (started - deadline):.0f} ms ago"
            )
        return fn(*args)

    try:
        return await asyncio.get_running_loop().run_in_executor(executor, job)
    except asyncio.CancelledError:
        with claim:
            unrun = state["job"] == "queued"
            state["job"] = "cancelled"
        if unrun:
            now = time.monotonic()
            QUEUE_WAIT.labels(service, "executor").observe(now - submitted)
            # A caller's cancellation at its deadline can reach the server a little before the
            # server's own clock of that deadline (its request took longer to arrive than the
            # cancellation did), so "at the deadline" allows for that transit.
            if deadline is not None and now >= deadline - CANCEL_TRANSIT_SLACK:
                SHED.labels(service, "expired").inc()
        raise
