"""The CLIP components' benchmark (``imgsearch bench-clip``): text encoding FP32 vs INT8,
exact vs ANN vector search with recall, and image embedding throughput."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def index_figures(
    embeddings: np.ndarray,
    factory: str | None,
    n_queries: int = 200,
    k: int = 10,
    ef_search: int = 128,
    nprobe: int = 16,
    search_k: int = 100,
    seed: int = 0,
) -> dict:
    """Build an index, and measure its recall@k against exact search and both latencies.

    Queries are embeddings sampled from the set, searched one per call on one thread.
    """
    from retrieval_service.vector_index import (
        VectorIndex,
        exact_index,
        recall_at_k,
        set_search_threads,
        time_search,
    )

    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    vector_index = VectorIndex.build(
        embeddings, factory=factory, ef_search=ef_search, nprobe=nprobe
    )
    build_s = time.perf_counter() - started
    exact = exact_index(embeddings)
    queries = embeddings[rng.choice(len(embeddings), min(n_queries, len(embeddings)), False)]
    set_search_threads(1)
    recall = recall_at_k(vector_index, exact, queries, k=k)
    return {
        "factory": vector_index.factory,
        "ntotal": vector_index.ntotal,
        "dim": vector_index.dim,
        "params": vector_index.params,
        "build_s": round(build_s, 3),
        f"recall@{k}": round(recall, 4),
        "queries": len(queries),
        "exact": time_search(exact, queries, search_k),
        "index": time_search(vector_index, queries, search_k),
    }


def _percentiles(times_ms: list[float]) -> dict:
    values = np.asarray(times_ms)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
    }


def _synthetic_clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """L2-normalised vectors around random centres: closer to real embeddings than uniform."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        labels = rng.integers(0, clusters, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = centres[labels] + 0.6 * noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def bench_clip(
    clip_dir: str | None = None,
    embeddings_path: str | None = None,
    demo_n: int = 5000,
    synthetic_n: int = 1_000_000,
    synthetic_dim: int = 128,
    factory: str = "HNSW32",
    n_queries: int = 200,
    k: int = 100,
    threads: int = 1,
) -> dict:
    """Measure text encoding (FP32 vs INT8), vector search (exact vs ANN) and image embedding.

    Returns
    -------
    dict
        ``text_encode`` (fp32/int8 p50/p99), ``search`` (per size: exact and ANN p50/p99,
        recall@10, build seconds), ``embedding`` (images/s at batch 64).
    """
    from PIL import Image

    from imgsearch.cpu import torch_threads
    from retrieval_service.clip_model import ClipSpec, load_clip
    from retrieval_service.quantization import quantize_text_encoder
    from retrieval_service.semantic import set_serving_threads

    set_serving_threads(threads)
    spec = ClipSpec(pretrained=clip_dir) if clip_dir else ClipSpec()
    bundle = load_clip(spec)
    int8 = bundle.with_model(quantize_text_encoder(bundle.model))
    words = ["red", "circle", "night", "blue square", "a green star in the snow", "beach"]
    texts = [f"{a} {b}" for a in words for b in words][:n_queries]
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for b in (bundle, int8):
        b.encode_text(texts[:4])
    for text in texts:
        for name, b in (("fp32", bundle), ("int8", int8)):
            start = time.perf_counter()
            b.encode_text([text])
            times[name].append((time.perf_counter() - start) * 1000)
    figures: dict = {
        "model": bundle.spec.describe(),
        "threads": threads,
        "k": k,
        "text_encode": {name: _percentiles(t) for name, t in times.items()},
    }

    if embeddings_path:
        from retrieval_service.embedding import load_embeddings

        _, demo = load_embeddings(embeddings_path)
        demo_label = f"{len(demo):,} x {demo.shape[1]} ({Path(embeddings_path).name})"
    else:
        demo = _synthetic_clustered(demo_n, bundle.embed_dim, seed=1)
        demo_label = f"{demo_n:,} x {bundle.embed_dim} (synthetic)"
    sizes = [(demo_label, demo)]
    if synthetic_n > 0:
        sizes.append(
            (
                f"{synthetic_n:,} x {synthetic_dim} (synthetic)",
                _synthetic_clustered(synthetic_n, synthetic_dim, seed=2),
            )
        )
    figures["search"] = []
    for label, vectors in sizes:
        row = index_figures(vectors, factory, n_queries=n_queries, k=10, search_k=k)
        figures["search"].append({"label": label, **row})
        del vectors

    # Embedding is an offline batch job: it gets the idle cores, unlike the serving path above.
    size = bundle.image_size
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(256)
    ]
    with torch_threads(None) as embed_threads:
        bundle.encode_images(images[:64])
        start = time.perf_counter()
        bundle.encode_images(images, batch_size=64)
        seconds = time.perf_counter() - start
    figures["embedding"] = {
        "images_per_s": round(len(images) / seconds, 1),
        "batch_size": 64,
        "image_size": size,
        "torch_threads": embed_threads,
    }
    return figures


def format_bench(figures: dict) -> str:
    """The benchmark as a plain-text table."""
    lines = [
        f"model {figures['model']}, {figures['threads']} thread(s)",
        f"{'what':<56} {'p50 ms':>9} {'p99 ms':>9}  notes",
    ]
    for name, row in figures["text_encode"].items():
        lines.append(
            f"{'text encode, one query, ' + name.upper():<56} {row['p50_ms']:>9.3f} "
            f"{row['p99_ms']:>9.3f}"
        )
    for row in figures["search"]:
        lines.append(
            f"{'search exact, ' + row['label']:<56} {row['exact']['p50_ms']:>9.3f} "
            f"{row['exact']['p99_ms']:>9.3f}  k={figures['k']}"
        )
        lines.append(
            f"{'search ' + row['factory'] + ', ' + row['label']:<56} "
            f"{row['index']['p50_ms']:>9.3f} {row['index']['p99_ms']:>9.3f}  "
            f"recall@10 {row['recall@10']:.3f}, build {row['build_s']:.1f} s, {row['params']}"
        )
    emb = figures["embedding"]
    lines.append(
        f"{'image embedding, batch ' + str(emb['batch_size']):<56} "
        f"{emb['images_per_s']:>9.1f} images/s at {emb['image_size']} px, "
        f"{emb['torch_threads']} thread(s), preprocessing included"
    )
    return "\n".join(lines)
