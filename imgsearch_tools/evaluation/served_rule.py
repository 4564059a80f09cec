"""The rule that picks the served (retriever, ranker) from per-query validation NDCG.

See :mod:`imgsearch_tools.evaluation.configuration` for the queries and the table it is
applied to; the rule itself, by the number of selection queries ``n``:

* ``n >= MIN_POINT_BEST``: the validation **point-best** combination, skipping any whose
  paired 95% interval against popularity (same retriever) lies wholly below 0. A **learned**
  ranker (``stacked`` when its trees passed their own rule, beating every base out-of-fold) is
  served instead, at its own best eligible retriever, when its paired interval against the
  point-best reaches 0: its figure here is out-of-fold (each query scored by trees fitted on two
  thirds of the slice, over bases fitted before it) while the served trees learn from the whole
  slice over bases refitted on every conversion, so among near-equals it is the one the figures
  understate.
* ``MIN_SELECTION_QUERIES <= n < MIN_POINT_BEST``: the winner only when its paired interval
  against popularity lies above 0, else popularity with its best retriever.
"""

from __future__ import annotations

import numpy as np

from imgsearch.ranking_metrics import paired_bootstrap_ci
from ranking_service.selection import BASELINE

# From this many selection queries on, the validation point-best is served.
MIN_POINT_BEST = 300


def apply_rule(
    per_query: dict[str, dict[str, np.ndarray]],
    eligible: list[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    learned: str | None = None,
) -> dict:
    """The rule of the module docstring on per-query NDCG (retriever label -> ranker -> values).

    ``learned`` names a learned ranker whose own rule let its model serve (module docstring);
    None when there is none.

    Returns
    -------
    dict
        ``label`` and ``ranker`` served, ``rule`` (``point-best``, ``learned`` or
        ``significant``), ``reason``, ``versus_popularity`` (the served one's paired difference
        and CI) and, for ``learned``, ``versus_point_best``.
    """
    rows = [
        (label, ranker, values)
        for label, rankers in per_query.items()
        if label in eligible
        for ranker, values in rankers.items()
    ]
    n = len(rows[0][2])
    # Highest mean first; on a tie popularity (it needs no personal data), then grid order.
    rows.sort(key=lambda row: (-float(row[2].mean()), row[1] != BASELINE))
    base_label = max(eligible, key=lambda label: per_query[label][BASELINE].mean())

    def versus(label: str, ranker: str) -> dict:
        diff, lo, hi = paired_bootstrap_ci(
            per_query[label][ranker], per_query[label][BASELINE], n=n_bootstrap, seed=seed
        )
        return {"diff": diff, "ci": [lo, hi]}

    def served(label, ranker, rule, why) -> dict:
        figures = versus(label, ranker) if ranker != BASELINE else None
        return _served(label, ranker, rule, why, figures)

    popularity = f"{BASELINE} with {base_label} ({per_query[base_label][BASELINE].mean():.4f})"
    if n >= MIN_POINT_BEST:
        best = _point_best(rows, versus, n)
        if best is not None and learned not in (None, best["ranker"]):
            alternative = _learned_within_noise(
                rows, best, per_query, learned, versus, n_bootstrap, seed
            )
            if alternative is not None:
                return alternative
        if best is not None:
            return best
    label, ranker, values = rows[0]
    if ranker != BASELINE:
        figures = versus(label, ranker)
        if figures["ci"][0] > 0:
            why = (
                f"{ranker} with {label} is the validation winner, significantly above "
                f"{BASELINE} ({_against(figures)}; {n} queries, fewer than {MIN_POINT_BEST})"
            )
            return served(label, ranker, "significant", why)
        why = (
            f"the validation winner {ranker} with {label} is not significantly above "
            f"{BASELINE} ({_against(figures)}; {n} queries, fewer than {MIN_POINT_BEST}); "
            f"serving {popularity}"
        )
        return served(base_label, BASELINE, "significant", why)
    why = f"{popularity} has the best validation NDCG@10 ({n} queries)"
    return served(base_label, BASELINE, "significant", why)


def _point_best(rows: list, versus, n: int) -> dict | None:
    """The best row (highest mean first) not significantly below popularity, as served."""
    for label, ranker, values in rows:
        if ranker == BASELINE:
            why = f"{ranker} with {label} has the best validation NDCG@10 ({values.mean():.4f})"
            return _served(label, ranker, "point-best", why + f", {n} queries", None)
        figures = versus(label, ranker)
        if figures["ci"][1] >= 0:
            why = (
                f"{ranker} with {label} has the best validation NDCG@10 "
                f"({values.mean():.4f}; {_against(figures)}, {n} queries)"
            )
            return _served(label, ranker, "point-best", why, figures)
    return None


def _learned_within_noise(
    rows: list, best: dict, per_query: dict, learned: str, versus, n_bootstrap: int, seed: int
) -> dict | None:
    """The learned ranker at its best eligible retriever, when level with the point-best."""
    mine = [row for row in rows if row[1] == learned]
    if not mine:
        return None
    label, _, values = mine[0]
    diff, lo, hi = paired_bootstrap_ci(
        values, per_query[best["label"]][best["ranker"]], n=n_bootstrap, seed=seed
    )
    figures = versus(label, learned)
    if hi < 0 or figures["ci"][1] < 0:
        return None
    why = (
        f"{learned} with {label} is within noise of the validation point-best "
        f"{best['ranker']} with {best['label']} ({diff:+.4f}, paired 95% CI {lo:+.4f} to "
        f"{hi:+.4f}; {_against(figures)}, {len(values)} queries) and its trees passed their "
        "own rule: its figure is out-of-fold, the served trees learn from the whole slice"
    )
    chosen = _served(label, learned, "learned", why, figures)
    chosen["versus_point_best"] = {
        "ranker": best["ranker"],
        "label": best["label"],
        "diff": diff,
        "ci": [lo, hi],
    }
    return chosen


def _served(label: str, ranker: str, rule: str, why: str, figures: dict | None) -> dict:
    """What :func:`apply_rule` returns for a served (retriever, ranker)."""
    return {
        "label": label,
        "ranker": ranker,
        "rule": rule,
        "reason": why,
        "versus_popularity": figures,
    }


def _against(figures: dict) -> str:
    lo, hi = figures["ci"]
    return f"{figures['diff']:+.4f} vs {BASELINE}, paired 95% CI {lo:+.4f} to {hi:+.4f}"
