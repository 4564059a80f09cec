"""`imgsearch bench-suite`: start the services, run the scenarios, write bench.json and bench.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from imgsearch.conversion_store import DB_SUFFIX
from imgsearch_tools.bench.json_door import NAME as JSON_DOOR
from imgsearch_tools.bench.json_door import json_door_scenario
from imgsearch_tools.bench.processes import ServiceProcesses
from imgsearch_tools.bench.queries import sample_queries
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
from imgsearch_tools.provenance import current_commit, machine_facts

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


def cmd_bench_suite(args) -> int:
    import asyncio

    from imgsearch import artifacts
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    out = Path(args.out)
    adopt_earlier_report(out)
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


def adopt_earlier_report(out: Path) -> None:
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
        "machine": machine_facts(command),
        "commit": current_commit(),
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
    queries = sample_queries(artifact_set.path, n=args.requests, seed=args.seed)
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
