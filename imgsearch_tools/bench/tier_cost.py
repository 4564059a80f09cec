"""One tier's CPU per call, its server driven alone, its servicer's work removed piece by piece.

A floor run says how much CPU each of imgsearch's tiers spends per search beyond its bare
counterpart (:mod:`imgsearch_tools.bench.bare_chain`); this tool says where. It records the
requests each tier receives in keyword + ALS searches on the served set (the load
generator's ``SearchRequest``, the gateway's ``RetrieveRequest`` for it and its
``RankRequest`` built from the real retrieval answer), then drives one tier's server directly
with them, closed loop or open loop at a fixed rate (``--rate``: every variant then serves the
same calls per second), each call with a request id and a deadline as the gateway sends, and
reads the server process's CPU time from ``/proc`` around each measured window. The gateway
calls a bare retrieval and ranking. The variants (:mod:`imgsearch_tools.bench.tier_variants`),
taken in turns, each round starting each afresh: ``bare`` (the bare chain's tier), ``cached``
(imgsearch's server, its method answering the bare tier's response), ``shipped``, and
``no-PIECE`` (one piece of the method's work replaced by its precomputed result): what a
piece costs in the server is the difference from ``shipped``.

``--in-process`` also times the shipped method called directly (no server) over the same
requests, alone and interleaved with a stand-in for gRPC's own work on each call (another
request parsed, a message of the response's size parsed and serialised), to tell the
method's instructions apart from what the server's surroundings add.

``python -m imgsearch_tools.bench.tier_cost --artifacts ROOT --tier ranking --out DIR``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from imgsearch_tools.bench.bare_chain import BareChain, write_payloads
from imgsearch_tools.bench.processes import (
    ServiceProcesses,
    process_cpu_seconds,
    wait_process_serving,
)
from imgsearch_tools.bench.tier_variants import METHODS, PIECES, install_variant

TIERS = tuple(METHODS)
DOWNSTREAM = ("retrieval", "ranking")  # the gateway's, served bare while it is measured
REQUESTS_FILE = "requests.bin"
MODULE = "imgsearch_tools.bench.tier_cost"  # as run with -m: __name__ is then "__main__"


# ------------------------------------------------------------------------ recorded requests
def record_requests(artifacts: str, folder: Path, n: int = 300, seed: int = 0) -> Path:
    """The requests each tier receives in ``n`` sampled keyword + ALS searches.

    Each SearchRequest is the load generator's; each RetrieveRequest is built as the gateway
    builds it from that SearchRequest; each RankRequest from the real retrieval answer to
    it. Written as length-prefixed serialised messages, one file per tier.
    """
    from gateway.server import Candidates
    from imgsearch.catalogue import normalise_user_id
    from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
    from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
    from imgsearch.serving import Reloadable
    from imgsearch_tools.bench.queries import sample_queries
    from retrieval_service.server import RetrievalServicer, load_retrieval_state

    holder = Reloadable(load_retrieval_state)
    asyncio.run(holder.load(artifacts))
    servicer = RetrievalServicer(holder)
    from imgsearch.search.v1 import search_service_pb2 as search_pb

    written = {"retrieval": [], "ranking": [], "gateway": []}
    for query in sample_queries(artifacts, n, seed):
        search = search_pb.SearchRequest(
            user_id=query.user_id,
            query=query.query,
            k=10,
            candidates_k=100,
            retriever=retr_pb.RETRIEVER_KEYWORD,
            ranker=rank_pb.RANKER_ALS,
        )
        retrieve = retr_pb.RetrieveRequest(
            query=query.query,
            candidates_k=100,
            retriever=retr_pb.RETRIEVER_KEYWORD,
            return_packed_photo_indices=True,
        )
        retrieved = _run(servicer.Retrieve(retrieve, None))
        candidates = Candidates(retrieved)
        rank = rank_pb.RankRequest(
            user_id=normalise_user_id(query.user_id),
            query=query.query,
            keyword=retrieved.keyword,
            candidate_photo_ids=candidates.ids,
            retrieval_scores=candidates.scores,
            k=10,
            ranker=rank_pb.RANKER_ALS,
            packed_candidate_indices=candidates.packed_indices,
            candidate_indices_version=candidates.version,
        )
        written["gateway"].append(search.SerializeToString())
        written["retrieval"].append(retrieve.SerializeToString())
        written["ranking"].append(rank.SerializeToString())
    servicer.executor.shutdown()
    folder.mkdir(parents=True, exist_ok=True)
    for tier, messages in written.items():
        (folder / f"{tier}-{REQUESTS_FILE}").write_bytes(_frames(messages))
    return folder


def _frames(messages: list[bytes]) -> bytes:
    return b"".join(len(m).to_bytes(4, "little") + m for m in messages)


def read_requests(folder: Path, tier: str) -> list[bytes]:
    """The serialised requests :func:`record_requests` wrote for ``tier``."""
    data = (folder / f"{tier}-{REQUESTS_FILE}").read_bytes()
    messages, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "little")
        messages.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return messages


def _run(coroutine):
    """Run a coroutine that completes without waiting (an inline method) to its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the method waited: it cannot be timed inline")


def serve_variant(argv: list[str]) -> int:
    """``variant TIER VARIANT PAYLOADS -- <imgsearch serve arguments>``."""
    tier, variant, payloads, separator, *serve = argv
    if separator != "--":
        raise SystemExit("usage: variant TIER VARIANT PAYLOADS -- SERVE-ARGS")
    install_variant(tier, variant, Path(payloads))
    from imgsearch_tools.cli import main as cli_main

    return cli_main(serve)


class VariantServer:
    """One variant of one tier as a child process on a free port (the gateway's calls go to
    ``downstream``, a :class:`~imgsearch_tools.bench.bare_chain.BareChain` serving the bare
    retrieval and ranking)."""

    def __init__(self, tier: str, variant: str, artifacts: str, work: Path, downstream=None):
        self.tier, self.variant = tier, variant
        self.log = work / "logs" / f"{tier}-{variant}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        payloads = work / "payloads"
        if variant == "bare":
            chain = downstream or BareChain(payloads, work / "logs")
            self.port = chain.ports[tier]
            command = chain.command(tier)
            self.admin = f"127.0.0.1:{self.port}"
        else:
            services = ServiceProcesses(artifacts, work / "logs")
            if downstream is not None:
                services.ports.update({t: downstream.ports[t] for t in DOWNSTREAM})
            serve = services.command(tier)
            self.port = services.ports[tier]
            self.admin = services.admin_address(tier)
            command = [sys.executable, "-m", MODULE, "variant", tier, variant]
            command += [str(payloads), "--", *serve[3:]]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self) -> None:
        wait_process_serving(self.variant, lambda: self.proc, self.admin, self.log, 300.0)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds({"server": self.proc})["server"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------- the driver
async def drive(
    address: str, method: str, requests: list[bytes], clients: int, seconds: float, rate=None
):
    """Closed loop (``clients`` callers, each sending the next request when its answer came)
    or, with ``rate``, open loop at that many calls per second.

    Requests go as their recorded bytes and answers stay bytes (nothing parsed on this side),
    each with a request id and a 2 s deadline as the gateway sends them. Returns (calls
    answered, errors).
    """
    import os

    import grpc

    from imgsearch.serving import REQUEST_ID_KEY

    counts = {"ok": 0, "errors": 0}
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)

        async def one(i: int) -> None:
            metadata = grpc.aio.Metadata((REQUEST_ID_KEY, os.urandom(8).hex()))
            try:
                await call(requests[i % len(requests)], timeout=2.0, metadata=metadata)
                counts["ok"] += 1
            except grpc.aio.AioRpcError:
                counts["errors"] += 1

        async def client(start: int) -> None:
            i = start
            while time.monotonic() < stop_at:
                await one(i)
                i += 1

        if rate is None:
            await asyncio.gather(*(client(c * 37) for c in range(clients)))
            return counts["ok"], counts["errors"]
        tasks, start, i = set(), time.monotonic(), 0
        while (now := time.monotonic()) < stop_at:
            due = start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.ensure_future(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
    return counts["ok"], counts["errors"]


def measure(
    server: VariantServer, requests: list[bytes], clients: int, seconds: float, rate=None
) -> dict:
    """Warm the server up, then one measured window: calls/s and server CPU ms per call."""
    address, method = f"127.0.0.1:{server.port}", METHODS[server.tier]
    asyncio.run(drive(address, method, requests, clients, 2.0, rate))
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    calls, errors = asyncio.run(drive(address, method, requests, clients, seconds, rate))
    cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - t0
    return {
        "calls": calls,
        "errors": errors,
        "calls_per_s": round(calls / wall, 1),
        "cpu_ms_per_call": round(1000.0 * cpu / max(1, calls), 4),
    }


# ------------------------------------------------------------------------ in-process timing
def in_process(artifacts: str, tier: str, requests: list[bytes], repeats: int = 5) -> dict:
    """Microseconds of CPU per call of the shipped method called directly, over the recorded
    requests: alone (request parsed, response serialised), and interleaved with a stand-in
    for gRPC's work around each call (another request parsed and a message of the response's
    size built and serialised), less that stand-in timed alone."""
    if tier == "ranking":
        from imgsearch.ranking.v1 import ranking_service_pb2 as pb
        from ranking_service.server import RankingServicer as Servicer
        from ranking_service.server import load_ranking_state as load
    else:
        from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb
        from retrieval_service.server import RetrievalServicer as Servicer
        from retrieval_service.server import load_retrieval_state as load
    from imgsearch.serving import Reloadable

    holder = Reloadable(load)
    asyncio.run(holder.load(artifacts))
    servicer = Servicer(holder)
    name = METHODS[tier].rsplit("/", 1)[1]
    method, parse = getattr(servicer, name), getattr(pb, name + "Request").FromString
    answers = [_run(method(parse(r), None)).SerializeToString() for r in requests]
    parse_answer = getattr(pb, name + "Response").FromString
    n = len(requests)

    def alone():
        for r in requests:
            _run(method(parse(r), None)).SerializeToString()

    def stand_in():
        for i in range(n):
            parse(requests[(i + 1) % n]).ByteSize()
            parse_answer(answers[i]).SerializeToString()

    def interleaved():
        for i, r in enumerate(requests):
            parse(requests[(i + 1) % n]).ByteSize()
            _run(method(parse(r), None)).SerializeToString()
            parse_answer(answers[i]).SerializeToString()

    def best(work) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            work()
            times.append(time.process_time() - t0)
        return 1e6 * min(times) / n

    figures = {"alone": best(alone), "stand_in": best(stand_in), "interleaved": best(interleaved)}
    figures["interleaved_less_stand_in"] = figures["interleaved"] - figures["stand_in"]
    servicer.executor.shutdown()
    return {key: round(value, 1) for key, value in figures.items()}


# ---------------------------------------------------------------------------------- the run
def start_downstream(work: Path) -> BareChain:
    """The bare retrieval and ranking the measured gateway calls, serving until stopped."""
    chain = BareChain(work / "payloads", work / "logs")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    for tier in DOWNSTREAM:
        with open(work / "logs" / f"bare-{tier}.log", "ab") as log:
            chain.procs[tier] = subprocess.Popen(
                chain.command(tier), stdout=log, stderr=subprocess.STDOUT
            )
    for tier in DOWNSTREAM:
        log = work / "logs" / f"bare-{tier}.log"
        wait_process_serving(tier, lambda t=tier: chain.procs[t], chain.address(tier), log, 60.0)
    return chain


def variants_of(tier: str) -> list[str]:
    """Every variant of ``tier``: bare, cached, shipped, then one per removable piece."""
    return ["bare", "cached", "shipped", *(f"no-{piece}" for piece in PIECES[tier])]


def run(args) -> dict:
    """Record, then measure each variant in turns; returns the report (also written)."""
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    if not (work / f"{args.tier}-{REQUESTS_FILE}").exists():
        # Recorded once per folder: later runs over it send the same requests.
        write_payloads(args.artifacts, work / "payloads")
        record_requests(args.artifacts, work, args.requests)
    requests = read_requests(work, args.tier)
    variants = args.variants or variants_of(args.tier)
    rounds: dict[str, list[dict]] = {variant: [] for variant in variants}
    downstream = start_downstream(work) if args.tier == "gateway" else None
    try:
        for round_number in range(1, args.rounds + 1):
            for variant in variants:
                server = VariantServer(args.tier, variant, args.artifacts, work, downstream)
                try:
                    server.wait_serving()
                    figures = measure(server, requests, args.clients, args.duration, args.rate)
                finally:
                    server.stop()
                rounds[variant].append(figures)
                print(f"round {round_number} {args.tier} {variant}: {figures}", flush=True)
    finally:
        if downstream is not None:
            downstream.stop_all()
    report = {
        "tier": args.tier,
        "clients": args.clients,
        "rate": args.rate,
        "duration_s": args.duration,
        "requests": len(requests),
        "variants": {variant: pooled(runs) for variant, runs in rounds.items()},
        "rounds": rounds,
    }
    if args.in_process and args.tier != "gateway":  # the gateway's method needs its downstreams
        report["in_process_us"] = in_process(args.artifacts, args.tier, requests)
    (work / f"tier-cost-{args.tier}.json").write_text(json.dumps(report, indent=2))
    print("\n".join(table(report)))
    return report


def pooled(runs: list[dict]) -> dict:
    """A variant's rounds: CPU pooled over their calls, the rounds' calls/s and errors."""
    calls = sum(run["calls"] for run in runs)
    cpu = sum(run["cpu_ms_per_call"] * run["calls"] for run in runs)
    return {
        "cpu_ms_per_call": round(cpu / max(1, calls), 4),
        "calls_per_s": [run["calls_per_s"] for run in runs],
        "errors": sum(run["errors"] for run in runs),
    }


def table(report: dict) -> list[str]:
    """The report as a Markdown table: each variant's CPU per call and its difference from
    the shipped server's (what the removed piece costs in the server)."""
    variants = report["variants"]
    shipped = variants.get("shipped", {}).get("cpu_ms_per_call")
    load = f"{report['clients']} clients closed loop"
    if report.get("rate"):
        load = f"open loop at {report['rate']:g} calls/s"
    rounds = len(next(iter(report["rounds"].values())))
    lines = [
        f"{report['tier']}: {load}, {rounds} rounds of {report['duration_s']:g} s",
        "",
        "| variant | server CPU ms per call | shipped minus this | calls/s per round | errors |",
        "|---|---:|---:|---|---:|",
    ]
    for variant, figures in variants.items():
        cpu = figures["cpu_ms_per_call"]
        saved = "" if shipped is None or variant == "shipped" else f"{shipped - cpu:+.3f}"
        rates = ", ".join(f"{rate:.0f}" for rate in figures["calls_per_s"])
        lines.append(f"| {variant} | {cpu:.3f} | {saved} | {rates} | {figures['errors']} |")
    if "in_process_us" in report:
        lines += ["", f"in-process, µs of CPU per call: {report['in_process_us']}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["variant"]:
        return serve_variant(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--artifacts", required=True, help="artifact root or set folder")
    parser.add_argument("--tier", choices=TIERS, required=True, help="the tier to drive")
    parser.add_argument("--out", type=Path, required=True, help="folder for requests, logs")
    parser.add_argument("--variants", nargs="*", help="variants to measure (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="turns over the variants")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per window")
    parser.add_argument("--clients", type=int, default=10, help="concurrent callers")
    parser.add_argument(
        "--rate", type=float, help="open loop at this many calls/s (default: closed loop)"
    )
    parser.add_argument("--requests", type=int, default=300, help="searches to record")
    parser.add_argument(
        "--in-process", action="store_true", help="also time the method called directly"
    )
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
