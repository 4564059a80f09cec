"""The compiled load generator: the load of :mod:`~imgsearch_tools.bench.load`, sent from Go.

A benchmark on one machine shares its cores between the servers and the load generator. The
Python one (``grpc.aio``) spent 0.44-0.51 ms of CPU per search in the floor runs at 10
clients, as much as a bare server hop. ``loadgen/main.go`` is a small grpc-go client that
sends the same serialized requests for about 30% less (0.29-0.39 ms in the same runs); ghz,
which the project's users load-test with, is a grpc-go client too.

Go is not a dependency: :func:`build` compiles it with Debian's ``golang-go`` and
``golang-google-grpc-dev`` (``apt install golang-go golang-google-grpc-dev``; both from the
Debian archive, no module download) and caches the binary by its source's hash; without them
it raises :class:`GoUnavailable`, naming what to install, and callers that asked for ``auto``
use the Python load generator.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from imgsearch_tools.bench.queries import BenchQuery

SOURCE = Path(__file__).parent / "loadgen" / "main.go"
# Where Debian's golang-*-dev packages install Go sources (GOPATH layout, no modules).
DEBIAN_GOPATH = "/usr/share/gocode"
INSTALL_HINT = "apt install golang-go golang-google-grpc-dev"
PROTOCOL = 1  # the report's "protocol"; main.go's must match
# A closed loop's request file holds enough unique queries for this rate over its run.
MAX_CLOSED_LOOP_QPS = 4000
CHOICES = ("auto", "go", "python")


class GoUnavailable(RuntimeError):
    """The compiled load generator cannot be built here; the message says what is missing."""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/imgsearch/loadgen`` (``~/.cache/...`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "imgsearch" / "loadgen"


def build(cache: Path | None = None) -> Path:
    """The load generator's binary, built into ``cache`` on first use (then reused).

    Raises
    ------
    GoUnavailable
        Without ``go`` on PATH, or when the build fails (the grpc-go sources missing).
    """
    go = shutil.which("go")
    if go is None:
        raise GoUnavailable(f"no `go` on PATH ({INSTALL_HINT})")
    cache = Path(cache or default_cache())
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache / f"loadgen-{digest}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    gopath = os.pathsep.join(p for p in (os.environ.get("GOPATH", ""), DEBIAN_GOPATH) if p)
    env = {
        **os.environ,
        "GOPATH": gopath,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOCACHE": str(cache / "go-build"),
    }
    partial = cache / f".{binary.name}.{os.getpid()}"
    built = subprocess.run(
        [go, "build", "-o", str(partial), "."],
        cwd=SOURCE.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        detail = built.stderr.strip().splitlines()[-1:] or ["no output"]
        raise GoUnavailable(f"go build of {SOURCE} failed ({INSTALL_HINT}?): {detail[0]}")
    os.replace(partial, binary)
    return binary


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve(choice: str, cache: Path | None = None, say: Callable[[str], None] = _to_stderr) -> str:
    """``go`` or ``python`` for a ``--load-generator`` choice; ``auto`` is go when it builds.

    Raises
    ------
    GoUnavailable
        For ``go`` when it cannot be built.
    """
    if choice not in CHOICES:
        raise ValueError(f"load generator must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "python":
        return "python"
    try:
        build(cache)
    except GoUnavailable as exc:
        if choice == "go":
            raise
        say(f"compiled load generator unavailable, using the Python one: {exc}")
        return "python"
    return "go"


def request_count(spec, queries: list[BenchQuery]) -> int:
    """How many requests the file holds: every one a run sends when unique queries are asked
    for (open loop: exactly; closed loop: up to ``MAX_CLOSED_LOOP_QPS``), else the sample."""
    seconds = spec.warmup_s + spec.duration_s
    if not spec.unique_share:
        return len(queries)
    if spec.qps is not None:
        return max(len(queries), math.ceil(spec.qps * seconds) + 1)
    return max(len(queries), math.ceil(MAX_CLOSED_LOOP_QPS * seconds))


def write_requests(path: Path, spec, queries: list[BenchQuery]) -> int:
    """The run's SearchRequests, each a 4-byte little-endian length and its bytes, in the
    order the Python load generator would send them (unique copies included)."""
    from imgsearch_tools.bench.load import _Driver

    driver = _Driver(spec, [], queries)
    n = request_count(spec, queries)
    with open(path, "wb") as out:
        for i in range(n):
            message = driver.request(i).SerializeToString()
            out.write(len(message).to_bytes(4, "little"))
            out.write(message)
    return n


def command(binary: Path, spec, data: Path, metadata=()) -> list[str]:
    """The load generator's command line for ``spec``."""
    from imgsearch.search.v1 import search_service_pb2 as pb
    from imgsearch_tools.bench.load import SEARCH_METHOD_PATH

    fields = pb.SearchResponse.DESCRIPTOR.fields_by_name
    cmd = [str(binary), "-target", spec.target, "-method", SEARCH_METHOD_PATH]
    cmd += ["-data", str(data), "-connections", str(max(1, spec.channels))]
    cmd += ["-warmup", f"{spec.warmup_s}s", "-duration", f"{spec.duration_s}s"]
    cmd += ["-timeout", f"{spec.timeout_s}s"]
    cmd += ["-flag-field", str(fields["degraded"].number)]
    cmd += ["-reason-field", str(fields["degraded_reason"].number)]
    cmd += ["-count-field", str(fields["results"].number)]
    if spec.qps is not None:
        cmd += ["-qps", f"{spec.qps:g}"]
    else:
        cmd += ["-c", str(spec.concurrency)]
    for key, value in metadata:
        cmd += ["-metadata", f"{key}={value}"]
    return cmd


def summary(spec, report: dict) -> dict:
    """The Go run's report as :meth:`LoadRecorder.summary` shapes the Python one's.

    Not known from Go: each open-loop send's lag (only the count of late ones) and the
    replies' artifact versions (left empty).
    """
    from imgsearch_tools.bench.load import LoadRecorder, _reason_bucket

    if report.get("protocol") != PROTOCOL:
        raise RuntimeError(
            f"load generator report protocol {report.get('protocol')}, not {PROTOCOL}"
        )
    recorder = LoadRecorder()
    start = recorder.start
    last_done = 0.0
    for call in report["calls"] or ():  # null when nothing was sent
        done = call["done_us"] / 1e6
        last_done = max(last_done, done)
        latency = call["latency_us"] / 1e6
        code = call["code"]
        recorder.codes[code] += 1
        bucket = recorder.timeline.setdefault(int(done), [0, 0, 0, []])
        if code != "OK":
            bucket[2] += 1
            recorder.error_latencies.setdefault(code, []).append(latency)
            continue
        recorder.latencies.append(latency)
        recorder.from_schedule.append(call["from_slot_us"] / 1e6)
        bucket[3].append(latency)
        recorder.result_counts[call["count"]] += 1
        if call["flag"]:
            recorder.degraded += 1
            recorder.last_degraded_s = max(recorder.last_degraded_s or 0.0, done)
            recorder.degraded_reasons[_reason_bucket(call.get("reason", ""))] += 1
            bucket[1] += 1
        else:
            bucket[0] += 1
    recorder.sent = report["sent"]
    recorder.late = report["late_sends"]
    recorder.last_done = start + last_done
    recorder.last_send = start + min(spec.duration_s, last_done)
    result = recorder.summary(spec, loadgen_cpu_s=report["cpu_s"])
    result["load_generator"] = "go"
    result["loadgen_cpu_s"] = report["cpu_s"]  # what CpuMeter counts as the load generator's
    return result


async def send_load(
    spec,
    queries: list[BenchQuery],
    on_measure_start: Callable[[], None] | None = None,
    security=None,
) -> dict:
    """``spec``'s load from the load generator it names (``spec.load_generator``)."""
    from imgsearch_tools.bench import load

    if spec.load_generator == "go":
        return await run_load(spec, queries, on_measure_start, security)
    return await load.run_load(spec, queries, on_measure_start, security)


async def run_load(
    spec,
    queries: list[BenchQuery],
    on_measure_start: Callable[[], None] | None = None,
    security=None,
    binary: Path | None = None,
) -> dict:
    """:func:`imgsearch_tools.bench.load.run_load`, sent by the compiled load generator.

    Raises
    ------
    ValueError
        For TLS (the compiled client speaks plaintext only) or a list of gateways.
    GoUnavailable
        When the load generator cannot be built.
    RuntimeError
        When it fails; the message carries its error output.
    """
    if not queries:
        raise ValueError("no queries to send")
    if security is not None and security.tls:
        raise ValueError("the compiled load generator speaks plaintext only: use the Python one")
    if "," in spec.target:
        raise ValueError("the compiled load generator takes one gateway, not a list")
    metadata = security.metadata() if security is not None else ()
    binary = binary or await asyncio.to_thread(build)
    with tempfile.TemporaryDirectory(prefix="imgsearch-loadgen-") as folder:
        data = Path(folder) / "requests.bin"
        await asyncio.to_thread(write_requests, data, spec, queries)
        process = await asyncio.create_subprocess_exec(
            *command(binary, spec, data, metadata),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 30,  # the report is one JSON line
        )
        try:
            first = await process.stdout.readline()
            if first.strip() == b"measure" and on_measure_start is not None:
                on_measure_start()
            report_line = await process.stdout.readline()
            stderr = await process.stderr.read()
            code = await process.wait()
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
    if code != 0 or not report_line:
        raise RuntimeError(
            f"load generator exited with {code}: {stderr.decode(errors='replace').strip()}"
        )
    return summary(spec, json.loads(report_line))
