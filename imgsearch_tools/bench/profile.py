"""Where each server's CPU goes under load: py-spy samples of every tier, as top-N tables.

``python -m imgsearch_tools.bench.profile --artifacts ROOT --out DIR`` starts retrieval,
ranking and the gateway as ``imgsearch serve`` processes, drives keyword + ALS searches closed
loop at 10 clients (``--retriever``, ``--ranker``, ``--qps`` for an open loop at a fixed rate,
``--unique-share`` for queries no cache has seen), and records each server with py-spy (a
sampling profiler that reads the process from outside; it needs ptrace, and ``py-spy`` on PATH
or ``--py-spy``). Samples are taken only while a thread runs Python (idle threads are not
sampled), so a function's share of the samples is its share of the process's CPU (samples
caught in the event loop's epoll wait are counted apart: a busy machine can make py-spy take a
waiting thread for a running one). Writes ``DIR/<tier>.txt`` (py-spy's
collapsed stacks) and prints, per tier, the project's functions with the most samples anywhere
on the stack (``total``: with what they call) and the functions most often found running.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from imgsearch.config import DEFAULT_ARTIFACTS
from imgsearch_tools.bench.queries import sample_queries

TIERS = ("gateway", "retrieval", "ranking")
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def frame_label(frame: str) -> str:
    """``function (path/to/module.py:12)`` as ``module.py:function``."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{Path(match['file']).name}:{match['name']}"


PROJECT = ("imgsearch/", "gateway/", "retrieval_service/", "ranking_service/")


# Innermost frames of a thread waiting, not running: the event loop in epoll_wait. py-spy
# leaves idle threads out by their state in /proc, which a busy machine can catch mid-wake;
# such samples are counted apart, not as CPU.
WAITS = frozenset({"selectors.py:EpollSelector.select"})


def _stacks(collapsed: str):
    """(frames root first, samples) per line of py-spy's collapsed stacks, waits left out."""
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [f for f in stack.split(";") if "(" in f]
            if frames and frame_label(frames[-1]) not in WAITS:
                yield frames, int(count)


def wait_samples(collapsed: str) -> int:
    """Samples whose innermost frame is a wait (:data:`WAITS`)."""
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if "(" in f]
        if frames and count.isdigit() and frame_label(frames[-1]) in WAITS:
            total += int(count)
    return total


def _is_project(frame: str) -> bool:
    match = _FRAME.match(frame)
    return bool(match) and match["file"].startswith(PROJECT)


def top_self(collapsed: str, n: int = 15) -> tuple[int, list[tuple[str, int]]]:
    """Total samples, and the ``n`` functions most often found running (innermost frame)."""
    own: Counter = Counter()
    samples = 0
    for frames, weight in _stacks(collapsed):
        samples += weight
        own[frame_label(frames[-1])] += weight
    return samples, own.most_common(n)


def top_project(collapsed: str, n: int = 15) -> list[tuple[str, int]]:
    """The ``n`` project functions (imgsearch, gateway, retrieval, ranking) with the most
    samples anywhere on the stack: what each costs with everything it calls."""
    anywhere: Counter = Counter()
    for frames, weight in _stacks(collapsed):
        for label in {frame_label(f) for f in frames if _is_project(f)}:
            anywhere[label] += weight
    return anywhere.most_common(n)


def markdown_table(tier: str, collapsed: str, n: int = 15) -> str:
    """One tier's project functions by total share, and the functions found running."""
    samples, running = top_self(collapsed, n)
    share = 100.0 / max(1, samples)
    waits = wait_samples(collapsed)
    title = f"**{tier}** ({samples} samples running; {waits} waiting in epoll, left out)"
    lines = [title, "", "| project function | total % |", "|---|---:|"]
    lines += [f"| `{label}` | {count * share:.1f} |" for label, count in top_project(collapsed, n)]
    lines += ["", "| running (self) | % |", "|---|---:|"]
    lines += [f"| `{label}` | {count * share:.1f} |" for label, count in running]
    return "\n".join(lines) + "\n"


async def profile(args) -> int:
    from imgsearch import artifacts
    from imgsearch_tools.bench import load as bench
    from imgsearch_tools.bench.processes import CpuMeter, ServiceProcesses
    from imgsearch_tools.bench.scenarios import CANDIDATES_K, K, say

    py_spy = args.py_spy or shutil.which("py-spy")
    if not py_spy:
        print("error: py-spy not found: pip install py-spy, or pass --py-spy PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact_set = artifacts.resolve(args.artifacts)
    queries = sample_queries(artifact_set.path, n=2000, seed=0)
    if args.chain:
        from imgsearch_tools.bench.bare_chain import BareChain, write_payloads

        payloads = write_payloads(artifact_set.path, out / "payloads")
        services = BareChain(payloads, out / "logs")
    else:
        services = ServiceProcesses(str(artifact_set.path), out / "logs")
    try:
        await asyncio.to_thread(services.start_all)
        spec = bench.LoadSpec(
            target=services.address("gateway"),
            qps=args.qps,
            concurrency=None if args.qps else args.concurrency,
            duration_s=args.duration + 2.0,
            warmup_s=2.0,
            retriever=args.retriever,
            ranker=args.ranker,
            unique_share=args.unique_share,
            k=K,
            candidates_k=CANDIDATES_K,
        )
        recorders: list[subprocess.Popen] = []
        meter = CpuMeter(services)

        def record() -> None:
            meter.start()
            for tier in TIERS:
                command = [py_spy, "record", "--pid", str(services.procs[tier].pid)]
                command += ["--duration", f"{args.duration:g}", "--rate", str(args.rate)]
                command += ["--format", "raw", "--output", str(out / f"{tier}.txt")]
                # Native stacks need the process paused for each sample (slower, exact).
                command += ["--native"] if args.native else ["--nonblocking"]
                recorders.append(
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                )

        say(f"profiling {', '.join(TIERS)} under {spec.describe()} for {args.duration:g} s")
        result = await bench.run_load(spec, queries, on_measure_start=record)
        meter.record(result)
        for recorder in recorders:
            _, err = await asyncio.to_thread(recorder.communicate)
            if recorder.returncode:
                print(f"error: py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
                return 1
    finally:
        await asyncio.to_thread(services.stop_all)
    print(bench.format_result(result))
    print(f"CPU ms per search {result['cpu_ms_per_search']} (py-spy sampling included)\n")
    for tier in TIERS:
        print(markdown_table(tier, (out / f"{tier}.txt").read_text(), args.top))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root or set")
    parser.add_argument("--out", default="var/profile", help="folder for the collapsed stacks")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds recorded")
    parser.add_argument("--concurrency", type=int, default=10, help="closed-loop clients")
    parser.add_argument("--qps", type=float, default=None, help="open loop at this rate instead")
    parser.add_argument("--retriever", default="keyword", help="retriever named in every search")
    parser.add_argument("--ranker", default="als", help="ranker named in every search")
    parser.add_argument(
        "--unique-share", type=float, default=0.0, help="share (0-1) of queries made unique"
    )
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions per table")
    parser.add_argument("--py-spy", default=None, help="py-spy binary (default: on PATH)")
    parser.add_argument(
        "--chain", action="store_true", help="profile the bare gRPC chain instead (bare_chain)"
    )
    parser.add_argument(
        "--native", action="store_true", help="sample C and Cython frames too (py-spy --native)"
    )
    return asyncio.run(profile(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
