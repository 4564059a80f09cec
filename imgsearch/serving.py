"""What every gRPC server shares: health, reflection, auth, metrics, admission, reload."""

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

from imgsearch import artifacts
from imgsearch.admin.v1 import admin_service_pb2, admin_service_pb2_grpc
from imgsearch.admission import Admission, AdmissionSettings, DeadlineExpired, Refusal
from imgsearch.certificates import serving_certificate, watch_certificate
from imgsearch.health import BoundedHealthServicer
from imgsearch.security import SecurityConfigError, is_loopback
from imgsearch.tokens import ADMIN, METHOD_SCOPES, SEARCH, TokenSet

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
    "Searches answered degraded, by reason (unavailable, overloaded, timeout, no_budget, "
    "circuit_open, shard_unavailable).",
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
    return os.urandom(8).hex()  # 16 random hex digits, as uuid4().hex[:16] gave, cheaper


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


HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """What every RPC of a service's own API goes through, in one place.

    With ``tokens``, every RPC on the port but the health service's (the service's own API,
    reflection, any service registered later, unknown methods alike) must carry
    ``authorization: Bearer <token>``; without one it gets UNAUTHENTICATED and nothing more,
    before its request is even decoded, and with a token that lacks the method's scope
    (:data:`imgsearch.tokens.METHOD_SCOPES`) PERMISSION_DENIED. For the methods of
    ``services`` (health and reflection pass untouched, so they are never shed): a request
    id (the caller's ``x-request-id`` or a new one, kept for the RPC's task so every log
    line carries it);
    UNAVAILABLE while the artifact set is loading; admission
    (:class:`~imgsearch.admission.Admission`: RESOURCE_EXHAUSTED with a pushback past the
    method's concurrency limit or when the deadline left is too short); bad input raised as
    :class:`InvalidArgument` turned into INVALID_ARGUMENT with a BadRequest naming the field;
    queued work dropped past its deadline (:class:`DeadlineExpired`) into DEADLINE_EXCEEDED;
    any other exception into INTERNAL with the request id (nothing a client sends crashes a
    server); requests, latency and in-flight metrics; and, with ``IMGSEARCH_ACCESS_LOG``, one
    log line per RPC.

    Parameters
    ----------
    service:
        The service's short name in metrics and logs ("gateway", "retrieval", "ranking").
    services:
        Full names of the gRPC services whose methods are handled here.
    holder:
        The serving state; a request before it is loaded gets UNAVAILABLE.
    admission:
        Admission control; None for no load shedding.
    tokens:
        The bearer tokens the port accepts; None for no authentication. Replaceable at run
        time (``interceptor.tokens = ...``), e.g. when the token file is re-read.
    """

    def __init__(
        self,
        service: str,
        services: set[str],
        holder: Reloadable | None = None,
        admission: Admission | None = None,
        tokens: TokenSet | None = None,
    ):
        self.service = service
        self.services = set(services)
        self.holder = holder
        self.admission = admission
        self.tokens = tokens
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._inflight = INFLIGHT.labels(service)
        self._latency = LATENCY.labels(service, "total")
        self._counters: dict[tuple[str, str], Any] = {}
        self._refuse = grpc.stream_stream_rpc_method_handler(self._unauthenticated)
        self._forbid: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        tokens = self.tokens
        if tokens is not None and not method.startswith(f"/{HEALTH_SERVICE}/"):
            granted = tokens.scopes(handler_call_details.invocation_metadata)
            needed = METHOD_SCOPES.get(method)
            if granted is None or (needed is not None and needed not in granted):
                # Only the API's own methods name a series: invented paths, however many,
                # must not grow the metrics' label sets.
                label = method.rpartition("/")[2] if needed is not None else "other"
                if granted is None:
                    self._count(label, "UNAUTHENTICATED")
                    return self._refuse
                self._count(label, "PERMISSION_DENIED")
                return self._forbidden(needed)
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

    @staticmethod
    async def _unauthenticated(request_iterator, context) -> None:
        # A stream handler with no deserializer answers any method shape without reading
        # (or decoding) the request; the message is the same whatever was wrong.
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    def _forbidden(self, scope: str) -> grpc.RpcMethodHandler:
        handler = self._forbid.get(scope)
        if handler is None:

            async def permission_denied(request_iterator, context) -> None:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"this token lacks the scope {scope!r}"
                )

            handler = self._forbid[scope] = grpc.stream_stream_rpc_method_handler(permission_denied)
        return handler

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
                waiting = f": {self.holder.waiting_for}" if self.holder.waiting_for else ""
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"{service} is loading its artifact set{waiting}"
                )
            admission = self.admission
            if admission is not None:
                ticket = admission.admit(method, request, context.time_remaining())
                if isinstance(ticket, Refusal):
                    self._count(method, "RESOURCE_EXHAUSTED")
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        ticket.message,
                        trailing_metadata=ticket.metadata,
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
            except DeadlineExpired as exc:
                status = "DEADLINE_EXCEEDED"
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
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
                # The exception's text (paths, hosts, data) stays in the log, found by the id.
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
            finally:
                elapsed = time.perf_counter() - start
                self._inflight.dec()
                self._latency.observe(elapsed)
                self._count(method, status)
                if admission is not None:
                    admission.finish(ticket, status)
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
    never mixes two artifact versions; a swap is a single reference assignment. Loads are
    serialised: each one loads the folder it was given and reports the state it replaced.

    Parameters
    ----------
    loader:
        Builds a state from an artifact path (run off the event loop).
    path:
        What an argument-less :meth:`load` loads (the server's configured artifacts).
    """

    def __init__(self, loader: Callable[[str], StateT], path: str = ""):
        self._loader = loader
        self.path = path
        self.state: StateT | None = None
        # Why no state is served yet, beyond loading (e.g. a store the load waits for).
        self.waiting_for = ""
        self._lock = asyncio.Lock()

    def wait_for(self, reason: str) -> None:
        """Say why the load waits ("" once it no longer does); callable from any thread."""
        self.waiting_for = reason

    async def load(self, path: str | None = None) -> StateT:
        """Load ``path`` (default: the configured one) off the event loop, then swap it in."""
        return (await self.swap(path))[1]

    async def swap(self, path: str | None = None) -> tuple[StateT | None, StateT]:
        """Like :meth:`load`; returns (the state replaced, the new state)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            new_state = await loop.run_in_executor(None, self._loader, path or self.path)
            previous, self.state = self.state, new_state
            return previous, new_state


# -------------------------------------------------------------------------------- lifecycle
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


# The shortest keepalive interval a client may use on an idle connection without strikes.
MIN_PING_INTERVAL_MS = 10_000


def new_server(
    name: str,
    host: str,
    port: int,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    credentials: grpc.ServerCredentials | None = None,
    max_connection_age_s: float = 0.0,
    grace_s: float = 5.0,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """An aio server bound to ``host:port`` (0 = ephemeral) with health registered.

    With ``credentials`` the port serves TLS, else plaintext. With ``max_connection_age_s``
    each client connection is closed (GOAWAY) after that long, its calls in flight given
    ``grace_s`` to finish, so that clients balancing over DNS resolve again and find new
    replicas.
    """
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC servers count a ping less than 5 minutes after the last one on an idle
        # connection as a strike, and close it (GOAWAY "too_many_pings") at the third; the
        # gateway pings its stages every 30 s to notice a dead peer, so accept that.
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ]
    if max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
        ]
    server = grpc.aio.server(interceptors=interceptors or (), options=options)
    health = BoundedHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
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
ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
REFLECTION_CHOICES = ("auto", "on", "off")


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


def reflection_wanted(setting: str, host: str, tls: bool) -> bool:
    """Whether a port serves reflection: ``on``, ``off``, or ``auto`` (plaintext loopback)."""
    if setting not in REFLECTION_CHOICES:
        raise SecurityConfigError(
            f"reflection must be one of {', '.join(REFLECTION_CHOICES)}, got {setting!r}"
        )
    if setting == "auto":
        return not tls and is_loopback(host)
    return setting == "on"


def _tokens(path: str, setting: str) -> TokenSet | None:
    # The admin ports' token files opened only AdminService before scopes: read a token
    # without scopes there as `admin`, on the service port as `search`.
    legacy = (ADMIN,) if setting == "admin_tokens_file" else (SEARCH,)
    return TokenSet.from_file(path, setting, legacy_scopes=legacy) if path else None


def start_admin(
    name: str, config, holder: Reloadable
) -> tuple[grpc.aio.Server, int, HealthServicer, ServiceInterceptor]:
    """The admin port: AdminService and health in plaintext, loopback unless configured.

    Raises
    ------
    SecurityConfigError
        When it would bind a non-loopback address without admin tokens.
    """
    tokens = _tokens(config.admin_tokens_file, "admin_tokens_file")
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
        tokens=_tokens(config.auth_tokens_file, "auth_tokens_file"),
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
    for servicer in servicers if isinstance(servicers, list) else [servicers]:
        if hasattr(servicer, "close"):
            service.stop_hooks.append(servicer.close)
    await service.set_serving(service_names, False)
    await admin_server.start()
    await server.start()
    state = await holder.load()
    service.reload_hooks.append(holder.load)

    async def reread_tokens() -> None:
        # SIGHUP also picks up rotated token files (a bad file keeps the old tokens).
        interceptor.tokens = _tokens(config.auth_tokens_file, "auth_tokens_file")
        admin_interceptor.tokens = _tokens(config.admin_tokens_file, "admin_tokens_file")

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
