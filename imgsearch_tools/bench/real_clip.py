"""The suite's real-size CLIP section: ViT-B-32 compute (random weights), cached and unseen queries.

The demo set's tiny CLIP encodes a query in well under a millisecond, so it cannot show what a
real text tower costs when queries miss every cache. This section builds a set of the 1,000-photo
demo with an open_clip ViT-B-32 whose weights are random (written locally: the same compute as
the pretrained checkpoint, and no download), serves it, and measures hybrid + ALS with queries
that are cached, catalogue keywords, partly unseen and all unseen; then it overloads the
servers (3x their capacity, unseen queries) and checks that they do not collapse.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from imgsearch_tools.bench.overload import finish, overload_scenario
from imgsearch_tools.bench.processes import ServiceProcesses
from imgsearch_tools.bench.queries import sample_queries
from imgsearch_tools.bench.scenarios import Scenario, run_scenario, say

MODEL = "ViT-B-32"
DEMO = {"n_photos": 1000, "n_users": 300, "n_conversions": 20_000, "seed": 0}
RANKERS = ["none", "popularity", "als"]
REPEATED_QUERY = "red circle at night"  # not a keyword: answered by the query LRU
TARGET_P99_MS = 60.0


def real_clip_scenarios(qps: float, target_duration_s: float) -> list[Scenario]:
    """The section's scenarios; the last one (unique queries, open loop) is the target."""
    rate = f"{qps:g}"
    prefix = f"{MODEL} hybrid+als"
    return [
        Scenario(f"{prefix} closed c=5, one repeated query", "hybrid", "als", concurrency=5,
                 repeated_query=REPEATED_QUERY),
        Scenario(f"{prefix} closed c=5, unique queries", "hybrid", "als", concurrency=5,
                 unique_share=1.0),
        Scenario(f"{prefix} open {rate} qps, catalogue keywords", "hybrid", "als", qps=qps),
        Scenario(f"{prefix} open {rate} qps, 20% unique", "hybrid", "als", qps=qps,
                 unique_share=0.2),
        Scenario(f"{prefix} open {rate} qps, unique queries", "hybrid", "als", qps=qps,
                 unique_share=1.0, duration_s=target_duration_s),
    ]  # fmt: skip


def write_random_checkpoint(folder: Path) -> Path:
    """An open_clip ViT-B-32 with random weights (seeded), saved as a CLIP folder."""
    import torch

    from retrieval_service.clip_model import CHECKPOINT_FILE, ClipSpec, load_clip, save_clip

    checkpoint = folder / CHECKPOINT_FILE
    if not checkpoint.exists():
        torch.manual_seed(0)
        save_clip(load_clip(ClipSpec(MODEL)), folder)
    return checkpoint


def prepare_set(folder: Path, show_progress: bool = True):
    """The section's artifact set under ``folder``: demo data, random ViT-B-32, build.

    Each step is skipped when its output is there and current: the data when it was made by
    this generator version, the set when its manifest has a text-runtime choice and the data's
    fingerprint.

    Returns
    -------
    imgsearch.artifacts.ArtifactSet
    """
    from imgsearch import artifacts
    from imgsearch_tools.build import build_artifacts
    from imgsearch_tools.demo_data import GENERATOR_VERSION, generate, generated_by

    data, root = folder / "data", folder / "artifacts"
    made, wanted = generated_by(data) or {}, {**DEMO, "generator": GENERATOR_VERSION}
    if any(made.get(key) != value for key, value in wanted.items()):
        say(f"{MODEL} section: generating the {DEMO['n_photos']:,}-photo demo into {data}")
        generate(data, show_progress=show_progress, **DEMO)
    checkpoint = write_random_checkpoint(folder / "random-weights")
    try:
        current = artifacts.resolve(root)
        fresh = current.manifest.get("data_fingerprint") == artifacts.data_fingerprint(data)
        fresh = fresh and "text_runtime" in current.manifest.get("clip", {})
    except artifacts.ArtifactError:
        fresh = False
    if not fresh:
        say(f"{MODEL} section: building a set with random {MODEL} weights into {root}")
        build_artifacts(
            str(data),
            str(root),
            RANKERS,
            clip_model=MODEL,
            clip_pretrained=str(checkpoint),
            show_progress=show_progress,
        )
    return artifacts.resolve(root)


async def real_clip_section(
    args,
    out: Path,
    overrides=None,
    security=None,
    scenarios: bool = True,
    with_overload: bool = True,
) -> dict:
    """Build (or reuse) the section's set, serve it, run its scenarios; the report's section.

    ``overrides`` and ``security`` secure the links as the rest of the suite (``--tls``);
    ``scenarios``: the steady-load scenarios; ``with_overload``: then the overload scenario
    (:mod:`imgsearch_tools.bench.overload`).
    """

    folder = out / "vit-b-32"
    started = time.perf_counter()
    artifact_set = await asyncio.to_thread(prepare_set, folder)
    section: dict = {
        "model": MODEL,
        "weights": "random weights (seeded, written locally: the compute of the pretrained "
        "model without a download)",
        "prepare_s": round(time.perf_counter() - started, 1),
        "artifacts": {
            "root": str((folder / "artifacts").resolve()),
            "version": artifact_set.version,
            "counts": artifact_set.manifest.get("counts", {}),
        },
        "text_runtime": artifact_set.manifest.get("clip", {}).get("text_runtime"),
        "target": {"qps": args.real_clip_qps, "p99_ms": TARGET_P99_MS},
        "scenarios": [],
    }
    queries = sample_queries(artifact_set.path, n=args.requests, seed=args.seed)
    services = ServiceProcesses(
        str(artifact_set.path), out / "logs" / "vit-b-32", overrides=overrides
    )
    say(f"{MODEL} section: starting the services on {services.ports}")
    overload = None
    try:
        await asyncio.to_thread(services.start_all)
        target = services.address("gateway")
        if scenarios:
            for scenario in real_clip_scenarios(args.real_clip_qps, args.real_clip_duration):
                section["scenarios"].append(
                    await run_scenario(services, scenario, target, args, queries, security)
                )
        if with_overload:
            overload = await overload_scenario(
                services,
                target,
                queries,
                channels=args.channels,
                warmup_s=args.warmup,
                security=security,
            )
    finally:
        section["exit_codes"] = await asyncio.to_thread(services.stop_all)
    if overload is not None:
        # Judged once the services have stopped: a crash shows in their exit codes.
        section["overload"] = finish(overload, section["exit_codes"])
    return section


def target_met(run: dict, target: dict) -> bool:
    """Sustained the offered rate (98%), p99 within the target, and no error."""
    p99 = run["latency_ms"]["p99"]
    return (
        run["achieved_qps"] >= 0.98 * target["qps"]
        and p99 is not None
        and p99 <= target["p99_ms"]
        and run["error_count"] == 0
    )
