"""The SearchService gateway: fans out to retrieval then ranking with deadlines and fallbacks."""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.breaker import CircuitBreaker, RankingCall, Verdict
from gateway.catalog import SERVICE_NAME as CATALOG_SERVICE_NAME
from gateway.catalog import CatalogServicer
from gateway.feedback import SERVICE_NAME as FEEDBACK_SERVICE_NAME
from gateway.feedback import FeedbackServicer
from gateway.merge import borda_merge
from gateway.photos import PHOTO_COLUMNS, PhotoMetadata
from gateway.shards import RetrievalTier
from gateway.validation import validate
from imgsearch import artifacts
from imgsearch.admission import PUSHBACK_KEY, SHED, report_downstream_overload
from imgsearch.balancing import channel_options, channel_target
from imgsearch.catalog.v1 import catalog_service_pb2_grpc as catalog_grpc
from imgsearch.catalogue import normalise_user_id
from imgsearch.config import GatewayConfig
from imgsearch.conversion_store import open_store
from imgsearch.conversion_store.background import BackgroundStore
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as feedback_grpc
from imgsearch.ranking.v1 import ranking_service_pb2 as rank_pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as rank_grpc
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from imgsearch.security import ClientSecurity, refuse_open_public_door
from imgsearch.serving import (
    DEGRADED,
    LATENCY,
    REQUEST_ID_KEY,
    Reloadable,
    Service,
    current_request_id,
    start_service,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name
# Downstream failures that degrade a search to retrieval order instead of failing it.
DEGRADABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
# Channel options: reconnect quickly with backoff when a downstream restarts. Balancing over
# replicas and retrying UNAVAILABLE on another one come on top (imgsearch.balancing).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
]
RANKING_SERVICE = rank_pb.DESCRIPTOR.services_by_name["RankingService"].full_name
# At start the gateway waits this long for the conversion store, then serves searches anyway.
STORE_OPEN_TIMEOUT_S = 5.0
TWO_STEP_RECOMMEND = 1000  # ALS recommendations voted against the retrieval candidates
# Consecutive ranking failures that open the breaker, and how long it stays open before a probe.
BREAKER_THRESHOLD = 3
BREAKER_COOLDOWN_S = 1.0
logger = logging.getLogger("imgsearch.gateway")


@dataclass
class GatewayState:
    """Photo metadata of one artifact set (the gateway owns no model)."""

    version: str
    path: Path
    photos: MutableMapping[str, pb.Photo]  # PhotoMetadata (or a plain dict)
    models: list[str] = field(default_factory=list)


def load_gateway_state(artifacts_path: str) -> GatewayState:
    """Read photo metadata and top keywords (:class:`~gateway.photos.PhotoMetadata`)."""
    import pandas as pd

    artifact_set = artifacts.resolve(artifacts_path)
    catalogue_dir = artifact_set.file(artifacts.CATALOGUE_DIR)
    photos = pd.read_parquet(catalogue_dir / "photos.parquet", columns=PHOTO_COLUMNS)
    keywords = pd.read_parquet(
        catalogue_dir / "keywords.parquet", columns=["photo_idx", "keyword", "confidence"]
    )
    metadata = PhotoMetadata(photos, keywords)
    return GatewayState(artifact_set.version, artifact_set.path, metadata, ["metadata"])


def unavailable(exc: grpc.aio.AioRpcError) -> str:
    """The degraded reason for a ranking call that failed with ``exc``."""
    return f"ranking unavailable: {exc.code().name}: {exc.details()}"


def pushback_ms(exc: grpc.aio.AioRpcError) -> int | None:
    """The ``grpc-retry-pushback-ms`` a refusal carried (negative: do not retry); None if none."""
    for key, value in exc.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def pass_through(context, exc: grpc.aio.AioRpcError) -> None:
    """Abort with a downstream refusal of the request itself, keeping its BadRequest detail."""
    details = [
        (key, value)
        for key, value in (exc.trailing_metadata() or ())
        if key == "grpc-status-details-bin"
    ]
    await context.abort(exc.code(), exc.details() or "", trailing_metadata=tuple(details))


class Candidates:
    """A RetrieveResponse's parallel arrays (ids and scores as plain lists, read once)."""

    def __init__(self, retrieved: retr_pb.RetrieveResponse):
        self.ids = list(retrieved.photo_ids)
        self.scores = list(retrieved.scores)
        # Their catalogue indexes, passed on to ranking as they came (one bytes object).
        self.packed_indices = retrieved.packed_photo_indices
        self.version = retrieved.artifact_version
        # Only the k results read them: no copy of the source lists.
        self.sources = [(s.source, s.scores) for s in retrieved.source_scores]

    def found_by(self, i: int) -> dict[str, float]:
        """The sources that found candidate ``i`` with their scores (NaN = not found)."""
        found = {}
        for name, values in self.sources:
            score = values[i]
            if score == score:
                found[name] = score
        return found


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Serves ``Search`` by calling retrieval then ranking."""

    def __init__(self, config: GatewayConfig, holder: Reloadable[GatewayState]):
        self.config = config
        self.holder = holder
        # TLS (mutual when the gateway has a certificate) when a downstream CA is configured.
        downstream = ClientSecurity(config.client_ca, config.client_cert, config.client_key)
        self.retrieval = RetrievalTier(config.retrieval_addr, downstream, CHANNEL_OPTIONS)
        self.ranking_channel = downstream.aio_channel(
            channel_target(config.ranking_addr), channel_options(RANKING_SERVICE, CHANNEL_OPTIONS)
        )
        self.ranking = rank_grpc.RankingServiceStub(self.ranking_channel)
        self.ranking_breaker = CircuitBreaker(BREAKER_THRESHOLD, BREAKER_COOLDOWN_S)
        # Ranking shedding load asks to be left alone this long: searches degrade meanwhile.
        self.ranking_pushback_until = 0.0
        self.shed_downstream = SHED.labels("gateway", "downstream")
        self.retrieval_latency = LATENCY.labels("gateway", "retrieval")
        self.ranking_latency = LATENCY.labels("gateway", "ranking")

    async def close(self) -> None:
        await self.retrieval.close()
        await self.ranking_channel.close()

    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        start = time.perf_counter()
        state = self.holder.state
        k, candidates_k = validate(request)
        rid = current_request_id()
        # One Metadata for both calls: grpc.aio turns a tuple into one on every call, after
        # an isinstance check against typing.Sequence (about 4 us a call here).
        metadata = grpc.aio.Metadata((REQUEST_ID_KEY, rid))
        # The search's budget: the client's deadline when it set one, else the configured one.
        budget = self.config.timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        # Keep a margin to merge and send the response before the client's deadline passes.
        deadline = start + budget - min(0.02, budget * 0.1)
        ranking_reserve = min(self.config.ranking_budget_ms / 1000, budget / 2)
        two_step = request.ranker == rank_pb.RANKER_TWO_STEP

        retrieve_request = retr_pb.RetrieveRequest(
            query=request.query,
            candidates_k=candidates_k,
            retriever=request.retriever,
            # Ranking reads the candidates' catalogue indexes instead of looking 100 ids up.
            return_packed_photo_indices=not two_step,
        )
        if request.HasField("filter"):
            # Only a filter the client set is copied: an absent one filters nothing.
            retrieve_request.filter.CopyFrom(request.filter)
        retrieve_call = self.retrieval.retrieve(
            retrieve_request,
            timeout=max(0.001, budget - ranking_reserve),
            metadata=metadata,
        )
        # Two-step asks ranking for recommendations while retrieval runs.
        recommend = self._start_recommend(request, deadline, metadata) if two_step else None
        try:
            return await self._search(
                context, request, state, start, k, deadline, metadata, retrieve_call, recommend
            )
        finally:
            # Retrieval failed, found nothing, or the client cancelled: ranking stops too.
            if isinstance(recommend, RankingCall):
                recommend.cancel()

    async def _search(
        self, context, request, state, start, k, deadline, metadata, retrieve_call, recommend
    ) -> pb.SearchResponse:
        two_step = request.ranker == rank_pb.RANKER_TWO_STEP
        try:
            retrieved, missing_shards = await retrieve_call
        except grpc.aio.AioRpcError as exc:
            await self._retrieval_failed(context, exc)
        self.retrieval_latency.observe(time.perf_counter() - start)

        response = pb.SearchResponse(retriever=retrieved.retriever)
        if missing_shards:
            DEGRADED.labels("shard_unavailable").inc()
            response.degraded = True
            response.degraded_reason = "; ".join(missing_shards)
        response.artifact_versions["gateway"] = state.version
        response.artifact_versions["retrieval"] = retrieved.artifact_version
        response.timings.retrieval_ms = retrieved.retrieval_ms
        if retrieved.note:
            response.notes.append(retrieved.note)
        candidates = Candidates(retrieved)
        order: list[tuple[str, float, float]] = []  # (photo_id, final score, ranker score)

        if not candidates.ids:
            response.ranker = request.ranker or rank_pb.RANKER_NONE
        elif two_step:
            order = await self._two_step(context, recommend, candidates, k, response)
        else:
            order = await self._rank(
                context, request, retrieved.keyword, candidates, k, deadline, metadata, response
            )

        position = {pid: i for i, pid in enumerate(candidates.ids)}
        add = response.results.add
        for photo_id, final, ranker_score in order:
            i = position[photo_id]
            found = candidates.found_by(i)
            result = add(
                photo_id=photo_id,
                score=final,
                retrieval_score=candidates.scores[i],
                retrieval_source="+".join(found),
                ranker_score=ranker_score,
            )
            # Key by key: the map's update() is a pure-Python mixin.
            source_scores = result.retrieval_source_scores
            for source, score in found.items():
                source_scores[source] = score
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
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Retrieval sheds load: the search is refused the same way, with its pushback. A
            # refusal for lack of capacity (not for a too-short deadline) also makes this
            # door's limit back off, so the next searches are refused here, before they cost
            # retrieval a call.
            pushback = pushback_ms(exc)
            if pushback is None or pushback >= 0:
                report_downstream_overload()
            self.shed_downstream.inc()
            metadata = () if pushback is None else ((PUSHBACK_KEY, str(pushback)),)
            await context.abort(
                code, f"retrieval is overloaded: {exc.details()}", trailing_metadata=metadata
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            await context.abort(code, "retrieval did not answer within the search's deadline")
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"retrieval service at {self.config.retrieval_addr} is unavailable "
            f"({code.name}: {exc.details()})",
        )

    def _skip_ranking(self, deadline: float) -> tuple[str, str, str | None]:
        """A permit for a ranking call, or why the search must not wait for ranking.

        Returns (degraded kind, reason, permit): the permit is None when the call is skipped.
        """
        if time.perf_counter() < self.ranking_pushback_until:
            return "overloaded", "ranking overloaded: skipped while it asks for a pause", None
        permit = self.ranking_breaker.acquire()
        if permit is None:
            reason = (
                "ranking unavailable: skipped after repeated failures "
                f"(one probe every {self.ranking_breaker.cooldown_s:g} s)"
            )
            return "circuit_open", reason, None
        if deadline - time.perf_counter() - 0.001 <= 0:
            self.ranking_breaker.record(permit, Verdict.NONE)
            return "no_budget", "ranking skipped: no time left for ranking", None
        return "", "", permit

    def _guarded(self, permit: str, start_call, timeout: float) -> RankingCall:
        """Start a ranking call with ``start_call(timeout)`` under ``permit``."""
        try:
            call = start_call(timeout)
        except BaseException:
            self.ranking_breaker.record(permit, Verdict.NONE)  # never leave a probe hanging
            raise
        fair_s = self.config.ranking_budget_ms / 1000
        return RankingCall(self.ranking_breaker, permit, call, timeout, fair_s)

    async def _rank(self, context, request, keyword, candidates, k, deadline, metadata, response):
        """Rank the candidates; on failure or timeout fall back to retrieval order."""
        ranking_start = time.perf_counter()
        kind, reason, permit = self._skip_ranking(deadline)
        if permit is None:
            return self._degrade(response, candidates, k, kind, reason)
        rank_request = rank_pb.RankRequest(
            user_id=normalise_user_id(request.user_id),
            query=request.query,
            keyword=keyword,
            candidate_photo_ids=candidates.ids,
            retrieval_scores=candidates.scores,
            k=k,
            ranker=request.ranker,
            recent_photo_ids=request.recent_photo_ids,
            packed_candidate_indices=candidates.packed_indices,
            candidate_indices_version=candidates.version,
        )
        call = self._guarded(
            permit,
            lambda timeout: self.ranking.Rank(rank_request, timeout=timeout, metadata=metadata),
            deadline - ranking_start - 0.001,
        )
        try:
            ranked = await call.result()
        except grpc.aio.AioRpcError as exc:
            return await self._ranking_failed(context, exc, call, response, candidates, k)
        self.ranking_latency.observe(time.perf_counter() - ranking_start)
        response.ranker = ranked.ranker
        response.timings.ranking_ms = ranked.ranking_ms
        response.artifact_versions["ranking"] = ranked.artifact_version
        if ranked.default_reason:
            response.notes.append(ranked.default_reason)
        if ranked.fallback_reason:
            response.notes.append(ranked.fallback_reason)
        return [(r.photo_id, r.score, r.score) for r in ranked.results]

    async def _ranking_failed(self, context, exc, call: RankingCall, response, candidates, k):
        """Pass a refusal of the request through; degrade on anything else."""
        if exc.code() not in DEGRADABLE:
            await pass_through(context, exc)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            elapsed_ms = (time.perf_counter() - call.started) * 1000
            reason = f"ranking timed out after {elapsed_ms:.0f} ms"
            return self._degrade(response, candidates, k, "timeout", reason)
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            pushback = pushback_ms(exc)
            if pushback is not None and pushback > 0:
                until = time.perf_counter() + pushback / 1000
                self.ranking_pushback_until = max(self.ranking_pushback_until, until)
            reason = f"ranking overloaded: {exc.code().name}: {exc.details()}"
            return self._degrade(response, candidates, k, "overloaded", reason)
        return self._degrade(response, candidates, k, "unavailable", unavailable(exc))

    @staticmethod
    def _degrade(response, candidates, k, kind: str, reason: str):
        """Answer in retrieval order; ``kind`` is the metric label (a small fixed set)."""
        DEGRADED.labels(kind).inc()
        response.degraded = True
        # After a missing retrieval shard's reason, when there is one.
        response.degraded_reason = "; ".join(r for r in (response.degraded_reason, reason) if r)
        response.ranker = rank_pb.RANKER_NONE
        return [(pid, s, s) for pid, s in zip(candidates.ids[:k], candidates.scores[:k])]

    def _start_recommend(self, request, deadline: float, metadata) -> RankingCall | tuple:
        """Start two-step's Recommend under the breaker and within the search's budget.

        Returns the call, or (degraded kind, reason) when ranking is skipped.
        """
        kind, reason, permit = self._skip_ranking(deadline)
        if permit is None:
            return kind, reason
        recommend_request = rank_pb.RecommendRequest(
            user_id=normalise_user_id(request.user_id),
            k=TWO_STEP_RECOMMEND,
            recent_photo_ids=request.recent_photo_ids,
        )
        return self._guarded(
            permit,
            lambda timeout: self.ranking.Recommend(
                recommend_request, timeout=timeout, metadata=metadata
            ),
            deadline - time.perf_counter() - 0.001,
        )

    async def _two_step(self, context, recommend, candidates, k, response):
        """The seed study's two-step ranking: ALS recommendations voted with retrieval order."""
        if not isinstance(recommend, RankingCall):
            return self._degrade(response, candidates, k, *recommend)
        try:
            recommended = await recommend.result()
        except grpc.aio.AioRpcError as exc:
            return await self._ranking_failed(context, exc, recommend, response, candidates, k)
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
    """Create, load and start the gateway; returns it once it is SERVING.

    Raises
    ------
    SecurityConfigError
        When it would bind a non-loopback address with neither tokens nor client
        certificates and ``config.insecure_public`` is not set, or a security file is bad.
    """
    refuse_open_public_door(
        "gateway",
        config.host,
        config.auth_tokens_file,
        config.tls_client_ca,
        config.insecure_public,
    )

    location = config.conversion_store()
    store = BackgroundStore(lambda: open_store(**location), name="conversions-writer")

    def add(server, holder):
        search = SearchServicer(config, holder)
        pb_grpc.add_SearchServiceServicer_to_server(search, server)
        catalog = CatalogServicer(
            store,
            holder,
            search.retrieval.channels,
            poll_s=config.catalog_poll_ms / 1000,
            enabled=config.live_catalogue,
        )
        feedback = FeedbackServicer(
            store, holder, catch_up=catalog.catch_up if config.live_catalogue else None
        )
        feedback_grpc.add_FeedbackServiceServicer_to_server(feedback, server)
        catalog_grpc.add_CatalogServiceServicer_to_server(catalog, server)
        return [search, feedback, catalog]

    logger.info(
        "gateway downstreams",
        extra={"retrieval": config.retrieval_addr, "ranking": config.ranking_addr},
    )
    problem = await store.try_open(STORE_OPEN_TIMEOUT_S)
    if problem:
        # Searches do not need the store: serve them, and let LogConversions say UNAVAILABLE.
        logger.warning("conversion store not open yet", extra={"problem": problem})
    else:
        logger.info("conversion store open", extra={"store": store.location})
    names = [SERVICE_NAME, FEEDBACK_SERVICE_NAME, CATALOG_SERVICE_NAME]
    return await start_service("gateway", config, names, load_gateway_state, add)
