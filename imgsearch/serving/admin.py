"""The admin port: AdminService (reload a set version, report status) and health, loopback."""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1._async import HealthServicer

from imgsearch import artifacts
from imgsearch.admin.v1 import admin_service_pb2, admin_service_pb2_grpc
from imgsearch.security import SecurityConfigError, is_loopback
from imgsearch.serving.auth import read_tokens
from imgsearch.serving.errors import InvalidArgument
from imgsearch.serving.interceptor import ServiceInterceptor
from imgsearch.serving.ports import new_server
from imgsearch.serving.reflection import enable_reflection, reflection_wanted
from imgsearch.serving.reload import Reloadable

ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
logger = logging.getLogger("imgsearch")


class AdminServicer:
    """``imgsearch.admin.v1.AdminService``: reload and status for one server's state holder.

    ``Reload`` loads a set *version* under the artifacts the server was started with (see
    :func:`imgsearch.artifacts.locate`), never a path a caller names; reloads are
    serialised by the holder, each reporting the version it replaced.
    """

    def __init__(self, service: str, holder: Reloadable, configured: str):
        self.service = service
        self.holder = holder
        self.configured = configured

    async def Reload(self, request, context):
        if request.artifacts:
            raise InvalidArgument(
                "artifacts",
                "paths are no longer accepted; name a set under the server's artifact root "
                "with `version` (empty: the set `current` points to)",
            )
        try:
            path = artifacts.locate(self.configured, request.version)
        except ValueError as exc:
            raise InvalidArgument("version", str(exc)) from None
        except artifacts.UnknownVersion as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        start = time.perf_counter()
        try:
            previous, state = await self.holder.swap(str(path))
        except Exception as exc:  # noqa: BLE001 - keep serving the previous set
            serving = self.holder.state.version if self.holder.state else "nothing"
            logger.exception("reload failed", extra={"service": self.service})
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"reload failed, still serving {serving}: {exc}",
            )
        previous_version = previous.version if previous is not None else ""
        logger.info(
            "reloaded",
            extra={"service": self.service, "from": previous_version, "to": state.version},
        )
        return admin_service_pb2.ReloadResponse(
            previous_version=previous_version,
            version=state.version,
            load_ms=(time.perf_counter() - start) * 1000,
        )

    async def GetStatus(self, request, context):
        state = self.holder.state
        defaults = [
            admin_service_pb2.DefaultChoice(kind=kind, name=name, reason=reason)
            for kind, name, reason in getattr(state, "defaults", [])
        ]
        return admin_service_pb2.GetStatusResponse(
            service=self.service,
            version=state.version if state else "",
            artifacts=str(state.path) if state else "",
            models=list(state.models) if state else [],
            defaults=defaults,
            not_serving_reason=self.holder.waiting_for if state is None else "",
        )


def start_admin(
    name: str, config, holder: Reloadable
) -> tuple[grpc.aio.Server, int, HealthServicer, ServiceInterceptor]:
    """The admin port: AdminService and health in plaintext, loopback unless configured.

    Raises
    ------
    SecurityConfigError
        When it would bind a non-loopback address without admin tokens.
    """
    tokens = read_tokens(config.admin_tokens_file, "admin_tokens_file")
    if tokens is None and not is_loopback(config.admin_host):
        raise SecurityConfigError(
            f"{name}: the admin port would bind {config.admin_host}, which is not loopback, "
            "with no token asked: set IMGSEARCH_ADMIN_TOKENS_FILE (--admin-tokens-file) or "
            "bind it to 127.0.0.1"
        )
    interceptor = ServiceInterceptor(name, {ADMIN_SERVICE}, tokens=tokens)
    server, port, health = new_server(
        f"{name} admin", config.admin_host, config.admin_port, [interceptor]
    )
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(name, holder, str(config.artifacts)), server
    )
    if reflection_wanted(config.reflection, config.admin_host, tls=False):
        enable_reflection(server, [ADMIN_SERVICE])
    return server, port, health, interceptor
