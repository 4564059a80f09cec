"""`imgsearch bench-shards`: what sharding retrieval costs per shard count, and that it is exact.

For each shard count the set is served from a hard-linked copy under OUT/shards/, whole (1)
or resharded into N, as separate `imgsearch serve` processes (N retrieval shards, ranking, the
gateway) on the same machine. First every catalogue keyword and 300 (``--unseen-queries``)
unseen multi-word queries are searched with each retriever (ranker none, all 100 candidates
shown) and compared to the unsharded answers, to the bit; then the load scenarios measure
latency and CPU per search of every process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from imgsearch_tools.bench.processes import ServiceProcesses
from imgsearch_tools.bench.queries import sample_queries
from imgsearch_tools.bench.report import _ms
from imgsearch_tools.bench.scenarios import Scenario, run_scenario, say
from imgsearch_tools.provenance import machine_facts

ENTRIES = ("shards.json", "shards.md", "shards/")
CHECK_K = 100
UNSEEN_QUERIES = 300


def shard_scenarios(qps: float, ranker: str) -> list[Scenario]:
    """The load each layout is measured under."""
    rate = f"{qps:g}"
    return [
        Scenario(f"keyword+{ranker} open {rate} qps", "keyword", ranker, qps=qps),
        Scenario(f"keyword+{ranker} closed c=10", "keyword", ranker, concurrency=10),
        Scenario(f"hybrid+{ranker} open {rate} qps", "hybrid", ranker, qps=qps, needs_clip=True),
        Scenario(f"hybrid+{ranker} closed c=10", "hybrid", ranker, concurrency=10, needs_clip=True),
    ]


def sharded_root(artifact_set, count: int, out: Path) -> Path:
    """An artifact root under ``out`` serving ``artifact_set``, split into ``count`` shards
    when ``count`` > 1 (the servers' conversion store goes beside it, also under ``out``)."""
    from imgsearch import artifacts
    from imgsearch_tools.reshard import reshard

    root = out / f"root-{count}"
    if root.exists():
        shutil.rmtree(root)  # made by an earlier run, under the folder this command owns
    whole = root / artifacts.SETS_DIR / artifact_set.version
    artifacts.link_tree(artifact_set.path, whole)
    artifacts.publish(root, whole)
    if count > 1:
        reshard(str(root), count, keep=1, show_progress=False)
    return root


def check_queries(artifact_set, unseen: int = UNSEEN_QUERIES) -> list[str]:
    """Every catalogue keyword, and ``unseen`` multi-word queries made of two of them."""
    import numpy as np
    import pandas as pd

    from imgsearch import artifacts

    keywords = sorted(
        pd.read_parquet(
            artifact_set.file(artifacts.CATALOGUE_DIR) / "keywords.parquet", columns=["keyword"]
        )["keyword"].unique()
    )
    rng = np.random.default_rng(0)
    pairs = rng.choice(len(keywords), size=(unseen, 2))
    return keywords + [f"{keywords[a]} {keywords[b]} {i}" for i, (a, b) in enumerate(pairs)]


def answers(target: str, queries: list[str], retrievers: list[str]) -> dict:
    """(retriever, query) -> what the gateway answered: ids, scores, sources, notes."""
    import grpc

    from imgsearch.names import retriever_value
    from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
    from imgsearch.search.v1 import search_service_pb2 as pb
    from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc

    found = {}
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        for retriever in retrievers:
            for query in queries:
                response = stub.Search(
                    pb.SearchRequest(
                        query=query,
                        k=CHECK_K,
                        candidates_k=CHECK_K,
                        retriever=retriever_value(retriever),
                        ranker=rank_pb.RANKER_NONE,
                    ),
                    timeout=30,
                )
                found[(retriever, query)] = (
                    response.degraded,
                    list(response.notes),
                    [
                        (r.photo_id, r.retrieval_score, sorted(r.retrieval_source_scores.items()))
                        for r in response.results
                    ],
                )
    return found


async def measure_layout(
    args, artifact_set, count: int, out: Path, queries, reference: dict | None
) -> dict:
    """Serve one layout, check it against ``reference`` (the unsharded answers; None for the
    unsharded layout itself), then load it."""
    import asyncio

    from imgsearch import artifacts

    root = sharded_root(artifact_set, count, out / "shards")
    services = ServiceProcesses(str(root), out / "shards" / f"logs-{count}", shards=count)
    say(f"{count} shard(s): starting {', '.join(services.names)}")
    services.start_all()
    try:
        target = services.address("gateway")
        clip = artifact_set.has(artifacts.VECTOR_INDEX)
        retrievers = ["keyword", "clip", "hybrid"] if clip else ["keyword"]
        checked = check_queries(artifact_set, args.unseen_queries)
        found = await asyncio.to_thread(answers, target, checked, retrievers)
        layout = {"shards": count, "processes": services.names}
        if reference is not None:
            # Keyword answers are exact; an approximate CLIP index per shard is another
            # approximation than the whole set's, so its answers are counted apart.
            by_retriever = {
                name: sum(found[key] == reference[key] for key in reference if key[0] == name)
                for name in retrievers
            }
            same = sum(by_retriever.values())
            layout["exact"] = {
                "identical": same,
                "searches": len(reference),
                "retrievers": retrievers,
                "identical_by_retriever": by_retriever,
                "degraded": sum(answer[0] for answer in found.values()),
            }
            say(f"{count} shard(s): {same} of {len(reference)} answers identical to unsharded")
        layout["answers"] = found
        layout["scenarios"] = []
        ranker = "als" if "als" in artifact_set.rankers else "none"
        for scenario in [] if args.no_load else shard_scenarios(args.qps, ranker):
            if scenario.needs_clip and not clip:
                continue
            layout["scenarios"].append(
                await run_scenario(services, scenario, target, args, queries)
            )
    finally:
        services.stop_all()
    return layout


def per_search(run: dict) -> dict:
    """CPU ms per search: gateway, retrieval (all shards), ranking, load generator, total."""
    cpu = run["cpu_ms_per_search"]
    retrieval = sum(v for k, v in cpu.items() if k.startswith("retrieval"))
    return {
        "gateway": cpu.get("gateway", 0.0),
        "retrieval": round(retrieval, 3),
        "ranking": cpu.get("ranking", 0.0),
        "load generator": next((v for k, v in cpu.items() if k.startswith("bench")), 0.0),
        "total": cpu["total"],
    }


def render(report: dict) -> str:
    """The report as Markdown: one table row per layout and scenario."""
    machine = report["machine"]
    lines = [
        f"Measured {machine['date']} on {machine['cpu_model']}, {machine['usable_cpus']} usable "
        f"CPUs, load average {machine['loadavg_at_start']} at start; set {report['set']}; "
        f"command: `{machine['command']}`.",
        "",
        "| shards | scenario | QPS | p50 ms | p99 ms | errors | degraded | CPU ms per search: "
        "gateway · retrieval (all shards) · ranking · load gen = total | other processes "
        "(cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for layout in report["layouts"]:
        for run in layout["scenarios"]:
            cpu = per_search(run)
            latency = run["latency_ms"]
            lines.append(
                f"| {layout['shards']} | {run['name']} | {run['achieved_qps']:.0f} | "
                f"{_ms(latency['p50'])} | {_ms(latency['p99'])} | {run['error_count']} | "
                f"{run['degraded']} | {cpu['gateway']:.2f} · {cpu['retrieval']:.2f} · "
                f"{cpu['ranking']:.2f} · {cpu['load generator']:.2f} = **{cpu['total']:.2f}** "
                f"| {run.get('other_processes_cores', '–')} |"
            )
    lines.append("")
    for layout in report["layouts"]:
        exact = layout.get("exact")
        if exact:
            lines.append(
                f"- {layout['shards']} shards: {exact['identical']} of {exact['searches']} "
                f"searches ({', '.join(exact['retrievers'])}; every catalogue keyword and "
                f"{report['unseen_queries']} unseen queries; top {CHECK_K}, ranker none) "
                f"identical to the unsharded answers, ids and scores; {exact['degraded']} degraded."
            )
            by_retriever = exact.get("identical_by_retriever", {})
            if by_retriever:
                per = exact["searches"] // len(by_retriever)
                lines.append(
                    "  By retriever: "
                    + ", ".join(f"{name} {n} of {per}" for name, n in by_retriever.items())
                    + "."
                )
    return "\n".join(lines) + "\n"


async def run_bench_shards(args, artifact_set, out: Path, counts: list[int]) -> int:

    command = " ".join(["imgsearch", *sys.argv[1:]])
    report = {"machine": machine_facts(command), "set": artifact_set.version, "layouts": []}
    report["unseen_queries"] = args.unseen_queries
    queries = sample_queries(args.artifacts, n=args.requests, seed=args.seed)
    reference: dict = {}
    for count in counts:
        layout = await measure_layout(
            args, artifact_set, count, out, queries, None if count == 1 else reference
        )
        if count == 1:
            reference.update(layout["answers"])
        report["layouts"].append(layout)
    for layout in report["layouts"]:
        layout.pop("answers")
    (out / "shards.json").write_text(json.dumps(report, indent=2))
    markdown = render(report)
    (out / "shards.md").write_text(markdown)
    print(markdown)
    exact = all(
        layout["exact"]["identical"] == layout["exact"]["searches"]
        for layout in report["layouts"]
        if "exact" in layout
    )
    return 0 if exact else 1


def cmd_bench_shards(args) -> int:
    import asyncio

    from imgsearch import artifacts
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    try:
        counts = sorted({int(c) for c in args.shards.split(",") if c.strip()})
        if not counts or counts[0] != 1 or counts[-1] > 64:
            raise ValueError(f"--shards must list 1 (the reference) and counts up to 64: {counts}")
        artifact_set = artifacts.resolve(args.artifacts)
        out = Path(args.out)
        claim_in_place(out, "bench-shards", ENTRIES, force=args.force)
    except (ValueError, artifacts.ArtifactError, RefusedFolder) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_bench_shards(args, artifact_set, out, counts))
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
