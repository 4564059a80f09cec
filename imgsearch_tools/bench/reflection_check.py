"""A reflection-only client, as ghz runs without ``--proto``: resolve SearchService.Search
through server reflection and call it with proto3 JSON requests."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from imgsearch.latency import percentiles_ms
from imgsearch_tools.bench.load import SEARCH_METHOD_SYMBOL

if TYPE_CHECKING:
    from imgsearch.security import ClientSecurity


def resolve_method(
    channel, symbol: str = SEARCH_METHOD_SYMBOL, metadata=()
) -> tuple[str, type, type]:
    """Resolve a method through server reflection alone, the way ghz does without ``--proto``.

    Asks ``file_containing_symbol`` for the method's full name, fetches any missing
    dependency by file name, builds a private descriptor pool (never the generated code) and
    makes the request and response classes with ``message_factory``.

    Parameters
    ----------
    channel:
        A synchronous ``grpc.Channel`` to the server.
    symbol:
        The method's full name, ``package.Service.Method``.
    metadata:
        Sent with the reflection calls (a bearer token, say).

    Returns
    -------
    tuple
        (the method's path ``/package.Service/Method``, request class, response class).

    Raises
    ------
    LookupError
        When reflection does not know the symbol (what ghz reports as "Symbol not found").
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def ask(request) -> None:
        for reply in stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata):
            if reply.HasField("error_response"):
                raise LookupError(
                    f"reflection: {reply.error_response.error_message or 'not found'} "
                    f"(code {reply.error_response.error_code}) for {symbol}"
                )
            for raw in reply.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files.setdefault(proto.name, proto)

    ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    while missing := sorted({d for f in files.values() for d in f.dependency} - files.keys()):
        ask(reflection_pb2.ServerReflectionRequest(file_by_filename=missing[0]))
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while len(added) < len(files):
        ready = [
            name
            for name, proto in files.items()
            if name not in added and set(proto.dependency) <= added
        ]
        for name in ready:
            pool.Add(files[name])
            added.add(name)
    service_name, _, method_name = symbol.rpartition(".")
    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    return (
        f"/{service_name}/{method_name}",
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )


def reflection_client_check(
    target: str,
    requests: list[dict],
    symbol: str = SEARCH_METHOD_SYMBOL,
    timeout: float = 5.0,
    security: ClientSecurity | None = None,
) -> dict:
    """Call ``symbol`` once per request (proto3 JSON dicts) with a reflection-only client.

    ``security`` gives the channel's TLS files and the token sent with every call, the
    reflection ones included (ghz's ``--metadata`` and ``--reflect-metadata``).

    Returns
    -------
    dict
        ``calls``, ``ok``, ``errors`` by status code, ``empty_responses`` (OK but no results)
        and the latency percentiles (ms) of the OK calls.
    """
    import grpc
    from google.protobuf import json_format

    from imgsearch.security import ClientSecurity

    codes: Counter = Counter()
    empty = 0
    latencies = []
    security = security or ClientSecurity()
    metadata = security.metadata()
    with security.channel(target) as channel:
        path, request_class, response_class = resolve_method(channel, symbol, metadata)
        call = channel.unary_unary(
            path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        for fields in requests:
            message = json_format.ParseDict(fields, request_class())
            start = time.perf_counter()
            try:
                response = call(message, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                continue
            latencies.append(time.perf_counter() - start)
            codes["OK"] += 1
            if "results" in response.DESCRIPTOR.fields_by_name and not len(response.results):
                empty += 1
    return {
        "symbol": symbol,
        "method_path": path,
        "calls": len(requests),
        "ok": codes.get("OK", 0),
        "errors": {c: n for c, n in sorted(codes.items()) if c != "OK"},
        "empty_responses": empty,
        "latency_ms": percentiles_ms(latencies),
    }
