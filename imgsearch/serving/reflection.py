"""Server reflection that ghz and grpcurl can use: method symbols resolve, and when it is on."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha._base import _file_descriptor_response, _not_found_error

from imgsearch.security import SecurityConfigError, is_loopback

REFLECTION_CHOICES = ("auto", "on", "off")


class SymbolReflectionServicer(ReflectionServicer):
    """Server reflection that also resolves method and nested symbols.

    Stock grpcio-reflection answers NOT_FOUND for ``file_containing_symbol`` of a method's full
    name (``pkg.Service.Method``); ghz and other clients ask exactly that. Walk up the dotted
    name until a known symbol is found and answer with the file that defines it.
    """

    def _file_containing_symbol(self, request, fully_qualified_name):
        name = fully_qualified_name
        while name:
            try:
                descriptor = self._pool.FindFileContainingSymbol(name)
            except KeyError:
                name = name.rpartition(".")[0]
                continue
            if name != fully_qualified_name and not _defines(descriptor, fully_qualified_name):
                break
            return _file_descriptor_response(descriptor, request)
        return _not_found_error(request)


def _defines(file_descriptor, full_name: str) -> bool:
    """Whether ``full_name`` is a service method (or nested element) of ``file_descriptor``."""
    parent, _, leaf = full_name.rpartition(".")
    for service in file_descriptor.services_by_name.values():
        if service.full_name == parent and leaf in service.methods_by_name:
            return True
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(parent)
        return True
    except KeyError:
        return False


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Register :class:`SymbolReflectionServicer` for the given services plus reflection itself."""
    from grpc_reflection.v1alpha import reflection

    names = [
        *service_names,
        reflection.SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    ]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        SymbolReflectionServicer(names), server
    )


def reflection_wanted(setting: str, host: str, tls: bool) -> bool:
    """Whether a port serves reflection: ``on``, ``off``, or ``auto`` (plaintext loopback)."""
    if setting not in REFLECTION_CHOICES:
        raise SecurityConfigError(
            f"reflection must be one of {', '.join(REFLECTION_CHOICES)}, got {setting!r}"
        )
    if setting == "auto":
        return not tls and is_loopback(host)
    return setting == "on"
