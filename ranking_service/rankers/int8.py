"""The INT8 gate: DeepFM serves its quantized MLP only when measured as accurate and faster."""

from __future__ import annotations

import time

import numpy as np

from ranking_service.rankers.deepfm import DeepFMRanker
from ranking_service.rankers.validation import ValidationSet


def _ms_per_request(ranker: DeepFMRanker, validation: ValidationSet, n: int) -> float:
    """Median milliseconds of ``ranker.score`` over the first ``n`` validation queries."""
    times = []
    for query in validation.queries[:n]:
        start = time.perf_counter()
        ranker.score(query)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3) if times else 0.0


def int8_gate(
    ranker: DeepFMRanker,
    validation: ValidationSet,
    max_relative_drop: float = 0.01,
    timing_queries: int = 200,
    rounds: int = 3,
    require_speedup: bool = True,
) -> dict:
    """Quantize ``ranker``'s MLP and keep INT8 only if validation NDCG@10 stays close to FP32.

    INT8 is accepted when ``int8_ndcg >= fp32_ndcg * (1 - max_relative_drop)`` and, with
    ``require_speedup``, when it is also faster per request (for a small MLP the quantize /
    dequantize overhead can outweigh the cheaper matrix products, as FIGURES.md shows for tiny
    CLIP); otherwise the ranker is left serving FP32. Timings interleave FP32 and INT8 runs
    over the same queries.

    Parameters
    ----------
    ranker:
        A fitted DeepFM ranker (switched to the chosen precision in place).
    validation:
        Held-out queries the ranker was not trained on.
    max_relative_drop:
        Largest accepted relative NDCG@10 loss (0.01 = 1%).
    timing_queries:
        Queries per timing round.
    rounds:
        Interleaved timing rounds per precision.
    require_speedup:
        Also require INT8 to be faster than FP32.

    Returns
    -------
    dict
        ``fp32_ndcg``, ``int8_ndcg``, ``fp32_ms_per_request``, ``int8_ms_per_request``,
        ``max_relative_drop``, ``accepted``, ``reason`` and ``n_queries``.
    """
    ranker.set_int8(False)
    fp32_ndcg = validation.ndcg(ranker)
    ranker.set_int8(True)
    int8_ndcg = validation.ndcg(ranker)
    fp32_times, int8_times = [], []
    for _ in range(rounds):
        ranker.set_int8(False)
        fp32_times.append(_ms_per_request(ranker, validation, timing_queries))
        ranker.set_int8(True)
        int8_times.append(_ms_per_request(ranker, validation, timing_queries))
    fp32_ms, int8_ms = float(np.median(fp32_times)), float(np.median(int8_times))
    if int8_ndcg < fp32_ndcg * (1.0 - max_relative_drop):
        reason = f"NDCG@10 dropped more than {max_relative_drop:.0%}"
    elif require_speedup and int8_ms >= fp32_ms:
        reason = "INT8 is not faster than FP32"
    else:
        reason = ""
    ranker.set_int8(not reason)
    return {
        "fp32_ndcg": fp32_ndcg,
        "int8_ndcg": int8_ndcg,
        "fp32_ms_per_request": fp32_ms,
        "int8_ms_per_request": int8_ms,
        "max_relative_drop": max_relative_drop,
        "accepted": not reason,
        "reason": reason or "accuracy within the gate and faster",
        "n_queries": len(validation),
    }


def format_int8_gate(figures: dict) -> str:
    """Return the gate's figures as one printable line."""
    verdict = "accepted" if figures["accepted"] else f"rejected ({figures['reason']}, serving FP32)"
    return (
        f"DeepFM INT8 {verdict}: NDCG@10 FP32 {figures['fp32_ndcg']:.4f} vs INT8 "
        f"{figures['int8_ndcg']:.4f} (gate: within {figures['max_relative_drop']:.0%}); "
        f"{figures['fp32_ms_per_request']:.3f} ms vs {figures['int8_ms_per_request']:.3f} ms "
        f"per request over {figures['n_queries']} queries"
    )
