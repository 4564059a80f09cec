"""`imgsearch bench` (one load run against running servers) and `imgsearch bench-feedback`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from imgsearch_tools.bench import go_load
from imgsearch_tools.bench.in_process import InProcessPipeline, network_ratio
from imgsearch_tools.bench.queries import query_mix, read_query_file, sample_queries
from imgsearch_tools.bench.scenarios import (
    say,
)
from imgsearch_tools.bench.suite import FEEDBACK_ENTRIES, adopt_earlier_report
from imgsearch_tools.client_flags import client_security
from imgsearch_tools.provenance import machine_facts


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

    sampled = sample_queries(artifacts_path, n=args.requests, seed=args.seed)
    if args.queries == "catalogue":
        return sampled, args.unique_share
    if args.queries == "unique":
        return sampled, 1.0
    if not Path(args.queries).is_file():
        raise ValueError(
            f"--queries {args.queries!r}: not 'catalogue', 'unique' or a file of queries"
        )
    return read_query_file(args.queries, sampled), args.unique_share


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
            load_generator=go_load.resolve(args.load_generator),
        )
    except (artifacts.ArtifactError, ValueError, OSError, go_load.GoUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["imgsearch", *sys.argv[1:]])
    machine = machine_facts(command)
    result = asyncio.run(go_load.send_load(spec, queries, security=security))
    in_process = None
    if not args.no_in_process:
        try:
            pipeline = InProcessPipeline(artifacts_path)
            in_process = pipeline.measure(
                query_mix(queries, args.in_process_requests, unique_share),
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
            "e2e_over_in_process_p50": network_ratio(result, in_process),
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------- bench-feedback
def cmd_bench_feedback(args) -> int:
    import asyncio

    import pandas as pd

    from imgsearch import artifacts
    from imgsearch.config import env
    from imgsearch_tools.bench.feedback import bench_backend, render_feedback_markdown
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
        adopt_earlier_report(out)
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
    report = {"machine": machine_facts(" ".join(["imgsearch", *sys.argv[1:]])), "backends": []}
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
