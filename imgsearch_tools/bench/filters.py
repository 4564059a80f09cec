"""`imgsearch bench-filters`: filtered CLIP retrieval's recall and latency per selectivity.

Part one, in-process, on the set's own vector index: for each selectivity (share of photos a
filter matches) and each kind of filter, the filtered search
(:func:`retrieval_service.filtered_search.search_allowed`, as retrieval runs it) is compared
with the exact filtered search (every allowed photo scored): recall@10, whether
``min(candidates_k, matching)`` photos came back, and the latency of building the filter's mask
and of the search. The filters are real ``PhotoFilter`` messages:

* ``independent``: a submission date range (unrelated to what photos show);
* ``correlated``: the dominant colour the query names (``red`` for "red circle"), with a
  minimum of downloads to reach the selectivity (more colours first when one is too few);
* ``anti-correlated``: colours the query never names, trimmed the same way.

Part two, served (``--qps``): hybrid retrieval + ALS through the real servers, open loop,
unfiltered and with independent filters of the smallest selectivity, in alternating rounds;
the filter's cost is the difference of the p99 latencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

K = 10
CANDIDATES_K = 100
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
KINDS = ("independent", "correlated", "anti-correlated")
REPORT_ENTRIES = ("filters.json", "filters.md", "filters-logs/")
_UNKNOWN_TIME = np.iinfo(np.int64).min


def add_commands(subparsers) -> None:
    """Register bench-filters."""
    p = subparsers.add_parser(
        "bench-filters",
        help="measure filtered CLIP retrieval: recall@10 against exact filtered search and "
        "latency per selectivity, filters independent of and correlated with the query",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root or set")
    p.add_argument("--out", default="var/bench", help="report folder (filters.json, filters.md)")
    p.add_argument("--force", action="store_true", help="write beside other files in OUT")
    p.add_argument("--queries", type=int, default=100, help="queries per kind of filter")
    p.add_argument(
        "--selectivities",
        default=",".join(f"{s:g}" for s in SELECTIVITIES),
        help="shares of photos the filters match (default 0.5,0.1,0.01,0.001)",
    )
    p.add_argument("--qps", type=float, default=100.0, help="served part's rate; 0 skips it")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per round")
    p.add_argument("--rounds", type=int, default=2, help="unfiltered/filtered round pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the query and filter draw")
    p.set_defaults(handler=cmd_bench_filters)


def say(message: str) -> None:
    print(f"[bench-filters] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ filters
def _timestamp(ns: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=int(ns // 1_000_000_000), nanos=int(ns % 1_000_000_000))


def date_filter(attributes, share: float, rng: np.random.Generator):
    """A submission date range matching about ``share`` of the photos, at a random place."""
    from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb

    known = np.sort(attributes.submitted_ns[attributes.submitted_ns != _UNKNOWN_TIME])
    wanted = min(len(known), max(1, round(share * attributes.n_photos)))
    start = int(rng.integers(0, len(known) - wanted + 1))
    end = known[start + wanted] if start + wanted < len(known) else known[-1] + 1
    return pb.PhotoFilter(
        submitted_after=_timestamp(known[start]), submitted_before=_timestamp(end)
    )


def colour_filter(attributes, colours: list[str], share: float):
    """Photos of the first of ``colours`` (more of them while too few), the most downloaded
    ones kept by a minimum of downloads so that about ``share`` of the photos match."""
    from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb

    wanted = max(1, round(share * attributes.n_photos))
    keep = np.zeros(attributes.n_photos, bool)
    chosen = []
    for colour in colours:
        chosen.append(colour)
        keep[attributes.color_photos[colour]] = True
        if keep.sum() >= wanted:
            break
    downloads = np.sort(attributes.downloads[keep])
    minimum = int(downloads[-wanted]) if len(downloads) > wanted else 0
    return pb.PhotoFilter(colors=chosen, min_downloads=minimum)


def named_colours(query: str, colours) -> list[str]:
    """The colours ``query`` names (whole words)."""
    padded = f" {query} "
    return [c for c in colours if f" {c} " in padded]


def filter_for(kind, attributes, query, share, rng):
    """The ``kind`` of filter (see the module docstring) for ``query`` at ``share``."""
    if kind == "independent":
        return date_filter(attributes, share, rng)
    colours = sorted(attributes.color_photos)
    named = named_colours(query, colours)
    others = [colours[i] for i in rng.permutation(len(colours)) if colours[i] not in named]
    return colour_filter(attributes, (named[:1] if kind == "correlated" else []) + others, share)


# ---------------------------------------------------------------------------- in-process
def load_pieces(set_dir: Path):
    """The set's vector index, embeddings by photo, photo attributes and known queries."""
    from imgsearch import artifacts
    from imgsearch.filters import PhotoAttributes
    from retrieval_service.clip_model import KEYWORD_EMBEDDINGS
    from retrieval_service.embedding import load_embeddings
    from retrieval_service.semantic import KnownQueries, set_serving_threads
    from retrieval_service.vector_index import VectorIndex

    set_serving_threads(1)
    artifact_set = artifacts.resolve(set_dir)
    attributes = PhotoAttributes.load(
        artifact_set.file(artifacts.CATALOGUE_DIR), artifact_set.manifest
    )
    if attributes is None:
        raise ValueError(f"{artifact_set.path}: built before photo filters; rebuild it")
    photo_idx, vectors = load_embeddings(artifact_set.file(artifacts.EMBEDDINGS))
    index = VectorIndex.load(artifact_set.file(artifacts.VECTOR_INDEX), row_to_photo_idx=photo_idx)
    known = KnownQueries.load(artifact_set.file(artifacts.CLIP_DIR) / KEYWORD_EMBEDDINGS)
    return artifact_set, index, photo_idx, vectors, attributes, known


def pick_queries(known, attributes, n: int, rng) -> dict[str, list[str]]:
    """Per kind, up to ``n`` catalogue keywords; the colour kinds need keywords naming one."""
    colours = sorted(attributes.color_photos)
    naming = [q for q in known.keywords if named_colours(q, colours)]
    every = list(known.keywords)

    def sample(pool):
        return [pool[i] for i in rng.permutation(len(pool))[:n]]

    return {
        "independent": sample(every),
        "correlated": sample(naming),
        "anti-correlated": sample(naming),
    }


def measure_recall(pieces, selectivities, n_queries: int, seed: int) -> list[dict]:
    """Recall@10, completeness and latency per (kind, selectivity): one row each."""
    from retrieval_service.filtered_search import search_allowed

    _, index, photo_idx, vectors, attributes, known = pieces
    rng = np.random.default_rng(seed)
    queries = pick_queries(known, attributes, n_queries, rng)
    has_vector = np.zeros(attributes.n_photos, bool)
    has_vector[photo_idx] = True
    rows = []
    for kind in KINDS:
        for share in selectivities:
            recalls, complete, matched, mask_ms, search_ms, plain_ms, paths = ([] for _ in range(7))
            # CPU time too: on a shared box, wall time mostly measures the other processes.
            search_cpu_ms, plain_cpu_ms = [], []
            for query in queries[kind]:
                embedding = known.get(query)
                photo_filter = filter_for(kind, attributes, query, share, rng)
                start = time.perf_counter()
                allowed = attributes.mask(photo_filter)
                middle, middle_cpu = time.perf_counter(), time.process_time()
                _, found, how = search_allowed(index, embedding, CANDIDATES_K, allowed)
                end, end_cpu = time.perf_counter(), time.process_time()
                index.search(embedding[None, :], CANDIDATES_K)
                plain_ms.append((time.perf_counter() - end) * 1000)
                plain_cpu_ms.append((time.process_time() - end_cpu) * 1000)
                mask_ms.append((middle - start) * 1000)
                search_ms.append((end - middle) * 1000)
                search_cpu_ms.append((end_cpu - middle_cpu) * 1000)
                paths.append(how.path)
                allowed_rows = allowed[photo_idx]
                n_allowed = int(allowed_rows.sum())
                matched.append(int(allowed.sum()) / attributes.n_photos)
                exact_scores = vectors[allowed_rows] @ embedding
                exact = photo_idx[allowed_rows][np.argsort(-exact_scores, kind="stable")[:K]]
                if n_allowed:
                    recalls.append(len(set(found[:K].tolist()) & set(exact.tolist())) / len(exact))
                complete.append(len(found) == min(CANDIDATES_K, n_allowed))
            rows.append(
                {
                    "kind": kind,
                    "selectivity": share,
                    "queries": len(queries[kind]),
                    "matched_share_mean": round(float(np.mean(matched)), 5) if matched else None,
                    "recall_at_10": round(float(np.mean(recalls)), 4) if recalls else None,
                    "recall_at_10_min": round(float(np.min(recalls)), 4) if recalls else None,
                    "complete_share": round(float(np.mean(complete)), 4) if complete else None,
                    "mask_ms": _percentiles(mask_ms),
                    "search_ms": _percentiles(search_ms),
                    "unfiltered_search_ms": _percentiles(plain_ms),
                    "search_cpu_ms_mean": round(float(np.mean(search_cpu_ms)), 3),
                    "unfiltered_search_cpu_ms_mean": round(float(np.mean(plain_cpu_ms)), 3),
                    "paths": {p: paths.count(p) for p in sorted(set(paths))},
                }
            )
            say(_row_line(rows[-1]))
    return rows


def _percentiles(values_ms) -> dict:
    if not values_ms:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values_ms, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def _row_line(row: dict) -> str:
    return (
        f"{row['kind']:<16} {row['selectivity']:>6g}  recall@10 {row['recall_at_10']}  "
        f"complete {row['complete_share']}  search p50/p99 {row['search_ms']['p50']}/"
        f"{row['search_ms']['p99']} ms (unfiltered {row['unfiltered_search_ms']['p50']}/"
        f"{row['unfiltered_search_ms']['p99']}), CPU mean {row['search_cpu_ms_mean']} "
        f"(unfiltered {row['unfiltered_search_cpu_ms_mean']}) ms  "
        f"mask p50 {row['mask_ms']['p50']} ms  {row['paths']}"
    )


# --------------------------------------------------------------------------------- served
async def served_overhead(
    target: str,
    set_dir,
    attributes,
    args,
    security=None,
    share: float | None = None,
    services=None,
) -> dict:
    """Hybrid + ALS at ``args.qps``: unfiltered and filtered rounds, alternating.

    With ``services`` (the :class:`~imgsearch_tools.bench.processes.ServiceProcesses` serving
    ``target``), each round also records the servers' CPU time per search, which other work on
    the machine hardly moves, unlike latency.
    """
    from imgsearch_tools.bench import load as bench
    from imgsearch_tools.bench.processes import LOADGEN, CpuMeter

    share = share if share is not None else min(float(s) for s in _selectivities(args))
    plain = bench.sample_queries(set_dir, n=2000, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    filtered = [
        bench.BenchQuery(q.user_id, q.query, date_filter(attributes, share, rng)) for q in plain
    ]
    spec = bench.LoadSpec(
        target=target,
        qps=args.qps,
        duration_s=args.duration,
        warmup_s=args.warmup,
        retriever="hybrid",
        ranker="als",
        k=K,
        candidates_k=CANDIDATES_K,
    )
    runs = []
    for round_number in range(args.rounds):
        for label, queries in (("unfiltered", plain), (f"filter {share:g}", filtered)):
            meter = CpuMeter(services) if services is not None else None
            start = meter.start if meter is not None else None
            result = await bench.run_load(spec, queries, on_measure_start=start, security=security)
            latency = result["latency_ms"]
            runs.append(
                {
                    "round": round_number,
                    "label": label,
                    "achieved_qps": result["achieved_qps"],
                    "errors": result["error_count"],
                    "degraded": result["degraded"],
                    "p50_ms": latency["p50"],
                    "p99_ms": latency["p99"],
                }
            )
            if meter is not None:
                meter.record(result)
                per_search = result["cpu_ms_per_search"]
                server = per_search["total"] - per_search.get(LOADGEN, 0.0)
                runs[-1]["server_cpu_ms_per_search"] = round(server, 3)
                runs[-1]["other_processes_cores"] = result.get("other_processes_cores")
            say(f"served round {round_number} {label}: {runs[-1]}")

    def median(label, key):
        return float(np.median([r[key] for r in runs if r["label"] == label]))

    return {
        "retriever": "hybrid",
        "ranker": "als",
        "qps": args.qps,
        "selectivity": share,
        "filter": "independent (submission date range)",
        "runs": runs,
        "added_p50_ms": round(
            median(f"filter {share:g}", "p50_ms") - median("unfiltered", "p50_ms"), 3
        ),
        "added_p99_ms": round(
            median(f"filter {share:g}", "p99_ms") - median("unfiltered", "p99_ms"), 3
        ),
        **(
            {
                "added_server_cpu_ms": round(
                    median(f"filter {share:g}", "server_cpu_ms_per_search")
                    - median("unfiltered", "server_cpu_ms_per_search"),
                    3,
                )
            }
            if services is not None
            else {}
        ),
    }


def _selectivities(args) -> list[float]:
    values = [float(s) for s in str(args.selectivities).split(",") if s.strip()]
    if not values or not all(0 < v <= 1 for v in values):
        raise ValueError(f"--selectivities must be shares in (0, 1], got {args.selectivities!r}")
    return values


# ---------------------------------------------------------------------------------- report
def render_markdown(report: dict) -> str:
    """The report as Markdown tables."""
    lines = [
        "## Filtered retrieval",
        "",
        f"Set {report['artifacts']['version']} ({report['artifacts']['photos']:,} photos, "
        f"index {report['artifacts']['factory']} {report['artifacts']['params']}), k = {K} of "
        f"{CANDIDATES_K} candidates, commit {report.get('commit') or '?'}.",
        "",
        *_calibration_lines(report["artifacts"].get("calibration")),
        "| filter | selectivity | matched | recall@10 | min | complete | search p50 / p99 ms "
        "| unfiltered p50 / p99 ms | search CPU ms (unfiltered) | mask p50 ms | paths |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["recall"]:
        lines.append(
            f"| {row['kind']} | {row['selectivity']:g} | {row['matched_share_mean']} | "
            f"{row['recall_at_10']} | {row['recall_at_10_min']} | {row['complete_share']} | "
            f"{row['search_ms']['p50']} / {row['search_ms']['p99']} | "
            f"{row['unfiltered_search_ms']['p50']} / {row['unfiltered_search_ms']['p99']} | "
            f"{row['search_cpu_ms_mean']} ({row['unfiltered_search_cpu_ms_mean']}) | "
            f"{row['mask_ms']['p50']} | "
            + ", ".join(f"{p} {n}" for p, n in row["paths"].items())
            + " |"
        )
    served = report.get("served")
    if served:
        lines += [
            "",
            f"Served: {served['retriever']} + {served['ranker']}, open loop {served['qps']:g} "
            f"qps, filter {served['filter']} at {served['selectivity']:g}.",
            "",
            "| round | requests | achieved qps | errors | degraded | p50 ms | p99 ms "
            "| server CPU ms per search | other processes' cores |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run in served["runs"]:
            lines.append(
                f"| {run['round']} | {run['label']} | {run['achieved_qps']} | {run['errors']} | "
                f"{run['degraded']} | {run['p50_ms']} | {run['p99_ms']} | "
                f"{run.get('server_cpu_ms_per_search', '-')} | "
                f"{run.get('other_processes_cores', '-')} |"
            )
        cpu = served.get("added_server_cpu_ms")
        lines += [
            "",
            f"Added by the filter (medians over rounds): p50 {served['added_p50_ms']} ms, "
            f"p99 {served['added_p99_ms']} ms"
            + (f", server CPU per search {cpu} ms." if cpu is not None else "."),
        ]
    return "\n".join(lines) + "\n"


def _calibration_lines(calibration: dict | None) -> list[str]:
    """The index's search effort as the build calibrated it (sets before that record none)."""
    if not calibration or not calibration.get("parameter"):
        return []
    tried = ", ".join(f"{t['value']}: {t['recall']}" for t in calibration["tried"])
    return [
        f"{calibration['parameter']} {calibration['value']} calibrated at build for recall@"
        f"{calibration['k']} >= {calibration['target']} on every query family "
        f"({'reached' if calibration['reached'] else 'not reached'}; tried {tried}; the other "
        f"halves {calibration['unseen_by_family']}).",
        "",
    ]


def filters_report(pieces, args, commit: str = "") -> dict:
    """The in-process part's report (the served part is added by the caller)."""
    artifact_set, index, *_ = pieces
    return {
        "command": " ".join(["imgsearch", *sys.argv[1:]]),
        "commit": commit,
        "artifacts": {
            "version": artifact_set.version,
            "photos": pieces[4].n_photos,
            "factory": index.factory,
            "params": index.params,
            "calibration": artifact_set.manifest.get("clip", {})
            .get("vector_index", {})
            .get("calibration"),
        },
        "settings": {"k": K, "candidates_k": CANDIDATES_K, "queries": args.queries},
        "recall": measure_recall(pieces, _selectivities(args), args.queries, args.seed),
    }


def cmd_bench_filters(args) -> int:
    import asyncio

    from imgsearch_tools.bench.load import git_commit, machine_info
    from imgsearch_tools.bench.processes import ServiceProcesses
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    out = Path(args.out)
    try:
        _selectivities(args)
        claim_in_place(out, "bench-filters", REPORT_ENTRIES, force=args.force)
        pieces = load_pieces(Path(args.artifacts))
    except (RefusedFolder, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = filters_report(pieces, args, git_commit())
    report["machine"] = machine_info(report["command"])
    if args.qps > 0:
        artifact_set = pieces[0]
        services = ServiceProcesses(str(artifact_set.path), out / "filters-logs")
        try:
            say("starting retrieval, ranking, gateway")
            services.start_all()
            report["served"] = asyncio.run(
                served_overhead(
                    services.address("gateway"),
                    artifact_set.path,
                    pieces[4],
                    args,
                    services=services,
                )
            )
        finally:
            services.stop_all()
    (out / "filters.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (out / "filters.md").write_text(markdown)
    print(markdown)
    return 0


async def suite_section(set_dir: Path, target: str, args, security=None) -> dict:
    """What `bench-suite` reports of filters: the recall table (50 queries per kind) and
    hybrid + ALS at 100 qps unfiltered and filtered at 0.1%, against the suite's servers."""
    pieces = load_pieces(set_dir)
    settings = argparse.Namespace(
        queries=50,
        selectivities=",".join(f"{s:g}" for s in SELECTIVITIES),
        seed=args.seed,
        qps=100.0,
        duration=args.duration,
        warmup=args.warmup,
        rounds=1,
    )
    from imgsearch_tools.bench.load import git_commit

    report = filters_report(pieces, settings, git_commit())
    report["served"] = await served_overhead(target, set_dir, pieces[4], settings, security)
    return report
