"""The two ways the door reaches the gateway: over gRPC, or in the gateway's own process.

Both offer the same calls (``search`` and ``log_conversions``, each awaited like a
``grpc.aio`` stub's method and raising ``grpc.RpcError`` on a refusal), the tokens the door's
own paths check, and the metadata a request's call carries.
"""

from __future__ import annotations

import grpc

from imgsearch.config import WebConfig
from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch.security import AUTHORIZATION_KEY, ClientSecurity
from imgsearch.tokens import TokenSet
from imgsearch_tools.web.in_process import InProcessMethod

SEARCH_METHOD = f"/{pb.DESCRIPTOR.services_by_name['SearchService'].full_name}/Search"
LOG_CONVERSIONS_METHOD = (
    f"/{fb_pb.DESCRIPTOR.services_by_name['FeedbackService'].full_name}/LogConversions"
)


def caller_metadata(header: str) -> tuple:
    """The caller's ``Authorization`` header as call metadata (none when it sent none)."""
    return ((AUTHORIZATION_KEY, header),) if header else ()


class RemoteGateway:
    """A gateway reached over ``grpc.aio`` (`imgsearch web`, a process of its own).

    Parameters
    ----------
    config:
        Where the gateway is, and the tokens file of the door's own port.
    security:
        How the door reaches the gateway: TLS files and the token it sends.
    """

    deployment = "standalone"

    def __init__(self, config: WebConfig, security: ClientSecurity):
        self.address = config.gateway_addr
        self.security = security
        self._tokens = (
            TokenSet.from_file(config.auth_tokens_file, "auth_tokens_file")
            if config.auth_tokens_file
            else None
        )
        self.own_metadata = security.metadata()  # a missing token file fails at start
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self.channel = self.security.aio_channel(self.address)
        self.search = pb_grpc.SearchServiceStub(self.channel).Search
        self.log_conversions = fb_grpc.FeedbackServiceStub(self.channel).LogConversions

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def tokens(self) -> TokenSet | None:
        """The tokens the door's own port accepts (its ``auth_tokens_file``)."""
        return self._tokens

    def metadata(self, header: str) -> tuple:
        """The door's own token when it has one, else the caller's bearer token, if any."""
        return self.own_metadata or caller_metadata(header)


class GatewayInProcess:
    """The gateway of this process, its servicers called through its port's interceptor.

    The door shares the gateway's tokens (re-read on SIGHUP with the port's), and every call
    carries the caller's own ``Authorization`` header, which the interceptor checks with the
    scope of the method exactly as for a gRPC call on the port.

    Parameters
    ----------
    service:
        The running gateway (:func:`gateway.server.create_gateway_server`'s result).
    """

    deployment = "in-gateway"

    def __init__(self, service):
        self.interceptor = service.interceptor
        if self.interceptor is None:
            raise ValueError(f"{service.name} has no interceptor to call its methods through")
        search = _servicer(service, pb_grpc.SearchServiceServicer)
        feedback = _servicer(service, fb_grpc.FeedbackServiceServicer)
        self.search = InProcessMethod(
            self.interceptor, SEARCH_METHOD, search.Search, pb.SearchRequest, pb.SearchResponse
        )
        self.log_conversions = InProcessMethod(
            self.interceptor,
            LOG_CONVERSIONS_METHOD,
            feedback.LogConversions,
            fb_pb.LogConversionsRequest,
            fb_pb.LogConversionsResponse,
        )

    async def start(self) -> None:
        """Nothing to open: the gateway is already serving."""

    async def close(self) -> None:
        """Nothing to close: the gateway closes its own channels when it stops."""

    def tokens(self) -> TokenSet | None:
        """The gateway port's tokens, as they are now."""
        return self.interceptor.tokens

    @staticmethod
    def metadata(header: str) -> tuple:
        return caller_metadata(header)


def _servicer(service, base: type):
    for servicer in service.servicers:
        if isinstance(servicer, base):
            return servicer
    raise ValueError(f"{service.name} serves no {base.__name__[: -len('Servicer')]}")
