"""Which ranker is served by default: one paired comparison on the validation slice.

Every trained ranker is scored on the same validation queries (NDCG@10 per query). The
validation winner, the ranker with the highest mean, becomes the default only when its paired
95% bootstrap interval against popularity lies above 0; otherwise the default is popularity,
the baseline that needs no personal data. One comparison decides, so the rule cannot pick the
luckiest of several rankers that are each level with popularity.
"""

from __future__ import annotations

import numpy as np

from imgsearch.ranking_metrics import bootstrap_ci, paired_bootstrap_ci

BASELINE = "popularity"
# Below this many validation queries a paired interval says little: selection is skipped.
MIN_SELECTION_QUERIES = 50


def skipped_selection(reason: str) -> dict:
    """The record of a selection that could not run: popularity is served, and why."""
    return {
        "default_ranker": BASELINE,
        "reason": f"selection skipped: {reason}; serving {BASELINE}, the baseline",
        "skipped": reason,
        "table": [],
    }


def select_default(
    per_query: dict[str, np.ndarray],
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_queries: int = MIN_SELECTION_QUERIES,
) -> dict:
    """Apply the rule to per-query validation NDCG@10 of each ranker (same queries, same order).

    Parameters
    ----------
    per_query:
        Ranker name to its per-query NDCG@10; must include :data:`BASELINE`.
    n_bootstrap, seed:
        Bootstrap resamples and seed of the intervals.
    min_queries:
        Fewer queries than this skip the selection (popularity is served).

    Returns
    -------
    dict
        ``default_ranker``, ``reason`` (a sentence with the deciding figures), ``winner``,
        ``n_queries`` and ``table``: per ranker, best first, ``ranker``, ``ndcg@10`` with its
        ``ndcg@10_ci`` and ``vs_popularity`` (paired ``diff`` and ``ci``).
    """
    if BASELINE not in per_query:
        raise ValueError(f"the selection needs {BASELINE}'s validation figures")
    n = len(per_query[BASELINE])
    if n < min_queries:
        return skipped_selection(
            f"{n} validation queries, fewer than the {min_queries} a paired comparison needs"
        )
    base = np.asarray(per_query[BASELINE], dtype=np.float64)
    table = []
    for name, values in per_query.items():
        values = np.asarray(values, dtype=np.float64)
        mean, lo, hi = bootstrap_ci(values, n=n_bootstrap, seed=seed)
        row = {"ranker": name, "ndcg@10": mean, "ndcg@10_ci": [lo, hi]}
        if name != BASELINE:
            diff, dlo, dhi = paired_bootstrap_ci(values, base, n=n_bootstrap, seed=seed)
            row["vs_popularity"] = {"diff": diff, "ci": [dlo, dhi]}
        table.append(row)
    # Highest mean first; on a tie the baseline wins (it needs no personal data).
    table.sort(key=lambda row: (-row["ndcg@10"], row["ranker"] != BASELINE))
    winner = table[0]
    record = {"winner": winner["ranker"], "n_queries": n, "table": table}
    if winner["ranker"] == BASELINE:
        reason = f"{BASELINE} has the best validation NDCG@10 ({winner['ndcg@10']:.4f})"
        return {**record, "default_ranker": BASELINE, "reason": reason}
    diff, (lo, hi) = winner["vs_popularity"]["diff"], winner["vs_popularity"]["ci"]
    figures = (
        f"validation NDCG@10 {winner['ndcg@10']:.4f} vs {BASELINE} "
        f"{next(r['ndcg@10'] for r in table if r['ranker'] == BASELINE):.4f}, "
        f"{diff:+.4f} (paired 95% CI {lo:+.4f} to {hi:+.4f}, {n} queries)"
    )
    if lo > 0:
        reason = f"{winner['ranker']} is the validation winner, above {BASELINE}: {figures}"
        return {**record, "default_ranker": winner["ranker"], "reason": reason}
    reason = (
        f"the validation winner {winner['ranker']} is not significantly above {BASELINE} "
        f"({figures}); serving {BASELINE}"
    )
    return {**record, "default_ranker": BASELINE, "reason": reason}


def format_selection(selection: dict) -> str:
    """The selection as printable lines: one per ranker, the served one marked."""
    lines = [f"default ranker: {selection['default_ranker']} — {selection['reason']}"]
    for row in selection.get("table", []):
        mark = "*" if row["ranker"] == selection["default_ranker"] else " "
        lo, hi = row["ndcg@10_ci"]
        line = f" {mark} {row['ranker']:<13} NDCG@10 {row['ndcg@10']:.4f} ({lo:.4f}–{hi:.4f})"
        if "vs_popularity" in row:
            diff, (dlo, dhi) = row["vs_popularity"]["diff"], row["vs_popularity"]["ci"]
            line += f"  vs {BASELINE} {diff:+.4f} ({dlo:+.4f} to {dhi:+.4f})"
        lines.append(line)
    return "\n".join(lines)
