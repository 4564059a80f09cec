"""Errors of the JSON door: proto JSON parsing that names the field, gRPC codes as HTTP status.

The body of every error follows Google's JSON error format (AIP-193) with the offending field
beside it: ``{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "...",
"field": "k", "details": [...]}}``.
"""

from __future__ import annotations

import json

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imgsearch_tools.web.json_request import quick_parse

# The HTTP status of each gRPC code, as grpc-gateway maps them (runtime.HTTPStatusFromCode).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


class DoorError(Exception):
    """A request the door answers with an error status, naming the field when there is one."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", http_status: int = 0):
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self._http_status = http_status
        self.message = f"{field}: {message}" if field else message
        self.description = message
        self.field = field

    def body(self) -> dict:
        """The JSON error body."""
        error = {
            "code": self.http_status,
            "status": self.code.name,
            "message": self.message,
        }
        if self.field:
            error["field"] = self.field
            error["details"] = [
                {
                    "@type": BAD_REQUEST_TYPE,
                    "fieldViolations": [{"field": self.field, "description": self.description}],
                }
            ]
        return {"error": error}

    @property
    def http_status(self) -> int:
        """The status set for this error, else the one its gRPC code maps to."""
        return self._http_status or HTTP_STATUS.get(self.code, 500)


def invalid(field: str, description: str) -> DoorError:
    """An INVALID_ARGUMENT error (HTTP 400) naming ``field``."""
    return DoorError(grpc.StatusCode.INVALID_ARGUMENT, description, field)


def from_rpc_error(exc: grpc.RpcError) -> DoorError:
    """The door's error for a gateway's refusal: same code, message, and the field its
    ``google.rpc.BadRequest`` detail names."""
    field = ""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            violations = error_details_pb2.BadRequest()
            detail.Unpack(violations)
            if violations.field_violations:
                field = violations.field_violations[0].field
                break
    message = exc.details() or exc.code().name
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    return DoorError(exc.code(), message, field)


# ---------------------------------------------------------------------------- JSON parsing
def parse_body(raw: bytes, message_class):
    """``raw`` (a JSON object in the proto JSON mapping) as a ``message_class`` message.

    Field names may be the proto names (``user_id``) or their JSON names (``userId``); enums
    take their names or numbers; unknown fields are refused.

    Raises
    ------
    DoorError
        INVALID_ARGUMENT naming the first field that does not parse (``events[2].photo_id``),
        or ``body`` when the body is not a JSON object.
    """
    try:
        value = json.loads(raw or b"{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid("body", f"not valid JSON: {exc}") from None
    message = quick_parse(value, message_class)
    if message is not None:
        return message
    _check(value, message_class.DESCRIPTOR, "")
    try:
        return json_format.ParseDict(value, message_class())
    except json_format.ParseError as exc:  # not expected after _check; still a bad request
        raise invalid("body", str(exc)) from None


def _check(value, descriptor, path: str) -> None:
    """Find the first field of ``value`` that does not parse as ``descriptor``, by its path."""
    if not isinstance(value, dict):
        raise invalid(path or "body", "must be a JSON object")
    fields = {f.name: f for f in descriptor.fields}
    fields.update({f.json_name: f for f in descriptor.fields})
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        field = fields.get(key)
        if field is None:
            raise invalid(where, f"unknown field of {descriptor.name}")
        where = f"{path}.{field.name}" if path else field.name
        nested = field.message_type
        is_map = nested is not None and nested.GetOptions().map_entry
        if nested is not None and not is_map and nested.full_name.startswith("imgsearch."):
            if field.is_repeated:
                if not isinstance(item, list):
                    raise invalid(where, "must be a JSON array")
                for i, element in enumerate(item):
                    _check(element, nested, f"{where}[{i}]")
            elif item is not None:
                _check(item, nested, where)
            continue
        try:
            json_format.ParseDict({key: item}, _message_class(descriptor)())
        except json_format.ParseError as exc:
            raise invalid(where, _reason(exc)) from None


def _message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _reason(exc: json_format.ParseError) -> str:
    """The parser's explanation without its "Failed to parse X field:" prefixes."""
    text = str(exc)
    while text.startswith("Failed to parse ") and " field: " in text:
        text = text.split(" field: ", 1)[1]
    return text.split(" at ", 1)[0].rstrip(".") or "does not parse"
