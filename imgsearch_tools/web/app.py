"""The door's HTTP side: routes, bearer tokens, security headers, calls to the gateway."""

from __future__ import annotations

import json
import logging
from importlib import resources

import grpc
from aiohttp import web

from imgsearch.config import WebConfig
from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
from imgsearch.names import RANKER_CHOICES, RETRIEVER_CHOICES
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.security import AUTHORIZATION_KEY, ClientSecurity
from imgsearch.tokens import METHOD_SCOPES, SEARCH
from imgsearch_tools.web.catalogue import CatalogueView
from imgsearch_tools.web.errors import DoorError, from_rpc_error, invalid, parse_body
from imgsearch_tools.web.gateways import LOG_CONVERSIONS_METHOD, SEARCH_METHOD, RemoteGateway
from imgsearch_tools.web.openapi import openapi_document
from imgsearch_tools.web.proto_json import to_dict

logger = logging.getLogger("imgsearch.web")

# Script, styles, images and calls from this origin only; no inline code, no frames.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# The page's files, shipped as package data (no CDN: the page works offline).
STATIC_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}
# Paths that answer with catalogue or user data: behind the tokens when there are any.
PROTECTED_PREFIXES = ("/v1/", "/images/")
# The scope each protected path needs: the scope of the gateway method it calls; `search`
# for the rest.
PATH_SCOPES = {
    "/v1/search": METHOD_SCOPES[SEARCH_METHOD],
    "/v1/conversions": METHOD_SCOPES[LOG_CONVERSIONS_METHOD],
}
MAX_USERS = 200
MAX_BODY_BYTES = 1 << 20
CONFIG = web.AppKey("config", WebConfig)
DOOR = web.AppKey("door", object)


# Every JSON reply's headers, built once (the security headers included, so that the guard
# has nothing to add to them).
JSON_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "Cache-Control": "no-store",
    **SECURITY_HEADERS,
}


def _json(body, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, headers=JSON_HEADERS)


def error_response(error: DoorError) -> web.Response:
    response = _json(error.body(), error.http_status)
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def http_error(exc: web.HTTPException, path: str) -> DoorError:
    """The door's error for aiohttp's own refusals (no route, wrong method, body too big)."""
    if exc.status == 413:
        return invalid("body", f"larger than {MAX_BODY_BYTES} bytes")
    if exc.status == 404:
        return DoorError(grpc.StatusCode.NOT_FOUND, f"no route {path}")
    if exc.status == 405:
        return DoorError(grpc.StatusCode.UNIMPLEMENTED, exc.reason, http_status=405)
    return DoorError(grpc.StatusCode.UNKNOWN, exc.reason, http_status=exc.status)


def to_json(message) -> dict:
    """A reply in the proto JSON mapping, with proto field names and every field present
    (json_format's output, from converters compiled once: :mod:`.proto_json`)."""
    return to_dict(message)


class Door:
    """The gateway's methods as JSON calls, with the door's own tokens and the gateway's.

    Parameters
    ----------
    config:
        The door's port, the deadline of each call.
    gateway:
        How the door reaches the gateway (:mod:`imgsearch_tools.web.gateways`): over gRPC,
        or in the gateway's own process.
    catalogue:
        The served photo ids and users (see :class:`CatalogueView`).
    """

    def __init__(self, config: WebConfig, gateway, catalogue: CatalogueView):
        self.config = config
        self.gateway = gateway
        self.catalogue = catalogue

    async def start(self, app: web.Application) -> None:
        await self.gateway.start()

    async def close(self, app: web.Application) -> None:
        await self.gateway.close()

    # -------------------------------------------------------------------------- endpoints
    async def search(self, request: web.Request) -> web.Response:
        search_request = parse_body(await request.read(), pb.SearchRequest)
        reply = await self._call(self.gateway.search, search_request, request)
        return _json(to_json(reply))

    async def log_conversions(self, request: web.Request) -> web.Response:
        log_request = parse_body(await request.read(), fb_pb.LogConversionsRequest)
        reply = await self._call(self.gateway.log_conversions, log_request, request)
        for event, result in zip(log_request.events, reply.results):
            if result.status in (fb_pb.EVENT_STATUS_STORED, fb_pb.EVENT_STATUS_DUPLICATE):
                when = event.converted_at.ToJsonString() if event.HasField("converted_at") else ""
                self.catalogue.record(event.user_id, event.query, when)
        return _json(to_json(reply))

    async def _call(self, method, message, request: web.Request):
        try:
            return await method(
                message,
                timeout=self.config.timeout_s,
                metadata=self.gateway.metadata(request.headers.get("Authorization", "")),
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def users(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", "20")
        try:
            limit = int(raw)
        except ValueError:
            raise invalid("limit", f"must be an integer, got {raw!r}") from None
        if not 1 <= limit <= MAX_USERS:
            raise invalid("limit", f"must be between 1 and {MAX_USERS}, got {limit}")
        return _json({"users": self.catalogue.recent_users(limit)})

    async def choices(self, request: web.Request) -> web.Response:
        return _json(
            {
                "retrievers": list(RETRIEVER_CHOICES),
                "rankers": list(RANKER_CHOICES),
                "images": self.catalogue.images_dir is not None,
                "artifact_version": self.catalogue.version,
            }
        )

    async def image(self, request: web.Request) -> web.StreamResponse:
        path = self.catalogue.image_path(request.match_info["photo_id"])
        if path is None:
            raise DoorError(grpc.StatusCode.NOT_FOUND, "no image for this photo id", "photo_id")
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document(self.catalogue.version))

    @staticmethod
    async def static(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        body = resources.files("imgsearch_tools.web").joinpath("static", name).read_bytes()
        return web.Response(
            body=body,
            content_type=STATIC_FILES[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    # ------------------------------------------------------------------------- middleware
    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Tokens on data paths, JSON errors for every failure, security headers everywhere."""
        try:
            if request.path.startswith(PROTECTED_PREFIXES):
                self._authorize(request)
            response = await handler(request)
        except DoorError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            response = error_response(http_error(exc, request.path))
        except Exception:  # noqa: BLE001 - a bug here must not cost the caller a hung socket
            logger.exception("web request failed", extra={"path": request.path})
            response = error_response(DoorError(grpc.StatusCode.INTERNAL, "internal error"))
        if "Content-Security-Policy" not in response.headers:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _authorize(self, request: web.Request) -> None:
        """Refuse a call without a known token (401) or without the path's scope (403)."""
        tokens = self.gateway.tokens()
        if tokens is None:
            return
        header = request.headers.get("Authorization", "")
        scopes = tokens.scopes([(AUTHORIZATION_KEY, header)] if header else [])
        if scopes is None:
            raise DoorError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        needed = PATH_SCOPES.get(request.path, SEARCH)
        if needed not in scopes:
            raise DoorError(
                grpc.StatusCode.PERMISSION_DENIED, f"the token lacks the scope {needed!r}"
            )


def create_app(
    config: WebConfig, security: ClientSecurity | None = None, catalogue=None, gateway=None
) -> web.Application:
    """The door's aiohttp application (started by :func:`imgsearch_tools.web.commands.start`).

    ``gateway`` is how it reaches the gateway (:mod:`imgsearch_tools.web.gateways`); by
    default over gRPC at ``config.gateway_addr`` with ``security``.

    Raises
    ------
    imgsearch.security.SecurityConfigError
        When a token file is missing or empty.
    """
    catalogue = catalogue or CatalogueView(config.artifacts, config.images)
    if gateway is None:
        gateway = RemoteGateway(config, security or ClientSecurity())
    door = Door(config, gateway, catalogue)
    app = web.Application(middlewares=[door.guard], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[DOOR] = door
    app.on_startup.append(door.start)
    app.on_cleanup.append(door.close)
    app.router.add_get("/", door.static)
    app.router.add_get("/static/{name}", door.static)
    app.router.add_get("/openapi.json", door.openapi)
    app.router.add_post("/v1/search", door.search)
    app.router.add_post("/v1/conversions", door.log_conversions)
    app.router.add_get("/v1/users", door.users)
    app.router.add_get("/v1/choices", door.choices)
    app.router.add_get("/images/{photo_id}.jpg", door.image)
    return app
