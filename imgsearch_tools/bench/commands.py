"""`imgsearch bench` (one load run) and `imgsearch bench-suite` (services, scenarios, report)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from imgsearch.conversion_store import DB_SUFFIX
from imgsearch.names import RANKER_CHOICES, RETRIEVER_CHOICES
from imgsearch_tools.bench.json_door import NAME as JSON_DOOR
from imgsearch_tools.bench.json_door import json_door_scenario
from imgsearch_tools.bench.processes import ServiceProcesses
from imgsearch_tools.bench.report import page_title, render_markdown
from imgsearch_tools.bench.scenarios import (
    CANDIDATES_K,
    K,
    add_in_process,
    hot_reload_scenario,
    kill_ranking_scenario,
    reflection_run,
    run_scenario,
    say,
    served_root,
    standard_scenarios,
    write_ghz_data,
)
from imgsearch_tools.bench.shards import cmd_bench_shards
from imgsearch_tools.client_flags import add_client_security_arguments, client_security


def add_commands(subparsers) -> None:
    """Register bench and bench-suite."""
    p = subparsers.add_parser(
        "bench",
        help="load-test a SearchService (open or closed loop) and compare with in-process",
        description="Send realistic searches (users and keywords sampled from the catalogue's "
        "conversions, unique queries no cache has seen, or queries from a file) to TARGET, "
        "open-loop at a fixed rate (--qps) or closed-loop with N workers (--concurrency); report "
        "achieved QPS, latency percentiles, errors by status code and degraded responses; then "
        "time the same requests in-process (retrieval and ranking called directly) and print the "
        "ratio of end-to-end p50 to in-process p50.",
    )
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="gateway HOST:PORT, several as IP:PORT,IP:PORT,... or dns:///NAME:PORT (balanced "
        "round-robin per request, UNAVAILABLE retried on another gateway)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--qps", type=float, default=None, help="open loop: sends per second")
    mode.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: workers (default 10)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument(
        "--retriever",
        default="keyword",
        choices=RETRIEVER_CHOICES,
        help="retriever named in every request",
    )
    p.add_argument(
        "--ranker", default="als", choices=RANKER_CHOICES, help="ranker named in every request"
    )
    p.add_argument("-k", type=int, default=K, help="results per search")
    p.add_argument("--candidates-k", type=int, default=CANDIDATES_K, help="candidates per search")
    p.add_argument(
        "--artifacts",
        default=None,
        help="artifact root or set for the queries and the in-process run "
        "(default: ask the gateway's AdminService at --admin which set it serves)",
    )
    p.add_argument(
        "--admin",
        default=None,
        help="the gateway's admin HOST:PORT (default 127.0.0.1:50061 or "
        "IMGSEARCH_GATEWAY_ADMIN_PORT; token from IMGSEARCH_ADMIN_TOKEN_FILE)",
    )
    p.add_argument("--channels", type=int, default=2, help="client channels (connections)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline per request, seconds")
    p.add_argument(
        "--queries",
        default="catalogue",
        metavar="catalogue|unique|FILE",
        help="what to search for: keywords sampled from the catalogue's conversions (default), "
        "unique queries (a catalogue keyword, another word and a number never sent before: no "
        "cache has them), or the lines of FILE",
    )
    p.add_argument(
        "--unique-share",
        type=float,
        default=0.0,
        help="with catalogue or FILE queries: the share (0-1) of requests made unique",
    )
    p.add_argument("--requests", type=int, default=2000, help="distinct requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    p.add_argument("--in-process-requests", type=int, default=500, help="requests timed in-process")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    add_client_security_arguments(p)
    p.set_defaults(handler=cmd_bench)

    p = subparsers.add_parser(
        "bench-suite",
        help="start the services and run the standard load, fault and reload scenarios",
        description="Make sure the demo artifact set exists, start retrieval, ranking and the "
        "gateway as separate `imgsearch serve` processes on free ports, run the standard scenarios "
        "(keyword+ALS open loop and closed loop at c=1/10/50, keyword+none, hybrid+ALS when "
        "the set has CLIP), a bare three-hop grpc.aio chain against keyword+ALS at c=10 "
        "(server CPU per search per tier, and the ratio), the JSON door (`imgsearch web`) "
        "against gRPC at --json-qps, a reflection-only client, the "
        "ranking server killed and restarted mid-load, and a hot reload mid-load; then the "
        "ViT-B-32 section: a 1,000-photo demo set built (once, under OUT/vit-b-32) with a "
        "random-weight ViT-B-32, served and measured with cached, keyword and unique "
        "queries, then overloaded (capacity closed loop at c=8, 3x that offered open loop "
        "for 20 s, a closed-loop run 5 s after); write OUT/bench.json and OUT/bench.md.",
    )
    p.add_argument("--data", default="var/demo-data", help="demo data folder (built if missing)")
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root to serve")
    p.add_argument(
        "--out",
        default="var/bench",
        help="report folder: new, empty, or one bench-suite wrote before",
    )
    p.add_argument("--no-build", action="store_true", help="fail instead of building the demo")
    p.add_argument(
        "--results-page",
        default=None,
        metavar="FILE.md",
        help="also write OUT/bench.md as the docs site's results page, under a header naming "
        "this command, the commit and the machine",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into folders bench-suite (or the demo, for --data/--artifacts) did not "
        "make, beside their files; none of them is deleted or overwritten",
    )
    p.add_argument("--qps", type=float, default=400.0, help="open-loop rate (default 400)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per scenario")
    p.add_argument("--channels", type=int, default=2, help="client channels (connections)")
    p.add_argument(
        "--fault-qps",
        type=float,
        default=200.0,
        help="open-loop rate during the kill and reload scenarios (default 200)",
    )
    p.add_argument(
        "--json-qps",
        type=float,
        default=200.0,
        help="open-loop rate of the JSON-door scenario, HTTP and gRPC alike (default 200)",
    )
    p.add_argument("--kill-duration", type=float, default=30.0, help="kill scenario seconds")
    p.add_argument("--reload-duration", type=float, default=15.0, help="reload scenario seconds")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated subset: scenario names, 'floor' (a bare gRPC chain against "
        "keyword + ALS, CPU per search), 'json-door', 'reflection', 'kill', 'reload', "
        "'vit-b-32' (the ViT-B-32 section's steady scenarios), 'overload' (its overload "
        "scenario), 'filters' (filtered retrieval: recall and the cost of a filter)",
    )
    p.add_argument("--skip-faults", action="store_true", help="no kill or reload scenario")
    p.add_argument(
        "--tls",
        default=None,
        metavar="CERTS",
        help="serve with TLS, mutual TLS between gateway and stages and a gateway token, all "
        "from a `make certs` folder (e.g. var/certs), and load through them",
    )
    p.add_argument(
        "--skip-real-clip",
        action="store_true",
        help="no ViT-B-32 section (its first run builds a 1,000-photo set: about 2 minutes)",
    )
    p.add_argument(
        "--skip-overload",
        action="store_true",
        help="no overload scenario in the ViT-B-32 section (capacity closed loop, 3x that "
        "offered open loop, recovery: about 70 s)",
    )
    p.add_argument(
        "--real-clip-qps",
        type=float,
        default=150.0,
        help="ViT-B-32 section: open-loop rate (default 150)",
    )
    p.add_argument(
        "--real-clip-duration",
        type=float,
        default=20.0,
        help="ViT-B-32 section: seconds of the unique-query target scenario (default 20)",
    )
    p.add_argument("--requests", type=int, default=2000, help="distinct requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    p.add_argument(
        "--in-process-requests",
        type=int,
        default=500,
        help="requests timed in-process (no gRPC) for the comparison column",
    )
    p.set_defaults(handler=cmd_bench_suite)

    p = subparsers.add_parser(
        "bench-shards",
        help="measure sharded retrieval per shard count: exactness, latency, CPU per search",
        description="Serve the current set whole and split into each shard count (hard-linked "
        "copies resharded under OUT/shards/), as separate `imgsearch serve` processes (one per "
        "shard, ranking, the gateway); check that every catalogue keyword and 300 unseen "
        "queries get, with each retriever, exactly the unsharded answer (ids and scores); run "
        "keyword and hybrid load, open and closed loop; write OUT/shards.json and "
        "OUT/shards.md. Run it alone on the machine (CPU figures).",
    )
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root or set")
    p.add_argument("--shards", default="1,2,4", help="shard counts, 1 first (default 1,2,4)")
    p.add_argument(
        "--out", default="var/bench", help="report folder: new, empty, or one it wrote before"
    )
    p.add_argument("--force", action="store_true", help="write beside other files in OUT")
    p.add_argument("--qps", type=float, default=200.0, help="open-loop rate (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per scenario")
    p.add_argument("--channels", type=int, default=2, help="client channels (connections)")
    p.add_argument("--requests", type=int, default=2000, help="distinct requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    p.set_defaults(handler=cmd_bench_shards)

    p = subparsers.add_parser(
        "bench-feedback",
        help="measure LogConversions throughput (events/s, latency) on SQLite and PostgreSQL",
        description="For each backend, start `imgsearch serve gateway` on a fresh conversion "
        "store (a scratch SQLite file in OUT, or a scratch schema on the PostgreSQL server, "
        "dropped afterwards), send batches of new events closed-loop at each concurrency, and "
        "report acknowledged events per second, call latency, errors and CPU per 1,000 events; "
        "write OUT/feedback.json and OUT/feedback.md.",
    )
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root to serve")
    p.add_argument(
        "--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    p.add_argument(
        "--postgres-dsn",
        default=None,
        help="PostgreSQL server for the postgres backend (default: IMGSEARCH_CONVERSIONS_DSN)",
    )
    p.add_argument("--batch", type=int, default=100, help="events per call (default 100)")
    p.add_argument(
        "--concurrency", default="1,4,16", help="calls in flight, comma-separated (default 1,4,16)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    p.add_argument(
        "--out",
        default="var/bench",
        help="report folder: new, empty, or one imgsearch's benchmarks wrote before",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder holding other files, beside them (none is deleted or "
        "overwritten)",
    )
    p.set_defaults(handler=cmd_bench_feedback)


# What bench-suite and bench-feedback write into --out ("name/": a folder whole); nothing
# else there is touched. bench-feedback's SQLite store lives there only while it runs.
# "artifacts/" is the root the suite serves (see scenarios.served_root), and its servers keep
# their conversion log beside it (SQLite and its WAL files); "reload-set/" is what earlier
# versions wrote there, still recognised as the suite's own.
REPORT_ENTRIES = (
    "bench.json",
    "bench.md",
    "ghz-data.json",
    "logs/",
    "artifacts/",
    *(f"artifacts{DB_SUFFIX}{end}" for end in ("", "-wal", "-shm")),
    "reload-set/",
    "vit-b-32/",
)
FEEDBACK_ENTRIES = ("feedback.json", "feedback.md")


# ------------------------------------------------------------------------------ bench
def _served_artifacts(admin_target: str) -> str:
    """The artifact set folder the server with admin port ``admin_target`` serves."""
    from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
    from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
    from imgsearch.config import env
    from imgsearch.security import ClientSecurity

    admin = ClientSecurity(token_file=env("ADMIN_TOKEN_FILE", ""))
    with admin.channel(admin_target) as channel:
        reply = admin_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb.GetStatusRequest(), timeout=5, metadata=admin.metadata()
        )
    return reply.artifacts


def _bench_queries(args, artifacts_path: str) -> tuple[list, float]:
    """The requests `bench` cycles through, and the share of them it makes unique."""
    from imgsearch_tools.bench import load as bench

    sampled = bench.sample_queries(artifacts_path, n=args.requests, seed=args.seed)
    if args.queries == "catalogue":
        return sampled, args.unique_share
    if args.queries == "unique":
        return sampled, 1.0
    if not Path(args.queries).is_file():
        raise ValueError(
            f"--queries {args.queries!r}: not 'catalogue', 'unique' or a file of queries"
        )
    return bench.read_query_file(args.queries, sampled), args.unique_share


def cmd_bench(args) -> int:
    import asyncio

    import grpc

    from imgsearch import artifacts
    from imgsearch.config import env_int
    from imgsearch.security import SecurityConfigError
    from imgsearch_tools.bench import load as bench

    artifacts_path = args.artifacts
    if artifacts_path is None:
        admin = args.admin or f"127.0.0.1:{env_int('GATEWAY_ADMIN_PORT', 50061)}"
        try:
            artifacts_path = _served_artifacts(admin)
        except (grpc.RpcError, SecurityConfigError) as exc:
            why = f"{exc.code().name}" if isinstance(exc, grpc.RpcError) else str(exc)
            print(
                f"error: cannot ask the gateway's admin port {admin} which artifact set it "
                f"serves ({why}); pass --artifacts DIR or --admin HOST:PORT",
                file=sys.stderr,
            )
            return 1
    try:
        security = client_security(args)
        security.metadata()  # a missing token file fails here, not on every request
    except SecurityConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        queries, unique_share = _bench_queries(args, artifacts_path)
        spec = bench.LoadSpec(
            target=args.target,
            qps=args.qps,
            concurrency=None if args.qps is not None else (args.concurrency or 10),
            duration_s=args.duration,
            warmup_s=args.warmup,
            retriever=args.retriever,
            ranker=args.ranker,
            k=args.k,
            candidates_k=args.candidates_k,
            channels=args.channels,
            timeout_s=args.timeout,
            unique_share=unique_share,
        )
    except (artifacts.ArtifactError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["imgsearch", *sys.argv[1:]])
    machine = bench.machine_info(command)
    result = asyncio.run(bench.run_load(spec, queries, security=security))
    in_process = None
    if not args.no_in_process:
        try:
            pipeline = bench.InProcessPipeline(artifacts_path)
            in_process = pipeline.measure(
                bench.query_mix(queries, args.in_process_requests, unique_share),
                args.retriever,
                args.ranker,
                args.k,
                args.candidates_k,
            )
        except ValueError as exc:
            in_process = {"skipped": str(exc)}
    print(bench.format_result(result, in_process))
    if args.json:
        report = {
            "machine": machine,
            "spec": bench.as_dict(spec),
            "result": result,
            "in_process": in_process,
            "e2e_over_in_process_p50": bench.network_ratio(result, in_process),
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------- the suite
def cmd_bench_suite(args) -> int:
    import asyncio

    from imgsearch import artifacts
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    out = Path(args.out)
    _adopt_earlier_report(out)
    try:
        # Checked before building anything: the report folder takes only these names.
        claim_in_place(out, "bench-suite", REPORT_ENTRIES, force=args.force, record=False)
    except RefusedFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        artifact_set = artifacts.resolve(args.artifacts)
    except artifacts.ArtifactError as exc:
        if args.no_build:
            print(
                f"error: {exc}\nbuild the demo first: .venv/bin/imgsearch demo --no-serve "
                f"--data {args.data} --artifacts {args.artifacts}",
                file=sys.stderr,
            )
            return 1
        from imgsearch_tools.commands import ensure_demo

        try:
            ensure_demo(
                argparse.Namespace(
                    data=args.data,
                    artifacts=args.artifacts,
                    photos=5000,
                    users=2000,
                    conversions=150_000,
                    seed=0,
                    force=args.force,
                )
            )
        except RefusedFolder as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        artifact_set = artifacts.resolve(args.artifacts)
    claim_in_place(out, "bench-suite", REPORT_ENTRIES, force=args.force)
    try:
        return asyncio.run(run_suite(args, artifact_set, out))
    except (RuntimeError, TimeoutError) as exc:
        # A service that cannot load the set (e.g. models from an older build) ends here.
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _adopt_earlier_report(out: Path) -> None:
    """Mark a report folder written before output markers existed as the benchmarks' own.

    Recognised by holding nothing but the entries of bench-suite and bench-feedback, with a
    ``bench.json`` that is a suite report or a ``feedback.json`` that is a feedback report.
    """
    from imgsearch_tools.outputs import MARKER, write_marker

    if not out.is_dir() or (out / MARKER).exists():
        return
    makers = {"bench-suite": ("bench.json", REPORT_ENTRIES, "scenarios")}
    makers["bench-feedback"] = ("feedback.json", FEEDBACK_ENTRIES, "backends")
    names = {entry.rstrip("/") for _, entries, _ in makers.values() for entry in entries}
    if any(entry.name not in names for entry in out.iterdir()):
        return
    adopted = []
    for maker, (report_name, entries, key) in makers.items():
        try:
            report = json.loads((out / report_name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and {"machine", key} <= set(report):
            adopted.append((maker, entries))
    present = {entry.name for entry in out.iterdir()}
    claimed = {e.rstrip("/") for _, entries in adopted for e in entries}
    if adopted and present <= claimed:
        for maker, entries in adopted:
            write_marker(out, maker, entries)


def _selected(args, name: str) -> bool:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    return not only or name in only


async def run_suite(args, artifact_set, out: Path) -> int:
    """Start the services, run every selected scenario, write bench.json and bench.md."""
    import asyncio

    from imgsearch import artifacts
    from imgsearch_tools.bench import load as bench

    command = getattr(args, "command_line", "imgsearch bench-suite")
    has_clip = artifact_set.has(artifacts.VECTOR_INDEX)
    overrides, security = {}, None
    if args.tls:
        from imgsearch_tools.certs import dev_tls_settings

        overrides, security = dev_tls_settings(args.tls)
    report: dict = {
        "machine": bench.machine_info(command),
        "commit": bench.git_commit(),
        "artifacts": {
            "root": str(Path(args.artifacts).resolve()),
            "version": artifact_set.version,
            "counts": artifact_set.manifest.get("counts", {}),
            "rankers": artifact_set.rankers,
            "clip": has_clip,
        },
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "channels": args.channels,
            "k": K,
            "candidates_k": CANDIDATES_K,
            "requests": args.requests,
            "seed": args.seed,
            "late_send_ms": bench.LATE_SEND_MS,
            "tls": bool(args.tls),
        },
        "scenarios": [],
    }
    queries = bench.sample_queries(artifact_set.path, n=args.requests, seed=args.seed)
    # The services serve a root under OUT holding the set and the hot-reload version.
    root = served_root(artifact_set, out)
    services = ServiceProcesses(str(root.resolve()), out / "logs", overrides=overrides)
    say(f"starting retrieval, ranking, gateway on ports {services.ports} (logs: {out / 'logs'})")
    started = time.perf_counter()
    try:
        await asyncio.to_thread(services.start_all)
        report["startup_s"] = round(time.perf_counter() - started, 1)
        say(f"all three SERVING after {report['startup_s']} s")
        target = services.address("gateway")
        for scenario in standard_scenarios(args.qps):
            if not _selected(args, scenario.name):
                continue
            skip = ""
            if scenario.needs_clip and not has_clip:
                skip = "the artifact set has no CLIP index"
            elif scenario.ranker not in ("none", "popularity") + tuple(artifact_set.rankers):
                skip = f"the artifact set has no {scenario.ranker} ranker"
            if skip:
                report["scenarios"].append({"name": scenario.name, "skipped": skip})
                say(f"{scenario.name}: skipped ({skip})")
                continue
            report["scenarios"].append(
                await run_scenario(services, scenario, target, args, queries, security)
            )
        if _selected(args, JSON_DOOR):
            report["json_door"] = await json_door_scenario(
                args, services, target, queries, security
            )
        if _selected(args, "floor"):
            report["floor"] = await _floor(args, artifact_set, out, services, target, queries)
        if _selected(args, "filters") and has_clip:
            from imgsearch_tools.bench.filters import suite_section

            say("filtered retrieval: recall per selectivity, and hybrid+als at 100 qps")
            report["filters"] = await suite_section(artifact_set.path, target, args, security)
        if _selected(args, "reflection"):
            report["reflection_client"] = await reflection_run(target, queries, security)
        if not args.skip_faults and _selected(args, "kill"):
            report["kill_ranking"] = await kill_ranking_scenario(
                args, services, target, queries, security
            )
        if not args.skip_faults and _selected(args, "reload"):
            report["hot_reload"] = await hot_reload_scenario(
                args, services, target, queries, artifact_set, security
            )
    finally:
        report["exit_codes"] = await asyncio.to_thread(services.stop_all)
    steady, overload = _selected(args, "vit-b-32"), _selected(args, "overload")
    overload = overload and not args.skip_overload
    if not args.skip_real_clip and (steady or overload):
        from imgsearch_tools.bench.real_clip import real_clip_section

        try:
            report["real_clip"] = await real_clip_section(
                args, out, overrides, security, scenarios=steady, with_overload=overload
            )
        except Exception as exc:  # noqa: BLE001 - keep the rest of the report
            say(f"ViT-B-32 section failed: {exc!r}")
            report["real_clip"] = {"error": repr(exc)}
    say("timing the same requests in-process (retrieval + ranking called directly)")
    add_in_process(report, artifact_set.path, queries[: args.in_process_requests])
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_ghz_data(out / "ghz-data.json", queries[:100])
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    if "filters" in report:
        from imgsearch_tools.bench.filters import render_markdown as render_filters

        markdown += "\n" + render_filters(report["filters"])
    (out / "bench.md").write_text(markdown)
    say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    if args.results_page:
        from imgsearch_tools.results_page import write_results_page

        write_results_page(
            args.results_page,
            page_title(args.only),
            report["machine"]["command"],
            markdown,
        )
        say(f"wrote {args.results_page}")
    print(markdown)
    return 0


async def _floor(args, artifact_set, out: Path, services, target: str, queries) -> dict:
    """The bare chain against imgsearch (:mod:`imgsearch_tools.bench.bare_chain`)."""
    from imgsearch_tools.bench.bare_chain import floor_section

    if args.tls:
        return {"skipped": "the bare chain is plaintext; run without --tls to compare"}
    return await floor_section(args, artifact_set.path, out, services, target, queries)


# ---------------------------------------------------------------------------- bench-feedback
def cmd_bench_feedback(args) -> int:
    import asyncio

    import pandas as pd

    from imgsearch import artifacts
    from imgsearch.config import env
    from imgsearch_tools.bench.feedback import bench_backend, render_feedback_markdown
    from imgsearch_tools.bench.load import machine_info
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"sqlite", "postgres"})
    if unknown or not backends:
        print(
            f"error: unknown backend(s) {unknown or '(none)'}; valid: sqlite, postgres",
            file=sys.stderr,
        )
        return 2
    postgres_dsn = args.postgres_dsn or env("CONVERSIONS_DSN", "")
    if "postgres" in backends and not postgres_dsn:
        print(
            "error: the postgres backend needs --postgres-dsn or IMGSEARCH_CONVERSIONS_DSN",
            file=sys.stderr,
        )
        return 2
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
        out = Path(args.out)
        _adopt_earlier_report(out)
        claim_in_place(out, "bench-feedback", FEEDBACK_ENTRIES, force=args.force, record=False)
        artifact_set = artifacts.resolve(args.artifacts)
        claim_in_place(out, "bench-feedback", FEEDBACK_ENTRIES, force=args.force)
    except (ValueError, artifacts.ArtifactError, RefusedFolder) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    catalogue_dir = artifact_set.file(artifacts.CATALOGUE_DIR)
    photo_ids = pd.read_parquet(catalogue_dir / "photos.parquet", columns=["photo_id"])
    keywords = pd.read_parquet(catalogue_dir / "keywords.parquet", columns=["keyword"])
    specs = [
        {
            "batch_size": args.batch,
            "concurrency": c,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        }
        for c in concurrencies
    ]
    report = {"machine": machine_info(" ".join(["imgsearch", *sys.argv[1:]])), "backends": []}
    for backend in backends:
        say(f"bench-feedback: {backend}")
        report["backends"].append(
            asyncio.run(
                bench_backend(
                    backend,
                    str(artifact_set.path),
                    out,
                    specs,
                    photo_ids["photo_id"].tolist(),
                    keywords["keyword"].drop_duplicates().tolist()[:500],
                    postgres_dsn,
                )
            )
        )
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    markdown = render_feedback_markdown(report)
    (out / "feedback.json").write_text(json.dumps(report, indent=2))
    (out / "feedback.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'feedback.json'} and {out / 'feedback.md'}", file=sys.stderr)
    errors = sum(sum(run["errors"].values()) for b in report["backends"] for run in b["runs"])
    return 1 if errors else 0
