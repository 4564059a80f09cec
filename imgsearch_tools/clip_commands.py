"""CLI commands for CLIP: train-clip, embed, index-stats, fetch-images, bench-clip."""

from __future__ import annotations

import argparse
import json
import sys

from retrieval_service.clip_model import TRAIN_STEPS
from retrieval_service.ray_embedding import CPUS_PER_DECODE, CPUS_PER_WORKER


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the CLIP commands on the ``imgsearch`` parser."""
    p = subparsers.add_parser(
        "train-clip",
        help="train the tiny CLIP on a catalogue (or fine-tune a pretrained one)",
        description="Contrastive training on image <-> caption pairs; prints held-out tag P@10.",
    )
    p.add_argument("--data", required=True, help="Unsplash Lite folder with images/")
    p.add_argument(
        "--out",
        required=True,
        help="CLIP folder to write: new, empty, or one train-clip wrote before (replaced)",
    )
    p.add_argument("--model", default="imgsearch-tiny-clip", help="open_clip model name")
    p.add_argument(
        "--pretrained", default=None, help="open_clip tag, checkpoint file or CLIP folder"
    )
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps")
    p.add_argument("--batch-size", type=int, default=128, help="image-text pairs per training step")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3, 1e-5 when fine-tuning")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out that train-clip did not make, beside its files "
        "(none of them is deleted or overwritten)",
    )
    p.set_defaults(handler=_train_clip)

    p = subparsers.add_parser(
        "embed",
        help="embed every image of a catalogue (resumable; --ray: on a Ray actor pool)",
        description="L2-normalised image embeddings; rerun after an interruption to resume. "
        "With --ray the image tower runs on Ray Data (a local Ray, or the Ray cluster at "
        "ADDRESS) and OUT is a folder of shards. `imgsearch build --embeddings OUT` reads "
        "either output.",
    )
    p.add_argument("--data", required=True, help="Unsplash Lite folder with images/")
    p.add_argument("--clip", default=None, help="CLIP folder (from train-clip) or checkpoint")
    p.add_argument("--model", default=None, help="open_clip model name (with --pretrained)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file")
    p.add_argument("--out", required=True, help="embeddings .npz to write (a folder with --ray)")
    p.add_argument("--batch-size", type=int, default=64, help="images embedded per forward pass")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ray_group = p.add_argument_group("Ray", "optional; install with pip install '.[ray]'")
    ray_group.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="embed with Ray Data: a local Ray without ADDRESS, else the cluster at ADDRESS "
        "(auto, HOST:6379, ray://HOST:10001); every node must see --data at the same path",
    )
    ray_group.add_argument(
        "--workers", type=int, default=None, help="model actors, one CLIP each (default 2)"
    )
    ray_group.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help=f"Ray CPUs each actor reserves (default {CPUS_PER_WORKER}: leaves room for the "
        f"decode tasks, {CPUS_PER_DECODE} each)",
    )
    ray_group.add_argument(
        "--threads-per-worker", type=int, default=None, help="torch threads per actor (default 1)"
    )
    ray_group.add_argument(
        "--rows-per-shard", type=int, default=None, help="photos per shard file (default 50000)"
    )
    ray_group.add_argument(
        "--force",
        action="store_true",
        help="with --ray: write into a non-empty --out that embed did not make, beside its "
        "files (none of them is deleted or overwritten)",
    )
    p.set_defaults(handler=_embed)

    p = subparsers.add_parser(
        "index-stats",
        help="recall@10 and latency of a FAISS index against exact search",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="embeddings .npz (from embed): build and measure")
    source.add_argument(
        "--artifacts",
        help="artifact root or set: its served CLIP index and, when the set is sharded, its "
        "shards merged, each against exact search, on every catalogue keyword and "
        "--unseen-queries multi-word queries embedded as the server embeds them",
    )
    p.add_argument(
        "--unseen-queries",
        type=int,
        default=300,
        help="with --artifacts: unseen multi-word queries beside the keywords (default 300)",
    )
    p.add_argument("--factory", default=None, help="FAISS factory string (default by size)")
    p.add_argument("--queries", type=int, default=200, help="sampled embeddings used as queries")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW efSearch for the recall check")
    p.add_argument("--nprobe", type=int, default=16, help="IVF nprobe for the recall check")
    p.add_argument("--json", action="store_true", help="print figures as JSON")
    p.set_defaults(handler=_index_stats)

    p = subparsers.add_parser(
        "fetch-images",
        help="download thumbnails of an Unsplash Lite folder into images/",
        description="Concurrent, resumable (existing files skipped), retried, verified.",
    )
    p.add_argument("--data", required=True, help="Unsplash Lite folder with photos.tsv*")
    p.add_argument("--width", type=int, default=400, help="thumbnail width (?w=)")
    p.add_argument("--workers", type=int, default=16, help="concurrent downloads")
    p.add_argument(
        "--retries", type=int, default=3, help="retries per image before it is counted as failed"
    )
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per request")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_fetch_images)

    p = subparsers.add_parser(
        "bench-clip",
        help="text-encode, vector-search and embedding-throughput benchmark",
    )
    p.add_argument("--clip", default=None, help="CLIP folder (default: untrained tiny CLIP)")
    p.add_argument("--embeddings", default=None, help="embeddings .npz for the demo-size rows")
    p.add_argument("--demo-n", type=int, default=5000, help="synthetic rows without --embeddings")
    p.add_argument("--synthetic-n", type=int, default=1_000_000, help="large synthetic size")
    p.add_argument(
        "--synthetic-dim", type=int, default=128, help="dimension of the large synthetic rows"
    )
    p.add_argument("--factory", default="HNSW32", help="ANN factory string")
    p.add_argument("--queries", type=int, default=200, help="queries timed per measurement")
    p.add_argument("--k", type=int, default=100, help="neighbours per search")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    p.add_argument("--json", action="store_true", help="print figures as JSON")
    p.set_defaults(handler=_bench_clip)


def _read_catalogue(data_dir: str):
    from imgsearch.unsplash import read_unsplash

    catalogue, _ = read_unsplash(data_dir, show_progress=False)
    return catalogue


def _train_clip(args: argparse.Namespace) -> int:
    from imgsearch_tools import outputs
    from imgsearch_tools.demo_data import query_families
    from retrieval_service.clip_training import train_clip

    catalogue = _read_catalogue(args.data)
    try:
        # The folder is checked on entry, before the minutes of training.
        with outputs.staged_folder(args.out, "train-clip", args.force) as staging:
            train_clip(
                catalogue,
                staging,
                model_name=args.model,
                pretrained=args.pretrained,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                show_progress=not args.quiet,
                threads=args.threads,
                query_families=query_families(catalogue),
            )
    except outputs.RefusedFolder as exc:
        print(f"train-clip: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from retrieval_service.clip_model import ClipSpec, load_clip
    from retrieval_service.embedding import embed_catalogue

    if args.clip:
        spec = ClipSpec(args.model or "imgsearch-tiny-clip", args.clip)
    elif args.pretrained:
        spec = ClipSpec(args.model or "ViT-B-32", args.pretrained)
    else:
        print("embed: give --clip DIR or --model NAME --pretrained TAG", file=sys.stderr)
        return 2
    ray_options = {
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "threads_per_worker": args.threads_per_worker,
        "rows_per_shard": args.rows_per_shard,
    }
    ray_options = {name: value for name, value in ray_options.items() if value is not None}
    if args.ray is None:
        if args.force:
            ray_options["force"] = True
        if ray_options:
            flags = ", ".join("--" + name.replace("_", "-") for name in ray_options)
            print(f"embed: {flags} only apply with --ray", file=sys.stderr)
            return 2
    else:
        problem = _ray_problem(args, ray_options)
        if problem:
            print(f"embed: {problem}", file=sys.stderr)
            return 2
        return _embed_on_ray(args, spec, ray_options)
    catalogue = _read_catalogue(args.data)
    bundle = load_clip(spec)
    result = embed_catalogue(
        bundle, catalogue, args.out, batch_size=args.batch_size, show_progress=not args.quiet
    )
    print(
        f"embedded {result['embedded']:,} images ({result['missing']:,} missing, "
        f"{result['corrupt']:,} corrupt, {result['resumed_from']:,} resumed) at "
        f"{result['images_per_s']} images/s -> {result['path']}"
    )
    return 0


def _embed_on_ray(args: argparse.Namespace, spec, ray_options: dict) -> int:
    from imgsearch_tools import outputs
    from retrieval_service.clip_model import load_clip
    from retrieval_service.ray_embedding import embed_catalogue_on_ray

    try:
        # The folder is checked on entry; the shards appear there only once all are written.
        with outputs.staged_folder(args.out, "embed", args.force) as staging:
            catalogue = _read_catalogue(args.data)
            result = embed_catalogue_on_ray(
                load_clip(spec),
                catalogue,
                staging,
                address=args.ray or None,
                batch_size=args.batch_size,
                show_progress=not args.quiet,
                **ray_options,
            )
    except outputs.RefusedFolder as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return 2
    print(
        f"embedded {result['embedded']:,} images ({result['missing']:,} missing, "
        f"{result['corrupt']:,} corrupt) on Ray ({result['cluster']}, "
        f"{result['workers']} workers) at {result['images_per_s']} images/s, actor "
        f"start-up included -> {args.out} ({len(result['shards'])} shard(s))"
    )
    return 0


def _ray_problem(args: argparse.Namespace, options: dict) -> str | None:
    """Why ``embed --ray`` cannot start (Ray missing, bad numbers), or None."""
    from retrieval_service.ray_embedding import RayUnavailable, import_ray

    if options.get("workers", 1) < 1 or options.get("threads_per_worker", 1) < 1:
        return "--workers and --threads-per-worker must be at least 1"
    if options.get("cpus_per_worker", 1.0) <= 0 or options.get("rows_per_shard", 1) < 1:
        return "--cpus-per-worker and --rows-per-shard must be positive"
    try:
        import_ray(local=not args.ray)
    except RayUnavailable as exc:
        return f"--ray: {exc}"
    return None


def _index_stats(args: argparse.Namespace) -> int:
    from imgsearch_tools.bench.clip_components import index_figures
    from retrieval_service.embedding import load_embeddings

    if args.artifacts:
        return _set_index_stats(args)

    photo_idx, embeddings = load_embeddings(args.embeddings)
    figures = index_figures(
        embeddings,
        args.factory,
        n_queries=args.queries,
        k=10,
        ef_search=args.ef_search,
        nprobe=args.nprobe,
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"{figures['factory']} over {figures['ntotal']:,} x {figures['dim']}: "
            f"build {figures['build_s']:.2f} s, recall@10 vs exact {figures['recall@10']:.4f}\n"
            f"  exact  p50 {figures['exact']['p50_ms']:.3f} ms  p99 "
            f"{figures['exact']['p99_ms']:.3f} ms\n"
            f"  index  p50 {figures['index']['p50_ms']:.3f} ms  p99 "
            f"{figures['index']['p99_ms']:.3f} ms  ({figures['queries']} queries, 1 thread)"
        )
    return 0


def _set_index_stats(args: argparse.Namespace) -> int:
    from imgsearch import artifacts
    from imgsearch_tools.bench.shard_recall import format_recall, recall_queries, sharded_recall

    if args.unseen_queries < 0:
        print("index-stats: --unseen-queries must be 0 or more", file=sys.stderr)
        return 2
    try:
        artifact_set = artifacts.resolve(args.artifacts)
        record = sharded_recall(artifact_set, recall_queries(artifact_set, args.unseen_queries))
    except (artifacts.ArtifactError, ValueError) as error:
        print(f"index-stats: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2) if args.json else format_recall(record))
    return 0


def _fetch_images(args: argparse.Namespace) -> int:
    from imgsearch_tools.fetch_images import fetch_images

    result = fetch_images(
        args.data,
        width=args.width,
        workers=args.workers,
        retries=args.retries,
        timeout=args.timeout,
        show_progress=not args.quiet,
        limit=args.limit,
    )
    print(
        f"{result['total']:,} photos: {result['downloaded']:,} downloaded, "
        f"{result['skipped']:,} already there, {result['failed']:,} failed "
        f"in {result['seconds']:.1f} s"
    )
    for reason, count in sorted(result["failures"].items(), key=lambda item: -item[1]):
        print(f"  {count:,} x {reason}")
    return 0 if result["failed"] == 0 else 1


def _bench_clip(args: argparse.Namespace) -> int:
    from imgsearch_tools.bench.clip_components import bench_clip, format_bench

    figures = bench_clip(
        clip_dir=args.clip,
        embeddings_path=args.embeddings,
        demo_n=args.demo_n,
        synthetic_n=args.synthetic_n,
        synthetic_dim=args.synthetic_dim,
        factory=args.factory,
        n_queries=args.queries,
        k=args.k,
        threads=args.threads,
    )
    print(json.dumps(figures, indent=2) if args.json else format_bench(figures))
    return 0
