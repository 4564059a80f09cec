"""Client helpers: call the gateway, wait for health, and print results for people."""

from __future__ import annotations

import time

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc

RETRIEVERS = {"default": 0, "keyword": 1, "clip": 2, "hybrid": 3}
RANKERS = {"default": 0, "none": 1, "popularity": 2, "als": 3, "fm": 4, "deepfm": 5, "two_step": 6}


def retriever_name(value: int) -> str:
    """'keyword' for RETRIEVER_KEYWORD, etc."""
    return retr_pb.Retriever.Name(value).removeprefix("RETRIEVER_").lower()


def ranker_name(value: int) -> str:
    """'als' for RANKER_ALS, etc."""
    return rank_pb.Ranker.Name(value).removeprefix("RANKER_").lower()


def wait_for_serving(target: str, timeout: float = 60.0, service: str = "") -> None:
    """Poll the health service at ``target`` until it reports SERVING.

    Raises
    ------
    TimeoutError
        When it is not SERVING within ``timeout`` seconds, with the last status seen.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s (last: {last})")


def search(
    target: str,
    query: str,
    user_id: str = "",
    k: int = 10,
    candidates_k: int = 0,
    retriever: str = "default",
    ranker: str = "default",
    recent_photo_ids: list[str] | None = None,
    timeout: float = 10.0,
) -> pb.SearchResponse:
    """One Search call against the gateway at ``target``."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        return stub.Search(
            pb.SearchRequest(
                user_id=user_id,
                query=query,
                k=k,
                candidates_k=candidates_k,
                retriever=RETRIEVERS[retriever],
                ranker=RANKERS[ranker],
                recent_photo_ids=recent_photo_ids or [],
            ),
            timeout=timeout,
        )


def to_json(response: pb.SearchResponse) -> str:
    """The response as JSON (proto field names)."""
    return json_format.MessageToJson(response, preserving_proto_field_name=True, indent=2)


def format_table(response: pb.SearchResponse, query: str, user_id: str) -> str:
    """A readable table of results, timings and notes."""
    lines = [
        f'query "{query}"  user {user_id or "(anonymous)"}  '
        f"retriever {retriever_name(response.retriever)}  ranker {ranker_name(response.ranker)}",
    ]
    header = f"{'#':>3}  {'photo_id':<12} {'score':>8} {'retrieval':>9} {'source':<13} keywords"
    lines += [header, "-" * len(header)]
    for rank, result in enumerate(response.results, 1):
        keywords = ", ".join(result.photo.keywords[:5])
        lines.append(
            f"{rank:>3}  {result.photo_id:<12} {result.score:>8.4f} {result.retrieval_score:>9.4f} "
            f"{result.retrieval_source:<13} {keywords}"
        )
        description = result.photo.description or result.photo.ai_description
        if description:
            lines.append(f"{'':>5} {description[:90]}")
    t = response.timings
    lines.append(
        f"timings: retrieval {t.retrieval_ms:.1f} ms, ranking {t.ranking_ms:.1f} ms, "
        f"total {t.total_ms:.1f} ms"
    )
    if response.degraded:
        lines.append(f"DEGRADED: {response.degraded_reason}")
    for note in response.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
