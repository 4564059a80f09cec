"""The suite's scenarios: steady load, ranking killed mid-load, hot reload under load."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imgsearch_tools.bench import go_load
from imgsearch_tools.bench.in_process import InProcessPipeline, network_ratio
from imgsearch_tools.bench.processes import CpuMeter, ServiceProcesses
from imgsearch_tools.bench.queries import BenchQuery
from imgsearch_tools.bench.reflection_check import reflection_client_check

# Request shape of every standard scenario: k=10 of 100 candidates.
K = 10
CANDIDATES_K = 100


@dataclass(frozen=True)
class Scenario:
    """One load scenario of the suite.

    ``unique_share`` of its queries are made unique (no cache has them); ``repeated_query``
    sends that one query every time; ``duration_s`` overrides the suite's duration.
    """

    name: str
    retriever: str
    ranker: str
    qps: float | None = None
    concurrency: int | None = None
    needs_clip: bool = False
    unique_share: float = 0.0
    repeated_query: str = ""
    duration_s: float | None = None


def standard_scenarios(qps: float) -> list[Scenario]:
    """The suite's steady-state scenarios (``qps`` is the open-loop rate)."""
    rate = f"{qps:g}"
    return [
        Scenario(f"keyword+als open {rate} qps", "keyword", "als", qps=qps),
        Scenario("keyword+als closed c=1", "keyword", "als", concurrency=1),
        Scenario("keyword+als closed c=10", "keyword", "als", concurrency=10),
        Scenario("keyword+als closed c=50", "keyword", "als", concurrency=50),
        Scenario(f"keyword+none open {rate} qps", "keyword", "none", qps=qps),
        Scenario("keyword+none closed c=10", "keyword", "none", concurrency=10),
        Scenario(f"hybrid+als open {rate} qps", "hybrid", "als", qps=qps, needs_clip=True),
        Scenario("hybrid+als closed c=10", "hybrid", "als", concurrency=10, needs_clip=True),
    ]


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def measured(services: ServiceProcesses, spec, queries, security=None) -> dict:
    """One load run (from the load generator ``spec`` names) with each process's CPU share
    over its measured phase."""
    meter = CpuMeter(services)
    loadavg = os.getloadavg()[0]
    result = await go_load.send_load(spec, queries, meter.start, security)
    meter.record(result)
    result["loadavg_1m_before"] = round(loadavg, 2)
    return result


async def run_scenario(
    services: ServiceProcesses, scenario: Scenario, target: str, args, queries, security=None
):
    """One scenario against ``target`` with the suite's settings; its result, named."""
    from imgsearch_tools.bench import load as bench

    if scenario.repeated_query:
        queries = [BenchQuery(queries[0].user_id, scenario.repeated_query)]
    spec = bench.LoadSpec(
        target=target,
        qps=scenario.qps,
        concurrency=scenario.concurrency,
        duration_s=scenario.duration_s or args.duration,
        warmup_s=args.warmup,
        retriever=scenario.retriever,
        ranker=scenario.ranker,
        k=K,
        candidates_k=CANDIDATES_K,
        channels=args.channels,
        unique_share=scenario.unique_share,
    )
    result = await measured(services, spec, queries, security)
    say(
        f"{scenario.name}\n{bench.format_result(result)}\n"
        f"  CPU % {result['cpu_percent']}\n"
        f"  CPU ms per search {result['cpu_ms_per_search']}"
    )
    return {"name": scenario.name, **result}


async def reflection_run(target: str, queries, security=None) -> dict:
    """What ghz does without --proto: resolve the method by reflection only, then call it."""
    import asyncio

    from imgsearch_tools.bench import load as bench

    spec = bench.LoadSpec(target=target, concurrency=1, retriever="keyword", ranker="als")
    requests = [bench.request_fields(q, spec) for q in queries[:200]]
    try:
        result = await asyncio.to_thread(
            reflection_client_check, target, requests, security=security
        )
    except LookupError as exc:
        result = {"error": str(exc)}
    say(f"reflection-only client: {result}")
    return result


def _offset(mark: dict) -> float:
    return round(time.perf_counter() - mark["start"], 2)


def fault_load_spec(args, target: str, duration_s: float):
    """The keyword + ALS open-loop load that the kill and reload scenarios run under."""
    from imgsearch_tools.bench import load as bench

    return bench.LoadSpec(
        target=target,
        qps=args.fault_qps,
        duration_s=duration_s,
        warmup_s=1.0,
        retriever="keyword",
        ranker="als",
        k=K,
        candidates_k=CANDIDATES_K,
        channels=args.channels,
    )


async def kill_ranking_scenario(
    args, services: ServiceProcesses, target: str, queries, security=None
) -> dict:
    """SIGTERM the ranking server mid-load, restart it, and watch the gateway recover."""
    import asyncio

    from imgsearch_tools.bench import load as bench

    spec = fault_load_spec(args, target, args.kill_duration)
    mark: dict = {}
    ready = asyncio.Event()
    events: list[dict] = []

    def on_start() -> None:
        mark["start"] = time.perf_counter()
        ready.set()

    async def controller() -> None:
        await ready.wait()
        await asyncio.sleep(min(3.0, args.kill_duration / 5))
        events.append({"t": _offset(mark), "event": "SIGTERM ranking"})
        code = await asyncio.to_thread(services.stop, "ranking")
        events.append({"t": _offset(mark), "event": f"ranking exited (code {code})"})
        await asyncio.sleep(1.0)
        services.start("ranking")
        events.append({"t": _offset(mark), "event": "ranking restarted"})
        await asyncio.to_thread(services.wait_serving, "ranking", 180.0)
        events.append({"t": _offset(mark), "event": "ranking SERVING"})

    say(f"kill ranking mid-load: {spec.describe()} for {spec.duration_s:g} s")
    # No CPU accounting here: the ranking process is replaced mid-run.
    control = asyncio.ensure_future(controller())
    result = await bench.run_load(spec, queries, on_measure_start=on_start, security=security)
    try:
        await asyncio.wait_for(control, timeout=1.0)
    except (asyncio.TimeoutError, RuntimeError) as exc:
        events.append({"t": _offset(mark), "event": f"ranking did not come back: {exc!r}"})
    serving = next((e["t"] for e in events if e["event"] == "ranking SERVING"), None)
    killed = events[0]["t"] if events else None
    result["events"] = events
    result["degraded_only_while_down"] = bool(
        serving is not None
        and result["last_degraded_s"] is not None
        and result["last_degraded_s"] <= serving + 2.0
    )
    result["recovered_after_serving_s"] = (
        round(max(0.0, result["last_degraded_s"] - serving), 2)
        if serving is not None and result["last_degraded_s"] is not None
        else None
    )
    after = [
        row for row in result["timeline"] if serving is not None and row["second"] > serving + 1
    ]
    result["after_restart"] = {
        "full": sum(r["full"] for r in after),
        "degraded": sum(r["degraded"] for r in after),
        "errors": sum(r["errors"] for r in after),
    }
    result["killed_at_s"] = killed
    result["serving_again_at_s"] = serving
    say(
        f"kill ranking: {bench.format_result(result)}\n  events {events}\n"
        f"  after restart {result['after_restart']}"
    )
    return result


def served_root(artifact_set, out: Path) -> Path:
    """An artifact root under ``out`` that serves ``artifact_set`` and holds a reload target.

    ``out/artifacts/sets/<version>`` (published as ``current``) and
    ``out/artifacts/sets/<version>-reload`` are hard-linked copies of the set (the second with
    its own manifest version), so a hot reload by version exercises the full load-and-swap
    path and shows the switch in every response, without a second build and without writing
    into the artifact root the suite was given.
    """
    import shutil

    from imgsearch import artifacts

    root = out / "artifacts"
    sets_dir = root / artifacts.SETS_DIR
    sets_dir.mkdir(parents=True, exist_ok=True)
    for version in (artifact_set.version, reload_version(artifact_set)):
        target = sets_dir / version
        if target.exists():
            shutil.rmtree(target)  # made by an earlier run of the suite, under its own out/
        artifacts.link_tree(artifact_set.path, target, skip=(artifacts.MANIFEST,))
        artifacts.write_manifest(target, {**artifact_set.manifest, "version": version})
    artifacts.publish(root, sets_dir / artifact_set.version)
    return root


def reload_version(artifact_set) -> str:
    """The version the hot-reload scenario switches to."""
    return f"{artifact_set.version}-reload"


async def hot_reload_scenario(
    args, services: ServiceProcesses, target: str, queries, artifact_set, security=None
) -> dict:
    """Reload all three servers to another set version mid-load; count failed requests.

    The services serve :func:`served_root`; the reload asks each admin port for the
    ``-reload`` version there.
    """
    import asyncio

    import grpc

    from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
    from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
    from imgsearch_tools.bench import load as bench

    version = reload_version(artifact_set)
    spec = fault_load_spec(args, target, args.reload_duration)
    mark: dict = {}
    ready = asyncio.Event()
    events: list[dict] = []

    meter = CpuMeter(services)

    def on_start() -> None:
        mark["start"] = time.perf_counter()
        meter.start()
        ready.set()

    async def controller() -> None:
        await ready.wait()
        await asyncio.sleep(min(3.0, args.reload_duration / 5))
        for name in ("retrieval", "ranking", "gateway"):
            async with grpc.aio.insecure_channel(services.admin_address(name)) as channel:
                events.append({"t": _offset(mark), "event": f"Reload {name}"})
                try:
                    reply = await admin_grpc.AdminServiceStub(channel).Reload(
                        admin_pb.ReloadRequest(version=version), timeout=300
                    )
                    events.append(
                        {
                            "t": _offset(mark),
                            "event": f"{name}: {reply.previous_version} -> {reply.version} "
                            f"({reply.load_ms:.0f} ms)",
                        }
                    )
                except grpc.aio.AioRpcError as exc:
                    events.append(
                        {"t": _offset(mark), "event": f"{name}: {exc.code().name} {exc.details()}"}
                    )

    say(f"hot reload mid-load: {spec.describe()} for {spec.duration_s:g} s -> version {version}")
    control = asyncio.ensure_future(controller())
    result = await bench.run_load(spec, queries, on_measure_start=on_start, security=security)
    meter.record(result)
    await control
    result["events"] = events
    result["reload_version"] = version
    result["failed_requests"] = result["error_count"]
    result["responses_on_new_version"] = sum(
        n
        for versions, n in result["artifact_versions"].items()
        if versions and all(v.endswith(version) for v in versions.split(","))
    )
    say(f"hot reload: {bench.format_result(result)}\n  events {events}")
    return result


def add_in_process(report: dict, artifacts_path, queries) -> None:
    """Time each scenario's requests in-process and attach the e2e / in-process ratio."""

    runs = [r for r in report["scenarios"] if "latency_ms" in r]
    runs += [report[key] for key in ("kill_ranking", "hot_reload") if key in report]
    if not runs:
        return
    try:
        pipeline = InProcessPipeline(artifacts_path)
    except Exception as exc:  # noqa: BLE001 - keep the measured load figures regardless
        say(f"in-process baseline skipped: cannot load {artifacts_path}: {exc!r}")
        for run in runs:
            run["in_process"] = {"skipped": f"cannot load the artifact set: {exc!r}"}
            run["e2e_over_in_process_p50"] = None
        return
    cache: dict[tuple, dict] = {}
    for run in runs:
        key = (run["retriever"], run["ranker"], run["k"], run["candidates_k"])
        if key not in cache:
            try:
                cache[key] = pipeline.measure(queries, *key)
            except ValueError as exc:
                cache[key] = {"skipped": str(exc)}
        run["in_process"] = cache[key]
        run["e2e_over_in_process_p50"] = network_ratio(run, cache[key])


def write_ghz_data(path: Path, queries) -> None:
    """Realistic SearchRequests as a JSON array for ``ghz --data-file`` (sent round-robin)."""
    from imgsearch_tools.bench import load as bench

    spec = bench.LoadSpec(target="", concurrency=1, retriever="keyword", ranker="als")
    path.write_text(json.dumps([bench.request_fields(q, spec) for q in queries], indent=1))
