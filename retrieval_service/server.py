"""The RetrievalService gRPC server: keyword, CLIP and hybrid retrieval over one artifact set."""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from imgsearch import artifacts
from imgsearch.admission import current_deadline, run_live
from imgsearch.catalogue import normalise_keyword
from imgsearch.config import (
    DEFAULT_CANDIDATES_K,
    MAX_CANDIDATES_K,
    MAX_QUERY_CHARS,
    RetrievalConfig,
)
from imgsearch.filters import FiltersUnsupported, PhotoAttributes, filter_mask
from imgsearch.names import DEFAULT, retriever_name, retriever_value
from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as pb_grpc
from imgsearch.serving import (
    LATENCY,
    InvalidArgument,
    Reloadable,
    Service,
    start_service,
)
from retrieval_service.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS
from retrieval_service.image_worker import ImageEmbedder
from retrieval_service.keyword_index import KeywordIndex
from retrieval_service.live_catalogue import LiveView
from retrieval_service.live_tail import LogReplay, LogTailer, live_retrievers
from retrieval_service.response_cache import ResponseCache
from retrieval_service.retrievers import RetrievalResult, Retriever
from retrieval_service.semantic import HybridRetriever, clip_source
from retrieval_service.sharding import check_shard, shard_dir

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name
NAME = "retrieval"
logger = logging.getLogger("imgsearch.retrieval")


@dataclass
class RetrievalState:
    """Everything one artifact set gives retrieval; swapped whole on reload."""

    version: str
    path: Path
    photo_ids: np.ndarray
    retrievers: dict[str, Retriever]
    default_retriever: str
    models: list[str] = field(default_factory=list)
    # The shard of a sharded set this state serves (shard_count 0: the whole catalogue).
    shard: int = 0
    shard_count: int = 0
    # (kind, name, reason) of each default, for AdminService.GetStatus.
    defaults: list[tuple[str, str, str]] = field(default_factory=list)
    # What filters test, per photo; None for a set built before filters (it refuses them).
    attributes: PhotoAttributes | None = None
    # The live catalogue's changes on top of the set (None: served without the log).
    live: LiveView | None = None
    # Whether the set has a CLIP whose image tower embeds the live catalogue's images.
    embeds_images: bool = False
    # Keyword answers already built from this state, by query (filled as they are asked).
    responses: ResponseCache = field(default_factory=ResponseCache)

    def ids(self) -> np.ndarray:
        """Photo ids by ``photo_idx``, the live catalogue's new photos included."""
        return self.photo_ids if self.live is None else self.live.segment.photo_ids

    def filter_attributes(self) -> PhotoAttributes | None:
        """What filters test now: the live catalogue's photos included."""
        if self.live is not None and self.live.segment.attributes is not None:
            return self.live.segment.attributes
        return self.attributes


def load_retrieval_state(
    artifacts_path: str,
    default_retriever: str = "",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    text_runtime: str = "",
    shard: int = -1,
    log_replay: LogReplay | None = None,
) -> RetrievalState:
    """Load the retrievers of the artifact set at ``artifacts_path``.

    ``max_batch`` and ``max_wait_ms`` set the micro-batching of query encodings;
    ``text_runtime`` overrides the text runtime the build chose ("" keeps it); ``shard`` (0 or
    more) serves that shard's keyword and vector indexes instead of the whole set's
    (:mod:`retrieval_service.sharding`); ``log_replay`` applies the live catalogue's log on top
    of the set (:mod:`retrieval_service.live_tail`).
    """
    import pandas as pd

    artifact_set = artifacts.resolve(artifacts_path)
    photos = pd.read_parquet(
        artifact_set.file(artifacts.CATALOGUE_DIR) / "photos.parquet", columns=["photo_id"]
    )
    indexes = artifact_set.path
    shard_count = 0
    if shard >= 0:
        shard_count = int(check_shard(artifact_set.path, shard)["count"])
        indexes = shard_dir(artifact_set.path, shard)
    keyword_index = KeywordIndex.load(indexes / artifacts.KEYWORD_INDEX)
    retrievers: dict[str, Retriever] = {"keyword": keyword_index}
    if artifact_set.has(artifacts.VECTOR_INDEX):
        from retrieval_service.semantic import load_clip_retrievers

        retrievers.update(
            load_clip_retrievers(
                artifact_set.path,
                keyword_index,
                max_batch=max_batch,
                max_wait_ms=max_wait_ms,
                text_runtime=text_runtime or None,
                vector_index=indexes / artifacts.VECTOR_INDEX if shard >= 0 else None,
            )
        )
    if default_retriever and default_retriever not in retrievers:
        raise ValueError(
            f"default retriever {default_retriever!r} is not in the artifact set "
            f"(available: {', '.join(retrievers)})"
        )
    default = default_retriever or recorded_retriever(artifact_set.manifest, retrievers)
    photo_ids = photos["photo_id"].to_numpy(dtype=object)
    attributes = PhotoAttributes.load(
        artifact_set.file(artifacts.CATALOGUE_DIR), artifact_set.manifest
    )
    live = None
    if log_replay is not None:
        retrievers, live = live_retrievers(
            retrievers,
            photo_ids,
            artifact_set.manifest,
            log_replay,
            max(0, shard),
            shard_count,
            attributes,
        )
    return RetrievalState(
        version=artifact_set.version,
        path=artifact_set.path,
        photo_ids=photo_ids,
        retrievers=retrievers,
        default_retriever=default,
        models=list(retrievers),
        shard=max(0, shard),
        shard_count=shard_count,
        defaults=retrieval_defaults(artifact_set.manifest, retrievers, default_retriever),
        attributes=attributes,
        live=live,
        embeds_images="clip" in retrievers,
    )


def recorded_retriever(manifest: dict, retrievers: dict[str, Retriever]) -> str:
    """The retriever the set's validation chose (``default_retriever`` in its manifest).

    A set that records none (built before the choice was made with the ranker) serves hybrid
    when it has CLIP, else keyword.
    """
    recorded = manifest.get("default_retriever")
    if recorded in retrievers:
        return recorded
    return "hybrid" if "hybrid" in retrievers else "keyword"


def retrieval_defaults(
    manifest: dict, retrievers: dict[str, Retriever], setting: str = ""
) -> list[tuple[str, str, str]]:
    """The default retriever and hybrid's fusion, each with why, for ``GetStatus``."""
    recorded = manifest.get("default_retriever")
    if setting:
        chosen = (setting, "set by the server's default-retriever setting")
    elif recorded in retrievers:
        configuration = manifest.get("configuration", {})
        chosen = (recorded, configuration.get("reason", "chosen on the validation slice"))
    elif "hybrid" in retrievers:
        chosen = ("hybrid", "the set has CLIP: keyword and CLIP candidates fused")
    else:
        chosen = ("keyword", "the set has no CLIP (built without images or with --no-clip)")
    defaults = [("retriever", *chosen)]
    hybrid = retrievers.get("hybrid")
    if hybrid is not None:
        from retrieval_service.semantic import fusion_label

        recorded = manifest.get("fusion", {})
        reason = recorded.get("reason") or (
            "the set records no fusion weights chosen on validation (built before they "
            "were): equal weights"
        )
        defaults.append(("fusion", fusion_label(hybrid.method, hybrid.weights), reason))
    return defaults


def validate_query(query: str, field_name: str = "query") -> str:
    """Return the normalised query or raise InvalidArgument naming the field."""
    if len(query) > MAX_QUERY_CHARS * 4:
        raise InvalidArgument(field_name, f"must be at most {MAX_QUERY_CHARS} characters")
    normalised = normalise_keyword(query)
    if not normalised:
        raise InvalidArgument(field_name, "must not be empty")
    if len(normalised) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            field_name, f"must be at most {MAX_QUERY_CHARS} characters, got {len(normalised)}"
        )
    return normalised


def to_response(
    result: RetrievalResult, photo_ids: np.ndarray, indices: bool = False, packed: bool = False
) -> pb.RetrieveResponse:
    """Turn a RetrievalResult into the response's parallel arrays (ids, scores, per source);
    ``indices`` adds the candidates' catalogue indexes, ``packed`` the same as little-endian
    int32 bytes."""
    return pb.RetrieveResponse(
        photo_ids=photo_ids[result.photo_idx].tolist(),
        scores=result.scores.tolist(),
        source_scores=[
            pb.SourceScores(source=name, scores=values.tolist())
            for name, values in result.source_scores.items()
        ],
        keyword=result.keyword,
        note=result.note,
        photo_indices=result.photo_idx.tolist() if indices else (),
        packed_photo_indices=result.photo_idx.astype("<i4").tobytes() if packed else b"",
    )


def given_embedding(request: pb.RetrieveRequest, state: RetrievalState, clip) -> np.ndarray | None:
    """The query embedding another shard computed, when it can stand for this server's own.

    Raises
    ------
    InvalidArgument
        When it is not a finite vector of the index's dimension.
    """
    if not request.query_embedding or request.query_embedding_version != state.version:
        return None
    embedding = np.asarray(request.query_embedding, np.float32)
    dim = clip.vector_index.dim
    if len(embedding) != dim:
        raise InvalidArgument(
            "query_embedding", f"must have {dim} values for this index, got {len(embedding)}"
        )
    if not np.isfinite(embedding).all():
        raise InvalidArgument("query_embedding", "must hold finite numbers only")
    embedding.setflags(write=False)
    return embedding


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    """Serves ``Retrieve`` from the state held by ``holder``."""

    def __init__(self, holder: Reloadable[RetrievalState]):
        self.holder = holder
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="retrieve")
        # Images written to the live catalogue: micro-batched into a child process at a lower
        # priority (retrieval_service.image_worker), waited for on a thread of its own.
        self.embedder = ImageEmbedder()
        self.stage_latency = LATENCY.labels(NAME, "retrieve")

    async def Retrieve(self, request: pb.RetrieveRequest, context) -> pb.RetrieveResponse:
        state = self.holder.state  # one snapshot per request: never mixes two versions
        query = validate_query(request.query)
        candidates_k = request.candidates_k or DEFAULT_CANDIDATES_K
        if not 1 <= candidates_k <= MAX_CANDIDATES_K:
            raise InvalidArgument(
                "candidates_k", f"must be between 1 and {MAX_CANDIDATES_K}, got {candidates_k}"
            )
        name = retriever_name(request.retriever)
        if name is None:
            raise InvalidArgument("retriever", f"unknown value {request.retriever}")
        if name == DEFAULT:
            name = state.default_retriever
        retriever = state.retrievers.get(name)
        if retriever is None:
            raise InvalidArgument(
                "retriever",
                f"{name!r} is not available in artifact set {state.version} "
                f"(available: {', '.join(state.retrievers)})",
            )
        try:
            allowed = filter_mask(state.filter_attributes(), request.filter, state.version)
        except FiltersUnsupported as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        filtered = {} if allowed is None else {"allowed": allowed}
        start = time.perf_counter()
        clip = clip_source(retriever)
        # Work queued inside this stage is dropped unrun once the caller's deadline has passed
        # (DeadlineExpired becomes DEADLINE_EXCEEDED in the interceptor).
        deadline = current_deadline()
        # A keyword index's answer depends on the query, candidates_k and this state alone,
        # unless a filter or the live catalogue takes part: those are stored once built.
        cacheable = type(retriever) is KeywordIndex and allowed is None and state.live is None
        packed = request.return_packed_photo_indices
        key = (name, query, candidates_k, request.source_lists, packed)
        stored = state.responses.get(key) if cacheable else None
        if stored is not None:
            response = pb.RetrieveResponse.FromString(stored)
        elif clip is not None:
            # A query the caches miss waits for the next micro-batch of the text encoder (unless
            # the gateway passed the vector another shard encoded). The search (and, for hybrid,
            # the keyword side) then runs off the event loop.
            embedding = given_embedding(request, state, clip)
            if embedding is None:
                # None: a cheap encoder, idle, leaves the encoding to the search's job below.
                inline = not request.return_query_embedding
                embedding = await clip.embed_query_async(query, deadline, inline=inline)
            hybrid = isinstance(retriever, HybridRetriever)
            uncut = {"uncut": True} if request.source_lists and hybrid else {}
            retrieve = functools.partial(
                retriever.retrieve,
                query,
                candidates_k,
                query_embedding=embedding,
                **uncut,
                **filtered,
            )
            result = await run_live(self.executor, retrieve, deadline=deadline, service=NAME)
        elif retriever.cheap(query):
            result = retriever.retrieve(query, candidates_k, **filtered)
        else:
            # The keyword index's token fallback: off the event loop.
            result = await run_live(
                self.executor,
                functools.partial(retriever.retrieve, query, candidates_k, **filtered),
                deadline=deadline,
                service=NAME,
            )
        if stored is None:
            response = to_response(result, state.ids(), request.source_lists, packed)
            if cacheable:
                state.responses.put(key, response.SerializeToString())
        if clip is not None and request.return_query_embedding:
            response.query_embedding.extend(embedding.tolist())
        if request.source_lists and clip is not None and hybrid:
            fusion = retriever.fusion
            response.fusion.CopyFrom(
                pb.Fusion(
                    method=fusion.method,
                    sources=fusion.sources,
                    weights=fusion.weights,
                    rrf_k=fusion.rrf_k,
                    depth=fusion.depth,
                )
            )
        elapsed = time.perf_counter() - start
        self.stage_latency.observe(elapsed)
        response.retriever = retriever_value(name)
        response.retrieval_ms = elapsed * 1000
        response.artifact_version = state.version
        response.shard = state.shard
        response.shard_count = state.shard_count
        return response

    async def EmbedImages(self, request: pb.EmbedImagesRequest, context) -> pb.EmbedImagesResponse:
        state = self.holder.state
        if not state.embeds_images:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"artifact set {state.version} has no CLIP: images cannot be embedded",
            )
        if not request.images:
            raise InvalidArgument("images", "must not be empty")
        try:
            vectors, fingerprint = await self.embedder.embed_batched(
                state.path, list(request.images), current_deadline()
            )
        except ValueError as exc:
            raise InvalidArgument("images", str(exc)) from exc
        return pb.EmbedImagesResponse(
            values=vectors.ravel().tolist(),
            dim=vectors.shape[1],
            artifact_version=state.version,
            clip_fingerprint=fingerprint,
        )

    async def close(self) -> None:
        self.embedder.close()


async def create_retrieval_server(config: RetrievalConfig) -> Service:
    """Create, load and start a retrieval server; returns it once it is SERVING."""

    def add(server, holder):
        servicer = RetrievalServicer(holder)
        pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
        if log_replay is None:
            return servicer
        if config.image_worker_at_start:
            servicer.embedder.start()  # the image tower's process is ready before the first write
        # The live catalogue: changes committed after the load are applied within a poll.
        log_replay.report = holder.wait_for
        tailer = LogTailer(holder, store, config.catalog_poll_ms / 1000, log_replay)
        tailer.start()
        return [servicer, tailer]

    store = config.conversion_store()
    log_replay = LogReplay(store) if config.live_catalogue else None
    return await start_service(
        NAME,
        config,
        [SERVICE_NAME],
        lambda path: load_retrieval_state(
            path,
            config.default_retriever,
            max_batch=config.encode_batch,
            max_wait_ms=config.encode_wait_ms,
            text_runtime=config.text_runtime,
            shard=config.shard,
            log_replay=log_replay,
        ),
        add,
    )
