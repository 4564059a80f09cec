"""The JSON door under load: the same searches through the door (HTTP) and over gRPC.

The door is measured as deployed: inside the gateway's process (``serve gateway
--web-port``, the default) or as `imgsearch web` in front of it (``--json-door-deployment
standalone``); the gRPC runs go to the same gateway process. Both paths get the same
open-loop rate and the same request sequence in one suite run. The p99 the door adds is a
difference of two noisy tails, so the runs are interleaved: each round is one gRPC run and
one HTTP run back to back, the first of the pair alternating from round to round (gRPC, HTTP,
HTTP, gRPC, ...), so that a drift of the machine's load weighs on both paths alike. Each
round gives one difference (its HTTP p99 minus its gRPC p99); the report gives every run with
each process's CPU per search, every round's difference, their median and a percentile
bootstrap interval of that median over the rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time

import grpc
from google.protobuf import json_format

from imgsearch_tools.bench import load as bench
from imgsearch_tools.bench.http_client import HttpClient
from imgsearch_tools.bench.processes import CpuMeter, free_port
from imgsearch_tools.bench.scenarios import CANDIDATES_K, K, say

NAME = "json-door"
PATHS = ("grpc", "http")
# Where the door runs: in the gateway's process, or as its own `imgsearch web` process.
IN_GATEWAY, STANDALONE = "in-gateway", "standalone"
DEPLOYMENTS = (IN_GATEWAY, STANDALONE)
# The p99 the door may add over gRPC at the rate (the docs compare against it).
BUDGET_MS = 5.0
# Requests whose HTTP bytes the JSON client keeps (the driver cycles through fewer).
MAX_PREBUILT = 10_000
# Resamples and level of the bootstrap interval of the median added p99.
BOOTSTRAP_RESAMPLES = 10_000
INTERVAL_LEVEL = 0.95


class _Reply:
    """What the load recorder reads of a SearchResponse, from the door's JSON."""

    def __init__(self, body: dict):
        self.results = body.get("results", [])
        self.degraded = bool(body.get("degraded"))
        self.degraded_reason = body.get("degraded_reason", "")
        self.artifact_versions = body.get("artifact_versions", {})


class HttpSearch:
    """``POST /v1/search`` with a gRPC stub's call signature, so the bench's driver sends it.

    Each request's JSON (the proto JSON mapping) and HTTP bytes are built once, the first time
    it is sent, so that the load generator's cost per call stays near the gRPC stub's.

    Parameters
    ----------
    url:
        The door's ``/v1/search`` address.
    ssl:
        The client's TLS context for an HTTPS door, or None.
    """

    def __init__(self, url: str, ssl=None):
        self.client = HttpClient(url, ssl)
        self.prebuilt: dict[int, tuple[object, bytes]] = {}

    def request_bytes(self, request, metadata) -> bytes:
        """The HTTP request of ``request`` (kept while the request object lives)."""
        known = self.prebuilt.get(id(request))
        if known is not None and known[0] is request:
            return known[1]
        if len(self.prebuilt) > MAX_PREBUILT:
            self.prebuilt.clear()
        body = json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)
        headers = {"Authorization": value for key, value in metadata}
        data = self.client.request_bytes(body.encode(), headers)
        self.prebuilt[id(request)] = (request, data)
        return data

    async def __call__(self, request, timeout: float, metadata=()):
        status, body = await self.client.send(self.request_bytes(request, metadata), timeout)
        payload = json.loads(body) if body else {}
        if status != 200:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            code = getattr(grpc.StatusCode, str(error.get("status")), grpc.StatusCode.UNKNOWN)
            raise grpc.aio.AioRpcError(
                code,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=error.get("message", f"HTTP {status}"),
            )
        return _Reply(payload)

    def close(self) -> None:
        self.client.close()


def web_command(target: str, port: int, artifacts: str, tls_files: dict | None) -> list[str]:
    """`imgsearch web` on ``port`` in front of the gateway at ``target``."""
    command = [
        sys.executable,
        "-m",
        "imgsearch_tools.cli",
        "web",
        "--target",
        target,
        "--port",
        str(port),
        "--artifacts",
        artifacts,
        "--log-level",
        "WARNING",
    ]
    for flag, value in (tls_files or {}).items():
        command += [flag, value]
    return command


def tls_files(certs: str) -> dict:
    """The door's flags for a `make certs` folder: HTTPS with the server certificate, the
    folder's token asked on its port and sent on to the gateway over mutual TLS."""
    from pathlib import Path

    from imgsearch_tools.certs import (
        CA_CERT,
        CLIENT_CERT,
        CLIENT_KEY,
        SERVER_CERT,
        SERVER_KEY,
        TOKEN,
    )

    folder = Path(certs)
    return {
        "--tls-cert": str(folder / SERVER_CERT),
        "--tls-key": str(folder / SERVER_KEY),
        "--auth-tokens-file": str(folder / TOKEN),
        "--cacert": str(folder / CA_CERT),
        "--cert": str(folder / CLIENT_CERT),
        "--key": str(folder / CLIENT_KEY),
        "--token-file": str(folder / TOKEN),
    }


async def wait_for_door(url: str, ssl, timeout: float = 60.0, proc=None) -> None:
    """Poll ``url`` until the door answers (any HTTP status)."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"imgsearch web exited with code {proc.returncode}")
            try:
                async with session.get(url, ssl=ssl if ssl is not None else True) as response:
                    await response.read()
                    return
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"imgsearch web did not answer at {url}") from None
                await asyncio.sleep(0.2)


def client_ssl_context(certs: str | None, deployment: str):
    """The HTTP client's TLS context for a `make certs` folder (None: plain HTTP). The door
    inside the gateway speaks the gateway's mutual TLS, so the client shows its certificate."""
    if not certs:
        return None
    import ssl
    from pathlib import Path

    from imgsearch_tools.certs import CA_CERT, CLIENT_CERT, CLIENT_KEY

    folder = Path(certs)
    context = ssl.create_default_context(cafile=str(folder / CA_CERT))
    if deployment == IN_GATEWAY:
        context.load_cert_chain(str(folder / CLIENT_CERT), str(folder / CLIENT_KEY))
    return context


def restart_gateway(services, web_port: int | None) -> None:
    """Restart the gateway process on its ports, serving the door on ``web_port`` (None:
    no door)."""
    overrides = {k: v for k, v in services.overrides.get("gateway", {}).items() if k != "web_port"}
    if web_port is not None:
        overrides["web_port"] = web_port
    services.overrides["gateway"] = overrides
    services.stop("gateway")
    services.start("gateway")
    services.wait_serving("gateway")


async def start_door(deployment: str, services, target: str, port: int, certs) -> str:
    """Start the door on ``port``; returns the name of the process it runs in."""
    if deployment == IN_GATEWAY:
        await asyncio.to_thread(restart_gateway, services, port)
        return "gateway"
    command = web_command(
        target, port, str(services.artifacts), tls_files(certs) if certs else None
    )
    services.start_process("web", command)
    return "web"


async def stop_door(deployment: str, services) -> None:
    """Stop the door; the gateway goes back to serving without one."""
    if deployment == IN_GATEWAY:
        await asyncio.to_thread(restart_gateway, services, None)
    else:
        services.stop("web")


async def json_door_scenario(args, services, target: str, queries, security=None) -> dict:
    """Start the door (in the gateway, or beside it); load it and the gateway at one rate."""
    certs = getattr(args, "tls", None)
    deployment = getattr(args, "json_door_deployment", IN_GATEWAY)
    port = free_port()
    base = f"{'https' if certs else 'http'}://127.0.0.1:{port}"
    client_ssl = client_ssl_context(certs, deployment)
    process = await start_door(deployment, services, target, port, certs)
    try:
        await wait_for_door(f"{base}/openapi.json", client_ssl, proc=services.procs[process])
        spec = bench.LoadSpec(
            target=target,
            qps=args.json_qps,
            duration_s=args.json_duration,
            warmup_s=args.warmup,
            retriever="keyword",
            ranker="als",
            k=K,
            candidates_k=CANDIDATES_K,
            channels=args.channels,
        )
        order = run_order(args.json_rounds)
        say(
            f"{NAME} ({deployment}): {spec.describe()} each, {args.json_rounds} rounds "
            f"({' '.join(order)}), {spec.duration_s:g} s per run"
        )
        runs = []
        load_average = [os.getloadavg()]
        http_call = HttpSearch(f"{base}/v1/search", client_ssl)
        try:
            for path in order:
                meter = CpuMeter(services)
                if path == "grpc":
                    result = await bench.run_load(
                        spec, queries, on_measure_start=meter.start, security=security
                    )
                else:
                    metadata = security.metadata() if security is not None else ()
                    result = await bench.drive(
                        spec, [http_call], queries, metadata, on_measure_start=meter.start
                    )
                meter.record(result)
                result["path"] = path
                runs.append(result)
                say(f"{NAME} {path}\n{bench.format_result(result)}")
        finally:
            http_call.close()
        load_average.append(os.getloadavg())
    finally:
        await stop_door(deployment, services)
    report = summarise(runs, args.json_qps)
    report["deployment"] = deployment
    report["load_average"] = {"start": list(load_average[0]), "end": list(load_average[-1])}
    return report


def run_order(rounds: int) -> list[str]:
    """The paths of ``rounds`` rounds: a gRPC run and an HTTP run each, the first of the pair
    alternating (gRPC, HTTP, HTTP, gRPC, gRPC, HTTP, ...)."""
    order = []
    for i in range(max(1, rounds)):
        order += PATHS if i % 2 == 0 else PATHS[::-1]
    return order


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def median_interval(
    values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, level: float = INTERVAL_LEVEL
) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the median of ``values`` (seeded: the same
    values give the same interval), or None for fewer than two values."""
    import numpy as np

    if len(values) < 2:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(0)
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(medians, [alpha, 1.0 - alpha])
    return round(float(low), 3), round(float(high), 3)


def summarise(runs: list[dict], qps: float) -> dict:
    """The runs, each path's mean p50/p99 and CPU per search of each process, each round's
    added p99 (its HTTP run's p99 minus its gRPC run's), their median and its interval."""
    paths = {}
    for path in PATHS:
        mine = [r for r in runs if r["path"] == path]
        processes = sorted({name for r in mine for name in r.get("cpu_ms_per_search", {})})
        paths[path] = {
            "p50_ms": _mean([r["latency_ms"]["p50"] for r in mine]),
            "p99_ms": _mean([r["latency_ms"]["p99"] for r in mine]),
            "errors": sum(r["error_count"] for r in mine),
            "cpu_ms_per_search": {
                name: _mean([r.get("cpu_ms_per_search", {}).get(name) for r in mine])
                for name in processes
            },
        }
    rounds = []
    for i in range(0, len(runs) - 1, len(PATHS)):
        pair = {r["path"]: r["latency_ms"]["p99"] for r in runs[i : i + len(PATHS)]}
        both = pair.get("http") is not None and pair.get("grpc") is not None
        rounds.append(round(pair["http"] - pair["grpc"], 3) if both else None)
    measured = [r for r in rounds if r is not None]
    added = round(statistics.median(measured), 3) if measured else None
    interval = median_interval(measured)
    return {
        "qps": qps,
        "order": [r["path"] for r in runs],
        "paths": paths,
        "rounds_p99_added_ms": rounds,
        "p99_added_ms": added,
        "p99_added_interval_ms": list(interval) if interval else None,
        "interval_level": INTERVAL_LEVEL,
        "budget_ms": BUDGET_MS,
        "within_budget": added is not None and added <= BUDGET_MS,
        "runs": runs,
    }


def _door_cpu(paths: dict, process: str) -> float | None:
    """The door's CPU ms per search: ``process``'s mean on the HTTP runs minus the gRPC runs'."""
    http = paths["http"]["cpu_ms_per_search"].get(process)
    grpc_cost = paths["grpc"]["cpu_ms_per_search"].get(process) or 0.0
    return None if http is None else http - grpc_cost


def render_json_door(report: dict) -> list[str]:
    """bench.md's section on the JSON door (empty when the suite did not run it)."""
    door = report.get("json_door")
    if not door:
        return []
    inside = door.get("deployment", STANDALONE) == IN_GATEWAY
    names = ("gateway", "retrieval", "ranking", "bench (load generator)")
    if inside:
        where = "the door inside the gateway's process (`serve gateway --web-port`)"
        columns = "gateway (with the door) · retrieval · ranking · load gen"
    else:
        names = ("web", *names)
        where = "`imgsearch web`, a process of its own in front of the gateway"
        columns = "web · gateway · retrieval · ranking · load gen"
    lines = [
        f"### JSON door: HTTP through {where} vs gRPC, open loop {door['qps']:g} qps",
        "",
        "Keyword + ALS, the same request sequence on both paths into the same gateway process, "
        "interleaved in rounds of one gRPC and one HTTP run, the first of each pair "
        "alternating. CPU ms per search: each process's own CPU time (from /proc) over the run "
        "divided by the searches answered; the load generator is the HTTP client (a lean "
        "keep-alive one) or the gRPC stub.",
        "",
        "| path | requests | achieved QPS | p50 ms | p90 ms | p99 ms | max ms | errors | CPU ms "
        f"per search: {columns} = total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in door["runs"]:
        lat, cost = run["latency_ms"], run.get("cpu_ms_per_search", {})
        shares = " · ".join(f"{cost[n]:.2f}" if n in cost else "–" for n in names)
        lines.append(
            f"| {run['path']} | {run['completed']} | {run['achieved_qps']:.0f} | {lat['p50']} | "
            f"{lat['p90']} | {lat['p99']} | {lat['max']} | {run['error_count']} | {shares} = "
            f"{cost.get('total', '–')} |"
        )
    paths = door["paths"]
    rounds = ", ".join(f"{r:+.1f}" if r is not None else "–" for r in door["rounds_p99_added_ms"])
    interval = door.get("p99_added_interval_ms")
    spread = (
        f", {door['interval_level']:.0%} bootstrap interval of the median over the rounds "
        f"[{interval[0]:+.1f}, {interval[1]:+.1f}] ms"
        if interval
        else ""
    )
    mean_cost = {
        path: " · ".join(
            f"{paths[path]['cpu_ms_per_search'][n]:.2f}"
            if paths[path]["cpu_ms_per_search"].get(n) is not None
            else "–"
            for n in names
        )
        for path in PATHS
    }
    load = door.get("load_average")
    lines += [
        "",
        f"p99 the door adds in each round (its HTTP run's p99 minus its gRPC run's): {rounds} ms;"
        f" median **{door['p99_added_ms']} ms**{spread} (budget {door['budget_ms']:g} ms: "
        f"{'within' if door['within_budget'] else 'over'}). Mean p99: HTTP "
        f"{paths['http']['p99_ms']} ms, gRPC {paths['grpc']['p99_ms']} ms. Mean CPU ms per "
        f"search ({columns}): HTTP {mean_cost['http']}; gRPC {mean_cost['grpc']}.",
    ]
    door_cpu = _door_cpu(paths, "gateway" if inside else "web")
    if door_cpu is not None:
        lines.append(
            f"The door's own CPU per search ({'the gateway' if inside else 'web'} on the HTTP "
            f"runs minus on the gRPC runs): {door_cpu:.2f} ms."
        )
    if load:
        lines.append(
            f"Load average over the scenario: {', '.join(f'{v:.2f}' for v in load['start'])} at "
            f"the start, {', '.join(f'{v:.2f}' for v in load['end'])} at the end."
        )
    return lines + [""]
