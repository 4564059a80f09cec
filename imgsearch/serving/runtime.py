"""A server's life: its ports started, the artifact set loaded, reloads and graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from imgsearch.admission import Admission, AdmissionSettings
from imgsearch.certificates import serving_certificate, watch_certificate
from imgsearch.security import is_loopback
from imgsearch.serving.admin import start_admin
from imgsearch.serving.auth import read_tokens
from imgsearch.serving.interceptor import ServiceInterceptor
from imgsearch.serving.metrics import watch_collector_pauses
from imgsearch.serving.ports import new_server
from imgsearch.serving.reflection import enable_reflection, reflection_wanted
from imgsearch.serving.reload import Reloadable

logger = logging.getLogger("imgsearch")


class Service:
    """One running server: its service port and its admin port, each with a health servicer.

    Created by ``create_*_server``; ``port`` serves the service's own API, ``admin_port``
    the AdminService and plaintext health.
    """

    def __init__(
        self,
        name: str,
        server: grpc.aio.Server,
        port: int,
        health: HealthServicer,
        admin_server: grpc.aio.Server | None = None,
        admin_port: int = 0,
        admin_health: HealthServicer | None = None,
    ):
        self.name = name
        self.server = server
        self.port = port
        self.health = health
        self.admin_server = admin_server
        self.admin_port = admin_port
        self.admin_health = admin_health
        self.reload_hooks: list[Callable[[], Awaitable[Any]]] = []
        self.stop_hooks: list[Callable[[], Awaitable[Any]]] = []
        # What a caller in this process needs to call the service's methods as the port
        # does (the door inside the gateway): the port's interceptor and the servicers.
        self.interceptor: ServiceInterceptor | None = None
        self.servicers: list[Any] = []

    @property
    def _healths(self) -> list[HealthServicer]:
        return [h for h in (self.health, self.admin_health) if h is not None]

    async def set_serving(self, service_names: list[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for health in self._healths:
            for service_name in ["", *service_names]:
                await health.set(service_name, status)

    async def reload(self) -> None:
        """Run every reload hook (each one even if another fails); re-raise the first error."""
        first_error = None
        for hook in self.reload_hooks:
            try:
                await hook()
            except Exception as exc:  # noqa: BLE001 - the other hooks still run
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    async def stop(self, grace: float) -> None:
        for health in self._healths:
            await health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.admin_server is not None:
            await self.admin_server.stop(grace)
        for hook in self.stop_hooks:
            await hook()


async def run_until_signalled(services: list[Service], grace: float) -> None:
    """Serve until SIGTERM/SIGINT (graceful stop); SIGHUP reloads the artifact set."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_reload() -> None:
        async def go():
            for service in services:
                try:
                    await service.reload()
                except Exception:  # noqa: BLE001 - a bad set must not take the server down
                    logger.exception("reload failed; still serving the previous set")

        loop.create_task(go())

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    await stop.wait()
    logger.info("shutting down (grace %.1fs)", grace)
    await asyncio.gather(*(service.stop(grace) for service in services))
    logger.info("stopped")


async def start_service(
    name: str,
    config,
    service_names: list[str],
    loader: Callable[[str], Any],
    add_servicer: Callable[[grpc.aio.Server, Reloadable], Any],
) -> Service:
    """Create a server and its admin port, register the servicers, load the state, serve.

    Health says NOT_SERVING from the moment the ports are open until the artifact set is
    loaded; then SERVING. ``loader(path)`` builds the state (it must have ``version``,
    ``path`` and ``models``); ``add_servicer`` registers the services named in
    ``service_names`` and returns the servicer, or a list of them (one with an async
    ``close()`` is closed when the service stops). Every RPC on the service port goes through
    one :class:`ServiceInterceptor` (bearer tokens when ``config.auth_tokens_file`` is set),
    and the port serves TLS when ``config.tls_cert`` is set (mutual TLS with
    ``config.tls_client_ca``); the admin port is :func:`start_admin`'s.

    Raises
    ------
    SecurityConfigError
        When a certificate, key or token file is missing or the settings contradict.
    """
    certificate = serving_certificate(name, config)
    credentials = certificate.credentials() if certificate is not None else None
    tls = credentials is not None
    if not tls and not is_loopback(config.host):
        logger.warning(
            f"{name} serves plaintext on {config.host}: set IMGSEARCH_TLS_CERT/KEY "
            "before exposing it"
        )
    holder: Reloadable = Reloadable(loader, str(config.artifacts))
    interceptor = ServiceInterceptor(
        name,
        set(service_names),
        holder,
        Admission(name, AdmissionSettings.from_config(config)),
        tokens=read_tokens(config.auth_tokens_file, "auth_tokens_file"),
    )
    reflection = reflection_wanted(config.reflection, config.host, tls)
    admin_server, admin_port, admin_health, admin_interceptor = start_admin(name, config, holder)
    server, port, health = new_server(
        name,
        config.host,
        config.port,
        [interceptor],
        credentials,
        max_connection_age_s=config.max_connection_age_s,
        grace_s=config.grace_s,
    )
    servicers = add_servicer(server, holder)
    if reflection:
        enable_reflection(server, service_names)
    service = Service(name, server, port, health, admin_server, admin_port, admin_health)
    service.interceptor = interceptor
    service.servicers = servicers if isinstance(servicers, list) else [servicers]
    for servicer in service.servicers:
        if hasattr(servicer, "close"):
            service.stop_hooks.append(servicer.close)
    await service.set_serving(service_names, False)
    await admin_server.start()
    await server.start()
    state = await holder.load()
    service.reload_hooks.append(holder.load)
    watch_collector_pauses()  # from here on, the collector's pauses are the requests' too

    async def reread_tokens() -> None:
        # SIGHUP also picks up rotated token files (a bad file keeps the old tokens).
        interceptor.tokens = read_tokens(config.auth_tokens_file, "auth_tokens_file")
        admin_interceptor.tokens = read_tokens(config.admin_tokens_file, "admin_tokens_file")

    service.reload_hooks.append(reread_tokens)
    await service.set_serving(service_names, True)
    if certificate is not None:
        watch_certificate(service, certificate, service_names, config.tls_watch_s)
    logger.info(
        f"{name} serving",
        extra={
            "port": port,
            "admin_port": admin_port,
            "tls": tls,
            "mutual_tls": bool(config.tls_client_ca),
            "auth": interceptor.tokens is not None,
            "reflection": reflection,
            "version": state.version,
            "models": list(state.models),
        },
    )
    return service
