"""The gRPC floor: a bare chain of three ``grpc.aio`` servers, the project's protos, no work.

A search through imgsearch is three RPCs: the client's ``Search`` to the gateway, the
gateway's ``Retrieve`` (100 candidates back) and its ``Rank`` (10 back). This module serves
the same three hops with nothing else: each server answers with a response built once at
start from the served artifact set (real photo ids, real photo metadata, so the messages have
the real sizes), the gateway only forwards (its ``RankRequest`` carries the 100 candidates it
got: ids, scores and packed catalogue indexes, as imgsearch's gateway sends them). No
interceptor, admission, metrics, validation or model. Whatever CPU imgsearch spends per search
beyond this chain's, measured on the same machine in the same run with the same load
generator, is the serving path's own overhead.

Each tier is its own process (``python -m imgsearch_tools.bench.bare_chain TIER ...``), as
imgsearch's services are, so each one's CPU time is read from ``/proc`` like theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch_tools.bench.processes import free_port, process_cpu_seconds, wait_process_serving

TIERS = ("retrieval", "ranking", "gateway")
SERVICE_NAMES = {
    "retrieval": "imgsearch.retrieval.v1.RetrievalService",
    "ranking": "imgsearch.ranking.v1.RankingService",
    "gateway": "imgsearch.search.v1.SearchService",
}
PAYLOAD_FILES = {
    "retrieval": "retrieve_response.bin",
    "ranking": "rank_response.bin",
    "gateway": "search_response.bin",
}


def write_payloads(artifacts_path: str | Path, folder: Path, candidates_k: int = 100, k: int = 10):
    """The three canned responses, from the artifact set's own photos, as protobuf files.

    ``RetrieveResponse``: ``candidates_k`` photo ids with a score each and the keyword
    source's scores (what keyword retrieval sends); ``RankResponse``: ``k`` of them scored;
    ``SearchResponse``: those ``k`` with their photo metadata, versions and timings (what the
    gateway sends a client).
    """
    from gateway.server import load_gateway_state
    from imgsearch.search.v1 import search_service_pb2 as pb

    state = load_gateway_state(str(artifacts_path))
    photo_ids = list(state.photos)[:candidates_k]
    scores = [1.0 - i / len(photo_ids) for i in range(len(photo_ids))]
    retrieved = retr_pb.RetrieveResponse(
        photo_ids=photo_ids,
        scores=scores,
        source_scores=[retr_pb.SourceScores(source="keyword", scores=scores)],
        # As imgsearch's gateway asks them of retrieval and passes them to ranking.
        packed_photo_indices=b"".join(i.to_bytes(4, "little") for i in range(len(photo_ids))),
        retriever=retr_pb.RETRIEVER_KEYWORD,
        keyword="keyword",
        retrieval_ms=0.1,
        artifact_version=state.version,
    )
    ranked = rank_pb.RankResponse(
        results=[rank_pb.RankedPhoto(photo_id=p, score=s) for p, s in zip(photo_ids, scores)][:k],
        ranker=rank_pb.RANKER_ALS,
        ranking_ms=0.1,
        artifact_version=state.version,
    )
    response = pb.SearchResponse(retriever=retr_pb.RETRIEVER_KEYWORD, ranker=rank_pb.RANKER_ALS)
    for tier in ("gateway", "retrieval", "ranking"):
        response.artifact_versions[tier] = state.version
    response.timings.retrieval_ms = response.timings.ranking_ms = 0.1
    response.timings.total_ms = 1.0
    for photo_id, score in zip(photo_ids[:k], scores):
        result = response.results.add(
            photo_id=photo_id,
            score=score,
            retrieval_score=score,
            retrieval_source="keyword",
            ranker_score=score,
        )
        result.retrieval_source_scores["keyword"] = score
        result.photo.CopyFrom(state.photos[photo_id])
    folder.mkdir(parents=True, exist_ok=True)
    for tier, message in (("retrieval", retrieved), ("ranking", ranked), ("gateway", response)):
        (folder / PAYLOAD_FILES[tier]).write_bytes(message.SerializeToString())
    return folder


# ------------------------------------------------------------------------------- the servers
def forwarded_retrieve(request):
    """The bare gateway's RetrieveRequest for a SearchRequest: the fields it copies, no more."""
    return retr_pb.RetrieveRequest(
        query=request.query,
        candidates_k=request.candidates_k,
        retriever=request.retriever,
        return_packed_photo_indices=True,
    )


def forwarded_rank(request, retrieved):
    """The bare gateway's RankRequest: the search's fields and the retrieved candidates."""
    return rank_pb.RankRequest(
        user_id=request.user_id,
        query=request.query,
        keyword=retrieved.keyword,
        candidate_photo_ids=retrieved.photo_ids,
        retrieval_scores=retrieved.scores,
        k=request.k,
        ranker=request.ranker,
        packed_candidate_indices=retrieved.packed_photo_indices,
        candidate_indices_version=retrieved.artifact_version,
    )


def _servicer(tier: str, payload: bytes, retrieval: str, ranking: str):
    """The tier's servicer: answers every call with its canned response."""
    import grpc

    from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
    from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
    from imgsearch.search.v1 import search_service_pb2 as pb
    from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc

    if tier == "retrieval":
        response = retr_pb.RetrieveResponse.FromString(payload)

        class Retrieval(retr_grpc.RetrievalServiceServicer):
            async def Retrieve(self, request, context):
                return response

        return Retrieval(), retr_grpc.add_RetrievalServiceServicer_to_server
    if tier == "ranking":
        response = rank_pb.RankResponse.FromString(payload)

        class Ranking(rank_grpc.RankingServiceServicer):
            async def Rank(self, request, context):
                return response

        return Ranking(), rank_grpc.add_RankingServiceServicer_to_server
    response = pb.SearchResponse.FromString(payload)
    retrieve = retr_grpc.RetrievalServiceStub(grpc.aio.insecure_channel(retrieval)).Retrieve
    rank = rank_grpc.RankingServiceStub(grpc.aio.insecure_channel(ranking)).Rank

    class Gateway(pb_grpc.SearchServiceServicer):
        async def Search(self, request, context):
            retrieved = await retrieve(forwarded_retrieve(request))
            await rank(forwarded_rank(request, retrieved))
            return response

    return Gateway(), pb_grpc.add_SearchServiceServicer_to_server


async def serve_tier(tier: str, port: int, payloads: Path, retrieval: str, ranking: str) -> None:
    """Serve one tier on 127.0.0.1:``port`` (health says SERVING) until cancelled."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    payload = (payloads / PAYLOAD_FILES[tier]).read_bytes()
    servicer, add = _servicer(tier, payload, retrieval, ranking)
    server = grpc.aio.server()
    add(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Clients that balance (the load generator's channels) check the service's own health.
    await health.set(SERVICE_NAMES[tier], health_pb2.HealthCheckResponse.SERVING)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"error: bare {tier} cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one tier of the bare gRPC chain")
    parser.add_argument("tier", choices=TIERS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--payloads", type=Path, required=True)
    parser.add_argument("--retrieval", default="", help="gateway: retrieval HOST:PORT")
    parser.add_argument("--ranking", default="", help="gateway: ranking HOST:PORT")
    args = parser.parse_args(argv)
    asyncio.run(serve_tier(args.tier, args.port, args.payloads, args.retrieval, args.ranking))


# ------------------------------------------------------------------------------ the processes
class BareChain:
    """The three tiers as child processes on free ports (stop with :meth:`stop_all`).

    Offers what :class:`~imgsearch_tools.bench.processes.CpuMeter` reads: ``procs`` and
    :meth:`cpu_seconds`, so the chain's CPU per search is measured like imgsearch's.
    """

    def __init__(self, payloads: Path, log_dir: Path):
        self.payloads = Path(payloads)
        self.log_dir = Path(log_dir)
        self.ports = {tier: free_port() for tier in TIERS}
        self.procs: dict[str, subprocess.Popen] = {}

    def address(self, tier: str) -> str:
        return f"127.0.0.1:{self.ports[tier]}"

    def command(self, tier: str) -> list[str]:
        command = [sys.executable, "-m", __name__, tier, "--port", str(self.ports[tier])]
        command += ["--payloads", str(self.payloads)]
        if tier == "gateway":
            command += ["--retrieval", self.address("retrieval")]
            command += ["--ranking", self.address("ranking")]
        return command

    def start_all(self, timeout: float = 60.0) -> None:
        """Start the three tiers and wait until each one's health says SERVING."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for tier in TIERS:
            with open(self.log_dir / f"bare-{tier}.log", "ab") as log:
                self.procs[tier] = subprocess.Popen(
                    self.command(tier), stdout=log, stderr=subprocess.STDOUT
                )
        for tier in TIERS:
            wait_process_serving(
                f"bare {tier}",
                lambda tier=tier: self.procs[tier],
                self.address(tier),
                self.log_dir / f"bare-{tier}.log",
                timeout,
            )

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds each running tier has used so far."""
        return process_cpu_seconds(self.procs)

    def stop_all(self, timeout: float = 10.0) -> dict[str, int]:
        """Terminate the tiers and collect their exit statuses."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        codes = {}
        for tier, proc in self.procs.items():
            try:
                codes[tier] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[tier] = proc.wait()
        return codes


# ------------------------------------------------------------------------- the suite's section
FLOOR_CONCURRENCY = 10
FLOOR_ROUNDS = 3  # runs of each side, alternating
CPU_RATIO_TARGET = 1.4  # imgsearch's server CPU per search over the chain's
P99_TARGET_MS = 20.0  # imgsearch keyword + ALS at FLOOR_CONCURRENCY clients
SERVER_TIERS = ("gateway", "retrieval", "ranking")
LOAD_GENERATORS = {
    "go": "the compiled grpc-go client of `imgsearch bench --load-generator go`, a fourth process",
    "python": "`imgsearch bench`'s grpc.aio client, in the suite's process",
}


def server_cpu_ms(runs: list[dict]) -> dict[str, float]:
    """CPU ms per search of each server tier over ``runs`` pooled (CPU seconds over searches),
    and their sum; the load generator is left out."""
    completed = sum(run["completed"] for run in runs)
    tiers = {
        tier: round(
            sum(run["cpu_ms_per_search"].get(tier, 0.0) * run["completed"] for run in runs)
            / max(1, completed),
            3,
        )
        for tier in SERVER_TIERS
    }
    return {**tiers, "total": round(sum(tiers.values()), 3)}


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _pooled(runs: list[dict]) -> dict:
    """The rounds of one side: each round's figures, CPU pooled, the median round's QPS/p99."""
    from imgsearch_tools.bench.processes import LOADGEN

    completed = sum(run["completed"] for run in runs)
    loadgen = sum(r["cpu_ms_per_search"].get(LOADGEN, 0.0) * r["completed"] for r in runs)
    return {
        "rounds": [
            {
                "achieved_qps": run["achieved_qps"],
                "latency_ms": run["latency_ms"],
                "error_count": run["error_count"],
                "errors": run["errors"],
                "completed": run["completed"],
                "cpu_ms_per_search": run["cpu_ms_per_search"],
                "other_processes_cores": run.get("other_processes_cores"),
            }
            for run in runs
        ],
        "completed": completed,
        "error_count": sum(run["error_count"] for run in runs),
        "achieved_qps": _median([run["achieved_qps"] for run in runs]),
        "p50_ms": _median([run["latency_ms"]["p50"] for run in runs]),
        "p99_ms": _median([run["latency_ms"]["p99"] for run in runs]),
        "server_cpu_ms_per_search": server_cpu_ms(runs),
        "loadgen_cpu_ms_per_search": round(loadgen / max(1, completed), 3),
    }


async def floor_section(
    args, artifacts_path, out: Path, services, target: str, queries, rounds: int = FLOOR_ROUNDS
) -> dict:
    """The bare chain and imgsearch keyword + ALS, closed loop at 10 clients, in turns.

    Same load generator, same requests, same machine; ``rounds`` runs of each, alternating
    (chain, imgsearch, chain, ...), so that a change in what else the machine runs weighs on
    both sides alike. CPU per search per tier from each server process's own CPU time, pooled
    over the rounds, and imgsearch's over the chain's; QPS and latency of the median round.
    """
    from imgsearch_tools.bench import go_load
    from imgsearch_tools.bench import load as bench
    from imgsearch_tools.bench.scenarios import CANDIDATES_K, K, measured, say

    log_dir = out / "logs"
    payloads = await asyncio.to_thread(write_payloads, artifacts_path, log_dir / "bare-chain")
    chain = BareChain(payloads, log_dir)
    load_generator = await asyncio.to_thread(
        go_load.resolve, getattr(args, "floor_load_generator", "auto"), None, say
    )
    chain_runs, imgsearch_runs = [], []
    say(f"bare chain: starting three grpc.aio servers on {chain.ports}")
    try:
        await asyncio.to_thread(chain.start_all)
        spec = bench.LoadSpec(
            target=chain.address("gateway"),
            concurrency=FLOOR_CONCURRENCY,
            duration_s=args.duration,
            warmup_s=args.warmup,
            retriever="keyword",
            ranker="als",
            k=K,
            candidates_k=CANDIDATES_K,
            channels=args.channels,
            load_generator=load_generator,
        )
        for round_number in range(1, rounds + 1):
            chain_runs.append(await measured(chain, spec, queries))
            say(
                f"bare chain, round {round_number} of {rounds}\n"
                f"{bench.format_result(chain_runs[-1])}\n"
                f"  CPU ms per search {chain_runs[-1]['cpu_ms_per_search']}"
            )
            imgsearch_runs.append(await measured(services, replace(spec, target=target), queries))
            say(
                f"imgsearch keyword + ALS, round {round_number} of {rounds}\n"
                f"{bench.format_result(imgsearch_runs[-1])}\n"
                f"  CPU ms per search {imgsearch_runs[-1]['cpu_ms_per_search']}"
            )
        # CPU per search falls as the rate rises (more calls per wake-up of each event loop
        # and poller): the chain again, open loop at the rate imgsearch reached, separates
        # that effect from imgsearch's own work.
        rate = _median([run["achieved_qps"] for run in imgsearch_runs])
        at_rate = None
        if rate:
            at_rate = await measured(chain, replace(spec, qps=rate, concurrency=None), queries)
            say(f"bare chain at imgsearch's {rate:.0f} QPS\n{bench.format_result(at_rate)}")
    finally:
        await asyncio.to_thread(chain.stop_all)
    chain_side, imgsearch_side = _pooled(chain_runs), _pooled(imgsearch_runs)
    chain_cpu = chain_side["server_cpu_ms_per_search"]
    imgsearch_cpu = imgsearch_side["server_cpu_ms_per_search"]
    ratio = {
        tier: round(imgsearch_cpu[tier] / chain_cpu[tier], 2) if chain_cpu[tier] else None
        for tier in (*SERVER_TIERS, "total")
    }
    p99 = imgsearch_side["p99_ms"]
    same_rate = _pooled([at_rate]) if at_rate is not None else None
    return {
        "load_generator": load_generator,
        "concurrency": FLOOR_CONCURRENCY,
        "rounds": rounds,
        "duration_s": args.duration,
        "chain": chain_side,
        "imgsearch": imgsearch_side,
        "cpu_ratio": ratio,
        "chain_at_imgsearch_rate": same_rate,
        "cpu_ratio_at_same_rate": _ratio(imgsearch_cpu, same_rate),
        "target": {"cpu_ratio": CPU_RATIO_TARGET, "p99_ms": P99_TARGET_MS},
        "met": bool(
            ratio["total"] is not None
            and ratio["total"] <= CPU_RATIO_TARGET
            and p99 is not None
            and p99 <= P99_TARGET_MS
            and imgsearch_side["error_count"] == 0
        ),
    }


def _ratio(imgsearch_cpu: dict, chain_side: dict | None) -> float | None:
    """imgsearch's summed server CPU per search over a chain run's (None without one)."""
    if chain_side is None or not chain_side["server_cpu_ms_per_search"]["total"]:
        return None
    return round(imgsearch_cpu["total"] / chain_side["server_cpu_ms_per_search"]["total"], 2)


def floor_lines(section: dict | None) -> list[str]:
    """bench.md's table of the chain against imgsearch, per tier, and the verdict."""
    if not section:
        return []
    lines = ["### The gRPC floor: a bare three-hop chain against imgsearch", ""]
    if "skipped" in section:
        return lines + [f"Not measured: {section['skipped']}", ""]
    lines += [
        "Three `grpc.aio` servers with the project's protos answering canned responses of the "
        "real sizes (100 candidates, 10 ranked, 10 results with photo metadata), no "
        "interceptor and no work, against imgsearch keyword + ALS; the same load generator "
        f"({LOAD_GENERATORS[section.get('load_generator', 'python')]}), closed loop at "
        f"{section['concurrency']} clients, {section['rounds']} runs of "
        f"{section['duration_s']:g} s each, alternating. CPU ms per search per server process, "
        "from each process's own CPU time (`/proc/<pid>/stat`), pooled over the runs; the load "
        "generator's is shown apart and not summed. QPS and latency: the median run.",
        "",
        "| run | achieved QPS | p50 ms | p99 ms | gateway | retrieval | ranking "
        "| servers total | load gen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sides = [("bare chain", "chain"), ("imgsearch keyword + ALS", "imgsearch")]
    if section.get("chain_at_imgsearch_rate"):
        sides.append(("bare chain, open loop at imgsearch's QPS", "chain_at_imgsearch_rate"))
    for name, key in sides:
        side = section[key]
        cpu = side["server_cpu_ms_per_search"]
        lines.append(
            f"| {name} | {_ms(side['achieved_qps'], 0)} | {_ms(side['p50_ms'])} | "
            f"{_ms(side['p99_ms'])} | "
            + " | ".join(f"{cpu[t]:.3f}" for t in SERVER_TIERS)
            + f" | **{cpu['total']:.3f}** | {_ms(side['loadgen_cpu_ms_per_search'], 3)} |"
        )
    ratio = section["cpu_ratio"]
    lines.append(
        "| imgsearch / chain | | | | "
        + " | ".join(f"{_ms(ratio[t], 2)}×" for t in SERVER_TIERS)
        + f" | **{_ms(ratio['total'], 2)}×** | |"
    )
    runs = "; ".join(
        f"{name} "
        + ", ".join(
            f"{r['achieved_qps']:.0f} QPS / {r['cpu_ms_per_search'].get('total', 0.0):.2f} ms"
            for r in section[key]["rounds"]
        )
        for name, key in (("chain", "chain"), ("imgsearch", "imgsearch"))
    )
    target = section["target"]
    lines += [
        "",
        f"Each run (QPS / CPU ms per search, load generator included): {runs}.",
        "",
        f"Target (server CPU per search ≤ {target['cpu_ratio']:g}× the chain's, p99 ≤ "
        f"{target['p99_ms']:g} ms at {section['concurrency']} clients, no error): "
        f"**{'met' if section['met'] else 'not met'}** — {_ms(ratio['total'], 2)}×, p99 "
        f"{_ms(section['imgsearch']['p99_ms'])} ms, {section['imgsearch']['error_count']} "
        "errors.",
        "",
    ]
    if section.get("cpu_ratio_at_same_rate") is not None:
        lines += [
            "At the same rate (the chain open loop at the QPS imgsearch reached, after the "
            "rounds), imgsearch's server CPU per search is "
            f"**{section['cpu_ratio_at_same_rate']:.2f}×** the chain's: the difference from "
            "the ratio above is the chain's higher rate, which spreads each wake-up of its "
            "event loops over more calls.",
            "",
        ]
    return lines


def _ms(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
