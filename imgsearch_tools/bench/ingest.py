"""`imgsearch bench-ingest`: the live catalogue measured through real servers.

Retrieval, ranking and the gateway run as child processes on a served set, with a change log
of their own (a SQLite file in ``--out``, removed at the end: the set's own log is never
written). It measures, in order:

* photos written per second (CatalogService.UpsertPhotos batches, images embedded by the
  served CLIP's image tower);
* acknowledgement to searchable: each photo written alone with a keyword no other photo has,
  then searched (keyword retriever) every ``--poll-ms`` until it is returned;
* deletion to gone: each of those photos taken down, then searched until it is not;
* search latency (the set's default retriever and ranker) at a fixed rate, idle, then while
  photos are written at ``--ingest-rate`` per second;
* with ``--real-clip-folder``, photos written per second again on a set embedded with a
  ViT-B-32-sized CLIP (random weights: the real model's compute without a download), the one
  :mod:`imgsearch_tools.bench.real_clip` builds (or reuses) in that folder.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import grpc
import pandas as pd

from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb
from imgsearch.catalog.v1 import catalog_service_pb2_grpc as cat_grpc
from imgsearch.latency import percentiles_ms
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc

# What bench-ingest writes into --out ("name/": a folder whole); its change log lives there
# only while it runs.
ENTRIES = ("ingest.json", "ingest.md", "ingest-logs/", "ingest-log.sqlite3")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-ingest",
        help="measure the live catalogue: photos/s written, ack-to-searchable, delete-to-gone, "
        "search latency while ingesting",
    )
    p.add_argument("--data", required=True, help="the set's data folder (its images are written)")
    p.add_argument("--artifacts", required=True, help="artifact root or set to serve")
    p.add_argument("--out", required=True, help="folder for ingest.json, ingest.md and logs")
    p.add_argument("--writes", type=int, default=200, help="photos timed to searchable")
    p.add_argument("--batch", type=int, default=16, help="photos per call for photos/s")
    p.add_argument("--throughput-s", type=float, default=10.0, help="seconds of batch writes")
    p.add_argument("--poll-ms", type=float, default=5.0, help="search poll interval")
    p.add_argument("--search-rate", type=float, default=20.0, help="searches per second")
    p.add_argument("--ingest-rate", type=float, default=20.0, help="photos/s while searching")
    p.add_argument("--search-s", type=float, default=20.0, help="seconds of each search run")
    p.add_argument(
        "--warm-s", type=float, default=2.0, help="seconds of searches that warm the caches first"
    )
    p.add_argument(
        "--real-clip-folder",
        default="",
        help="also measure photos/s written with a ViT-B-32-sized CLIP, on the set built (or "
        "reused) in this folder as bench-suite's real-clip section builds it",
    )
    p.add_argument("--results-page", default="", help="also write this docs results page")
    p.set_defaults(handler=cmd_bench_ingest)


class Images:
    """The data folder's images and keywords, handed out in turn as new photos."""

    def __init__(self, data: Path):
        folder = Path(data) / "images"
        self.paths = sorted(folder.glob("*.jpg"))
        if not self.paths:
            raise SystemExit(f"error: {folder} holds no .jpg images to write")
        keywords = pd.concat(
            pd.read_csv(f, sep="\t") for f in sorted(Path(data).glob("keywords.tsv*"))
        )
        self.queries = sorted(keywords["keyword"].astype(str).unique().tolist())
        self.cache: dict[Path, bytes] = {}
        self.n = 0

    def photo(self, photo_id: str, keywords: list[str]) -> cat_pb.PhotoRecord:
        path = self.paths[self.n % len(self.paths)]
        self.n += 1
        image = self.cache.get(path) or self.cache.setdefault(path, path.read_bytes())
        return cat_pb.PhotoRecord(
            photo_id=photo_id,
            image=image,
            keywords=[cat_pb.KeywordConfidence(keyword=k, confidence=90.0) for k in keywords],
            photographer="bench",
        )


async def upsert(stub, photos: list) -> None:
    request = cat_pb.UpsertPhotosRequest(request_id=str(uuid.uuid4()), photos=photos)
    await stub.UpsertPhotos(request, timeout=60)


async def found(search, keyword: str, photo_id: str) -> bool:
    reply = await search.Search(
        pb.SearchRequest(
            query=keyword, k=10, candidates_k=10, retriever=retr_pb.RETRIEVER_KEYWORD, ranker=1
        ),
        timeout=10,
    )
    return any(r.photo_id == photo_id for r in reply.results)


async def until(condition, poll_s: float, limit_s: float = 30.0) -> float:
    """Seconds until ``await condition()`` holds (polled every ``poll_s``)."""
    start = time.perf_counter()
    while not await condition():
        if time.perf_counter() - start > limit_s:
            raise RuntimeError(f"not reached within {limit_s:.0f} s")
        await asyncio.sleep(poll_s)
    return time.perf_counter() - start


async def throughput(stub, images: Images, batch: int, seconds: float, run: str) -> dict:
    written, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ids = [f"{run}-t{written + i}" for i in range(batch)]
        await upsert(stub, [images.photo(p, [f"{run} throughput"]) for p in ids])
        written += batch
    elapsed = time.perf_counter() - start
    return {"photos": written, "seconds": round(elapsed, 2), "photos_per_s": written / elapsed}


async def visibility(stub, search, images: Images, writes: int, poll_s: float, run: str):
    """Ack-to-searchable and delete-to-gone latencies, one photo at a time."""
    searchable, gone, ids = [], [], []
    for i in range(writes):
        photo_id, keyword = f"{run}-v{i}", f"{run}v{i}"
        await upsert(stub, [images.photo(photo_id, [keyword])])
        searchable.append(await until(lambda: found(search, keyword, photo_id), poll_s))
        ids.append((photo_id, keyword))
    for photo_id, keyword in ids:
        await stub.DeletePhotos(
            cat_pb.DeletePhotosRequest(request_id=str(uuid.uuid4()), photo_ids=[photo_id]),
            timeout=30,
        )

        async def absent(keyword=keyword, photo_id=photo_id):
            return not await found(search, keyword, photo_id)

        gone.append(await until(absent, poll_s))
    return percentiles_ms(searchable), percentiles_ms(gone)


async def search_load(search, queries: list[str], rate: float, seconds: float) -> dict:
    """Open-loop searches at ``rate`` per second for ``seconds``; latency of each."""
    latencies, errors, tasks = [], 0, []

    async def one(query: str) -> None:
        nonlocal errors
        start = time.perf_counter()
        try:
            await search.Search(pb.SearchRequest(query=query, k=10), timeout=10)
            latencies.append(time.perf_counter() - start)
        except grpc.aio.AioRpcError:
            errors += 1

    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(queries[n % len(queries)])))
    await asyncio.gather(*tasks)
    return {"searches": len(latencies), "errors": errors, **percentiles_ms(latencies)}


async def ingest_at(stub, images: Images, rate: float, seconds: float, run: str) -> dict:
    """Single-photo writes at ``rate`` per second for ``seconds`` (open loop): how many were
    acknowledged, and refused (the gateway sheds writes it cannot keep up with)."""
    tasks, start = [], time.perf_counter()
    refused: list[str] = []

    async def one(photo) -> None:
        try:
            await upsert(stub, [photo])
        except grpc.aio.AioRpcError as exc:
            refused.append(exc.code().name)

    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        photo = images.photo(f"{run}-l{n}", [f"{run} load"])
        tasks.append(asyncio.create_task(one(photo)))
    await asyncio.gather(*tasks)
    return {"photos_written": len(tasks) - len(refused), "photos_refused": len(refused)}


async def measure_throughput(args, target: str, images: Images) -> dict:
    """Photos/s written alone (the ViT-B-32-sized set), after one write that loads the tower."""
    run = f"ingest{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = cat_grpc.CatalogServiceStub(channel)
        await upsert(stub, [images.photo(f"{run}-warm", [f"{run} warm"])])
        return await throughput(stub, images, args.batch, args.throughput_s, run)


def real_clip_throughput(args, out: Path) -> dict:
    """Build or reuse the ViT-B-32-sized set in ``--real-clip-folder``, serve it with a log of
    its own, and measure photos/s written."""
    from imgsearch_tools.bench.processes import ServiceProcesses
    from imgsearch_tools.bench.real_clip import MODEL, prepare_set

    folder = Path(args.real_clip_folder)
    artifact_set = prepare_set(folder)
    images = Images(folder / "data")
    log_db = out / "ingest-log.sqlite3"
    remove_log(log_db)
    store = {"conversions_db": str(log_db), "live_catalogue": True}
    services = ServiceProcesses(str(artifact_set.path), out / "ingest-logs", store=store)
    try:
        say(f"starting the services on the {MODEL}-sized set {artifact_set.version}")
        services.start_all()
        report = asyncio.run(measure_throughput(args, services.address("gateway"), images))
    finally:
        services.stop_all()
        remove_log(log_db)
    say(f"{MODEL}-sized photos/s written: {report['photos_per_s']:.1f}")
    return {**report, "model": MODEL, "artifact_version": artifact_set.version}


async def measure(args, target: str, images: Images) -> dict:
    run = f"ingest{uuid.uuid4().hex[:6]}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub, search = cat_grpc.CatalogServiceStub(channel), pb_grpc.SearchServiceStub(channel)
        await upsert(stub, [images.photo(f"{run}-warm", [f"{run} warm"])])  # loads the tower
        await search_load(search, images.queries, args.search_rate, args.warm_s)  # warm the caches
        report = {"throughput": await throughput(stub, images, args.batch, args.throughput_s, run)}
        say(f"photos/s written: {report['throughput']['photos_per_s']:.1f}")
        searchable, gone = await visibility(
            stub, search, images, args.writes, args.poll_ms / 1000, run
        )
        report["ack_to_searchable_ms"], report["delete_to_gone_ms"] = searchable, gone
        say(f"ack to searchable p99 {searchable['p99']} ms, delete to gone p99 {gone['p99']} ms")
        report["search_idle"] = await search_load(
            search, images.queries, args.search_rate, args.search_s
        )
        loaded, written = await asyncio.gather(
            search_load(search, images.queries, args.search_rate, args.search_s),
            ingest_at(stub, images, args.ingest_rate, args.search_s, run),
        )
        report["search_while_ingesting"] = {**loaded, **written}
        ratio = loaded["p99"] / report["search_idle"]["p99"]
        report["p99_ratio"] = round(ratio, 3)
        say(f"search p99 idle {report['search_idle']['p99']} ms, ingesting {loaded['p99']} ms")
    return report


def say(text: str) -> None:
    print(f"[bench-ingest] {text}", file=sys.stderr, flush=True)


def render_markdown(report: dict) -> str:
    t = report["throughput"]
    a, d = report["ack_to_searchable_ms"], report["delete_to_gone_ms"]
    idle, busy = report["search_idle"], report["search_while_ingesting"]
    s = report["settings"]
    return "\n".join(
        [
            f"Served set `{report['artifact_version']}` ({report['clip']}); one retrieval, "
            "ranking and gateway process each; the change log in its own SQLite file.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| photos/s written (batches of {s['batch']}, embedded at write) "
            f"| {t['photos_per_s']:.1f} ({t['photos']} photos in {t['seconds']} s) |",
            f"| ack to searchable p50 / p99 ({s['writes']} writes, polled every "
            f"{s['poll_ms']:g} ms) | {a['p50']:.1f} / {a['p99']:.1f} ms |",
            f"| delete to gone p50 / p99 ({s['writes']} deletions) "
            f"| {d['p50']:.1f} / {d['p99']:.1f} ms |",
            f"| search p50 / p99 idle ({s['search_rate']:g}/s, {idle['searches']} searches) "
            f"| {idle['p50']:.1f} / {idle['p99']:.1f} ms |",
            f"| search p50 / p99 while writing {s['ingest_rate']:g} photos/s "
            f"({busy['searches']} searches, {busy['photos_written']} photos written, "
            f"{busy.get('photos_refused', 0)} refused) "
            f"| {busy['p50']:.1f} / {busy['p99']:.1f} ms |",
            f"| p99 while ingesting / idle | {report['p99_ratio']:.2f}x |",
            *real_clip_rows(report, s),
            "",
        ]
    )


def real_clip_rows(report: dict, settings: dict) -> list[str]:
    """The ViT-B-32-sized set's row, when it was measured."""
    vit = report.get("real_clip")
    if not vit:
        return []
    return [
        f"| photos/s written with a {vit['model']}-sized CLIP (random weights; set "
        f"`{vit['artifact_version']}`, batches of {settings['batch']}) "
        f"| {vit['photos_per_s']:.1f} ({vit['photos']} photos in {vit['seconds']} s) |"
    ]


def remove_log(path: Path) -> None:
    """Remove the run's SQLite change log and its WAL files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def cmd_bench_ingest(args) -> int:
    from imgsearch import artifacts
    from imgsearch_tools.bench.processes import ServiceProcesses
    from imgsearch_tools.outputs import RefusedFolder, claim_in_place

    out = Path(args.out)
    try:
        claim_in_place(out, "bench-ingest", ENTRIES)
    except RefusedFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    artifact_set = artifacts.resolve(args.artifacts)
    images = Images(Path(args.data))
    log_db = out / "ingest-log.sqlite3"
    remove_log(log_db)  # an interrupted run's: this run starts from an empty log
    store = {"conversions_db": str(log_db), "live_catalogue": True}
    services = ServiceProcesses(str(artifact_set.path), out / "ingest-logs", store=store)
    try:
        say("starting retrieval, ranking and gateway")
        services.start_all()
        report = asyncio.run(measure(args, services.address("gateway"), images))
    finally:
        services.stop_all()
        remove_log(log_db)
    if args.real_clip_folder:
        report["real_clip"] = real_clip_throughput(args, out)
    write_report(args, report, artifact_set, out)
    return 0


def write_report(args, report: dict, artifact_set, out: Path) -> None:
    """Complete ``report`` with the set and settings; write ingest.json, ingest.md (and the
    results page when asked) into ``out`` and print the table."""
    clip = artifact_set.manifest.get("clip", {})
    report.update(
        artifact_version=artifact_set.version,
        clip=f"CLIP {clip.get('model', clip.get('model_name', 'tiny'))}",
        settings={
            k: getattr(args, k)
            for k in ("writes", "batch", "poll_ms", "search_rate", "ingest_rate", "search_s")
        },
    )
    markdown = render_markdown(report)
    (out / "ingest.json").write_text(json.dumps(report, indent=2))
    (out / "ingest.md").write_text(markdown)
    if args.results_page:
        from imgsearch_tools.results_page import write_results_page

        command = " ".join(["imgsearch", *sys.argv[1:]])
        write_results_page(args.results_page, "Live catalogue: ingest", command, markdown)
    print(markdown)
