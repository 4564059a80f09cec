"""`imgsearch web` and the door inside the gateway: flags, TLS for the HTTP port, start, stop."""

from __future__ import annotations

import argparse
import sys

from imgsearch_tools.client_flags import add_client_security_arguments, client_security
from imgsearch_tools.port_flags import add_port_security_arguments


def add_commands(subparsers) -> None:
    """Register web."""
    p = subparsers.add_parser(
        "web",
        help="serve the search page and the gateway's methods as HTTP/JSON, with OpenAPI",
        description="An HTTP server in front of the gateway: POST /v1/search (Search) and POST "
        "/v1/conversions (LogConversions) in the proto JSON mapping, errors as HTTP status with "
        "the gRPC code and the field, GET /openapi.json, the search page at /, the catalogue's "
        "images under /images/. Settings: imgsearch/config.py (IMGSEARCH_WEB_*).",
    )
    p.add_argument("--host", default=None, help="bind address (IMGSEARCH_WEB_HOST; 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (IMGSEARCH_WEB_PORT; 8080)")
    p.add_argument(
        "--target",
        default=None,
        help="gateway HOST:PORT or any gRPC target (IMGSEARCH_GATEWAY_ADDR; 127.0.0.1:50051)",
    )
    p.add_argument(
        "--artifacts",
        default=None,
        help="artifact root or set the gateway serves: photo ids and users for the page "
        "(IMGSEARCH_ARTIFACTS; '' for none)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="folder of <photo_id>.jpg images, e.g. DATA/images (IMGSEARCH_WEB_IMAGES)",
    )
    p.add_argument("--timeout", type=float, default=None, help="deadline per gateway call, s")
    tls = p.add_argument_group("the HTTP port", "the same files the gateway's port reads")
    add_port_security_arguments(
        tls, "bearer tokens /v1 and /images accept (IMGSEARCH_AUTH_TOKENS_FILE)"
    )
    add_client_security_arguments(p)
    p.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)"
    )
    p.set_defaults(handler=cmd_web)


def web_config(args):
    """The WebConfig of the flags in ``args``, then the environment, then the defaults."""
    from imgsearch.config import WebConfig, with_overrides

    return with_overrides(
        WebConfig(),
        host=args.host,
        port=args.port,
        gateway_addr=args.target,
        artifacts=args.artifacts,
        images=args.images,
        timeout_s=args.timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens_file=args.auth_tokens_file,
    )


def ssl_context(config):
    """The HTTPS context of the door's port, or None for plain HTTP."""
    import ssl

    from imgsearch.security import SecurityConfigError

    if not config.tls_cert and not config.tls_key:
        if config.tls_client_ca:
            raise SecurityConfigError("tls_client_ca needs tls_cert and tls_key (mutual TLS)")
        return None
    if not (config.tls_cert and config.tls_key):
        raise SecurityConfigError("tls_cert and tls_key go together: set both or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"web TLS files: {exc}") from None
    return context


def page_url(config, port: int) -> str:
    """The address a browser opens."""
    scheme = "https" if config.tls_cert else "http"
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}/"


async def start(config, security=None, catalogue=None, gateway=None):
    """Start the door; returns ``(runner, port)`` (stop with ``await runner.cleanup()``).

    ``gateway`` is how it reaches the gateway (:mod:`imgsearch_tools.web.gateways`); by
    default over gRPC at ``config.gateway_addr`` with ``security``.
    """
    from aiohttp import web

    from imgsearch.security import is_loopback
    from imgsearch_tools.web.app import create_app

    context = ssl_context(config)
    app = create_app(config, security, catalogue, gateway)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    if context is None and not is_loopback(config.host):
        print(
            f"[imgsearch] warning: web serves plain HTTP on {config.host}: set "
            "IMGSEARCH_TLS_CERT/KEY before exposing it",
            file=sys.stderr,
        )
    return runner, port


def in_gateway_config(gateway_config):
    """The door's settings inside the gateway: the gateway's host, certificate and tokens,
    its artifact set, ``web_port`` and ``web_images``."""
    from imgsearch.config import WebConfig

    return WebConfig(
        host=gateway_config.host,
        port=gateway_config.web_port,
        artifacts=str(gateway_config.artifacts),
        images=gateway_config.web_images,
        tls_cert=gateway_config.tls_cert,
        tls_key=gateway_config.tls_key,
        tls_client_ca=gateway_config.tls_client_ca,
        auth_tokens_file=gateway_config.auth_tokens_file,
    )


async def start_in_gateway(service, gateway_config) -> str:
    """Serve the door on the running gateway ``service``'s loop, calling its servicers in
    this process; returns the page's address. The door stops first when the gateway stops.
    """
    from imgsearch_tools.web.gateways import GatewayInProcess

    config = in_gateway_config(gateway_config)
    runner, port = await start(config, gateway=GatewayInProcess(service))
    service.stop_hooks.insert(0, runner.cleanup)
    return page_url(config, port)


async def serve(config, security) -> None:
    """Run the door until SIGTERM/SIGINT."""
    import asyncio
    import signal

    runner, port = await start(config, security)
    print(f"[imgsearch] web page at {page_url(config, port)}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def cmd_web(args: argparse.Namespace) -> int:
    import asyncio

    from imgsearch import artifacts
    from imgsearch.security import SecurityConfigError
    from imgsearch.serving import setup_logging

    setup_logging(args.log_level)
    config = web_config(args)
    try:
        asyncio.run(serve(config, client_security(args)))
    except (SecurityConfigError, artifacts.ArtifactError, OSError) as exc:
        print(f"error: web: {exc}", file=sys.stderr)
        return 2
    return 0
