"""`imgsearch bench-scale`: how build time, memory, index size, load time and latency grow.

For each catalogue size (photos; users = photos × ``--users-per-photo``, conversions = photos ×
``--conversions-per-photo``), in WORK/<size>/:

1. ``demo-data`` writes the catalogue (tables only unless ``--images``); its seconds and peak
   memory are measured on the child process. A catalogue already there with the same sizes and
   seed is kept (so an interrupted run resumes where it stopped).
2. ``imgsearch build`` builds an artifact set (kept likewise unless ``--rebuild``); the
   manifest's ``build_steps`` give each step's seconds and peak memory, its ``rankers`` each
   ranker's seconds.
3. The three servers start as child processes: seconds to SERVING and resident memory each.
4. Open-loop load at ``--qps`` for ``--duration`` seconds: keyword + ALS with single-keyword
   queries sampled from the conversions, keyword + ALS with unseen multi-word queries (every
   request unique), and with images hybrid (tiny CLIP) + ALS on unseen queries; p50/p99 and
   errors of each.

The report (scale.json, scale.md and scale.png in OUT) holds a table per size and the stated
extrapolation to 10,000,000 photos on 4 shards (:mod:`imgsearch_tools.bench.scale_report`).
Builds and generation run at the lowest CPU priority; run the command itself under the CPU
lock for serving figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imgsearch_tools.bench import go_load

SIZES = (10_000, 100_000, 1_000_000)
QPS = 200.0
REPORT_ENTRIES = ("scale.json", "scale.md", "scale.png", "scale-logs/")


def add_commands(subparsers) -> None:
    """Register bench-scale."""
    p = subparsers.add_parser(
        "bench-scale",
        help="build and serve catalogues of growing size; report build seconds and memory per "
        "step, index bytes, load time, resident memory and serving p50/p99 per size",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SIZES),
        help="catalogue sizes in photos, comma-separated (default 10000,100000,1000000)",
    )
    p.add_argument("--work", default="var/scale", help="folder for the catalogues and sets")
    p.add_argument("--out", default="var/bench", help="report folder (scale.json, .md, .png)")
    p.add_argument("--force", action="store_true", help="write beside other files in OUT")
    p.add_argument("--users-per-photo", type=float, default=1.0, help="users per photo")
    p.add_argument(
        "--conversions-per-photo", type=float, default=20.0, help="conversions per photo"
    )
    p.add_argument("--seed", type=int, default=3, help="demo-data seed")
    p.add_argument(
        "--images",
        action="store_true",
        help="draw images and build tiny CLIP (adds the hybrid scenario); default: tables only",
    )
    p.add_argument("--rankers", default="popularity,als", help="rankers to build")
    p.add_argument("--rebuild", action="store_true", help="build again over a kept set")
    p.add_argument("--qps", type=float, default=QPS, help="offered load; 0 skips serving")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per scenario")
    p.add_argument(
        "--results-page", default=None, help="also write the report as this docs results page"
    )
    p.add_argument(
        "--cpu-lock",
        default=None,
        help="a lock file (flock) to hold while the servers load and serve, so serving figures "
        "are taken when no other measurement runs; generation and builds run niced outside it",
    )
    p.add_argument(
        "--load-generator",
        default="auto",
        choices=go_load.CHOICES,
        help="what sends the load: auto (default: the compiled grpc-go client when Debian's "
        "golang-go and golang-google-grpc-dev are installed, else python), go, or python; the "
        "compiled one leaves the servers more of the machine they share with it",
    )
    p.set_defaults(handler=cmd_bench_scale)


def parse_sizes(text: str) -> list[int]:
    """``10000,100000`` as sizes; raises ValueError naming a bad one."""
    sizes = []
    for part in text.split(","):
        try:
            size = int(part.replace("_", ""))
        except ValueError:
            raise ValueError(f"--sizes: {part!r} is not a number of photos") from None
        if size < 100:
            raise ValueError(f"--sizes: {size} photos is too few (at least 100)")
        sizes.append(size)
    return sizes


def run_child(command: list[str], log: Path) -> dict:
    """Run ``command`` niced (CPU and disk), output to ``log``; its seconds, CPU seconds and
    peak resident memory."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["nice", "-n", "19", "ionice", "-c3", *command], stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}; see {log}")
    # ru_maxrss of a waited child: KiB on Linux.
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def catalogue(size: int, args, folder: Path, logs: Path) -> dict:
    """Write (or keep) the catalogue of ``size`` photos; what it took."""
    from imgsearch_tools.demo_data import generated_by

    users = max(1, round(size * args.users_per_photo))
    conversions = round(size * args.conversions_per_photo)
    wanted = {"n_photos": size, "n_users": users, "n_conversions": conversions}
    wanted |= {"seed": args.seed, "with_images": bool(args.images)}
    made = generated_by(folder) if folder.exists() else None
    if made and all(made.get(k) == v for k, v in wanted.items()):
        return {**wanted, "kept": True}
    command = [sys.executable, "-m", "imgsearch_tools.cli", "demo-data", str(folder)]
    command += [f"--photos={size}", f"--users={users}", f"--conversions={conversions}"]
    command += [f"--seed={args.seed}", "--quiet"] + ([] if args.images else ["--no-images"])
    return {**wanted, **run_child(command, logs / "demo-data.log")}


def artifact_set(data: Path, root: Path, args, logs: Path) -> tuple[Path, dict]:
    """Build (or keep) the set of ``data`` under ``root``; its folder and what it took."""
    from imgsearch import artifacts

    measured: dict = {"kept": True}
    current = root / artifacts.CURRENT
    if args.rebuild or not current.exists():
        command = [sys.executable, "-m", "imgsearch_tools.cli", "build", f"--data={data}"]
        command += [f"--out={root}", f"--rankers={args.rankers}", "--no-int8"]
        command += [] if args.images else ["--no-clip"]
        measured = run_child(command, logs / "build.log")
    found = artifacts.resolve(root)
    return found.path, {**measured, **build_figures(found.path, found.manifest)}


def build_figures(set_dir: Path, manifest: dict) -> dict:
    """Per step and per ranker seconds and memory, and the bytes of each index."""
    from imgsearch import artifacts

    def size(relative: str) -> int:
        path = set_dir / relative
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size if path.exists() else 0

    return {
        "steps": manifest.get("build_steps", []),
        "build_seconds": manifest.get("build_seconds"),
        "rankers": {
            name: {k: entry[k] for k in ("seconds", "fit_seconds") if k in entry}
            for name, entry in manifest.get("rankers", {}).items()
        },
        "rankers_skipped": manifest.get("rankers_skipped", {}),
        "vector_index": (manifest.get("clip") or {}).get("vector_index", {}),
        "bytes": {
            "keyword index": size(artifacts.KEYWORD_INDEX),
            "vector index": size("vector.faiss"),
            "embeddings": size(artifacts.EMBEDDINGS),
            "rankers": size(artifacts.RANKERS_DIR),
            "catalogue": size(artifacts.CATALOGUE_DIR),
        },
    }


def resident_mib(pid: int) -> float:
    """A process's resident memory now (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def serve_and_load(set_dir: Path, args, logs: Path, images: bool) -> dict:
    """Start the servers, time their loading, measure memory and the load scenarios."""
    from imgsearch_tools.bench.processes import ServiceProcesses

    services = ServiceProcesses(str(set_dir), logs)
    figures: dict = {"load_seconds": {}, "resident_mib": {}, "scenarios": {}}
    try:
        for name in services.names:
            started = time.perf_counter()
            services.start(name)
            services.wait_serving(name, timeout=1800)
            figures["load_seconds"][name] = round(time.perf_counter() - started, 1)
        if args.qps > 0:
            figures["scenarios"] = asyncio.run(load_scenarios(services, set_dir, args, images))
        for name in services.names:
            figures["resident_mib"][name] = resident_mib(services.procs[name].pid)
    finally:
        services.stop_all()
    return figures


async def load_scenarios(services, set_dir: Path, args, images: bool) -> dict:
    """p50/p99 and errors of each scenario at the offered load."""
    from imgsearch_tools.bench import load as bench
    from imgsearch_tools.bench.queries import sample_queries

    queries = sample_queries(set_dir, n=4000, seed=args.seed)
    single = [q for q in queries if " " not in q.query] or queries
    scenarios = {
        "keyword + ALS, single keyword": ("keyword", single, 0.0),
        "keyword + ALS, unseen multi-word": ("keyword", single, 1.0),
    }
    if images:
        scenarios["hybrid + ALS, unseen multi-word"] = ("hybrid", single, 1.0)
    results = {}
    for name, (retriever, requests, unique) in scenarios.items():
        spec = bench.LoadSpec(
            target=services.address("gateway"),
            qps=args.qps,
            duration_s=args.duration,
            warmup_s=args.warmup,
            retriever=retriever,
            ranker="als",
            unique_share=unique,
            load_generator=args.load_generator,
        )
        result = await go_load.send_load(spec, requests)
        results[name] = summary(result)
        say(f"  {name}: {results[name]}")
    return results


def summary(result: dict) -> dict:
    """The figures of a load run the report shows."""
    latency = result["latency_ms"]
    scheduled = result.get("latency_from_schedule_ms", {})
    return {
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "p99_from_schedule_ms": scheduled.get("p99"),
        "achieved_qps": round(result["achieved_qps"], 1),
        "errors": result["error_count"],
        "degraded": result["degraded"],
        "sent": result["sent"],
    }


@contextmanager
def cpu_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (nothing when None)."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_size(size: int, args, work: Path, logs: Path) -> tuple[Path, dict]:
    """The catalogue and artifact set of one size, with what they took."""
    folder = work / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    say(f"{size:,} photos: catalogue")
    made = catalogue(size, args, folder / "data", logs)
    say(f"{size:,} photos: catalogue {made}; build")
    set_dir, built = artifact_set(folder / "data", folder / "artifacts", args, logs)
    say(f"{size:,} photos: built in {built.get('build_seconds')} s")
    return set_dir, {"photos": size, "demo_data": made, "build": built}


def say(message: str) -> None:
    print(f"[bench-scale] {message}", file=sys.stderr, flush=True)


def cmd_bench_scale(args) -> int:
    """Measure each size, then write the report (and the results page)."""
    from imgsearch_tools.bench.scale_report import write_report
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as error:
        print(f"bench-scale: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        claim_in_place(out, "bench-scale", REPORT_ENTRIES, force=args.force)
    except RefusedFolder as error:
        print(f"bench-scale: {error}", file=sys.stderr)
        return 2
    try:
        # Resolved once, before any build: "auto" becomes what every scenario then uses.
        if args.qps > 0:
            args.load_generator = go_load.resolve(args.load_generator, None, say)
    except go_load.GoUnavailable as error:
        print(f"bench-scale: {error}", file=sys.stderr)
        return 2
    work = Path(args.work)
    report = {
        "command": args.command_line,
        "settings": {k: v for k, v in vars(args).items() if k not in ("handler", "command_line")},
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "sizes": [],
    }
    # Every size is generated and built first (niced), then served: the CPU lock is taken
    # for the serving figures only.
    prepared = []
    for size in sizes:
        set_dir, figures = prepare_size(size, args, work, out / "scale-logs" / str(size))
        prepared.append(set_dir)
        report["sizes"].append({**figures, "serving": {}})
        write_report(report, out)
    for set_dir, figures in zip(prepared, report["sizes"]):
        say(f"{figures['photos']:,} photos: serving")
        with cpu_lock(args.cpu_lock):
            logs = out / "scale-logs" / str(figures["photos"])
            figures["serving"] = serve_and_load(set_dir, args, logs, bool(args.images))
        # Written after each size, so a long run leaves what it measured so far (in OUT: the
        # results page is written once, at the end, so that its header's commit is not made
        # "-dirty" by its own earlier version).
        write_report(report, out)
    write_report(report, out, args.results_page)
    print(json.dumps({"report": str(out / "scale.md")}))
    return 0
