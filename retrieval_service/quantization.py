"""The text runtime gate (torch or ONNX Runtime, FP32 or INT8) and torch's INT8 quantization."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_COSINE = 0.99
MIN_TOP10_OVERLAP = 0.9
# Another runtime must be clearly faster than torch FP32 to be worth its accuracy cost or its
# dependency, and a margin keeps timing noise from flipping the verdict between builds: torch
# INT8 on the tiny CLIP sits near parity (0.57-0.94 ms INT8 vs 0.61-0.86 ms FP32 across runs
# here), ViT-B-32 gains x1.7 on one thread.
MIN_SPEEDUP = 1.2


def quantize_text_encoder(model: Any) -> Any:
    """Return a copy of an open_clip model whose text transformer Linears are INT8 dynamic.

    Only ``model.transformer`` (the text tower) is quantized; the image tower is untouched.
    In open_clip's text blocks that reaches the MLP Linears (``c_fc``, ``c_proj``); attention
    uses ``nn.MultiheadAttention``'s own projections, which dynamic quantization skips.

    Each quantized Linear gets ``int8_original_dtype = torch.float32``: open_clip's
    ``get_cast_dtype`` otherwise reads ``mlp.c_fc.weight.dtype`` and fails, because on a
    quantized Linear ``weight`` is a method (issue 4).
    """
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    from torch.ao.quantization import quantize_dynamic

    quantized = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch 2.14 marks the eager quantization API deprecated; it remains the one path that
        # is faster on this CPU without torch.compile (FIGURES.md: torchao is slower there).
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        quantized.transformer = quantize_dynamic(
            quantized.transformer, {torch.nn.Linear}, dtype=torch.qint8
        )
    for module in quantized.transformer.modules():
        if isinstance(module, QuantizedLinear):
            module.int8_original_dtype = torch.float32
    return quantized


def count_quantized_linears(model: Any) -> int:
    """How many INT8 dynamic Linears the model holds."""
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    return sum(isinstance(m, QuantizedLinear) for m in model.modules())


@dataclass
class RuntimeFigures:
    """One text runtime's figures in the gate.

    Attributes
    ----------
    runtime:
        Its name (``torch-fp32``, ``torch-int8``, ``onnx-fp32``, ``onnx-int8``).
    mean_cosine:
        Mean cosine between its embeddings and torch FP32's over the held-out queries.
    top10_overlap:
        Mean share of torch FP32's top 10 images also in its top 10, per query.
    batch1_ms:
        Median time to encode one query alone.
    batch_ms:
        Median time per query when ``batch`` queries are encoded together.
    speedup:
        torch FP32's cost over its cost, the cost being ``batch1_ms + batch_ms``.
    passed:
        Accurate enough and at least ``min_speedup`` faster than torch FP32 (torch FP32
        itself always passes: it is the reference and the fallback).
    reason:
        Why it passed or not, in words.
    """

    runtime: str
    mean_cosine: float
    top10_overlap: float
    batch1_ms: float
    batch_ms: float
    speedup: float = 1.0
    passed: bool = False
    reason: str = ""


@dataclass
class RuntimeChoice:
    """The gate's verdict: which text runtime to serve, and every candidate's figures.

    Attributes
    ----------
    runtime:
        The chosen runtime: the fastest that passed, torch FP32 when none other did.
    candidates:
        Each candidate's :class:`RuntimeFigures`, in the order timed.
    queries:
        Held-out queries the accuracy figures are computed on.
    batch:
        Batch size of the batched timing.
    thresholds:
        ``min_cosine``, ``min_overlap``, ``min_speedup`` applied.
    """

    runtime: str
    candidates: list[RuntimeFigures]
    queries: int
    batch: int
    thresholds: dict

    def as_dict(self) -> dict:
        return asdict(self)

    def figures(self, runtime: str) -> RuntimeFigures:
        """The figures of one candidate."""
        return next(c for c in self.candidates if c.runtime == runtime)

    def summary(self) -> str:
        """A few lines for the build's output."""
        lines = [f"text runtime: {self.runtime} (held-out queries: {self.queries})"]
        for c in self.candidates:
            lines.append(
                f"  {c.runtime:<10} cosine {c.mean_cosine:.4f}  top-10 {c.top10_overlap:.3f}  "
                f"{c.batch1_ms:7.2f} ms alone  {c.batch_ms:7.2f} ms/query at batch {self.batch}"
                f"  x{c.speedup:.2f}  {'pass' if c.passed else 'fail'}: {c.reason}"
            )
        return "\n".join(lines)


def top_k_rows(queries: np.ndarray, images: np.ndarray, k: int, chunk: int = 16) -> np.ndarray:
    """Each query's ``k`` best image rows by inner product, equal scores in row order: what a
    stable full sort gives, without sorting (or holding) every query's scores of every image."""
    top = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ images.T
        for row, query_scores in enumerate(scores):
            # Every image scoring at least the k-th best: the ties at the cut included.
            kth = np.partition(query_scores, len(query_scores) - k)[len(query_scores) - k]
            candidates = np.flatnonzero(query_scores >= kth)
            order = np.argsort(-query_scores[candidates], kind="stable")[:k]
            top[start + row] = candidates[order]
    return top


def _top10_overlap(reference: np.ndarray, other: np.ndarray, images: np.ndarray) -> float:
    k = min(10, len(images))
    if not k:
        return 1.0
    top_ref = top_k_rows(reference, images, k)
    top_other = top_k_rows(other, images, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other)]))


def _interleaved_ms(
    encoders: list[Any], queries: list[str], rounds: int, batch: int
) -> list[tuple[float, float]]:
    """Per encoder: median ms for one query alone, and per query at ``batch``.

    Runs of the encoders are interleaved (and their order rotated each round) so that a burst
    of load from elsewhere on the machine hits them all alike.
    """
    alone: list[list[float]] = [[] for _ in encoders]
    batched: list[list[float]] = [[] for _ in encoders]
    for encoder in encoders:
        encoder.encode_text(queries[:batch])  # warm-up: first calls allocate
    chunks = [queries[i : i + batch] for i in range(0, len(queries), batch)]
    chunks = [c for c in chunks if len(c) == batch] or [queries[:batch]]
    for round_ in range(rounds):
        order = list(range(len(encoders)))
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for query in queries:
            for i in order:
                start = time.perf_counter()
                encoders[i].encode_text([query])
                alone[i].append((time.perf_counter() - start) * 1000)
        for chunk in chunks:
            for i in order:
                start = time.perf_counter()
                encoders[i].encode_text(chunk)
                batched[i].append((time.perf_counter() - start) * 1000 / len(chunk))
    return [(float(np.median(a)), float(np.median(b))) for a, b in zip(alone, batched)]


def select_text_runtime(
    reference: Any,
    candidates: dict[str, Any],
    queries: list[str],
    image_embeddings: np.ndarray,
    min_cosine: float = MIN_COSINE,
    min_overlap: float = MIN_TOP10_OVERLAP,
    min_speedup: float = MIN_SPEEDUP,
    timing_queries: int = 32,
    timing_rounds: int = 3,
    batch: int = 8,
    threads: int | None = 1,
) -> RuntimeChoice:
    """Choose the text runtime to serve: the fastest accurate one, if clearly faster.

    Every candidate is compared with ``reference`` (torch FP32) on held-out queries: mean
    cosine of the embeddings and top-10 overlap of exact search over the image embeddings.
    Then all are timed, interleaved, on one thread as served: one query alone and ``batch``
    queries together. A candidate passes when its cosine is >= ``min_cosine``, its overlap
    >= ``min_overlap`` and it is at least ``min_speedup`` times faster than the reference
    (time alone plus time per query in a batch); the fastest that passes is chosen, else the
    reference.

    Parameters
    ----------
    reference:
        The torch FP32 text encoder (a :class:`~retrieval_service.text_encoder.TextEncoder`).
    candidates:
        Other encoders by runtime name.
    queries:
        Held-out queries (not the stored keywords: those never reach the encoder).
    image_embeddings:
        ``(n, d)`` L2-normalised image embeddings for the top-10 overlap.
    min_cosine, min_overlap, min_speedup:
        The gate.
    timing_queries, timing_rounds, batch:
        How many queries are timed, how often, and the batched timing's batch size.
    threads:
        Torch intra-op threads while timing (serving uses 1; None keeps the current setting).

    Returns
    -------
    RuntimeChoice
    """
    import torch

    queries = list(dict.fromkeys(str(q) for q in queries))
    if not queries:
        raise ValueError("the runtime gate needs held-out queries")
    names = [reference.runtime, *candidates]
    encoders = [reference, *candidates.values()]
    expected = reference.encode_text(queries)
    images = np.asarray(image_embeddings, dtype=np.float32)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        step = max(1, len(queries) // timing_queries)
        timed = queries[::step][:timing_queries]
        timings = _interleaved_ms(encoders, timed, timing_rounds, batch)
    finally:
        torch.set_num_threads(previous)
    base_cost = sum(timings[0])
    figures = []
    for name, encoder, (alone_ms, batch_ms) in zip(names, encoders, timings):
        got = expected if encoder is reference else encoder.encode_text(queries)
        cosine = float(np.mean(np.sum(expected * got, axis=1)))  # both L2-normalised
        overlap = _top10_overlap(expected, got, images)
        cost = alone_ms + batch_ms
        speedup = base_cost / cost if cost > 0 else 0.0
        failures = []
        if encoder is not reference:
            if cosine < min_cosine:
                failures.append(f"cosine {cosine:.4f} < {min_cosine}")
            if overlap < min_overlap:
                failures.append(f"top-10 overlap {overlap:.3f} < {min_overlap}")
            if speedup < min_speedup:
                failures.append(f"speed-up x{speedup:.2f} < x{min_speedup}")
        reason = "; ".join(failures) or (
            "the reference" if encoder is reference else "accurate and faster"
        )
        figures.append(
            RuntimeFigures(
                runtime=name,
                mean_cosine=round(cosine, 5),
                top10_overlap=round(overlap, 4),
                batch1_ms=round(alone_ms, 3),
                batch_ms=round(batch_ms, 3),
                speedup=round(speedup, 3),
                passed=not failures,
                reason=reason,
            )
        )
    passed = [f for f in figures if f.passed]
    chosen = max(passed, key=lambda f: f.speedup).runtime
    return RuntimeChoice(
        runtime=chosen,
        candidates=figures,
        queries=len(queries),
        batch=batch,
        thresholds={
            "min_cosine": min_cosine,
            "min_overlap": min_overlap,
            "min_speedup": min_speedup,
        },
    )
