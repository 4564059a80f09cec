"""Client helpers: call the gateway, wait for health, and print results for people."""

from __future__ import annotations

import time

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.names import ranker_name, ranker_value, retriever_name, retriever_value
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch.security import ClientSecurity

PLAINTEXT = ClientSecurity()


def wait_for_serving(
    target: str, timeout: float = 60.0, service: str = "", security: ClientSecurity = PLAINTEXT
) -> None:
    """Poll the health service at ``target`` until it reports SERVING.

    Every server answers health in plaintext on its admin port; its service port answers
    health too, over TLS when it serves TLS (pass ``security`` then).

    Raises
    ------
    TimeoutError
        When it is not SERVING within ``timeout`` seconds, with the last status seen.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    with security.channel(target) as channel:
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
    security: ClientSecurity = PLAINTEXT,
    photo_filter: retr_pb.PhotoFilter | None = None,
) -> pb.SearchResponse:
    """One Search call against the gateway at ``target`` (TLS and token per ``security``);
    ``photo_filter`` restricts the results to the photos it matches."""
    with security.channel(target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        return stub.Search(
            pb.SearchRequest(
                user_id=user_id,
                query=query,
                k=k,
                candidates_k=candidates_k,
                retriever=retriever_value(retriever),
                ranker=ranker_value(ranker),
                recent_photo_ids=recent_photo_ids or [],
                filter=photo_filter,
            ),
            timeout=timeout,
            metadata=security.metadata(),
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


def to_html(
    response: pb.SearchResponse, query: str, user_id: str, images_dir: str | None = None
) -> str:
    """A self-contained HTML page of the results: image, scores, keywords and description.

    With ``images_dir`` (a catalogue's ``images/`` folder) the pictures are embedded from disk,
    so the page works offline; otherwise they are linked by their ``photo.url``.
    """
    import base64
    import html
    from pathlib import Path

    def image_src(result) -> str:
        if images_dir:
            path = Path(images_dir) / f"{result.photo_id}.jpg"
            if path.exists():
                return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
        return result.photo.url

    cards = []
    for rank, result in enumerate(response.results, 1):
        sources = ", ".join(
            f"{name} {score:.3f}" for name, score in sorted(result.retrieval_source_scores.items())
        )
        photo_id = html.escape(result.photo_id)
        cards.append(
            f"""<figure><img src="{html.escape(image_src(result))}" alt="{photo_id}">
<figcaption><b>#{rank} {photo_id}</b> score {result.score:.4f}<br>
retrieval {result.retrieval_score:.4f} ({html.escape(sources)})<br>
<i>{html.escape(", ".join(result.photo.keywords[:6]))}</i><br>
{html.escape(result.photo.description or result.photo.ai_description)}</figcaption></figure>"""
        )
    t = response.timings
    notes = [html.escape(n) for n in response.notes]
    if response.degraded:
        notes.insert(0, f"<b>degraded</b>: {html.escape(response.degraded_reason)}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>imgsearch: {html.escape(query)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .grid{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{width:220px;margin:0}} img{{width:220px;height:220px;object-fit:cover;
image-rendering:pixelated;border-radius:4px}} figcaption{{font-size:12px}}</style></head>
<body><h2>&ldquo;{html.escape(query)}&rdquo; for {html.escape(user_id or "an anonymous user")}</h2>
<p>retriever {retriever_name(response.retriever)}, ranker {ranker_name(response.ranker)};
retrieval {t.retrieval_ms:.1f} ms, ranking {t.ranking_ms:.1f} ms, total {t.total_ms:.1f} ms</p>
<p>{"<br>".join(notes)}</p>
<div class="grid">{"".join(cards)}</div></body></html>
"""
