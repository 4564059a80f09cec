"""Subcommands around running servers: search, reload and demo (what `make run` runs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgsearch.config import DEFAULT_ARTIFACTS
from imgsearch.names import RANKER_CHOICES, RANKER_NAMES, RETRIEVER_CHOICES
from imgsearch_tools.build import build_artifacts, check_artifact_root
from imgsearch_tools.client_flags import add_client_security_arguments, client_security
from imgsearch_tools.filter_flags import add_filter_arguments, photo_filter
from imgsearch_tools.outputs import RefusedFolder
from imgsearch_tools.serve import SERVICES, add_serve_arguments, resolve_configs, serve_all


def add_commands(subparsers) -> None:
    """Register search, reload and demo."""
    p = subparsers.add_parser("search", help="search through the gateway and print the results")
    p.add_argument("query", help="the search text (1-256 characters)")
    p.add_argument("--user", default="", help="anonymous_user_id (empty: anonymous)")
    p.add_argument("-k", type=int, default=10, help="results to return (1-1000)")
    p.add_argument(
        "--candidates-k",
        type=int,
        default=0,
        help="candidates retrieval hands to ranking (k-1000; 0: the server's default)",
    )
    p.add_argument(
        "--retriever",
        default="default",
        choices=RETRIEVER_CHOICES,
        help="retriever to use (default: the server's)",
    )
    p.add_argument(
        "--ranker",
        default="default",
        choices=RANKER_CHOICES,
        help="ranker to use (default: the server's)",
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
    add_filter_arguments(p)
    add_client_security_arguments(p)
    p.set_defaults(handler=cmd_search)

    p = subparsers.add_parser(
        "reload",
        help="switch running servers to an artifact set version",
        description="Ask each server's AdminService (on its admin port) to load a set version "
        "under the artifact root it was started with; no version: the set `current` points "
        "to. A server never loads a path a caller names.",
    )
    p.add_argument(
        "--targets",
        default=None,
        help="comma-separated admin HOST:PORT of the servers (default: the three local admin "
        "ports, 127.0.0.1:50062,50063,50061 or IMGSEARCH_*_ADMIN_PORT)",
    )
    p.add_argument(
        "--version",
        default="",
        help="set version (folder name under ARTIFACTS/sets/; default: what `current` points to)",
    )
    add_client_security_arguments(p, tls=False, token_env="ADMIN_TOKEN_FILE")
    p.set_defaults(handler=cmd_reload)

    p = subparsers.add_parser("demo", help="build the embedded demo if missing and serve it")
    p.add_argument(
        "--data", default="var/demo-data", help="demo data folder (generated when missing)"
    )
    p.add_argument(
        "--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root (built when it has no set)"
    )
    p.add_argument("--photos", type=int, default=5000, help="photos in a generated demo catalogue")
    p.add_argument("--users", type=int, default=2000, help="users in a generated demo catalogue")
    p.add_argument(
        "--conversions", type=int, default=150_000, help="conversions in a generated demo catalogue"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated demo catalogue")
    p.add_argument("--no-serve", action="store_true", help="build only, then exit")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into non-empty --data/--artifacts folders the demo did not make, beside "
        "their files (none of them is deleted or overwritten)",
    )
    p.set_defaults(handler=cmd_demo)


# ----------------------------------------------------------------------------------- search
def cmd_search(args) -> int:
    import grpc

    from gateway.client import format_table, search, to_json
    from imgsearch.config import env_int
    from imgsearch.security import SecurityConfigError

    target = args.target or f"127.0.0.1:{env_int('GATEWAY_PORT', 50051)}"
    recent = [r for r in args.recent.split(",") if r]
    try:
        security = client_security(args)
        response = search(
            target,
            args.query,
            args.user,
            k=args.k,
            candidates_k=args.candidates_k,
            retriever=args.retriever,
            ranker=args.ranker,
            recent_photo_ids=recent,
            photo_filter=photo_filter(args),
            timeout=args.timeout,
            security=security,
        )
    except SecurityConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(to_json(response) if args.json else format_table(response, args.query, args.user))
    if args.html:
        from gateway.client import to_html

        Path(args.html).write_text(to_html(response, args.query, args.user, args.images))
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def default_admin_targets() -> str:
    """The three local admin ports, retrieval and ranking first (the gateway reads both)."""
    from imgsearch.config import env_int

    ports = [
        env_int("RETRIEVAL_ADMIN_PORT", 50062),
        env_int("RANKING_ADMIN_PORT", 50063),
        env_int("GATEWAY_ADMIN_PORT", 50061),
    ]
    return ",".join(f"127.0.0.1:{port}" for port in ports)


def cmd_reload(args) -> int:
    import grpc

    from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
    from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
    from imgsearch.security import SecurityConfigError

    try:
        security = client_security(args)
        metadata = security.metadata()
    except SecurityConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    targets = args.targets or default_admin_targets()
    for target in [t for t in targets.split(",") if t]:
        with security.channel(target) as channel:
            stub = admin_grpc.AdminServiceStub(channel)
            try:
                reply = stub.Reload(
                    admin_pb.ReloadRequest(version=args.version), timeout=300, metadata=metadata
                )
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
    """Generate the demo data and build its set when missing or made by an older generator.

    Raises
    ------
    imgsearch_tools.outputs.RefusedFolder
        ``args.data`` or ``args.artifacts`` holds files the demo did not make (and
        ``args.force`` is off): nothing is written.
    """
    from imgsearch import artifacts
    from imgsearch_tools.demo_data import (
        GENERATOR_VERSION,
        check_folder,
        generate,
        generated_by,
    )

    force = getattr(args, "force", False)
    data = Path(args.data)
    made = generated_by(data)
    version = made.get("generator") if made else None
    regenerated = version != GENERATOR_VERSION
    try:
        artifacts.resolve(args.artifacts)
    except artifacts.ArtifactError:
        # Refuse a foreign artifact folder before spending minutes on the data.
        check_artifact_root(args.artifacts, force)
        regenerated = True
    if version != GENERATOR_VERSION:
        try:
            check_folder(data, force)
        except RefusedFolder as exc:
            raise RefusedFolder(
                f"{exc}\n(a demo catalogue written by `imgsearch demo-data` before it marked its "
                f"folders has no marker either: if {data} is one, delete it and run again; "
                "`make clean` deletes var/)"
            ) from None
        why = "generating" if version is None else "regenerating (the generator changed)"
        print(f"[imgsearch] {why} the demo catalogue into {data}", file=sys.stderr)
        generate(
            data,
            n_photos=args.photos,
            n_users=args.users,
            n_conversions=args.conversions,
            seed=args.seed,
            force=force,
        )
    if regenerated:
        build_artifacts(str(data), args.artifacts, list(RANKER_NAMES), force=force)


def demo_serve_args(artifacts: str, data: str | None = None) -> argparse.Namespace:
    """`serve all --artifacts ARTIFACTS` as `serve` parses it: every flag present, unset.

    With ``data``, the gateway also serves the search page and the JSON door in its own
    process (``--web-port``: ``IMGSEARCH_WEB_PORT``, 8080 by default), showing the images of
    ``data/images``. Parsed by the `serve` flags themselves, so a flag added to `serve` is
    never missing here.
    """
    from imgsearch.config import WebConfig

    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    argv = ["all", "--artifacts", str(artifacts), "--log-level", "WARNING"]
    if data is not None:
        argv += ["--web-port", str(WebConfig().port), "--web-images", str(Path(data) / "images")]
    return parser.parse_args(argv)


def cmd_demo(args) -> int:
    import threading

    try:
        ensure_demo(args)
    except RefusedFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_serve:
        return 0
    os.environ.setdefault("IMGSEARCH_LOG_FORMAT", "text")
    serve_args = demo_serve_args(args.artifacts, args.data)
    configs = resolve_configs(serve_args)
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
            # The admin port answers health in plaintext whatever the service port speaks.
            wait_for_serving(f"127.0.0.1:{configs[name].admin_port}", timeout=180)
        user = _example_user(artifacts_path)
        response = search(
            f"127.0.0.1:{ports['gateway']}", "red circle", user, k=5, security=client_security()
        )
        print("\n" + format_table(response, "red circle", user))
        page = wait_for_page(configs["gateway"], 180)
        print(
            f"\nimgsearch is SERVING: gateway 127.0.0.1:{ports['gateway']}, "
            f"retrieval 127.0.0.1:{ports['retrieval']}, ranking 127.0.0.1:{ports['ranking']}"
            f"\nsearch page: {page} (open it in a browser; HTTP/JSON at {page}v1/search, "
            f"OpenAPI at {page}openapi.json)"
            f'\ntry: .venv/bin/imgsearch search "blue star" --user {user}'
            "\nCtrl-C stops them all.",
            flush=True,
        )
    except Exception as exc:  # noqa: BLE001 - the servers keep running; say what failed
        print(f"example search failed: {exc}", file=sys.stderr)


def wait_for_page(gateway_config, timeout: float) -> str:
    """The search page's address once the gateway's door (``gateway_config.web_port``)
    answers there.

    Raises
    ------
    TimeoutError
        When it does not answer within ``timeout`` seconds.
    """
    import ssl
    import time
    import urllib.error
    import urllib.request

    from imgsearch_tools.web.commands import in_gateway_config, page_url

    config = in_gateway_config(gateway_config)
    url = page_url(config, config.port)
    context = None
    if url.startswith("https"):
        # Only "is it up?": the page's certificate may be the development CA's.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return url
        except (urllib.error.HTTPError, ssl.SSLError):
            return url  # it answers (asking for a token or a client certificate)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no search page at {url} after {timeout:.0f}s ({exc})")
            time.sleep(0.2)


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
