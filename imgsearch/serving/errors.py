"""Bad input as a status: INVALID_ARGUMENT with a ``google.rpc.BadRequest`` naming the field."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


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
