"""`imgsearch serve`: one service in this process, or all three as child processes."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from imgsearch_tools.port_flags import add_port_security_arguments

SERVICES = ("retrieval", "ranking", "gateway")


def add_commands(subparsers) -> None:
    """Register serve."""
    p = subparsers.add_parser("serve", help="serve retrieval, ranking, the gateway, or all three")
    add_serve_arguments(p)
    p.set_defaults(handler=cmd_serve)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` flags; a flag named after a config field (``--max-inflight``) sets it."""
    from retrieval_service.text_encoder import RUNTIMES  # numpy only; torch loads on use

    p.add_argument(
        "service",
        choices=(*SERVICES, "all"),
        help="the service to start, or all three as separate processes",
    )
    p.add_argument("--artifacts", default=None, help="artifact root or set (IMGSEARCH_ARTIFACTS)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port of a single service")
    p.add_argument("--gateway-port", type=int, default=None, help="default 50051")
    p.add_argument("--retrieval-port", type=int, default=None, help="default 50052")
    p.add_argument("--ranking-port", type=int, default=None, help="default 50053")
    p.add_argument(
        "--retrieval-addr",
        default=None,
        help="gateway: where retrieval is: HOST:PORT, replicas as IP:PORT,IP:PORT,... or "
        "dns:///NAME:PORT (balanced round-robin, UNAVAILABLE retried on another replica); a "
        "sharded set: one such target per shard, in shard order, separated by ';'",
    )
    p.add_argument(
        "--ranking-addr",
        default=None,
        help="gateway: where ranking is: HOST:PORT, IP:PORT,IP:PORT,... or dns:///NAME:PORT",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus port of the service (with `all`: a base, gateway +0, retrieval +1, "
        "ranking +2; default from IMGSEARCH_METRICS_PORT, the same offsets)",
    )
    p.add_argument(
        "--concurrency-limit",
        default=None,
        choices=("adaptive", "fixed"),
        help="requests each method works on at once: adaptive (follows latency, between "
        "--min-inflight and --max-inflight) or fixed (--max-inflight); default adaptive",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="the most requests a method works on at once before RESOURCE_EXHAUSTED (64)",
    )
    p.add_argument(
        "--min-inflight",
        type=int,
        default=None,
        help="adaptive: the lowest limit, so bursts up to it are never refused (20); the "
        "baseline latency (minRTT) is measured with at most 8 in flight",
    )
    p.add_argument(
        "--limit-buffer",
        type=float,
        default=None,
        help="adaptive: latency above the baseline (minRTT) accepted before the limit shrinks, "
        "as a fraction of it (0.25)",
    )
    p.add_argument(
        "--limit-slack-ms",
        type=float,
        default=None,
        help="adaptive: latency above the baseline always accepted, in ms (50): fast requests "
        "are not refused for a queue of a millisecond",
    )
    p.add_argument(
        "--max-connection-age-s",
        type=float,
        default=None,
        help="close each client connection after this long, so clients balancing over DNS "
        "find new replicas (IMGSEARCH_MAX_CONNECTION_AGE_S; default 0 = never)",
    )
    p.add_argument(
        "--default-retriever",
        default=None,
        help="retriever for requests that name none (IMGSEARCH_DEFAULT_RETRIEVER)",
    )
    p.add_argument(
        "--encode-batch",
        type=int,
        default=None,
        help="retrieval: unseen queries encoded together at most (default 16)",
    )
    p.add_argument(
        "--encode-wait-ms",
        type=float,
        default=None,
        help="retrieval: how long an unseen query may wait for others to join its batch "
        "(default 2)",
    )
    p.add_argument(
        "--text-runtime",
        default=None,
        choices=RUNTIMES,
        help="retrieval: run the CLIP text tower with this runtime instead of the one the "
        "build chose",
    )
    p.add_argument(
        "--shard",
        type=int,
        default=None,
        help="retrieval: serve this shard (0-based) of a set built with --shards "
        "(IMGSEARCH_SHARD; default: the whole set)",
    )
    p.add_argument(
        "--default-ranker",
        default=None,
        help="ranker for requests that name none, instead of the set's validation choice "
        "(IMGSEARCH_DEFAULT_RANKER)",
    )
    p.add_argument("--timeout-ms", type=int, default=None, help="gateway search budget")
    p.add_argument(
        "--web-port",
        type=int,
        default=None,
        help="gateway: also serve the HTTP/JSON door and search page on this port, in the "
        "gateway's process, on its host, with its certificate and tokens "
        "(IMGSEARCH_GATEWAY_WEB_PORT; 0: an ephemeral port; default -1: none)",
    )
    p.add_argument(
        "--web-images",
        default=None,
        help="gateway: folder of <photo_id>.jpg images the page shows, e.g. DATA/images "
        "(IMGSEARCH_WEB_IMAGES)",
    )
    p.add_argument(
        "--conversions-db",
        default=None,
        help="SQLite file of logged conversions (IMGSEARCH_CONVERSIONS_DB; default: beside the "
        "artifact root, ROOT-conversions.sqlite3)",
    )
    p.add_argument(
        "--conversions-dsn",
        default=None,
        help="PostgreSQL DSN of the conversion store, instead of the SQLite file "
        "(IMGSEARCH_CONVERSIONS_DSN)",
    )
    p.add_argument(
        "--live-catalogue",
        action="store_true",
        default=None,
        help="serve the live catalogue: photos written and taken down through CatalogService, "
        "read from the conversion store's catalogue log (IMGSEARCH_LIVE_CATALOGUE=1)",
    )
    p.add_argument(
        "--foldin-conversions",
        type=int,
        default=None,
        help="ranking: latest logged conversions folded in for a user the model has not seen "
        "(default 50; 0 = off)",
    )
    p.add_argument(
        "--foldin-timeout-ms",
        type=int,
        default=None,
        help="ranking: how long a request waits for them (default 20)",
    )
    admin = p.add_argument_group(
        "admin ports", "AdminService (Reload, GetStatus) and plaintext health, one port each"
    )
    admin.add_argument("--admin-host", default=None, help="bind address (default 127.0.0.1)")
    admin.add_argument("--admin-port", type=int, default=None, help="of a single service")
    admin.add_argument("--gateway-admin-port", type=int, default=None, help="default 50061")
    admin.add_argument("--retrieval-admin-port", type=int, default=None, help="default 50062")
    admin.add_argument("--ranking-admin-port", type=int, default=None, help="default 50063")
    admin.add_argument(
        "--admin-tokens-file",
        default=None,
        help="bearer tokens the admin ports accept, one per line (required off loopback)",
    )
    tls = p.add_argument_group("TLS and tokens", "imgsearch/config.py; `make certs` makes a set")
    add_port_security_arguments(tls, "gateway: bearer tokens its service port accepts")
    tls.add_argument(
        "--insecure-public",
        action="store_true",
        default=None,
        help="gateway: serve a non-loopback --host with neither --auth-tokens-file nor "
        "--tls-client-ca (refused without this flag; IMGSEARCH_INSECURE_PUBLIC=1)",
    )
    tls.add_argument(
        "--reflection",
        default=None,
        choices=("auto", "on", "off"),
        help="server reflection (default auto: on only for a plaintext port on loopback)",
    )
    tls.add_argument(
        "--client-ca", default=None, help="gateway: CA of the stages' certificates (TLS)"
    )
    tls.add_argument("--client-cert", default=None, help="gateway: its certificate (mutual TLS)")
    tls.add_argument("--client-key", default=None, help="gateway: its private key")
    p.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)"
    )


def resolve_configs(args) -> dict:
    """The three services' configs from `serve` flags, then the environment, then defaults."""
    from imgsearch.config import (
        METRICS_PORT_OFFSETS,
        GatewayConfig,
        RankingConfig,
        RetrievalConfig,
        with_overrides,
    )

    def flag(name: str):
        return getattr(args, name, None)

    security = (
        "admin_host",
        "admin_tokens_file",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "reflection",
    )
    admission = (
        "concurrency_limit",
        "max_inflight",
        "min_inflight",
        "limit_buffer",
        "limit_slack_ms",
    )
    common = {
        "artifacts": args.artifacts,
        "host": args.host,
        **{name: flag(name) for name in admission},
        "max_connection_age_s": getattr(args, "max_connection_age_s", None),
        **{name: flag(name) for name in security},
    }
    base = args.metrics_port
    # --metrics-port is the port of `serve NAME`, and the base of `serve all`.
    spread = bool(base) and getattr(args, "service", "all") == "all"
    metrics = {n: base + METRICS_PORT_OFFSETS[n] if spread else base for n in SERVICES}
    conversions = {
        "conversions_db": args.conversions_db,
        "conversions_dsn": args.conversions_dsn,
        "live_catalogue": getattr(args, "live_catalogue", None),
    }
    retrieval = with_overrides(
        RetrievalConfig(),
        **common,
        **conversions,
        metrics_port=metrics["retrieval"],
        port=args.retrieval_port,
        admin_port=flag("retrieval_admin_port"),
        default_retriever=args.default_retriever,
        encode_batch=getattr(args, "encode_batch", None),
        encode_wait_ms=getattr(args, "encode_wait_ms", None),
        text_runtime=getattr(args, "text_runtime", None),
        shard=getattr(args, "shard", None),
    )
    ranking = with_overrides(
        RankingConfig(),
        **common,
        **conversions,
        metrics_port=metrics["ranking"],
        port=args.ranking_port,
        admin_port=flag("ranking_admin_port"),
        default_ranker=args.default_ranker,
        foldin_conversions=args.foldin_conversions,
        foldin_timeout_ms=args.foldin_timeout_ms,
    )
    gateway = with_overrides(
        GatewayConfig(),
        **common,
        **conversions,
        metrics_port=metrics["gateway"],
        port=args.gateway_port,
        admin_port=flag("gateway_admin_port"),
        auth_tokens_file=flag("auth_tokens_file"),
        insecure_public=flag("insecure_public"),
        client_ca=flag("client_ca"),
        client_cert=flag("client_cert"),
        client_key=flag("client_key"),
        timeout_ms=args.timeout_ms,
        web_port=flag("web_port"),
        web_images=flag("web_images"),
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
        f"[imgsearch] {name} SERVING on {config.host}:{service.port} "
        f"(admin {config.admin_host}:{service.admin_port})",
        file=sys.stderr,
        flush=True,
    )
    if name == "gateway" and config.web_port >= 0:
        from imgsearch_tools.web.commands import start_in_gateway

        page = await start_in_gateway(service, config)
        print(f"[imgsearch] web page at {page}", file=sys.stderr, flush=True)
    await run_until_signalled([service], config.grace_s)


def cmd_serve(args) -> int:
    import asyncio

    from imgsearch import artifacts
    from imgsearch.security import SecurityConfigError
    from imgsearch.serving import setup_logging

    setup_logging(args.log_level)
    configs = resolve_configs(args)
    try:
        artifacts.resolve(configs["gateway"].artifacts)
    except artifacts.ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.service != "all":
        config = service_config(args, configs)
        try:
            asyncio.run(serve_one(args.service, config))
        except (SecurityConfigError, OSError) as exc:
            print(f"error: {args.service}: {exc}", file=sys.stderr)
            return 2
        return 0
    return serve_all(args, configs)


def service_config(args, configs: dict | None = None):
    """The config `serve NAME` runs with: its resolved config with --port/--admin-port applied.

    ``configs`` are :func:`resolve_configs`'s (resolved again when not given).
    """
    from imgsearch.config import with_overrides

    configs = configs if configs is not None else resolve_configs(args)
    return with_overrides(configs[args.service], port=args.port, admin_port=args.admin_port)


def serve_all(args, configs, beside: dict[str, list[str]] | None = None) -> int:
    """Run the three services as child processes (one GIL each); forward signals; wait.

    ``beside`` names more commands to run and supervise with them (the demo's web page).
    Secrets reach the children through their environment (:func:`serve_environment`), which
    only their user can read, never through their command lines, which every user can.
    """
    from imgsearch_tools.supervision import start_children, supervise

    names = ("gateway", "retrieval", "ranking")
    if getattr(args, "conversions_dsn", None):
        print(
            "warning: --conversions-dsn shows in the process list with its password; set "
            "IMGSEARCH_CONVERSIONS_DSN instead",
            file=sys.stderr,
        )
    commands = {n: serve_command(n, configs[n], args.log_level) for n in names}
    commands.update(beside or {})
    environment = serve_environment(configs["gateway"], configs["ranking"])
    return supervise(start_children(commands, environment))


# Settings that may hold a password: passed to a child through its environment, as
# IMGSEARCH_<NAME>, never as a flag.
SECRET_SETTINGS = ("conversions_dsn",)


def serve_environment(*configs) -> dict[str, str]:
    """This process's environment plus the secret settings of ``configs`` (see
    :data:`SECRET_SETTINGS`), for the children that run them."""
    from imgsearch.config import ENV_PREFIX

    environment = dict(os.environ)
    for config in configs:
        for name in SECRET_SETTINGS:
            value = getattr(config, name, "")
            if value:
                environment[ENV_PREFIX + name.upper()] = value
    return environment


def serve_command(name: str, config, log_level: str = "INFO") -> list[str]:
    """The `imgsearch serve NAME` command line that runs one service with ``config``.

    Every setting of the config that `serve` has a flag for is passed as that flag (the field
    ``max_inflight`` as ``--max-inflight``; ``port`` as ``--port``), so a child process runs
    with exactly the settings the parent resolved; the rest come from the environment it
    inherits, and the secret ones (:data:`SECRET_SETTINGS`) from :func:`serve_environment`.
    """
    flags = _serve_flags()
    cmd = [sys.executable, "-m", "imgsearch_tools.cli", "serve", name, "--log-level", log_level]
    for field in fields(config):
        flag = "--" + field.name.replace("_", "-")
        value = getattr(config, field.name)
        if flag not in flags or field.name in SECRET_SETTINGS or value in (None, ""):
            continue
        if isinstance(value, bool):
            cmd += [flag] if value else []
        else:
            cmd += [flag, str(value)]
    return cmd


def _serve_flags() -> set[str]:
    probe = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(probe)
    return {option for action in probe._actions for option in action.option_strings}
