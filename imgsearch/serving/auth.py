"""Bearer tokens at a port: UNAUTHENTICATED or PERMISSION_DENIED before a request is decoded."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from imgsearch.serving.metrics import RequestCounts
from imgsearch.tokens import ADMIN, METHOD_SCOPES, SEARCH, TokenSet

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
_HEALTH_PREFIX = f"/{HEALTH_SERVICE}/"


def read_tokens(path: str, setting: str) -> TokenSet | None:
    """The tokens of the file at ``path`` (None when no file is set) for the setting named.

    The admin ports' token files opened only AdminService before scopes: a token without
    scopes reads as ``admin`` there (``admin_tokens_file``), as ``search`` on a service port.
    """
    legacy = (ADMIN,) if setting == "admin_tokens_file" else (SEARCH,)
    return TokenSet.from_file(path, setting, legacy_scopes=legacy) if path else None


async def _unauthenticated(request_iterator, context) -> None:
    # A stream handler with no deserializer answers any method shape without reading
    # (or decoding) the request; the message is the same whatever was wrong.
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


class PortAuth:
    """Checks each call's bearer token against the scope its method needs.

    Every method on the port but the health service's (the service's own API, reflection,
    any service registered later, unknown methods alike) needs ``authorization: Bearer
    <token>``; without a known token the call gets UNAUTHENTICATED, with a token that lacks
    the method's scope (:data:`imgsearch.tokens.METHOD_SCOPES`) PERMISSION_DENIED. Refusals
    are handlers built once, counted in ``imgsearch_requests_total``.
    """

    def __init__(self, counts: RequestCounts):
        self.counts = counts
        self._unauthenticated = grpc.stream_stream_rpc_method_handler(_unauthenticated)
        self._forbidden: dict[str, grpc.RpcMethodHandler] = {}

    def refusal(self, tokens: TokenSet, method: str, metadata) -> grpc.RpcMethodHandler | None:
        """The handler that refuses this call, or None when its token lets it through."""
        if method.startswith(_HEALTH_PREFIX):
            return None
        granted = tokens.scopes(metadata)
        needed = METHOD_SCOPES.get(method)
        if granted is not None and (needed is None or needed in granted):
            return None
        # Only the API's own methods name a series: invented paths, however many, must not
        # grow the metrics' label sets.
        label = method.rpartition("/")[2] if needed is not None else "other"
        if granted is None:
            self.counts.count(label, "UNAUTHENTICATED")
            return self._unauthenticated
        self.counts.count(label, "PERMISSION_DENIED")
        return self._forbidden_for(needed)

    def _forbidden_for(self, scope: str) -> grpc.RpcMethodHandler:
        handler = self._forbidden.get(scope)
        if handler is None:

            async def permission_denied(request_iterator, context) -> None:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"this token lacks the scope {scope!r}"
                )

            handler = self._forbidden[scope] = grpc.stream_stream_rpc_method_handler(
                permission_denied
            )
        return handler
