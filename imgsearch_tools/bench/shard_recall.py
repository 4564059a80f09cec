"""CLIP recall@k against exact search of a set's served vector index, whole and split in shards.

An approximate index (HNSW, IVF) over every photo and the same index built per shard do not
return the same photos, so the shards' answers are measured, not compared to the bit: each query
is embedded once, as the retrieval server embeds it (the stored keyword table, else the set's
text runtime), searched by the server's own :class:`~retrieval_service.semantic.ClipRetriever`
over the whole index and over each shard's (merged as the gateway merges shards,
:func:`~imgsearch.fusion.merge_shards`), and both top ``k`` are scored against an exact
inner-product search over the set's embeddings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

UNSEEN_QUERIES = 300


def exact_top(exact, row_photo_idx: np.ndarray, embedding: np.ndarray, k: int) -> set[int]:
    """The photos of the exact top ``k`` (equal scores in photo order, as the retrievers cut)."""
    from retrieval_service.semantic import TIE_MARGIN

    scores, rows = exact.search(embedding[None, :], k + TIE_MARGIN)
    found = rows[0] >= 0
    photo_idx, scores = row_photo_idx[rows[0][found]], scores[0][found]
    return set(photo_idx[np.lexsort((photo_idx, -scores))[:k]].tolist())


def clip_retrievers(set_dir: Path, vector_index: Path | None = None):
    """The set's ClipRetriever over its whole index, or over the index at ``vector_index``."""
    from retrieval_service.semantic import load_clip_retrievers

    found = load_clip_retrievers(set_dir, None, threads=None, vector_index=vector_index)
    if not found:
        raise ValueError(f"artifact set {set_dir} holds no CLIP index (built without images)")
    return found["clip"]


def sharded_recall(artifact_set, queries: dict[str, list[str]], k: int = 10) -> dict:
    """recall@``k`` against exact search of the set's whole CLIP index and of its shards.

    Parameters
    ----------
    artifact_set:
        A resolved set (:func:`imgsearch.artifacts.resolve`) with CLIP; sharded or not.
    queries:
        Query texts by family (``{"keyword": [...], "unseen": [...]}``).
    k:
        Cut-off.

    Returns
    -------
    dict
        ``k``, ``queries`` (per family), ``whole`` and, when the set is sharded, ``shards``:
        each ``{"recall": lowest family's, "by_family": {...}, "params": ...}`` (and
        ``params_by_query`` where query classes search with efforts of their own);
        ``seconds``.
    """
    from imgsearch.artifacts import EMBEDDINGS, VECTOR_INDEX
    from imgsearch.fusion import merge_shards
    from retrieval_service.embedding import load_embeddings
    from retrieval_service.sharding import read_layout, shard_dir
    from retrieval_service.vector_index import exact_index

    started = time.perf_counter()
    set_dir = Path(artifact_set.path)
    whole = clip_retrievers(set_dir)
    layout = read_layout(set_dir)
    shards = [
        clip_retrievers(set_dir, shard_dir(set_dir, shard) / VECTOR_INDEX)
        for shard in range(int(layout["count"]) if layout else 0)
    ]
    row_photo_idx, embeddings = load_embeddings(set_dir / EMBEDDINGS)
    exact = exact_index(embeddings)
    hits: dict[str, dict[str, int]] = {"whole": {}, "shards": {}}
    for family, texts in queries.items():
        hits["whole"][family] = hits["shards"][family] = 0
        for text in texts:
            embedding = whole.embed_query(text)
            truth = exact_top(exact, row_photo_idx, embedding, k)
            found = whole.retrieve(text, k, query_embedding=embedding)
            hits["whole"][family] += len(truth & set(found.photo_idx.tolist()))
            if shards:
                answers = [s.retrieve(text, k, query_embedding=embedding) for s in shards]
                merged = merge_shards(answers, k)
                hits["shards"][family] += len(truth & set(merged.photo_idx.tolist()))

    def figures(layout_hits: dict[str, int], index) -> dict:
        by_family = {
            family: round(n / max(1, k * len(queries[family])), 4)
            for family, n in layout_hits.items()
            if queries[family]
        }
        recall = min(by_family.values(), default=None)
        by_query = {"params_by_query": index.params_by_query} if index.params_by_query else {}
        return {"recall": recall, "by_family": by_family, "params": index.params, **by_query}

    record = {
        "k": k,
        "queries": {family: len(texts) for family, texts in queries.items()},
        "whole": {
            "factory": whole.vector_index.factory,
            "photos": whole.vector_index.ntotal,
            **figures(hits["whole"], whole.vector_index),
        },
    }
    if shards:
        record["shards"] = {
            "count": len(shards),
            "photos": [s.vector_index.ntotal for s in shards],
            **figures(hits["shards"], shards[0].vector_index),
        }
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def recall_queries(artifact_set, unseen: int = UNSEEN_QUERIES) -> dict[str, list[str]]:
    """Every catalogue keyword, and ``unseen`` multi-word queries (those bench-shards checks)."""
    from imgsearch_tools.bench.shards import check_queries

    texts = check_queries(artifact_set, unseen)
    keywords = len(texts) - unseen
    return {"keyword": texts[:keywords], "unseen": texts[keywords:]}


def format_recall(record: dict) -> str:
    """The figures as lines of text."""

    def line(name: str, figures: dict) -> str:
        families = ", ".join(f"{f} {r:.4f}" for f, r in figures["by_family"].items())
        return f"  {name}: recall@{record['k']} {figures['recall']:.4f} ({families})"

    whole = record["whole"]
    lines = [
        f"{whole['factory']} over {whole['photos']:,} photos, {whole['params']}"
        + (f" (by query class {whole['params_by_query']})" if "params_by_query" in whole else "")
        + f"; queries "
        f"{record['queries']}, against exact search:",
        line("whole index", whole),
    ]
    if "shards" in record:
        shards = record["shards"]
        lines.append(line(f"{shards['count']} shards {shards['photos']}, merged", shards))
    return "\n".join(lines)
