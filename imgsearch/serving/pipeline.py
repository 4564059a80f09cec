"""The request pipeline of a service's own methods, composed once per method from small parts.

A call goes through, in order: its request id (:mod:`imgsearch.serving.request_ids`, set
by the port's interceptor from the metadata gRPC decoded to find the handler), the readiness
check (UNAVAILABLE while the artifact set loads), admission (RESOURCE_EXHAUSTED with a
pushback, :mod:`imgsearch.admission`), the method itself with its exceptions mapped to status
codes (:class:`ErrorMapping`), and its observation (requests, latency and in-flight metrics,
and the access log when on). Each part is built once per method when the method is first
called, with its metric children looked up then, and :func:`compose` joins the parts present
into one handler: a call makes one pass through them, with no lookup by name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc

from imgsearch.admission import Admission, DeadlineExpired, Refusal
from imgsearch.request_kinds import kind_reader
from imgsearch.serving.errors import InvalidArgument, bad_request_status
from imgsearch.serving.metrics import LATENCY, RequestCounts, inflight_of
from imgsearch.serving.reload import Reloadable
from imgsearch.serving.request_ids import request_id_var

# One JSON line per RPC (service, method, code, ms, request id) when IMGSEARCH_ACCESS_LOG=1;
# off by default because at hundreds of searches per second it costs more than it tells.
ACCESS_LOG = os.environ.get("IMGSEARCH_ACCESS_LOG", "") not in ("", "0", "false")
logger = logging.getLogger("imgsearch")


class Readiness:
    """UNAVAILABLE while the service's artifact set is loading (the port opens before)."""

    def __init__(self, service: str, holder: Reloadable):
        self.holder = holder
        self.message = f"{service} is loading its artifact set"

    def ready(self) -> bool:
        """Whether a state is loaded."""
        return self.holder.state is not None

    def refusal(self) -> str:
        """What a call refused before the load says, with what the load waits for if anything."""
        waiting = self.holder.waiting_for
        return f"{self.message}: {waiting}" if waiting else self.message


class ErrorMapping:
    """What a method's exception answers: bad input, expired work, an abort, or INTERNAL.

    :class:`~imgsearch.serving.errors.InvalidArgument` becomes INVALID_ARGUMENT with a
    BadRequest naming the field; queued work dropped past its deadline
    (:class:`~imgsearch.admission.DeadlineExpired`) DEADLINE_EXCEEDED; a call the method
    aborted keeps its status; anything else INTERNAL with the request id, its text kept in
    the log (nothing a client sends crashes a server).
    """

    def __init__(self, service: str):
        self.service = service

    @staticmethod
    def aborted(exc: Exception, context) -> bool:
        """Whether the method ended the call with a status of its own (``context.abort``)."""
        code = context.code()
        return isinstance(exc, grpc.aio.AbortError) or (
            code is not None and code != grpc.StatusCode.OK
        )

    def status(self, exc: Exception, context) -> str:
        """The status code name the call ends with."""
        if isinstance(exc, InvalidArgument):
            return "INVALID_ARGUMENT"
        if isinstance(exc, DeadlineExpired):
            return "DEADLINE_EXCEEDED"
        if self.aborted(exc, context):
            code = context.code()
            return code.name if code is not None else "ABORTED"
        return "INTERNAL"

    async def answer(self, exc: Exception, context, rid: str) -> None:
        """End the call with the status :meth:`status` named; always raises."""
        if isinstance(exc, InvalidArgument):
            await context.abort_with_status(bad_request_status(exc.field, exc.description))
        if isinstance(exc, DeadlineExpired):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        if self.aborted(exc, context):
            raise exc
        logger.error("unhandled error", extra={"service": self.service}, exc_info=exc)
        # The exception's text (paths, hosts, data) stays in the log, found by the id.
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")


class Observer:
    """The metrics of one method's calls, and its access-log line when the log is on."""

    def __init__(self, service: str, method: str, counts: RequestCounts):
        self.service = service
        self.method = method
        self.counts = counts
        self.inflight = inflight_of(service)
        self.latency = LATENCY.labels(service, "total")
        self.ok = counts.child(method, "OK")

    def refused(self, status: str) -> None:
        """A call turned away before its method ran."""
        self.counts.count(self.method, status)

    def finish(self, elapsed: float, status: str) -> None:
        """A call that ran ended with ``status`` after ``elapsed`` seconds."""
        self.inflight.count -= 1
        self.latency.observe(elapsed)
        if status == "OK":
            self.ok.inc()
        else:
            self.counts.count(self.method, status)
        if ACCESS_LOG:
            logger.info(
                "rpc",
                extra={
                    "service": self.service,
                    "method": self.method,
                    "code": status,
                    "ms": round(elapsed * 1000, 3),
                },
            )


def compose(
    method: str,
    behavior,
    observer: Observer,
    errors: ErrorMapping,
    readiness: Readiness | None = None,
    admission: Admission | None = None,
):
    """One method's handler: readiness, admission, the method, its observation.

    The call's request id is already set for its task: the port's interceptor
    (:class:`~imgsearch.serving.interceptor.ServiceInterceptor`) sets it before the handler runs.

    ``behavior(request, context)`` is the servicer's method; ``readiness`` and ``admission``
    are left out when None (the admin port has neither).
    """
    get_request_id = request_id_var.get
    perf_counter = time.perf_counter
    inflight = observer.inflight
    read_kind = None  # the request's kind for admission, set up on the first call

    async def handle(request, context):
        nonlocal read_kind
        rid = get_request_id()  # set by the interceptor for this call's task
        if readiness is not None and readiness.holder.state is None:
            observer.refused("UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, readiness.refusal())
        if admission is not None:
            if read_kind is None:
                read_kind = kind_reader(request)
            ticket = admission.admit(method, request, context.time_remaining(), read_kind(request))
            if type(ticket) is Refusal:
                observer.refused("RESOURCE_EXHAUSTED")
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ticket.message,
                    trailing_metadata=ticket.metadata,
                )
        inflight.count += 1
        start = perf_counter()
        status = "UNKNOWN"
        try:
            response = await behavior(request, context)
            status = "OK"
            return response
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - nothing a client sends may crash a server
            status = errors.status(exc, context)
            await errors.answer(exc, context, rid)
        finally:
            observer.finish(perf_counter() - start, status)
            if admission is not None:
                admission.finish(ticket, status)

    return handle
