"""The one server interceptor of a port: bearer tokens first, then each method's pipeline."""

from __future__ import annotations

import grpc

from imgsearch.admission import Admission
from imgsearch.serving.auth import PortAuth
from imgsearch.serving.metrics import RequestCounts, inflight_of
from imgsearch.serving.pipeline import ErrorMapping, Observer, Readiness, compose
from imgsearch.serving.reload import Reloadable
from imgsearch.serving.request_ids import incoming_request_id, request_id_var
from imgsearch.tokens import TokenSet


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """What every RPC of a service's own API goes through, in one place.

    With ``tokens``, :class:`~imgsearch.serving.auth.PortAuth` checks every RPC on the port
    but the health service's before its request is even decoded. The methods of ``services``
    (health and reflection pass untouched, so they are never shed) then run through the
    request pipeline of :mod:`imgsearch.serving.pipeline`: a request id kept for the RPC's
    task, UNAVAILABLE while the artifact set is loading, admission, errors mapped to status
    codes, requests, latency and in-flight metrics and, with ``IMGSEARCH_ACCESS_LOG``, one
    log line per RPC. Each method's pipeline is composed on its first call and reused.

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
        self.counts = RequestCounts(service)
        inflight_of(service)  # the gauge's series exists from the start, at 0
        self.auth = PortAuth(self.counts)
        self._readiness = Readiness(service, holder) if holder is not None else None
        self._errors = ErrorMapping(service)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        # The call's id, kept for its task (the handler below runs in the same one): read
        # from the metadata gRPC already decoded for this lookup, not decoded again.
        request_id_var.set(incoming_request_id(metadata))
        tokens = self.tokens
        if tokens is not None:
            refusal = self.auth.refusal(tokens, method, metadata)
            if refusal is not None:
                return refusal
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        service_name, _, method_name = method.lstrip("/").rpartition("/")
        if handler is None or handler.unary_unary is None or service_name not in self.services:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            compose(
                method_name,
                handler.unary_unary,
                Observer(self.service, method_name, self.counts),
                self._errors,
                self._readiness,
                self.admission,
            ),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped
