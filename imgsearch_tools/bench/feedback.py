"""Load generator for FeedbackService.LogConversions: acknowledged events per second and latency."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from imgsearch.feedback.v1 import feedback_service_pb2 as pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from imgsearch.metrics import percentiles_ms


@dataclass(frozen=True)
class FeedbackLoadSpec:
    """What to send: closed-loop workers, each waiting for its reply before the next batch.

    Attributes
    ----------
    target:
        The gateway's HOST:PORT.
    batch_size:
        Events per LogConversions call.
    concurrency:
        Calls in flight at once (one worker each).
    duration_s:
        The measured window, after ``warmup_s``.
    users:
        How many distinct synthetic users the events spread over.
    """

    target: str
    batch_size: int = 100
    concurrency: int = 4
    duration_s: float = 10.0
    warmup_s: float = 2.0
    users: int = 10_000
    seed: int = 0
    timeout_s: float = 10.0


async def run_feedback_load(
    spec: FeedbackLoadSpec, photo_ids: list[str], keywords: list[str], run_id: str = ""
) -> dict:
    """Send batches of new events for ``warmup_s + duration_s`` and measure the window.

    Every event has a fresh id (``run_id`` keeps runs apart in one store), a catalogue photo
    and keyword and a time just past. Only calls that finish inside the measured window
    count; an event counts when its call returned OK and it was stored or a duplicate.

    Returns
    -------
    dict
        ``events_per_s``, ``calls_per_s``, ``latency_ms`` (per call: p50/p90/p99/max/mean),
        ``events_acknowledged``, ``events_rejected``, ``errors`` (by status code), ``calls``,
        ``measured_s`` and the spec.
    """
    if not photo_ids:
        raise ValueError("no photo ids to log conversions of")
    run_id = run_id or uuid.uuid4().hex[:8]
    rng = random.Random(spec.seed)
    users = [f"bench-{run_id}-user-{i}" for i in range(spec.users)]
    keywords = keywords or ["bench"]
    latencies: list[float] = []
    acknowledged = rejected = calls = 0
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    window_start = start + spec.warmup_s
    end = window_start + spec.duration_s

    def batch(worker: int, seq: int) -> pb.LogConversionsRequest:
        now_ns = time.time_ns()
        events = []
        for j in range(spec.batch_size):
            stamp = Timestamp()
            stamp.FromNanoseconds(now_ns - (spec.batch_size - j) * 1000)
            events.append(
                pb.ConversionEvent(
                    event_id=f"{run_id}-{worker}-{seq}-{j}",
                    user_id=rng.choice(users),
                    photo_id=rng.choice(photo_ids),
                    query=rng.choice(keywords),
                    converted_at=stamp,
                    country="FR",
                )
            )
        return pb.LogConversionsRequest(events=events)

    async def worker(stub, n: int) -> None:
        nonlocal acknowledged, rejected, calls
        seq = 0
        while time.perf_counter() < end:
            request = batch(n, seq)
            seq += 1
            sent = time.perf_counter()
            try:
                response = await stub.LogConversions(request, timeout=spec.timeout_s)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            done = time.perf_counter()
            if not window_start <= done <= end:
                continue
            calls += 1
            if code != "OK":
                errors[code] += 1
                continue
            latencies.append(done - sent)
            acknowledged += response.stored_count + response.duplicate_count
            rejected += response.rejected_count

    async with grpc.aio.insecure_channel(spec.target) as channel:
        stub = pb_grpc.FeedbackServiceStub(channel)
        await channel.channel_ready()
        await asyncio.gather(*(worker(stub, n) for n in range(spec.concurrency)))
    measured = spec.duration_s
    return {
        "spec": asdict(spec),
        "run_id": run_id,
        "events_per_s": round(acknowledged / measured, 1),
        "calls_per_s": round(len(latencies) / measured, 1),
        "latency_ms": percentiles_ms(latencies),
        "events_acknowledged": acknowledged,
        "events_rejected": rejected,
        "calls": calls,
        "errors": dict(errors),
        "measured_s": measured,
    }
