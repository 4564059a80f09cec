"""CLIP and hybrid (keyword + CLIP) retrievers, and loading them from an artifact set."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.catalogue import normalise_keyword
from retrieval_service.retrievers import RetrievalResult, Retriever

SERVING_THREADS = 1


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


class ClipRetriever(Retriever):
    """Text-to-image retrieval: CLIP text embedding, then FAISS inner-product search.

    Parameters
    ----------
    text_encoder:
        Anything with ``encode_text(list[str]) -> ndarray`` of L2-normalised rows (a
        :class:`~retrieval_service.clip_model.ClipBundle`, FP32 or INT8).
    vector_index:
        A :class:`~retrieval_service.vector_index.VectorIndex`, or a bare FAISS index together
        with ``row_to_photo_idx``.
    row_to_photo_idx:
        ``photo_idx`` per FAISS row; needed only with a bare FAISS index.
    cache_size:
        Query embeddings kept in an LRU cache (popular queries skip the text encoder).
    """

    name = "clip"

    def __init__(
        self,
        text_encoder: Any,
        vector_index: Any,
        row_to_photo_idx: np.ndarray | None = None,
        cache_size: int = 4096,
    ):
        from retrieval_service.vector_index import VectorIndex

        if not isinstance(vector_index, VectorIndex):
            if row_to_photo_idx is None:
                raise ValueError("row_to_photo_idx is required with a bare FAISS index")
            vector_index = VectorIndex(vector_index, np.asarray(row_to_photo_idx, np.int64))
        self.text_encoder = text_encoder
        self.vector_index = vector_index
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def embed_query(self, query: str) -> np.ndarray:
        """The query's L2-normalised embedding ``(d,)``, from the LRU cache when present."""
        with self._lock:
            cached = self._cache.get(query)
            if cached is not None:
                self._cache.move_to_end(query)
                self.cache_hits += 1
                return cached
        embedding = np.asarray(self.text_encoder.encode_text([query])[0], dtype=np.float32)
        embedding.setflags(write=False)
        with self._lock:
            self.cache_misses += 1
            if self.cache_size > 0:
                self._cache[query] = embedding
                self._cache.move_to_end(query)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return embedding

    def retrieve(self, query: str, candidates_k: int) -> RetrievalResult:
        """Return up to ``candidates_k`` photos by cosine between query and image embeddings."""
        query = normalise_keyword(query)
        if not query:
            return RetrievalResult.empty(note="empty query")
        if candidates_k <= 0:
            return RetrievalResult.empty()
        scores, photo_idx = self.vector_index.search(self.embed_query(query)[None, :], candidates_k)
        found = photo_idx[0] >= 0
        scores, photo_idx = scores[0][found], photo_idx[0][found]
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

    def retrieve(self, query: str, candidates_k: int) -> RetrievalResult:
        """Fuse both sources' candidates; return up to ``candidates_k``, best first."""
        query = normalise_keyword(query)
        if not query:
            return RetrievalResult.empty(note="empty query")
        depth = max(candidates_k, int(math.ceil(candidates_k * self.depth)))
        results = (self.keyword.retrieve(query, depth), self.clip.retrieve(query, depth))
        fused = fuse(
            results,
            self.SOURCES,
            candidates_k,
            method=self.method,
            rrf_k=self.rrf_k,
            weights=self.weights,
        )
        fused.keyword = results[0].keyword
        fused.note = "; ".join(f"{n}: {r.note}" for n, r in zip(self.SOURCES, results) if r.note)
        return fused


def _minmax(scores: np.ndarray) -> np.ndarray:
    if len(scores) == 0:
        return scores.astype(np.float64)
    low, high = float(scores.min()), float(scores.max())
    if high - low <= 1e-12:
        return np.ones(len(scores))
    return (scores.astype(np.float64) - low) / (high - low)


def fuse(
    results: tuple[RetrievalResult, ...] | list[RetrievalResult],
    names: tuple[str, ...],
    candidates_k: int,
    method: str = "rrf",
    rrf_k: int = 60,
    weights: tuple[float, ...] | None = None,
) -> RetrievalResult:
    """Fuse ranked lists (see :class:`HybridRetriever` for the methods).

    Ties are broken by ``photo_idx`` so the order is deterministic. ``source_scores[name]``
    holds each source's own score for every fused candidate, NaN where it did not find it.
    """
    weights = weights or tuple(1.0 for _ in names)
    mean_weight = sum(weights) / len(weights) if sum(weights) > 0 else 1.0
    union = np.unique(np.concatenate([np.asarray(r.photo_idx, np.int64) for r in results]))
    position = {int(p): i for i, p in enumerate(union.tolist())}
    fused = np.zeros(len(union), np.float64)
    per_source = {}
    for name, result, weight in zip(names, results, weights):
        rows = np.fromiter((position[int(p)] for p in result.photo_idx), np.int64)
        own = np.full(len(union), np.nan, np.float32)
        own[rows] = result.scores
        per_source[name] = own
        if method == "rrf":
            fused[rows] += (weight / mean_weight) / (rrf_k + np.arange(1, len(rows) + 1))
        else:
            fused[rows] += weight * _minmax(np.asarray(result.scores))
    order = np.lexsort((union, -fused))[: max(0, candidates_k)]
    return RetrievalResult(
        union[order],
        fused[order].astype(np.float32),
        {name: scores[order] for name, scores in per_source.items()},
    )


def load_clip_retrievers(
    set_dir: str | Path,
    keyword_index: Retriever,
    threads: int | None = SERVING_THREADS,
    cache_size: int = 4096,
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

    Returns
    -------
    dict
        ``{"clip": ClipRetriever, "hybrid": HybridRetriever}``, or ``{}`` when the set holds
        no CLIP artifacts (built without images).
    """
    from imgsearch.artifacts import CLIP_DIR, EMBEDDINGS, VECTOR_INDEX
    from retrieval_service.clip_model import ClipSpec, load_clip, read_clip_json
    from retrieval_service.embedding import load_embeddings
    from retrieval_service.quantization import quantize_text_encoder
    from retrieval_service.vector_index import VectorIndex

    set_dir = Path(set_dir)
    clip_dir = set_dir / CLIP_DIR
    needed = [clip_dir / "clip.json", set_dir / EMBEDDINGS, set_dir / VECTOR_INDEX]
    if not all(p.exists() for p in needed):
        return {}
    if threads:
        set_serving_threads(threads)
    meta = read_clip_json(clip_dir)
    bundle = load_clip(ClipSpec.from_dir(clip_dir))
    if meta.get("text_encoder") == "int8":
        bundle = bundle.with_model(quantize_text_encoder(bundle.model))
    photo_idx, _ = load_embeddings(set_dir / EMBEDDINGS)
    vector_index = VectorIndex.load(set_dir / VECTOR_INDEX, row_to_photo_idx=photo_idx)
    clip = ClipRetriever(bundle, vector_index, cache_size=cache_size)
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
