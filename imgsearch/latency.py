"""Latency summaries: the one place durations become p50/p90/p99/max/mean milliseconds."""

from __future__ import annotations

import numpy as np


def percentiles_ms(seconds, suffix: str = "") -> dict[str, float | None]:
    """p50/p90/p99/max/mean of durations given in seconds, in milliseconds (3 decimals).

    ``suffix`` is appended to every key (``"_ms"`` gives ``p50_ms`` …) for reports whose
    other fields carry their unit. Every value is None when there are no durations.
    """
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    keys = [name + suffix for name in ("p50", "p90", "p99", "max", "mean")]
    if len(values) == 0:
        return dict.fromkeys(keys)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    figures = (p50, p90, p99, values.max(), values.mean())
    return {key: round(float(value), 3) for key, value in zip(keys, figures)}
