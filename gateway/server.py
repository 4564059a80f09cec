"""The SearchService gateway: fans out to retrieval then ranking with deadlines and fallbacks."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from imgsearch import artifacts
from imgsearch.config import (
    DEFAULT_CANDIDATES_K,
    DEFAULT_K,
    MAX_CANDIDATES_K,
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_RECENT_PHOTOS,
    GatewayConfig,
)
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch.serving import (
    DEGRADED,
    LATENCY,
    REQUEST_ID_KEY,
    InvalidArgument,
    Reloadable,
    Service,
    current_request_id,
    start_service,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name
MAX_USER_ID_CHARS = 256
KEYWORDS_PER_PHOTO = 8
# Downstream failures that degrade a search to retrieval order instead of failing it.
DEGRADABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
# Channel options: reconnect quickly with backoff when a downstream restarts.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
]
TWO_STEP_RECOMMEND = 1000  # ALS recommendations voted against the retrieval candidates
logger = logging.getLogger("imgsearch.gateway")


@dataclass
class GatewayState:
    """Photo metadata of one artifact set (the gateway owns no model)."""

    version: str
    path: Path
    photos: dict[str, pb.Photo]
    models: list[str] = field(default_factory=list)


def load_gateway_state(artifacts_path: str) -> GatewayState:
    """Read photo metadata and top keywords, prebuilt as protobuf messages."""
    import pandas as pd

    artifact_set = artifacts.resolve(artifacts_path)
    catalogue_dir = artifact_set.file(artifacts.CATALOGUE_DIR)
    photos = pd.read_parquet(catalogue_dir / "photos.parquet")
    keywords = pd.read_parquet(catalogue_dir / "keywords.parquet")
    keywords = keywords.sort_values(["photo_idx", "confidence"], ascending=[True, False])
    top = keywords.groupby("photo_idx", sort=False).head(KEYWORDS_PER_PHOTO)
    by_photo = top.groupby("photo_idx")["keyword"].agg(list).to_dict()
    messages = {}
    for row in photos.itertuples(index=False):
        messages[row.photo_id] = pb.Photo(
            photo_id=row.photo_id,
            url=row.photo_image_url,
            description=row.photo_description,
            ai_description=row.ai_description,
            photographer_username=row.photographer_username,
            keywords=by_photo.get(row.photo_idx, []),
        )
    return GatewayState(artifact_set.version, artifact_set.path, messages, ["metadata"])


def validate(request: pb.SearchRequest) -> tuple[int, int]:
    """Check a SearchRequest; returns (k, candidates_k) or raises InvalidArgument."""
    query = " ".join(request.query.split())
    if not query:
        raise InvalidArgument("query", "must not be empty")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            "query", f"must be at most {MAX_QUERY_CHARS} characters, got {len(query)}"
        )
    k = request.k or DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise InvalidArgument("k", f"must be between 1 and {MAX_K}, got {request.k}")
    candidates_k = request.candidates_k or max(DEFAULT_CANDIDATES_K, k)
    if not k <= candidates_k <= MAX_CANDIDATES_K:
        raise InvalidArgument(
            "candidates_k",
            f"must be between k ({k}) and {MAX_CANDIDATES_K}, got {request.candidates_k}",
        )
    if request.retriever not in retr_pb.Retriever.values():
        raise InvalidArgument("retriever", f"unknown value {request.retriever}")
    if request.ranker not in rank_pb.Ranker.values():
        raise InvalidArgument("ranker", f"unknown value {request.ranker}")
    if len(request.user_id) > MAX_USER_ID_CHARS:
        raise InvalidArgument("user_id", f"must be at most {MAX_USER_ID_CHARS} characters")
    if len(request.recent_photo_ids) > MAX_RECENT_PHOTOS:
        raise InvalidArgument(
            "recent_photo_ids",
            f"at most {MAX_RECENT_PHOTOS} ids, got {len(request.recent_photo_ids)}",
        )
    return k, candidates_k


def borda_merge(first: list[str], second: list[str]) -> list[tuple[str, float]]:
    """Ranked voting over two lists: each list gives n - rank points; only shared items count.

    The seed study's two-step ranking intersects ALS recommendations with CLIP results and
    merges the two orders by ranked voting.
    """
    points: dict[str, float] = {}
    n1, n2 = len(first), len(second)
    pos2 = {pid: i for i, pid in enumerate(second)}
    for i, pid in enumerate(first):
        j = pos2.get(pid)
        if j is not None:
            points[pid] = (n1 - i) / n1 + (n2 - j) / n2
    return sorted(points.items(), key=lambda item: -item[1])


class CircuitBreaker:
    """Skips a failing downstream for a while so searches degrade at once instead of waiting.

    After ``threshold`` consecutive failures the breaker opens for ``cooldown_s``; after that,
    calls go through again and one more failure reopens it, one success closes it.
    """

    def __init__(self, threshold: int = 3, cooldown_s: float = 1.0):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self.open_until

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s


def unavailable(exc: grpc.aio.AioRpcError) -> str:
    """The degraded reason for a ranking call that failed with ``exc``."""
    return f"ranking unavailable: {exc.code().name}: {exc.details()}"


async def pass_through(context, exc: grpc.aio.AioRpcError) -> None:
    """Abort with a downstream refusal of the request itself, keeping its BadRequest detail."""
    details = [
        (key, value)
        for key, value in (exc.trailing_metadata() or ())
        if key == "grpc-status-details-bin"
    ]
    await context.abort(exc.code(), exc.details() or "", trailing_metadata=tuple(details))


class Candidates:
    """A RetrieveResponse's parallel arrays as plain lists (read once per search)."""

    def __init__(self, retrieved: retr_pb.RetrieveResponse):
        self.ids = list(retrieved.photo_ids)
        self.scores = list(retrieved.scores)
        self.sources = [(s.source, list(s.scores)) for s in retrieved.source_scores]

    def found_by(self, i: int) -> dict[str, float]:
        """The sources that found candidate ``i`` with their scores (NaN = not found)."""
        return {name: values[i] for name, values in self.sources if values[i] == values[i]}


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Serves ``Search`` by calling retrieval then ranking."""

    def __init__(self, config: GatewayConfig, holder: Reloadable[GatewayState]):
        self.config = config
        self.holder = holder
        self.retrieval_channel = grpc.aio.insecure_channel(
            config.retrieval_addr, options=CHANNEL_OPTIONS
        )
        self.ranking_channel = grpc.aio.insecure_channel(
            config.ranking_addr, options=CHANNEL_OPTIONS
        )
        self.retrieval = retr_grpc.RetrievalServiceStub(self.retrieval_channel)
        self.ranking = rank_grpc.RankingServiceStub(self.ranking_channel)
        self.ranking_breaker = CircuitBreaker()
        self.retrieval_latency = LATENCY.labels("gateway", "retrieval")
        self.ranking_latency = LATENCY.labels("gateway", "ranking")

    async def close(self) -> None:
        await self.retrieval_channel.close()
        await self.ranking_channel.close()

    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        start = time.perf_counter()
        state = self.holder.state
        k, candidates_k = validate(request)
        rid = current_request_id()
        metadata = ((REQUEST_ID_KEY, rid),)
        # The search's budget: the client's deadline when it set one, else the configured one.
        budget = self.config.timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        # Keep a margin to merge and send the response before the client's deadline passes.
        deadline = start + budget - min(0.02, budget * 0.1)
        ranking_reserve = min(self.config.ranking_budget_ms / 1000, budget / 2)
        two_step = request.ranker == rank_pb.RANKER_TWO_STEP

        retrieve_call = self.retrieval.Retrieve(
            retr_pb.RetrieveRequest(
                query=request.query, candidates_k=candidates_k, retriever=request.retriever
            ),
            timeout=max(0.001, budget - ranking_reserve),
            metadata=metadata,
        )
        recommend_task = None
        if two_step:
            recommend_task = asyncio.ensure_future(
                self.ranking.Recommend(
                    rank_pb.RecommendRequest(
                        user_id=request.user_id,
                        k=TWO_STEP_RECOMMEND,
                        recent_photo_ids=request.recent_photo_ids,
                    ),
                    timeout=max(0.001, budget - 0.002),
                    metadata=metadata,
                )
            )
        try:
            retrieved = await retrieve_call
        except grpc.aio.AioRpcError as exc:
            if recommend_task is not None:
                recommend_task.cancel()
            await self._retrieval_failed(context, exc)
        self.retrieval_latency.observe(time.perf_counter() - start)

        response = pb.SearchResponse(retriever=retrieved.retriever)
        response.artifact_versions["gateway"] = state.version
        response.artifact_versions["retrieval"] = retrieved.artifact_version
        response.timings.retrieval_ms = retrieved.retrieval_ms
        if retrieved.note:
            response.notes.append(retrieved.note)
        candidates = Candidates(retrieved)
        order: list[tuple[str, float, float]] = []  # (photo_id, final score, ranker score)

        if not candidates.ids:
            response.ranker = request.ranker or rank_pb.RANKER_NONE
            if recommend_task is not None:
                recommend_task.cancel()
        elif two_step:
            order = await self._two_step(context, recommend_task, candidates, k, response)
        else:
            order = await self._rank(
                context, request, retrieved.keyword, candidates, k, deadline, metadata, response
            )

        position = {pid: i for i, pid in enumerate(candidates.ids)}
        for photo_id, final, ranker_score in order:
            i = position[photo_id]
            found = candidates.found_by(i)
            result = response.results.add(
                photo_id=photo_id,
                score=final,
                retrieval_score=candidates.scores[i],
                retrieval_source="+".join(found),
                ranker_score=ranker_score,
            )
            result.retrieval_source_scores.update(found)
            photo = state.photos.get(photo_id)
            if photo is not None:
                result.photo.CopyFrom(photo)
            else:
                result.photo.photo_id = photo_id
        response.timings.total_ms = (time.perf_counter() - start) * 1000
        if response.degraded:
            logger.warning(
                "degraded search",
                extra={"reason": response.degraded_reason},
            )
        return response

    async def _retrieval_failed(self, context, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code()
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            await pass_through(context, exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            await context.abort(code, "retrieval did not answer within the search's deadline")
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"retrieval service at {self.config.retrieval_addr} is unavailable "
            f"({code.name}: {exc.details()})",
        )

    async def _rank(self, context, request, keyword, candidates, k, deadline, metadata, response):
        """Rank the candidates; on failure or timeout fall back to retrieval order."""
        ranking_start = time.perf_counter()
        timeout = deadline - ranking_start - 0.001
        if not self.ranking_breaker.allow():
            return self._degrade(
                response,
                candidates,
                k,
                "circuit_open",
                "ranking unavailable: skipped after repeated failures "
                f"(retrying within {self.ranking_breaker.cooldown_s:.0f} s)",
            )
        try:
            if timeout <= 0:
                raise TimeoutError("no time left for ranking")
            ranked = await self.ranking.Rank(
                rank_pb.RankRequest(
                    user_id=request.user_id,
                    query=request.query,
                    keyword=keyword,
                    candidate_photo_ids=candidates.ids,
                    retrieval_scores=candidates.scores,
                    k=k,
                    ranker=request.ranker,
                    recent_photo_ids=request.recent_photo_ids,
                ),
                timeout=timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in DEGRADABLE:
                await pass_through(context, exc)
            self.ranking_breaker.failure()
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                elapsed_ms = (time.perf_counter() - ranking_start) * 1000
                reason = f"ranking timed out after {elapsed_ms:.0f} ms"
                return self._degrade(response, candidates, k, "timeout", reason)
            return self._degrade(response, candidates, k, "unavailable", unavailable(exc))
        except TimeoutError as exc:
            return self._degrade(response, candidates, k, "no_budget", f"ranking skipped: {exc}")
        self.ranking_breaker.success()
        self.ranking_latency.observe(time.perf_counter() - ranking_start)
        response.ranker = ranked.ranker
        response.timings.ranking_ms = ranked.ranking_ms
        response.artifact_versions["ranking"] = ranked.artifact_version
        if ranked.default_reason:
            response.notes.append(ranked.default_reason)
        if ranked.fallback_reason:
            response.notes.append(ranked.fallback_reason)
        return [(r.photo_id, r.score, r.score) for r in ranked.results]

    @staticmethod
    def _degrade(response, candidates, k, kind: str, reason: str):
        """Answer in retrieval order; ``kind`` is the metric label (a small fixed set)."""
        DEGRADED.labels(kind).inc()
        response.degraded = True
        response.degraded_reason = reason
        response.ranker = rank_pb.RANKER_NONE
        return [(pid, s, s) for pid, s in zip(candidates.ids[:k], candidates.scores[:k])]

    async def _two_step(self, context, recommend_task, candidates, k, response):
        """The seed study's two-step ranking: ALS recommendations voted with retrieval order."""
        try:
            recommended = await recommend_task
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in DEGRADABLE:
                await pass_through(context, exc)
            return self._degrade(response, candidates, k, "unavailable", unavailable(exc))
        response.ranker = rank_pb.RANKER_TWO_STEP
        response.artifact_versions["ranking"] = recommended.artifact_version
        if recommended.fallback_reason:
            response.notes.append(recommended.fallback_reason)
        voted = borda_merge([r.photo_id for r in recommended.results], candidates.ids)
        chosen = [(pid, score, score) for pid, score in voted[:k]]
        if len(chosen) < k:
            # Too few shared items: fill with retrieval order so the user still gets k results.
            seen = {pid for pid, _, _ in chosen}
            rest = [pid for pid in candidates.ids if pid not in seen][: k - len(chosen)]
            chosen += [(pid, 0.0, 0.0) for pid in rest]
            response.notes.append(
                f"two-step: {len(voted)} photos shared by ALS and retrieval; "
                "the rest in retrieval order"
            )
        return chosen


async def create_gateway_server(config: GatewayConfig) -> Service:
    """Create, load and start the gateway; returns it once it is SERVING."""

    def add(server, holder):
        servicer = SearchServicer(config, holder)
        pb_grpc.add_SearchServiceServicer_to_server(servicer, server)
        return servicer

    logger.info(
        "gateway downstreams",
        extra={"retrieval": config.retrieval_addr, "ranking": config.ranking_addr},
    )
    return await start_service("gateway", config, [SERVICE_NAME], load_gateway_state, add)
