"""The JSON door under load: the same searches through `imgsearch web` (HTTP) and over gRPC.

Both paths get the same open-loop rate and the same request sequence in one suite run, in
the order gRPC, HTTP, HTTP, gRPC, so that a drift of the machine's load over the scenario
weighs on both alike; the report gives each run and the p99 the door adds (mean of the HTTP
runs' p99 minus mean of the gRPC runs').
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc

from imgsearch_tools.bench import load as bench
from imgsearch_tools.bench.processes import CpuMeter, free_port
from imgsearch_tools.bench.scenarios import CANDIDATES_K, K, say

NAME = "json-door"
ORDER = ("grpc", "http", "http", "grpc")
# The p99 the door may add over gRPC at the rate (the docs compare against it).
BUDGET_MS = 5.0


class _Reply:
    """What the load recorder reads of a SearchResponse, from the door's JSON."""

    def __init__(self, body: dict):
        self.results = body.get("results", [])
        self.degraded = bool(body.get("degraded"))
        self.degraded_reason = body.get("degraded_reason", "")
        self.artifact_versions = body.get("artifact_versions", {})


class HttpSearch:
    """``POST /v1/search`` with a gRPC stub's call signature, so the bench's driver sends it.

    Parameters
    ----------
    session:
        An ``aiohttp.ClientSession`` (keep-alive connections).
    url:
        The door's ``/v1/search`` address.
    ssl:
        The client's TLS context for an HTTPS door, or None.
    """

    def __init__(self, session, url: str, ssl=None):
        self.session = session
        self.url = url
        self.ssl = ssl

    async def __call__(self, request, timeout: float, metadata=()):
        import aiohttp
        from google.protobuf import json_format

        headers = {"Content-Type": "application/json"}
        headers.update({"Authorization": value for key, value in metadata})
        body = json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)
        async with self.session.post(
            self.url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            ssl=self.ssl if self.ssl is not None else True,
        ) as response:
            payload = await response.json(content_type=None)
        if response.status != 200:
            error = (payload or {}).get("error", {})
            code = getattr(grpc.StatusCode, str(error.get("status")), grpc.StatusCode.UNKNOWN)
            raise grpc.aio.AioRpcError(
                code,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=error.get("message", f"HTTP {response.status}"),
            )
        return _Reply(payload)


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


async def json_door_scenario(args, services, target: str, queries, security=None) -> dict:
    """Start `imgsearch web` beside the gateway; load it and the gateway at the same rate."""
    import ssl as ssl_module

    import aiohttp

    certs = getattr(args, "tls", None)
    port = free_port()
    scheme = "https" if certs else "http"
    base = f"{scheme}://127.0.0.1:{port}"
    client_ssl = None
    if certs:
        from pathlib import Path

        from imgsearch_tools.certs import CA_CERT

        client_ssl = ssl_module.create_default_context(cafile=str(Path(certs) / CA_CERT))
    command = web_command(
        target, port, str(services.artifacts), tls_files(certs) if certs else None
    )
    services.start_process("web", command)
    try:
        await wait_for_door(f"{base}/openapi.json", client_ssl, proc=services.procs["web"])
        spec = bench.LoadSpec(
            target=target,
            qps=args.json_qps,
            duration_s=args.duration,
            warmup_s=args.warmup,
            retriever="keyword",
            ranker="als",
            k=K,
            candidates_k=CANDIDATES_K,
            channels=args.channels,
        )
        say(f"{NAME}: {spec.describe()} each, {' '.join(ORDER)}, {spec.duration_s:g} s per run")
        runs = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            http_call = HttpSearch(session, f"{base}/v1/search", client_ssl)
            for path in ORDER:
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
        services.stop("web")
    return summarise(runs, args.json_qps)


def summarise(runs: list[dict], qps: float) -> dict:
    """The runs, each path's mean p50/p99 and the p99 the door adds over gRPC."""
    paths = {}
    for path in ("grpc", "http"):
        mine = [r for r in runs if r["path"] == path]
        p99s = [r["latency_ms"]["p99"] for r in mine if r["latency_ms"]["p99"] is not None]
        p50s = [r["latency_ms"]["p50"] for r in mine if r["latency_ms"]["p50"] is not None]
        paths[path] = {
            "p50_ms": round(sum(p50s) / len(p50s), 3) if p50s else None,
            "p99_ms": round(sum(p99s) / len(p99s), 3) if p99s else None,
            "errors": sum(r["error_count"] for r in mine),
        }
    grpc_p99, http_p99 = paths["grpc"]["p99_ms"], paths["http"]["p99_ms"]
    added = None if grpc_p99 is None or http_p99 is None else round(http_p99 - grpc_p99, 3)
    return {
        "qps": qps,
        "order": list(ORDER),
        "paths": paths,
        "p99_added_ms": added,
        "budget_ms": BUDGET_MS,
        "within_budget": added is not None and added <= BUDGET_MS,
        "runs": runs,
    }


def render_json_door(report: dict) -> list[str]:
    """bench.md's section on the JSON door (empty when the suite did not run it)."""
    door = report.get("json_door")
    if not door:
        return []
    lines = [
        f"### JSON door: HTTP through `imgsearch web` vs gRPC, open loop {door['qps']:g} qps",
        "",
        "Keyword + ALS, the same request sequence on both paths, runs in the order "
        f"{', '.join(door['order'])}. CPU ms per search include the door's process (web).",
        "",
        "| path | achieved QPS | p50 ms | p90 ms | p99 ms | max ms | errors | CPU ms per "
        "search: web · gateway · retrieval · ranking · load gen = total |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in door["runs"]:
        lat, cost = run["latency_ms"], run.get("cpu_ms_per_search", {})
        names = ("web", "gateway", "retrieval", "ranking", "bench (load generator)")
        shares = " · ".join(f"{cost[n]:.2f}" if n in cost else "–" for n in names)
        lines.append(
            f"| {run['path']} | {run['achieved_qps']:.0f} | {lat['p50']} | {lat['p90']} | "
            f"{lat['p99']} | {lat['max']} | {run['error_count']} | {shares} = "
            f"{cost.get('total', '–')} |"
        )
    paths = door["paths"]
    lines += [
        "",
        f"Mean p99: HTTP {paths['http']['p99_ms']} ms, gRPC {paths['grpc']['p99_ms']} ms: "
        f"the door adds **{door['p99_added_ms']} ms** to p99 (budget {door['budget_ms']:g} ms: "
        f"{'within' if door['within_budget'] else 'over'}).",
        "",
    ]
    return lines
