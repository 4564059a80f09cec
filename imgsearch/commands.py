"""Core subcommands: build, train, serve, search, reload and demo (what `make run` runs)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from retrieval_service.clip_model import TRAIN_STEPS

SERVICES = ("retrieval", "ranking", "gateway")
DEFAULT_RANKERS = ("none", "popularity", "als", "fm", "deepfm")


def add_commands(subparsers) -> None:
    """Register build, train, serve, search, reload and demo."""
    p = subparsers.add_parser(
        "build",
        help="validate an Unsplash Lite folder and build a versioned artifact set",
        description="Read DATA (Unsplash Lite layout), then write catalogue tables, the keyword "
        "index, CLIP embeddings + FAISS index (when images exist) and trained rankers as one "
        "versioned set under OUT/sets/<version>, and point OUT/current at it.",
    )
    p.add_argument("--data", required=True, help="folder in the Unsplash Lite layout")
    p.add_argument("--out", required=True, help="artifact root (sets/ and current are made here)")
    p.add_argument(
        "--rankers",
        default=",".join(DEFAULT_RANKERS),
        help="comma-separated rankers to train (default: %(default)s)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="pick ranker hyper-parameters on a "
        "validation slice of the conversions (recorded in the manifest)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="try INT8 for the DeepFM MLP, kept only if NDCG@10 stays within 1%% of FP32 and "
        "it is faster (default: on)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip CLIP even when images exist")
    p.add_argument(
        "--clip-model",
        default=None,
        help="open_clip model name (default: the project's tiny CLIP, trained on the catalogue)",
    )
    p.add_argument(
        "--clip-pretrained",
        default=None,
        help="open_clip pretrained tag or local checkpoint path for --clip-model",
    )
    p.add_argument(
        "--clip-steps",
        type=int,
        default=TRAIN_STEPS,
        help="CLIP training steps when training (default: %(default)s)",
    )
    p.add_argument(
        "--index-factory",
        default=None,
        help="FAISS factory string (default: Flat below 50k photos, else HNSW32)",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail on the first malformed row (default) or skip and count them",
    )
    p.add_argument("--keep", type=int, default=3, help="artifact sets to keep (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_build)

    p = subparsers.add_parser(
        "train",
        help="retrain the rankers of the current artifact set into a new set version",
        description="Train rankers on the catalogue of ARTIFACTS/current and publish a new set "
        "that shares every other artifact (hard links) with it; running servers pick it up on "
        "`imgsearch reload`. --tune picks hyper-parameters on a validation slice cut from the "
        "end of the conversions and records the choice in the manifest.",
    )
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root (with current)")
    p.add_argument(
        "--rankers",
        default=",".join(DEFAULT_RANKERS[2:]),
        help="comma-separated rankers to train (default: %(default)s)",
    )
    p.add_argument("--tune", action="store_true", help="tune on a validation slice first")
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gate INT8 for the DeepFM MLP (default: on)",
    )
    p.add_argument("--keep", type=int, default=3, help="artifact sets to keep (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train)

    p = subparsers.add_parser("serve", help="serve retrieval, ranking, the gateway, or all three")
    p.add_argument("service", choices=(*SERVICES, "all"))
    p.add_argument("--artifacts", default=None, help="artifact root or set (IMGSEARCH_ARTIFACTS)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port of a single service")
    p.add_argument("--gateway-port", type=int, default=None, help="default 50051")
    p.add_argument("--retrieval-port", type=int, default=None, help="default 50052")
    p.add_argument("--ranking-port", type=int, default=None, help="default 50053")
    p.add_argument("--retrieval-addr", default=None, help="gateway: retrieval HOST:PORT")
    p.add_argument("--ranking-addr", default=None, help="gateway: ranking HOST:PORT")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus port (with `all`: base, +0 gateway, +1 retrieval, +2 ranking)",
    )
    p.add_argument("--max-inflight", type=int, default=None, help="load-shedding limit")
    p.add_argument("--default-retriever", default=None)
    p.add_argument("--default-ranker", default=None)
    p.add_argument("--timeout-ms", type=int, default=None, help="gateway search budget")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(handler=cmd_serve)

    p = subparsers.add_parser("search", help="search through the gateway and print the results")
    p.add_argument("query")
    p.add_argument("--user", default="", help="anonymous_user_id (empty: anonymous)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--candidates-k", type=int, default=0)
    p.add_argument(
        "--retriever", default="default", choices=("default", "keyword", "clip", "hybrid")
    )
    p.add_argument(
        "--ranker",
        default="default",
        choices=("default", "none", "popularity", "als", "fm", "deepfm", "two_step"),
    )
    p.add_argument("--recent", default="", help="comma-separated recent photo ids of the user")
    p.add_argument("--target", default=None, help="gateway HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument(
        "--html",
        default=None,
        metavar="FILE",
        help="also write the results as an HTML page with the images",
    )
    p.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="with --html: embed images from this folder (e.g. DATA/images) "
        "instead of linking their URLs",
    )
    p.set_defaults(handler=cmd_search)

    p = subparsers.add_parser("reload", help="switch running servers to the newest artifact set")
    p.add_argument(
        "--targets",
        default="127.0.0.1:50052,127.0.0.1:50053,127.0.0.1:50051",
        help="comma-separated HOST:PORT of the servers (default: all three local)",
    )
    p.add_argument("--artifacts", default="", help="artifact root or set (default: the same)")
    p.set_defaults(handler=cmd_reload)

    p = subparsers.add_parser("demo", help="build the embedded demo if missing and serve it")
    p.add_argument("--data", default="var/demo-data")
    p.add_argument("--artifacts", default="var/artifacts")
    p.add_argument("--photos", type=int, default=5000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--conversions", type=int, default=150_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-serve", action="store_true", help="build only, then exit")
    p.set_defaults(handler=cmd_demo)


# ------------------------------------------------------------------------------------ build
def build_artifacts(
    data: str,
    out: str,
    rankers: list[str],
    tune: bool = False,
    clip: bool = True,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    clip_steps: int = TRAIN_STEPS,
    index_factory: str | None = None,
    strict: bool = True,
    keep: int = 3,
    show_progress: bool = True,
    int8: bool = True,
) -> Path:
    """Build one artifact set from ``data`` under ``out`` and publish it; returns its folder."""
    from imgsearch import artifacts
    from imgsearch.unsplash import read_unsplash
    from retrieval_service.keyword_index import KeywordIndex

    started = time.time()
    log = _stage_printer(show_progress)
    log(f"reading {data}")
    catalogue, report = read_unsplash(data, show_progress=show_progress, strict=strict)
    log(report.summary())
    fingerprint = artifacts.data_fingerprint(data)
    set_dir, version = artifacts.new_set_dir(out, fingerprint)
    try:
        manifest: dict = {
            "version": version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data_dir": str(Path(data).resolve()),
            "data_fingerprint": fingerprint,
            "counts": {
                "photos": catalogue.n_photos,
                "photos_with_images": int(catalogue.photos["has_image"].sum()),
                "keywords": len(catalogue.keywords),
                "users": catalogue.n_users,
                "conversions": len(catalogue.conversions),
            },
            "versions": _library_versions(),
        }
        catalogue.save(set_dir / artifacts.CATALOGUE_DIR)
        log("building keyword index")
        KeywordIndex.from_keywords(catalogue.keywords).save(set_dir / artifacts.KEYWORD_INDEX)
        if clip and catalogue.photos["has_image"].any():
            from retrieval_service.clip_model import ClipSpec
            from retrieval_service.clip_training import build_clip_artifacts

            spec = ClipSpec(clip_model, clip_pretrained) if clip_model else None
            log("CLIP: " + (f"{clip_model} ({clip_pretrained})" if spec else "training tiny CLIP"))
            manifest["clip"] = build_clip_artifacts(
                catalogue,
                set_dir,
                spec,
                factory=index_factory,
                train_steps=clip_steps,
                show_progress=show_progress,
            )
        else:
            manifest["clip"] = {
                "skipped": "disabled by --no-clip" if not clip else "the catalogue has no images"
            }
        if rankers:
            from ranking_service.training import train_rankers

            log(f"training rankers: {', '.join(rankers)}")
            manifest["rankers"] = train_rankers(
                catalogue,
                rankers,
                set_dir / artifacts.RANKERS_DIR,
                tune=tune,
                show_progress=show_progress,
                int8=int8,
            )
        else:
            manifest["rankers"] = {}
        manifest["build_seconds"] = round(time.time() - started, 1)
        artifacts.write_manifest(set_dir, manifest)
    except BaseException:
        shutil.rmtree(set_dir, ignore_errors=True)
        raise
    artifacts.publish(out, set_dir)
    artifacts.prune(out, keep=keep)
    log(f"artifact set {version} ready in {manifest['build_seconds']}s: {set_dir}")
    return set_dir


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("imgsearch", "torch", "open_clip_torch", "faiss-cpu", "implicit", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _stage_printer(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(f"[imgsearch] {message}", file=sys.stderr, flush=True)

    return log


def cmd_build(args) -> int:
    from imgsearch.unsplash import DataError

    rankers = [r.strip() for r in args.rankers.split(",") if r.strip()]
    unknown = sorted(set(rankers) - set(DEFAULT_RANKERS))
    if unknown:
        print(
            f"error: unknown ranker(s) {', '.join(unknown)}; valid: {', '.join(DEFAULT_RANKERS)}",
            file=sys.stderr,
        )
        return 2
    try:
        build_artifacts(
            args.data,
            args.out,
            rankers,
            tune=args.tune,
            clip=not args.no_clip,
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            clip_steps=args.clip_steps,
            index_factory=args.index_factory,
            strict=args.strict,
            keep=args.keep,
            show_progress=not args.quiet,
            int8=args.int8,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def retrain_rankers(
    root: str,
    rankers: list[str],
    tune: bool = False,
    int8: bool = True,
    keep: int = 3,
    show_progress: bool = True,
) -> Path:
    """Train ``rankers`` on the current set's catalogue and publish them as a new set version.

    Rankers of the current set that are not retrained are kept as they are.
    """
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue
    from ranking_service.training import train_rankers

    if not (Path(root) / artifacts.CURRENT).exists():
        raise artifacts.ArtifactError(
            f"{root} is not an artifact root (no {artifacts.CURRENT} link); "
            "build one with `imgsearch build --data DIR --out ROOT`"
        )
    current = artifacts.resolve(root)
    catalogue = Catalogue.load(current.file(artifacts.CATALOGUE_DIR))
    set_dir, version = artifacts.new_set_dir(root, current.manifest.get("data_fingerprint", ""))
    try:
        artifacts.link_tree(current.path, set_dir, skip=(artifacts.MANIFEST,))
        for name in rankers:
            shutil.rmtree(set_dir / artifacts.RANKERS_DIR / name, ignore_errors=True)
        trained = train_rankers(
            catalogue,
            rankers,
            set_dir / artifacts.RANKERS_DIR,
            tune=tune,
            show_progress=show_progress,
            int8=int8,
        )
        manifest = {
            **current.manifest,
            "version": version,
            "parent_version": current.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rankers": {**current.manifest.get("rankers", {}), **trained},
        }
        artifacts.write_manifest(set_dir, manifest)
    except BaseException:
        shutil.rmtree(set_dir, ignore_errors=True)
        raise
    artifacts.publish(root, set_dir)
    artifacts.prune(root, keep=keep)
    _stage_printer(show_progress)(f"artifact set {version} (rankers retrained) ready: {set_dir}")
    return set_dir


def cmd_train(args) -> int:
    from imgsearch import artifacts

    rankers = [r.strip() for r in args.rankers.split(",") if r.strip()]
    unknown = sorted(set(rankers) - set(DEFAULT_RANKERS))
    if unknown or not rankers:
        print(
            f"error: unknown ranker(s) {', '.join(unknown) or '(none given)'}; valid: "
            f"{', '.join(DEFAULT_RANKERS)}",
            file=sys.stderr,
        )
        return 2
    try:
        retrain_rankers(
            args.artifacts,
            rankers,
            tune=args.tune,
            int8=args.int8,
            keep=args.keep,
            show_progress=not args.quiet,
        )
    except artifacts.ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------ serve
def _configs(args):
    from imgsearch.config import GatewayConfig, RankingConfig, RetrievalConfig, with_overrides

    common = {
        "artifacts": args.artifacts,
        "host": args.host,
        "max_inflight": args.max_inflight,
        "metrics_port": args.metrics_port,
    }
    retrieval = with_overrides(
        RetrievalConfig(),
        **common,
        port=args.retrieval_port,
        default_retriever=args.default_retriever,
    )
    ranking = with_overrides(
        RankingConfig(), **common, port=args.ranking_port, default_ranker=args.default_ranker
    )
    gateway = with_overrides(
        GatewayConfig(),
        **common,
        port=args.gateway_port,
        timeout_ms=args.timeout_ms,
        retrieval_addr=args.retrieval_addr
        or (f"127.0.0.1:{retrieval.port}" if args.retrieval_port else None),
        ranking_addr=args.ranking_addr
        or (f"127.0.0.1:{ranking.port}" if args.ranking_port else None),
    )
    return {"retrieval": retrieval, "ranking": ranking, "gateway": gateway}


async def serve_one(name: str, config) -> None:
    """Run one service until SIGTERM/SIGINT."""
    from imgsearch.serving import run_until_signalled, start_metrics

    if name == "retrieval":
        from retrieval_service.server import create_retrieval_server as create
    elif name == "ranking":
        from ranking_service.server import create_ranking_server as create
    else:
        from gateway.server import create_gateway_server as create
    start_metrics(config.metrics_port, config.host)
    service = await create(config)
    print(
        f"[imgsearch] {name} SERVING on {config.host}:{service.port}", file=sys.stderr, flush=True
    )
    await run_until_signalled([service], config.grace_s)


def cmd_serve(args) -> int:
    import asyncio

    from imgsearch import artifacts
    from imgsearch.config import with_overrides
    from imgsearch.serving import setup_logging

    setup_logging(args.log_level)
    configs = _configs(args)
    try:
        artifacts.resolve(configs["gateway"].artifacts)
    except artifacts.ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.service != "all":
        config = with_overrides(configs[args.service], port=args.port)
        asyncio.run(serve_one(args.service, config))
        return 0
    return serve_all(args, configs)


def serve_all(args, configs) -> int:
    """Run the three services as child processes (one GIL each); forward signals; wait."""
    children: dict[str, subprocess.Popen] = {}
    for offset, name in enumerate(("gateway", "retrieval", "ranking")):
        config = configs[name]
        cmd = [
            sys.executable,
            "-m",
            "imgsearch.cli",
            "serve",
            name,
            "--artifacts",
            config.artifacts,
            "--host",
            config.host,
            "--port",
            str(config.port),
            "--log-level",
            args.log_level,
            "--max-inflight",
            str(config.max_inflight),
        ]
        if config.metrics_port:
            cmd += ["--metrics-port", str(config.metrics_port + offset)]
        if name == "gateway":
            cmd += [
                "--retrieval-addr",
                config.retrieval_addr,
                "--ranking-addr",
                config.ranking_addr,
                "--timeout-ms",
                str(config.timeout_ms),
            ]
        if name == "retrieval" and args.default_retriever:
            cmd += ["--default-retriever", args.default_retriever]
        if name == "ranking" and args.default_ranker:
            cmd += ["--default-ranker", args.default_ranker]
        children[name] = subprocess.Popen(cmd, start_new_session=True)
    return supervise(children)


def supervise(children: dict[str, subprocess.Popen], grace: float = 10.0) -> int:
    """Wait for children; on SIGTERM/SIGINT forward SIGTERM and wait for clean exits."""
    stopping = {"flag": False}

    def forward(signum, frame):
        stopping["flag"] = True

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(
        signal.SIGHUP, lambda s, f: [c.send_signal(signal.SIGHUP) for c in children.values()]
    )
    try:
        while not stopping["flag"]:
            dead = {n: c.returncode for n, c in children.items() if c.poll() is not None}
            if dead:
                print(f"error: service exited: {dead}", file=sys.stderr)
                stopping["flag"] = True
                break
            time.sleep(0.2)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [c.returncode for c in children.values()]
    return 0 if all(code == 0 for code in codes) else 1


# ----------------------------------------------------------------------------------- search
def cmd_search(args) -> int:
    import grpc

    from gateway.client import format_table, search, to_json
    from imgsearch.config import env_int

    target = args.target or f"127.0.0.1:{env_int('GATEWAY_PORT', 50051)}"
    recent = [r for r in args.recent.split(",") if r]
    try:
        response = search(
            target,
            args.query,
            args.user,
            k=args.k,
            candidates_k=args.candidates_k,
            retriever=args.retriever,
            ranker=args.ranker,
            recent_photo_ids=recent,
            timeout=args.timeout,
        )
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(to_json(response) if args.json else format_table(response, args.query, args.user))
    if args.html:
        from gateway.client import to_html

        Path(args.html).write_text(to_html(response, args.query, args.user, args.images))
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def cmd_reload(args) -> int:
    import grpc

    from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
    from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc

    status = 0
    for target in [t for t in args.targets.split(",") if t]:
        with grpc.insecure_channel(target) as channel:
            stub = admin_grpc.AdminServiceStub(channel)
            try:
                reply = stub.Reload(admin_pb.ReloadRequest(artifacts=args.artifacts), timeout=300)
                print(
                    f"{target}: {reply.previous_version} -> {reply.version} "
                    f"({reply.load_ms:.0f} ms)"
                )
            except grpc.RpcError as exc:
                print(f"{target}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                status = 1
    return status


# ------------------------------------------------------------------------------------- demo
def ensure_demo(args) -> None:
    """Generate the demo data and build its set when missing or made by an older generator."""
    from imgsearch import artifacts
    from imgsearch.demo_data import GENERATOR_VERSION, generate

    data = Path(args.data)
    marker = data / ".complete"
    try:
        generated_by = json.loads(marker.read_text()).get("generator")
    except (OSError, ValueError, AttributeError):
        generated_by = None
    regenerated = generated_by != GENERATOR_VERSION
    if regenerated:
        why = "generating" if generated_by is None else "regenerating (the generator changed)"
        print(f"[imgsearch] {why} the demo catalogue into {data}", file=sys.stderr)
        if data.exists():
            shutil.rmtree(data)
        generate(
            data,
            n_photos=args.photos,
            n_users=args.users,
            n_conversions=args.conversions,
            seed=args.seed,
        )
        marker.write_text(json.dumps({**vars(args), "generator": GENERATOR_VERSION}, default=str))
    try:
        artifacts.resolve(args.artifacts)
    except artifacts.ArtifactError:
        regenerated = True
    if regenerated:
        build_artifacts(str(data), args.artifacts, list(DEFAULT_RANKERS))


def cmd_demo(args) -> int:
    import threading

    ensure_demo(args)
    if args.no_serve:
        return 0
    os.environ.setdefault("IMGSEARCH_LOG_FORMAT", "text")
    serve_args = argparse.Namespace(
        artifacts=args.artifacts,
        host=None,
        max_inflight=None,
        retrieval_port=None,
        ranking_port=None,
        gateway_port=None,
        default_retriever=None,
        default_ranker=None,
        timeout_ms=None,
        retrieval_addr=None,
        ranking_addr=None,
        metrics_port=None,
        log_level="WARNING",
    )
    configs = _configs(serve_args)
    # serve_all installs signal handlers, which only the main thread may do: it runs there,
    # and the example search runs from a helper thread once all three are SERVING.
    threading.Thread(target=show_example, args=(configs, args.artifacts), daemon=True).start()
    return serve_all(serve_args, configs)


def show_example(configs: dict, artifacts_path: str) -> None:
    """Wait for the three services, then print one personalized example search."""
    from gateway.client import format_table, search, wait_for_serving

    ports = {name: configs[name].port for name in SERVICES}
    try:
        for name in SERVICES:
            wait_for_serving(f"127.0.0.1:{ports[name]}", timeout=180)
        user = _example_user(artifacts_path)
        response = search(f"127.0.0.1:{ports['gateway']}", "red circle", user, k=5)
        print("\n" + format_table(response, "red circle", user))
        print(
            f"\nimgsearch is SERVING: gateway 127.0.0.1:{ports['gateway']}, "
            f"retrieval 127.0.0.1:{ports['retrieval']}, ranking 127.0.0.1:{ports['ranking']}"
            f'\ntry: .venv/bin/imgsearch search "blue star" --user {user}'
            "\nCtrl-C stops all three.",
            flush=True,
        )
    except Exception as exc:  # noqa: BLE001 - the servers keep running; say what failed
        print(f"example search failed: {exc}", file=sys.stderr)


def _example_user(artifacts_path: str) -> str:
    """The most active user of the served set, so the example search is personalized."""
    import pandas as pd

    from imgsearch import artifacts

    artifact_set = artifacts.resolve(artifacts_path)
    catalogue_dir = artifact_set.file(artifacts.CATALOGUE_DIR)
    conversions = pd.read_parquet(catalogue_dir / "conversions.parquet", columns=["user_idx"])
    users = pd.read_parquet(catalogue_dir / "users.parquet")
    if conversions.empty:
        return ""
    top = int(conversions["user_idx"].value_counts().idxmax())
    return str(users.loc[users["user_idx"] == top, "anonymous_user_id"].iloc[0])
