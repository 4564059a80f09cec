"""Load generator for FeedbackService.LogConversions: acknowledged events per second and latency."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from imgsearch.feedback.v1 import feedback_service_pb2 as pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from imgsearch.ranking_metrics import percentiles_ms


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


# ------------------------------------------------------------------------ the benchmark
def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (what an fsync costs depends on it)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and target.startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], f"{parts[2]} on {parts[1]}"
    return kind


def _postgres_schema(dsn: str, schema: str, create: bool) -> tuple[str, str]:
    """Create (or drop) a scratch schema; returns a DSN whose tables live in it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(dsn, autocommit=True) as conn:
        if create:
            conn.execute(f"CREATE SCHEMA {schema}")
            version = conn.execute("SHOW server_version").fetchone()[0]
        else:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            return "", ""
    params = conninfo_to_dict(dsn)
    params["options"] = f"-c search_path={schema}"
    return make_conninfo(**params), version


async def bench_backend(
    backend: str,
    artifacts: str,
    work_dir: Path,
    specs: list[dict],
    photo_ids: list[str],
    keywords: list[str],
    postgres_dsn: str = "",
) -> dict:
    """Serve the gateway on a fresh store of ``backend``, run each load, measure, clean up.

    Returns the backend's description and one result per spec, each with the gateway's and
    the load generator's CPU time per 1,000 events and the cores other processes kept busy.
    """
    from imgsearch.conversion_store import open_store
    from imgsearch.cpu import machine_busy_seconds
    from imgsearch_tools.bench.processes import ServiceProcesses

    run_id = uuid.uuid4().hex[:8]
    info: dict = {"backend": backend}
    if backend == "sqlite":
        db = work_dir / f"bench-{run_id}.sqlite3"
        store = {"conversions_db": str(db)}
        location = {"db": db}
        info["where"] = (
            f"SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL, {_filesystem(work_dir)}"
        )
    else:
        schema = f"bench_{run_id}"
        dsn, version = _postgres_schema(postgres_dsn, schema, create=True)
        store = {"conversions_dsn": dsn}
        location = {"dsn": dsn}
        info["where"] = f"PostgreSQL {version}, synchronous_commit=on, same machine"
    services = ServiceProcesses(artifacts, work_dir / "logs", store=store)
    services.start("gateway")
    results = []
    try:
        services.wait_serving("gateway", timeout=120)
        for n, fields in enumerate(specs):
            spec = FeedbackLoadSpec(target=services.address("gateway"), **fields)
            cpu0, self0 = services.cpu_seconds()["gateway"], time.process_time()
            busy0, wall0 = machine_busy_seconds(), time.perf_counter()
            result = await run_feedback_load(spec, photo_ids, keywords, f"{run_id}-{n}")
            wall = time.perf_counter() - wall0
            gateway_cpu = services.cpu_seconds()["gateway"] - cpu0
            loadgen_cpu = time.process_time() - self0
            sent = max(1, result["events_acknowledged"]) * (wall / result["measured_s"])
            result["cpu_ms_per_1000_events"] = {
                "gateway": round(1e6 * gateway_cpu / sent, 1),
                "load generator": round(1e6 * loadgen_cpu / sent, 1),
            }
            busy = machine_busy_seconds()
            if busy is not None and busy0 is not None:
                others = (busy - busy0 - gateway_cpu - loadgen_cpu) / wall
                result["other_processes_cores"] = round(max(0.0, others), 2)
            results.append(result)
        with open_store(**location) as opened:
            info["events_stored"] = opened.count()
    finally:
        services.stop_all()
        if backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        else:
            _postgres_schema(postgres_dsn, schema, create=False)
    info["runs"] = results
    return info


def render_feedback_markdown(report: dict) -> str:
    """The benchmark as a Markdown table with the machine it ran on."""
    machine = report["machine"]
    lines = [
        f"Measured {machine['date']} on {machine['cpu_model']}, {machine['usable_cpus']} usable "
        f"CPUs, {machine['memory_gib']} GiB, `{machine['platform']}`, Python "
        f"{machine['python']}, grpcio {machine['grpcio']}; load average "
        f"{machine['loadavg_at_start']} at start. Command: `{machine['command']}`.",
        "",
        "One `imgsearch serve gateway` process (FeedbackService) and the load generator (closed "
        "loop, grpc.aio, one channel; a fresh event id per event) on the same CPUs; with "
        "PostgreSQL, the database server's own CPU counts under other processes.",
        "",
        "| backend | batch | concurrency | events/s | calls/s | p50 ms | p99 ms | max ms | "
        "errors | CPU ms per 1,000 events: gateway · load gen | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for backend in report["backends"]:
        for run in backend["runs"]:
            spec, latency, cpu = run["spec"], run["latency_ms"], run["cpu_ms_per_1000_events"]
            errors = sum(run["errors"].values())
            lines.append(
                f"| {backend['backend']} | {spec['batch_size']} | {spec['concurrency']} | "
                f"{run['events_per_s']:,.0f} | {run['calls_per_s']:,.0f} | {latency['p50']:.1f} | "
                f"{latency['p99']:.1f} | {latency['max']:.1f} | {errors} | "
                f"{cpu['gateway']} · {cpu['load generator']} | "
                f"{run.get('other_processes_cores', '')} |"
            )
    lines.append("")
    for backend in report["backends"]:
        lines.append(
            f"- {backend['backend']}: {backend['where']}; {backend['events_stored']:,} events "
            "stored in all."
        )
    return "\n".join(lines) + "\n"
