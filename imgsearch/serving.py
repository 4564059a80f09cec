"""What every gRPC server shares: health, reflection, metrics, load shedding, reload, signals."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import any_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha._base import _file_descriptor_response, _not_found_error
from grpc_status import rpc_status
from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUEST_ID_KEY = "x-request-id"
# One JSON line per RPC (service, method, code, ms, request id) when IMGSEARCH_ACCESS_LOG=1;
# off by default because at hundreds of searches per second it costs more than it tells.
ACCESS_LOG = os.environ.get("IMGSEARCH_ACCESS_LOG", "") not in ("", "0", "false")
logger = logging.getLogger("imgsearch")

REQUESTS = Counter(
    "imgsearch_requests_total", "RPCs handled, by final status code.", ["service", "method", "code"]
)
LATENCY = Histogram(
    "imgsearch_latency_seconds",
    "Latency per stage inside a service.",
    ["service", "stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
INFLIGHT = Gauge("imgsearch_inflight_requests", "RPCs being handled now.", ["service"])
DEGRADED = Counter(
    "imgsearch_degraded_total",
    "Searches answered degraded, by reason (unavailable, timeout, no_budget, circuit_open).",
    ["reason"],
)
ARTIFACT_INFO = Gauge(
    "imgsearch_artifact_loaded_timestamp_seconds",
    "When the serving artifact set was loaded, by version.",
    ["service", "version"],
)


# ---------------------------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _standard = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once: JSON lines (default) or plain text on stderr."""
    fmt = fmt or os.environ.get("IMGSEARCH_LOG_FORMAT", "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# The request id of the RPC being handled: set by the interceptor for the RPC's task, read by
# every log line (see JsonFormatter) and forwarded downstream by the gateway.
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def _record_with_request_id(*args, **kwargs) -> logging.LogRecord:
    record = _base_record_factory(*args, **kwargs)
    rid = _request_id.get()
    if rid:
        record.request_id = rid
    return record


# Every log record made while an RPC is handled carries its request id, whoever logs it.
_base_record_factory = logging.getLogRecordFactory()
logging.setLogRecordFactory(_record_with_request_id)


def current_request_id() -> str:
    """The id of the request this task is handling ("" outside an RPC)."""
    return _request_id.get()


def _incoming_request_id(metadata) -> str:
    """The caller's ``x-request-id`` metadata, or a new id when it sent none."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and value:
            return value[:128]
    return uuid.uuid4().hex[:16]


# ----------------------------------------------------------------------------------- errors
class InvalidArgument(Exception):
    """A request field is invalid; becomes INVALID_ARGUMENT with a BadRequest detail."""

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def bad_request_status(field: str, description: str) -> grpc.Status:
    """An INVALID_ARGUMENT status carrying a ``google.rpc.BadRequest`` that names the field."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            ]
        )
    )
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}", details=[detail]
        )
    )


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """What every RPC of a service's own API goes through, in one place.

    For the methods of ``services`` (health, reflection and admin pass untouched, so they are
    never shed): a request id (the caller's ``x-request-id`` or a new one, kept for the RPC's
    task so every log line carries it); UNAVAILABLE while the artifact set is loading;
    load shedding with RESOURCE_EXHAUSTED past the in-flight limit; bad input raised as
    :class:`InvalidArgument` turned into INVALID_ARGUMENT with a BadRequest naming the field;
    any other exception into INTERNAL with the request id (nothing a client sends crashes a
    server); requests, latency and in-flight metrics; and, with ``IMGSEARCH_ACCESS_LOG``,
    one log line per RPC.

    Parameters
    ----------
    service:
        The service's short name in metrics and logs ("gateway", "retrieval", "ranking").
    services:
        Full names of the gRPC services whose methods are handled here.
    holder:
        The serving state; a request before it is loaded gets UNAVAILABLE.
    limiter:
        The in-flight limit; None for no load shedding.
    """

    def __init__(
        self,
        service: str,
        services: set[str],
        holder: Reloadable | None = None,
        limiter: InflightLimiter | None = None,
    ):
        self.service = service
        self.services = set(services)
        self.holder = holder
        self.limiter = limiter
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._inflight = INFLIGHT.labels(service)
        self._latency = LATENCY.labels(service, "total")
        self._counters: dict[tuple[str, str], Any] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        service_name, _, method_name = method.lstrip("/").rpartition("/")
        if handler is None or handler.unary_unary is None or service_name not in self.services:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method_name, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped

    def _count(self, method: str, code: str) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = REQUESTS.labels(self.service, method, code)
        counter.inc()

    def _wrap(self, method: str, behavior: Callable[..., Awaitable[Any]]):
        service = self.service

        async def handle(request, context):
            rid = _incoming_request_id(context.invocation_metadata())
            _request_id.set(rid)
            if self.holder is not None and self.holder.state is None:
                # The port opens before the artifact set is loaded (health says NOT_SERVING).
                self._count(method, "UNAVAILABLE")
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"{service} is loading its artifact set"
                )
            limiter = self.limiter
            if limiter is not None and not limiter.try_acquire():
                self._count(method, "RESOURCE_EXHAUSTED")
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{service} is saturated ({limiter.limit} requests in flight); "
                    "retry with backoff",
                )
            self._inflight.inc()
            start = time.perf_counter()
            status = "UNKNOWN"
            try:
                response = await behavior(request, context)
                status = "OK"
                return response
            except InvalidArgument as exc:
                status = "INVALID_ARGUMENT"
                await context.abort_with_status(bad_request_status(exc.field, exc.description))
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except Exception as exc:  # noqa: BLE001 - nothing a client sends may crash a server
                code = context.code()
                if isinstance(exc, grpc.aio.AbortError) or (
                    code is not None and code != grpc.StatusCode.OK
                ):
                    status = code.name if code is not None else "ABORTED"
                    raise
                logger.exception("unhandled error", extra={"service": service})
                status = "INTERNAL"
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error (request id {rid}): {exc}"
                )
            finally:
                elapsed = time.perf_counter() - start
                self._inflight.dec()
                self._latency.observe(elapsed)
                self._count(method, status)
                if limiter is not None:
                    limiter.release()
                if ACCESS_LOG:
                    logger.info(
                        "rpc",
                        extra={
                            "service": service,
                            "method": method,
                            "code": status,
                            "ms": round(elapsed * 1000, 3),
                        },
                    )

        return handle


class InflightLimiter:
    """Counts requests in flight on the event loop; refuses past the limit (no queue)."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.inflight = 0

    def try_acquire(self) -> bool:
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        self.inflight -= 1


# -------------------------------------------------------------------------------- reflection
class SymbolReflectionServicer(ReflectionServicer):
    """Server reflection that also resolves method and nested symbols.

    Stock grpcio-reflection answers NOT_FOUND for ``file_containing_symbol`` of a method's full
    name (``pkg.Service.Method``); ghz and other clients ask exactly that. Walk up the dotted
    name until a known symbol is found and answer with the file that defines it.
    """

    def _file_containing_symbol(self, request, fully_qualified_name):
        name = fully_qualified_name
        while name:
            try:
                descriptor = self._pool.FindFileContainingSymbol(name)
            except KeyError:
                name = name.rpartition(".")[0]
                continue
            if name != fully_qualified_name and not _defines(descriptor, fully_qualified_name):
                break
            return _file_descriptor_response(descriptor, request)
        return _not_found_error(request)


def _defines(file_descriptor, full_name: str) -> bool:
    """Whether ``full_name`` is a service method (or nested element) of ``file_descriptor``."""
    parent, _, leaf = full_name.rpartition(".")
    for service in file_descriptor.services_by_name.values():
        if service.full_name == parent and leaf in service.methods_by_name:
            return True
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(parent)
        return True
    except KeyError:
        return False


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Register :class:`SymbolReflectionServicer` for the given services plus reflection itself."""
    from grpc_reflection.v1alpha import reflection

    names = [
        *service_names,
        reflection.SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    ]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        SymbolReflectionServicer(names), server
    )


# ------------------------------------------------------------------------------ hot reload
StateT = TypeVar("StateT")


class Reloadable(Generic[StateT]):
    """Holds the serving state (models + artifact version) and swaps it atomically.

    Handlers read ``holder.state`` once per request and use only that object, so a request
    never mixes two artifact versions; a swap is a single reference assignment.
    """

    def __init__(self, loader: Callable[[], StateT]):
        self._loader = loader
        self.state: StateT | None = None
        self._lock = asyncio.Lock()

    async def load(self) -> StateT:
        """Load a new state off the event loop, then swap it in."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            new_state = await loop.run_in_executor(None, self._loader)
            self.state = new_state
            return new_state


# -------------------------------------------------------------------------------- lifecycle
class Service:
    """One running gRPC server with its health servicer; created by ``create_*_server``."""

    def __init__(self, name: str, server: grpc.aio.Server, port: int, health: HealthServicer):
        self.name = name
        self.server = server
        self.port = port
        self.health = health
        self.reload_hooks: list[Callable[[], Awaitable[Any]]] = []
        self.stop_hooks: list[Callable[[], Awaitable[Any]]] = []

    async def set_serving(self, service_names: list[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service_name in ["", *service_names]:
            await self.health.set(service_name, status)

    async def reload(self) -> None:
        for hook in self.reload_hooks:
            await hook()

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for hook in self.stop_hooks:
            await hook()


def new_server(
    name: str, host: str, port: int, interceptors: list[grpc.aio.ServerInterceptor] | None = None
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """An aio server bound to ``host:port`` (0 = ephemeral) with health registered."""
    server = grpc.aio.server(
        interceptors=interceptors or (),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"error: {name} cannot listen on {host}:{port} (address in use?)")
    return server, bound, health


def start_metrics(port: int, host: str) -> None:
    """Expose Prometheus metrics over HTTP on ``port`` (0 disables)."""
    if port:
        start_http_server(port, addr=host)
        logger.info("metrics on http://%s:%d/metrics", host, port)


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


# ------------------------------------------------------------------------------------ admin
class AdminServicer:
    """``imgsearch.admin.v1.AdminService``: reload and status for one server's state holder."""

    def __init__(self, service: str, holder: Reloadable, paths: dict):
        self.service = service
        self.holder = holder
        self.paths = paths  # {"artifacts": path the loader reads}

    async def Reload(self, request, context):
        from imgsearch.admin.v1 import admin_service_pb2

        previous = self.holder.state.version if self.holder.state else ""
        previous_path = self.paths["artifacts"]
        if request.artifacts:
            self.paths["artifacts"] = request.artifacts
        start = time.perf_counter()
        try:
            state = await self.holder.load()
        except Exception as exc:  # noqa: BLE001 - keep serving the previous set
            self.paths["artifacts"] = previous_path
            logger.exception("reload failed", extra={"service": self.service})
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"reload failed, still serving {previous}: {exc}",
            )
        logger.info(
            "reloaded", extra={"service": self.service, "from": previous, "to": state.version}
        )
        return admin_service_pb2.ReloadResponse(
            previous_version=previous,
            version=state.version,
            load_ms=(time.perf_counter() - start) * 1000,
        )

    async def GetStatus(self, request, context):
        from imgsearch.admin.v1 import admin_service_pb2

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
        )


def add_admin(server: grpc.aio.Server, service: str, holder: Reloadable, paths: dict) -> str:
    """Register the AdminService on ``server``; returns its full service name."""
    from imgsearch.admin.v1 import admin_service_pb2, admin_service_pb2_grpc

    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(service, holder, paths), server
    )
    return admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


async def start_service(
    name: str,
    config,
    service_names: list[str],
    loader: Callable[[str], Any],
    add_servicer: Callable[[grpc.aio.Server, Reloadable], Any],
) -> Service:
    """Create a server, register its servicers, admin and reflection, load its state, serve.

    Health says NOT_SERVING from the moment the port is open until the artifact set is
    loaded; then SERVING. ``loader(path)`` builds the state (it must have ``version``,
    ``path`` and ``models``); ``add_servicer`` registers the services named in
    ``service_names`` and returns the servicer, or a list of them (one with an async
    ``close()`` is closed when the service stops). Their RPCs go through one
    :class:`ServiceInterceptor`.
    """
    paths = {"artifacts": config.artifacts}
    holder: Reloadable = Reloadable(lambda: loader(paths["artifacts"]))
    interceptor = ServiceInterceptor(
        name, set(service_names), holder, InflightLimiter(config.max_inflight)
    )
    server, port, health = new_server(name, config.host, config.port, [interceptor])
    servicers = add_servicer(server, holder)
    admin_name = add_admin(server, name, holder, paths)
    enable_reflection(server, [*service_names, admin_name])
    service = Service(name, server, port, health)
    for servicer in servicers if isinstance(servicers, list) else [servicers]:
        if hasattr(servicer, "close"):
            service.stop_hooks.append(servicer.close)
    await service.set_serving(service_names, False)
    await server.start()
    state = await holder.load()
    service.reload_hooks.append(holder.load)
    await service.set_serving(service_names, True)
    logger.info(
        f"{name} serving",
        extra={"port": port, "version": state.version, "models": list(state.models)},
    )
    return service
