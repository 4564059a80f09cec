"""Request ids: the caller's ``x-request-id`` or a new one, kept for the task handling the RPC."""

from __future__ import annotations

import contextvars
import os

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128

# The request id of the RPC being handled: set by the request pipeline for the RPC's task,
# read by every log line (imgsearch.serving.logs) and forwarded downstream by the gateway.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_request_id() -> str:
    """The id of the request this task is handling ("" outside an RPC)."""
    return request_id_var.get()


def incoming_request_id(metadata) -> str:
    """The caller's ``x-request-id`` metadata, or a new id when it sent none."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and value:
            return value[:MAX_REQUEST_ID_CHARS]
    return os.urandom(8).hex()  # 16 random hex digits, as uuid4().hex[:16] gave, cheaper
