"""INT8 dynamic quantization of the CLIP text encoder, accepted only through a measured gate."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_COSINE = 0.99
MIN_TOP10_OVERLAP = 0.9
# INT8 must be clearly faster to be worth its accuracy cost, and a margin keeps timing noise from
# flipping the verdict between builds: the tiny CLIP sits near parity (0.57-0.94 ms INT8 vs
# 0.61-0.86 ms FP32 across runs here), ViT-B-32 gains x1.7 on one thread.
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
class GateResult:
    """The INT8 gate's figures and verdict.

    Attributes
    ----------
    accepted:
        True when INT8 is accurate enough and faster: serve INT8; otherwise keep FP32.
    mean_cosine:
        Mean cosine between FP32 and INT8 embeddings of the vocabulary's queries.
    top10_overlap:
        Mean share of the FP32 top 10 images also in the INT8 top 10, per query.
    fp32_ms, int8_ms:
        Median per-query text-encoding latency (one query per call).
    speedup:
        ``fp32_ms / int8_ms``.
    queries:
        Vocabulary size used for the accuracy figures.
    reason:
        Why it was accepted or rejected, in words.
    """

    accepted: bool
    mean_cosine: float
    top10_overlap: float
    fp32_ms: float
    int8_ms: float
    speedup: float
    queries: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the build's output."""
        verdict = "INT8 accepted" if self.accepted else "INT8 rejected, serving FP32"
        return (
            f"{verdict}: cosine {self.mean_cosine:.4f}, top-10 overlap {self.top10_overlap:.3f} "
            f"over {self.queries} queries; text encode {self.fp32_ms:.2f} ms FP32 vs "
            f"{self.int8_ms:.2f} ms INT8 (x{self.speedup:.2f}) — {self.reason}"
        )


def _per_query_ms(bundles: list[Any], queries: list[str], rounds: int) -> list[float]:
    """Median latency of encoding one query at a time, runs of each bundle interleaved."""
    times: list[list[float]] = [[] for _ in bundles]
    for bundle in bundles:
        bundle.encode_text(queries[:2])  # warm-up: first calls allocate
    for _ in range(rounds):
        for query in queries:
            for i, bundle in enumerate(bundles):
                start = time.perf_counter()
                bundle.encode_text([query])
                times[i].append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


def int8_gate(
    bundle: Any,
    vocabulary: list[str],
    image_embeddings: np.ndarray,
    int8_bundle: Any | None = None,
    min_cosine: float = MIN_COSINE,
    min_overlap: float = MIN_TOP10_OVERLAP,
    min_speedup: float = MIN_SPEEDUP,
    timing_queries: int = 64,
    timing_rounds: int = 3,
    threads: int | None = 1,
) -> GateResult:
    """Compare the INT8 text encoder with FP32 over the catalogue's keyword vocabulary.

    Parameters
    ----------
    bundle:
        The FP32 :class:`~retrieval_service.clip_model.ClipBundle`.
    vocabulary:
        Queries to compare on (the catalogue's keywords).
    image_embeddings:
        ``(n, d)`` L2-normalised image embeddings for the top-10 overlap (exact search).
    int8_bundle:
        The INT8 bundle; made with :func:`quantize_text_encoder` when omitted.
    min_cosine, min_overlap, min_speedup:
        The gate: accepted only when all three hold.
    timing_queries, timing_rounds:
        How many vocabulary queries are timed, and how often each.
    threads:
        Torch intra-op threads while timing (serving uses 1; None keeps the current setting).

    Returns
    -------
    GateResult
    """
    import torch

    if int8_bundle is None:
        int8_bundle = bundle.with_model(quantize_text_encoder(bundle.model))
    vocabulary = list(dict.fromkeys(str(v) for v in vocabulary))
    if not vocabulary:
        raise ValueError("the INT8 gate needs a non-empty vocabulary")
    fp32 = bundle.encode_text(vocabulary)
    int8 = int8_bundle.encode_text(vocabulary)
    cosine = float(np.mean(np.sum(fp32 * int8, axis=1)))  # both sides L2-normalised
    images = np.asarray(image_embeddings, dtype=np.float32)
    k = min(10, len(images))
    if k:
        top_fp32 = np.argsort(-(fp32 @ images.T), axis=1, kind="stable")[:, :k]
        top_int8 = np.argsort(-(int8 @ images.T), axis=1, kind="stable")[:, :k]
        overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_fp32, top_int8)]))
    else:
        overlap = 1.0
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        step = max(1, len(vocabulary) // timing_queries)
        timed = vocabulary[::step][:timing_queries]
        fp32_ms, int8_ms = _per_query_ms([bundle, int8_bundle], timed, timing_rounds)
    finally:
        torch.set_num_threads(previous)
    speedup = fp32_ms / int8_ms if int8_ms > 0 else 0.0
    failures = []
    if cosine < min_cosine:
        failures.append(f"cosine {cosine:.4f} < {min_cosine}")
    if overlap < min_overlap:
        failures.append(f"top-10 overlap {overlap:.3f} < {min_overlap}")
    if speedup < min_speedup:
        failures.append(f"speed-up x{speedup:.2f} < x{min_speedup}")
    reason = "; ".join(failures) if failures else "accurate and faster"
    return GateResult(
        accepted=not failures,
        mean_cosine=round(cosine, 5),
        top10_overlap=round(overlap, 4),
        fp32_ms=round(fp32_ms, 3),
        int8_ms=round(int8_ms, 3),
        speedup=round(speedup, 3),
        queries=len(vocabulary),
        reason=reason,
    )
