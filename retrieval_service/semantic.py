"""CLIP and hybrid (keyword + CLIP) retrievers, and loading them from an artifact set."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.catalogue import normalise_keyword
from imgsearch.fusion import FusionSpec, fuse, source_depth
from retrieval_service.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, MicroBatcher
from retrieval_service.filtered_search import search_allowed
from retrieval_service.retrievers import RetrievalResult, Retriever
from retrieval_service.vector_index import query_class

SERVING_THREADS = 1
# Extra neighbours a CLIP search fetches so that ties at the cut are broken in photo order.
TIE_MARGIN = 8
logger = logging.getLogger("imgsearch.retrieval")


def set_serving_threads(threads: int = SERVING_THREADS) -> None:
    """Set torch's intra-op and FAISS's OpenMP threads for serving.

    One thread each: a served query is one short forward pass (~1 ms for the tiny CLIP, ~70 ms
    for ViT-B-32 on one core) and one search, and concurrent requests already keep the cores
    busy. Intra-op threads would only add synchronisation and oversubscribe the cores shared
    with gRPC (FIGURES.md: ViT-B-32 text is 46 ms on 2 threads vs 71 ms on 1, so a single query
    gains 35% while throughput under load loses). Scale with processes instead. Note that torch's
    setting is process-wide.
    """
    import torch

    from retrieval_service.vector_index import set_search_threads

    torch.set_num_threads(max(1, int(threads)))
    set_search_threads(threads)


class KnownQueries:
    """Query embeddings computed at build time for the catalogue's keywords.

    A query equal to a known keyword (after normalisation) is answered from here without
    running the text encoder. Saved as ``.npz`` (``keywords`` as a unicode array,
    ``embeddings`` float32), loaded with ``allow_pickle=False``.

    Parameters
    ----------
    keywords:
        Normalised keywords, one per row.
    embeddings:
        ``(len(keywords), d)`` L2-normalised float32.
    """

    def __init__(self, keywords: list[str], embeddings: np.ndarray):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if len(keywords) != len(embeddings):
            raise ValueError(f"{len(keywords)} keywords but {len(embeddings)} embeddings")
        embeddings.setflags(write=False)
        self.keywords = list(keywords)
        self.embeddings = embeddings
        self._row = {keyword: i for i, keyword in enumerate(self.keywords)}

    def __len__(self) -> int:
        return len(self.keywords)

    def get(self, query: str) -> np.ndarray | None:
        """The stored embedding of ``query`` (a read-only row), None when it is not known."""
        row = self._row.get(query)
        return None if row is None else self.embeddings[row]

    def save(self, path: str | Path) -> None:
        """Write the table as ``.npz`` (no pickle)."""
        np.savez(path, keywords=np.array(self.keywords, dtype=np.str_), embeddings=self.embeddings)

    @classmethod
    def load(cls, path: str | Path) -> KnownQueries:
        """Read a table written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            return cls(data["keywords"].tolist(), data["embeddings"])


class ClipRetriever(Retriever):
    """Text-to-image retrieval: CLIP text embedding, then FAISS inner-product search.

    A query's embedding comes, in order, from the known-keyword table (computed at build), an
    LRU of recent queries, or the text encoder. Served queries that miss both go through a
    :class:`~retrieval_service.batching.MicroBatcher` (:meth:`embed_query_async`), so
    concurrent misses share one forward pass.

    Parameters
    ----------
    text_encoder:
        Anything with ``encode_text(list[str]) -> ndarray`` of L2-normalised rows (a
        :class:`~retrieval_service.text_encoder.TextEncoder`, or a
        :class:`~retrieval_service.clip_model.ClipBundle`).
    vector_index:
        A :class:`~retrieval_service.vector_index.VectorIndex`, or a bare FAISS index together
        with ``row_to_photo_idx``.
    row_to_photo_idx:
        ``photo_idx`` per FAISS row; needed only with a bare FAISS index.
    cache_size:
        Query embeddings kept in an LRU cache (popular queries skip the text encoder).
    known_queries:
        The known-keyword table; None: none.
    max_batch, max_wait_ms:
        The micro-batcher's settings (see :class:`~retrieval_service.batching.MicroBatcher`).
    """

    name = "clip"

    def __init__(
        self,
        text_encoder: Any,
        vector_index: Any,
        row_to_photo_idx: np.ndarray | None = None,
        cache_size: int = 4096,
        known_queries: KnownQueries | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ):
        from retrieval_service.vector_index import VectorIndex

        if not isinstance(vector_index, VectorIndex):
            if row_to_photo_idx is None:
                raise ValueError("row_to_photo_idx is required with a bare FAISS index")
            vector_index = VectorIndex(vector_index, np.asarray(row_to_photo_idx, np.int64))
        self.text_encoder = text_encoder
        self.vector_index = vector_index
        self.cache_size = int(cache_size)
        self.known_queries = known_queries
        self.batcher = MicroBatcher(text_encoder.encode_text, max_batch, max_wait_ms)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.known_hits = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def cached_embedding(self, query: str) -> np.ndarray | None:
        """The query's embedding from the known-keyword table or the LRU, None on a miss."""
        if self.known_queries is not None:
            known = self.known_queries.get(query)
            if known is not None:
                self.known_hits += 1
                return known
        with self._lock:
            cached = self._cache.get(query)
            if cached is not None:
                self._cache.move_to_end(query)
                self.cache_hits += 1
            return cached

    def remember(self, query: str, embedding: np.ndarray) -> None:
        """Put a freshly encoded query into the LRU."""
        with self._lock:
            self.cache_misses += 1
            if self.cache_size > 0:
                self._cache[query] = embedding
                self._cache.move_to_end(query)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)

    def embed_query(self, query: str) -> np.ndarray:
        """The query's L2-normalised embedding ``(d,)``, encoded here on a miss."""
        embedding = self.cached_embedding(query)
        if embedding is None:
            embedding = np.asarray(self.batcher.encode_now([query])[0], dtype=np.float32)
            embedding.setflags(write=False)
            self.remember(query, embedding)
        return embedding

    async def embed_query_async(
        self, query: str, deadline: float | None = None, inline: bool = False
    ) -> np.ndarray | None:
        """:meth:`embed_query` for the event loop: a miss waits for the next micro-batch.

        With ``inline``, a miss the batcher would encode alone (a cheap encoder, idle:
        :meth:`~retrieval_service.batching.MicroBatcher.inline`) returns None instead: the
        caller's job off the event loop encodes it (:meth:`embed_query`, as :meth:`retrieve`
        does when given no embedding).

        Raises
        ------
        ~retrieval_service.batching.DeadlineExpired
            When ``deadline`` (``time.monotonic()`` seconds) passed before the query's batch.
        """
        embedding = self.cached_embedding(query)
        if embedding is None:
            if inline and self.batcher.inline():
                return None
            embedding = await self.batcher.submit(query, deadline)
            self.remember(query, embedding)
        return embedding

    def retrieve(
        self,
        query: str,
        candidates_k: int,
        allowed: np.ndarray | None = None,
        query_embedding: np.ndarray | None = None,
    ) -> RetrievalResult:
        """Return up to ``candidates_k`` photos by cosine between query and image embeddings.

        ``allowed`` (bool per ``photo_idx``) restricts the search to those photos inside FAISS
        (:mod:`retrieval_service.filtered_search`). ``query_embedding`` skips encoding when the
        caller already has it (the server).
        """
        query = normalise_keyword(query)
        if not query:
            return RetrievalResult.empty(note="empty query")
        if candidates_k <= 0:
            return RetrievalResult.empty()
        if query_embedding is None:
            query_embedding = self.embed_query(query)
        # A few more than asked: which of several photos with equal scores FAISS keeps at the
        # cut depends on the index's other rows; the sort below then cuts in photo order.
        fetch = candidates_k + TIE_MARGIN
        effort = query_class(query)  # one-word queries may search more of the index
        if allowed is None:
            scores, photo_idx = self.vector_index.search(query_embedding[None, :], fetch, effort)
            found = photo_idx[0] >= 0
            scores, photo_idx = scores[0][found], photo_idx[0][found]
        else:
            scores, photo_idx, _ = search_allowed(
                self.vector_index, query_embedding, fetch, allowed, effort
            )
        # Equal scores in photo order, as every retriever orders its list: a merge of shards
        # then reproduces this list exactly.
        order = np.lexsort((photo_idx, -scores))[:candidates_k]
        scores, photo_idx = scores[order], photo_idx[order]
        return RetrievalResult(photo_idx, scores, {"clip": scores.copy()})


class HybridRetriever(Retriever):
    """Keyword and CLIP candidates fused into one list.

    Parameters
    ----------
    keyword:
        The keyword retriever (its resolved keyword becomes the result's keyword).
    clip:
        The CLIP retriever.
    method:
        ``"rrf"``: reciprocal-rank fusion, score = sum over sources of ``w / (rrf_k + rank)``
        (rank from 1; Cormack et al. 2009), blind to the sources' score scales; ``w`` is the
        source's weight relative to the mean weight (equal weights: the paper's 1).
        ``"weighted"``: ``weights[0] * keyword + weights[1] * clip`` on scores min-max
        normalised per source within this query's candidates; a source that did not find a
        photo contributes 0.
    rrf_k:
        RRF's damping constant (60 in the paper).
    weights:
        (keyword, clip) weights. An artifact set records the ones chosen on its validation
        slice (``fusion`` in the manifest, see :func:`fusion_settings`).
    depth:
        Candidates asked of each source, as a multiple of ``candidates_k``.

    Each candidate carries both sources' scores (NaN where a source did not find it).
    """

    name = "hybrid"
    SOURCES = ("keyword", "clip")

    def __init__(
        self,
        keyword: Retriever,
        clip: Retriever,
        method: str = "rrf",
        rrf_k: int = 60,
        weights: tuple[float, float] = (0.5, 0.5),
        depth: float = 1.0,
    ):
        if method not in ("rrf", "weighted"):
            raise ValueError(f"unknown fusion method {method!r}: use 'rrf' or 'weighted'")
        self.keyword = keyword
        self.clip = clip
        self.method = method
        self.rrf_k = rrf_k
        self.weights = tuple(float(w) for w in weights)
        self.depth = depth

    @property
    def fusion(self) -> FusionSpec:
        """How this retriever fuses (what a caller merging shards fuses with)."""
        return FusionSpec(self.method, self.SOURCES, self.weights, self.rrf_k, self.depth)

    def retrieve(
        self,
        query: str,
        candidates_k: int,
        allowed: np.ndarray | None = None,
        query_embedding: np.ndarray | None = None,
        uncut: bool = False,
    ) -> RetrievalResult:
        """Fuse both sources' candidates; return up to ``candidates_k``, best first.

        ``allowed`` restricts both sources to those photos. ``query_embedding`` is handed to
        the CLIP source (see :meth:`ClipRetriever.retrieve`).
        ``uncut`` returns every candidate of both sources' lists instead (what a shard hands
        to :func:`imgsearch.fusion.merge_shards`).
        """
        query = normalise_keyword(query)
        if not query:
            return RetrievalResult.empty(note="empty query")
        depth = source_depth(candidates_k, self.depth)
        # Unfiltered, the sources are called as any Retriever: with the query and the depth.
        filtered = {} if allowed is None else {"allowed": allowed}
        if query_embedding is not None:
            clip = self.clip.retrieve(query, depth, query_embedding=query_embedding, **filtered)
        else:
            clip = self.clip.retrieve(query, depth, **filtered)
        results = (self.keyword.retrieve(query, depth, **filtered), clip)
        fused = fuse(
            results,
            self.SOURCES,
            None if uncut else candidates_k,
            method=self.method,
            rrf_k=self.rrf_k,
            weights=self.weights,
        )
        fused.keyword = results[0].keyword
        fused.note = "; ".join(f"{n}: {r.note}" for n, r in zip(self.SOURCES, results) if r.note)
        return fused


def clip_source(retriever: Retriever) -> ClipRetriever | None:
    """The CLIP retriever that embeds queries for ``retriever`` (itself, or hybrid's; under the
    live catalogue's wrapper, the set's own), if any."""
    if isinstance(retriever, HybridRetriever):
        retriever = retriever.clip
    retriever = getattr(retriever, "base", retriever)  # a live catalogue's wrapper
    return retriever if isinstance(retriever, ClipRetriever) else None


def load_clip_retrievers(
    set_dir: str | Path,
    keyword_index: Retriever,
    threads: int | None = SERVING_THREADS,
    cache_size: int = 4096,
    known_queries: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    text_runtime: str | None = None,
    vector_index: str | Path | None = None,
) -> dict[str, Retriever]:
    """Load the ``clip`` and ``hybrid`` retrievers of an artifact set.

    Parameters
    ----------
    set_dir:
        The artifact set's folder.
    keyword_index:
        The set's keyword retriever, fused by ``hybrid``.
    threads:
        Torch/FAISS threads for serving (see :func:`set_serving_threads`); None leaves them.
    cache_size:
        Query-embedding LRU cache size.
    known_queries:
        Answer the catalogue's keywords from the table the build stored (False: encode them
        like any query, e.g. to measure the encoder).
    max_batch, max_wait_ms:
        Micro-batching of served queries (see :class:`~retrieval_service.batching.MicroBatcher`).
    text_runtime:
        Overrides the text runtime the build chose (``torch-fp32``, ``torch-int8``,
        ``onnx-fp32``, ``onnx-int8``).
    vector_index:
        A shard's vector index (its row map stored beside it) to search instead of the set's.

    Returns
    -------
    dict
        ``{"clip": ClipRetriever, "hybrid": HybridRetriever}``, or ``{}`` when the set holds
        no CLIP artifacts (built without images).
    """
    from imgsearch.artifacts import CLIP_DIR, EMBEDDINGS, VECTOR_INDEX
    from retrieval_service.clip_model import KEYWORD_EMBEDDINGS, ClipSpec, load_clip
    from retrieval_service.embedding import load_embeddings
    from retrieval_service.text_encoder import load_text_encoder
    from retrieval_service.vector_index import VectorIndex

    set_dir = Path(set_dir)
    clip_dir = set_dir / CLIP_DIR
    needed = [clip_dir / "clip.json", set_dir / EMBEDDINGS, set_dir / VECTOR_INDEX]
    if not all(p.exists() for p in needed):
        return {}
    if threads:
        set_serving_threads(threads)
    bundle = load_clip(ClipSpec.from_dir(clip_dir))
    text_encoder, note = load_text_encoder(clip_dir, bundle, text_runtime)
    if note:
        logger.warning("text encoder: %s", note)
    table = clip_dir / KEYWORD_EMBEDDINGS
    known = KnownQueries.load(table) if known_queries and table.exists() else None
    if vector_index is None:
        photo_idx, _ = load_embeddings(set_dir / EMBEDDINGS)
        index = VectorIndex.load(set_dir / VECTOR_INDEX, row_to_photo_idx=photo_idx)
    else:
        index = VectorIndex.load(vector_index)
    clip = ClipRetriever(
        text_encoder,
        index,
        cache_size=cache_size,
        known_queries=known,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    return {
        "clip": clip,
        "hybrid": HybridRetriever(keyword_index, clip, **fusion_settings(set_dir)),
    }


def fusion_label(method: str, weights) -> str:
    """A short name for a fusion setting, e.g. ``rrf keyword 0.30 / clip 0.70``."""
    keyword, clip = (float(w) for w in weights)
    return f"{method} keyword {keyword:.2f} / clip {clip:.2f}"


def fusion_settings(set_dir: str | Path) -> dict:
    """Hybrid's fusion as the set's manifest records it (``method``, ``weights``), or ``{}``.

    Sets built before fusion weights were chosen on validation record none: hybrid then fuses
    with equal weights.
    """
    from imgsearch.artifacts import MANIFEST

    path = Path(set_dir) / MANIFEST
    fusion = json.loads(path.read_text()).get("fusion", {}) if path.exists() else {}
    if "weights" not in fusion:
        return {}
    return {"method": fusion.get("method", "rrf"), "weights": tuple(fusion["weights"])}


def read_vector_meta(set_dir: str | Path) -> dict:
    """The set's ``vector.json`` (factory, size, parameters), ``{}`` when absent."""
    from imgsearch.artifacts import VECTOR_INDEX

    sidecar = (Path(set_dir) / VECTOR_INDEX).with_suffix(".json")
    return json.loads(sidecar.read_text()) if sidecar.exists() else {}
