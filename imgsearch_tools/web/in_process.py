"""A service's methods called in its own process, through its port's interceptor, like a stub.

The door inside the gateway (``imgsearch serve gateway --web-port``) calls the gateway's
servicers this way. A call goes through the very interceptor of the gateway's port (bearer
token and scope, request id, readiness, admission, errors mapped to status codes, metrics),
then the servicer's method, with a context that carries the caller's metadata and the call's
deadline: what a gRPC call on the port goes through, without the socket, the HTTP/2 framing
and the protobuf encoding both ways. A refusal comes back as the ``grpc.aio.AioRpcError`` a
stub would raise, with the same code, details and trailing metadata (the BadRequest detail
naming the field).
"""

from __future__ import annotations

import asyncio
import time
from collections import namedtuple

import grpc

from imgsearch.serving.request_ids import request_id_var

# What the interceptor reads of a call before it picks the handler.
CallDetails = namedtuple("CallDetails", ("method", "invocation_metadata"))


class InProcessContext:
    """The servicer context of an in-process call: metadata, deadline, peer, status.

    Parameters
    ----------
    metadata:
        The call's metadata, ``(key, value)`` pairs (``authorization``, ``x-request-id``).
    deadline:
        When the call's deadline passes, on ``time.monotonic``'s clock.
    peer:
        Who called, for logs (``in-process``).
    """

    __slots__ = ("_metadata", "_deadline", "_peer", "_code", "_details", "_trailing")

    def __init__(self, metadata: tuple, deadline: float, peer: str = "in-process"):
        self._metadata = metadata
        self._deadline = deadline
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple = ()

    def time_remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def cancelled(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        """End the call with ``code``, as ``grpc.aio``'s context does: raise AbortError."""
        self._code = code
        self._details = details
        self._trailing = tuple(trailing_metadata or ())
        raise grpc.aio.AbortError("Locally aborted.")

    async def abort_with_status(self, status: grpc.Status):
        await self.abort(status.code, status.details, status.trailing_metadata)

    def error(self) -> grpc.aio.AioRpcError:
        """The error a stub's caller would see for the status this context ended with."""
        return grpc.aio.AioRpcError(
            self._code or grpc.StatusCode.UNKNOWN,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*self._trailing),
            details=self._details,
        )


class InProcessMethod:
    """One unary method of a servicer, called like a ``grpc.aio`` stub's method.

    ``await method(request, timeout=..., metadata=...)`` returns the servicer's reply or
    raises ``grpc.aio.AioRpcError``.

    Parameters
    ----------
    interceptor:
        The port's :class:`~imgsearch.serving.interceptor.ServiceInterceptor`.
    method:
        The method's full path (``/imgsearch.search.v1.SearchService/Search``).
    behavior:
        The servicer's method, ``behavior(request, context)``.
    request_class, response_class:
        Its messages (the handler the port registers decodes and encodes with them).
    """

    def __init__(self, interceptor, method: str, behavior, request_class, response_class):
        self.interceptor = interceptor
        self.method = method
        self.handler = grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )

    async def _continuation(self, details) -> grpc.RpcMethodHandler:
        return self.handler

    async def __call__(self, request, timeout: float, metadata=()):
        metadata = tuple(metadata)
        context = InProcessContext(metadata, time.monotonic() + timeout)
        # The interceptor sets the call's request id for this task; the caller keeps its own.
        previous_id = request_id_var.get()
        try:
            async with asyncio.timeout(timeout):
                handler = await self.interceptor.intercept_service(
                    self._continuation, CallDetails(self.method, metadata)
                )
                if handler.unary_unary is not None:
                    return await handler.unary_unary(request, context)
                # A refusal (no token, a token without the method's scope): it aborts.
                await handler.stream_stream(None, context)
                raise grpc.aio.AbortError("refused")
        except grpc.aio.AbortError:
            raise context.error() from None
        except TimeoutError:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="Deadline Exceeded",
            ) from None
        finally:
            request_id_var.set(previous_id)
