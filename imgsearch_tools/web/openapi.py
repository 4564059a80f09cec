"""The door's OpenAPI 3.1 description, its request and response schemas read off the protos."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from imgsearch.feedback.v1 import feedback_service_pb2 as fb_pb
from imgsearch.search.v1 import search_service_pb2 as pb

_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32"},
    # The proto JSON mapping writes 64-bit integers as strings (and reads either).
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN = {"google.protobuf.Timestamp": {"type": "string", "format": "date-time"}}


def _ref(descriptor) -> dict:
    return {"$ref": f"#/components/schemas/{descriptor.full_name}"}


def _field_schema(field, schemas: dict) -> dict:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _value_schema(value, schemas)}
    schema = _value_schema(field, schemas)
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _value_schema(field, schemas: dict) -> dict:
    if field.enum_type is not None:
        names = [v.name for v in field.enum_type.values]
        return {"type": "string", "enum": names, "description": f"{field.enum_type.full_name}"}
    if field.message_type is not None:
        known = _WELL_KNOWN.get(field.message_type.full_name)
        if known:
            return dict(known)
        _add_message(field.message_type, schemas)
        return _ref(field.message_type)
    return dict(_SCALARS[field.type])


def _add_message(descriptor, schemas: dict) -> None:
    """Add the schema of ``descriptor`` (and of the messages it holds) to ``schemas``."""
    if descriptor.full_name in schemas:
        return
    schemas[descriptor.full_name] = {}  # placeholder: messages may refer to each other
    properties = {field.name: _field_schema(field, schemas) for field in descriptor.fields}
    schemas[descriptor.full_name] = {
        "type": "object",
        "description": f"{descriptor.full_name} in the proto JSON mapping: proto field names "
        "or their lowerCamelCase JSON names; enums by name (or number).",
        "properties": properties,
        "additionalProperties": False,
    }


ERROR_SCHEMA = {
    "type": "object",
    "description": "Google's JSON error format, with the offending field beside the message.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "integer", "description": "the HTTP status"},
                "status": {"type": "string", "description": "the gRPC status code name"},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the field that is wrong, if any"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
            "required": ["code", "status", "message"],
        }
    },
}
USERS_SCHEMA = {
    "type": "object",
    "properties": {
        "users": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "user_id": {"type": "string"},
                    "conversions": {"type": "integer"},
                    "last_converted_at": {"type": "string", "format": "date-time"},
                    "top_keywords": {"type": "array", "items": {"type": "string"}},
                    "source": {"type": "string", "enum": ["logged", "catalogue"]},
                },
            },
        }
    },
}
CHOICES_SCHEMA = {
    "type": "object",
    "properties": {
        "retrievers": {"type": "array", "items": {"type": "string"}},
        "rankers": {"type": "array", "items": {"type": "string"}},
        "images": {"type": "boolean"},
        "artifact_version": {"type": "string"},
    },
}


def _errors(*statuses: int) -> dict:
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    meaning = {
        400: "bad input: `error.field` names the field",
        401: "missing or unknown bearer token",
        404: "no such photo image",
        429: "the gateway is overloaded: retry later",
        503: "the gateway cannot be reached",
        504: "the gateway did not answer in time",
    }
    return {str(s): {"description": meaning[s], "content": content} for s in statuses}


def _json_call(summary: str, request, response, method: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "operationId": method,
            "description": f"Calls the gateway's `{method}`; the body is a "
            f"`{request.DESCRIPTOR.full_name}`, the reply a `{response.DESCRIPTOR.full_name}`.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request.DESCRIPTOR)}},
            },
            "responses": {
                "200": {
                    "description": "the gateway's reply",
                    "content": {"application/json": {"schema": _ref(response.DESCRIPTOR)}},
                },
                **_errors(400, 401, 429, 503, 504),
            },
        }
    }


def openapi_document(version: str = "") -> dict:
    """The OpenAPI 3.1 description of every endpoint the door serves."""
    schemas: dict = {}
    for message in (pb.SearchRequest, pb.SearchResponse):
        _add_message(message.DESCRIPTOR, schemas)
    for message in (fb_pb.LogConversionsRequest, fb_pb.LogConversionsResponse):
        _add_message(message.DESCRIPTOR, schemas)
    schemas.update(Error=ERROR_SCHEMA, Users=USERS_SCHEMA, Choices=CHOICES_SCHEMA)
    json_reply = {"application/json": {"schema": {"$ref": "#/components/schemas/Users"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imgsearch JSON door",
            "version": version or "v1",
            "description": "The gateway's SearchService.Search and FeedbackService."
            "LogConversions over HTTP with the proto JSON mapping; errors carry the gRPC "
            "code and the field. With a tokens file, every /v1 and /images request needs "
            "`Authorization: Bearer <token>`.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/search": _json_call(
                "Search photos for a user", pb.SearchRequest, pb.SearchResponse, "Search"
            ),
            "/v1/conversions": _json_call(
                "Log conversions (a user downloaded a photo a query found)",
                fb_pb.LogConversionsRequest,
                fb_pb.LogConversionsResponse,
                "LogConversions",
            ),
            "/v1/users": {
                "get": {
                    "summary": "Users with recent conversions, for a user picker",
                    "operationId": "RecentUsers",
                    "description": "Users who converted through this door (latest first), "
                    "then the served catalogue's users with the latest conversions.",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the users", "content": json_reply},
                        **_errors(400, 401),
                    },
                }
            },
            "/v1/choices": {
                "get": {
                    "summary": "Retriever and ranker names, and whether images are served",
                    "operationId": "Choices",
                    "responses": {
                        "200": {
                            "description": "the choices",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Choices"}
                                }
                            },
                        },
                        **_errors(401),
                    },
                }
            },
            "/images/{photo_id}.jpg": {
                "get": {
                    "summary": "The image of a photo of the served catalogue",
                    "operationId": "Image",
                    "parameters": [
                        {
                            "name": "photo_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "the JPEG",
                            "content": {"image/jpeg": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 404),
                    },
                }
            },
        },
    }
