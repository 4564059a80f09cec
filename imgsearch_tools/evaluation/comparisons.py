"""Paired comparisons of evaluated rows on the same test queries, with bootstrap intervals.

Every row of ``imgsearch eval`` carries its per-query NDCG (``_per_query_ndcg``) until these
functions have paired it with the others: the served configuration against the best row, the
served ranker against the best ranker per retriever, the stacked ranker against the best
single ranker, retrievers against each other, and each row against popularity and keyword
retrieval. ``config`` is the evaluation's configuration (its ``bootstrap`` and ``seed``).
"""

from __future__ import annotations

from imgsearch.ranking_metrics import paired_bootstrap_ci

# The learned combination, compared with the best of the rankers it could have been replaced by.
STACKED = "stacked"


def served_vs_best_configuration(
    rows: list[dict], retriever: str, ranker: str | None, k: int, config
) -> dict:
    """The served (retriever, ranker) against the best row of all on test: paired difference,
    its interval and the ratio of their NDCG@k ({} when the served row was not evaluated)."""
    mine = {(r["retriever"], r["ranker"]): r for r in rows if "_per_query_ndcg" in r}
    served = mine.get((retriever, ranker))
    if served is None:
        return {}
    best = max(mine.values(), key=lambda r: r[f"ndcg@{k}"])
    ratio = served[f"ndcg@{k}"] / best[f"ndcg@{k}"] if best[f"ndcg@{k}"] > 0 else None
    paired = paired_difference(served, best, config)
    return {
        "served": {"retriever": retriever, "ranker": ranker, f"ndcg@{k}": served[f"ndcg@{k}"]},
        "best": {
            "retriever": best["retriever"],
            "ranker": best["ranker"],
            f"ndcg@{k}": best[f"ndcg@{k}"],
        },
        "vs_best": paired,
        "ratio": ratio,
        "significantly_below": paired["ci"][1] < 0,
    }


def served_vs_best(rows: list[dict], served: str | None, k: int, config) -> dict:
    """Per retriever: the served default against the best ranker on test, and popularity."""
    out: dict = {}
    if not served:
        return out
    for retriever in dict.fromkeys(r["retriever"] for r in rows):
        mine = {
            r["ranker"]: r for r in rows if r["retriever"] == retriever and "_per_query_ndcg" in r
        }
        if served not in mine:
            continue
        best = max(mine.values(), key=lambda r: r[f"ndcg@{k}"])
        entry = {"served": served, "best": best["ranker"]}
        for name, other in (("best", best), ("popularity", mine.get("popularity"))):
            if other is None:
                continue
            entry[f"vs_{name}"] = paired_difference(mine[served], other, config)
        out[retriever] = entry
    return out


def stacked_vs_single(rows: list[dict], served_retriever: str, k: int, config) -> dict:
    """Per retriever: the stacked ranker against the best other ranker on test (by NDCG@k).

    ``per_retriever`` maps each retriever to the best single ranker, both figures, the paired
    difference (stacked minus it) with its interval, and whether stacked is at least as good by
    the point estimate, significantly above or significantly below; ``served_retriever`` names
    the retriever served, the one the headline line reads ({} without a stacked row).
    """
    out: dict = {}
    key = f"ndcg@{k}"
    for retriever in dict.fromkeys(r["retriever"] for r in rows):
        mine = {
            r["ranker"]: r for r in rows if r["retriever"] == retriever and "_per_query_ndcg" in r
        }
        singles = [r for name, r in mine.items() if name != STACKED]
        if STACKED not in mine or not singles:
            continue
        stacked, best = mine[STACKED], max(singles, key=lambda r: r[key])
        figures = paired_difference(stacked, best, config)
        out[retriever] = {
            "best_single": best["ranker"],
            key: stacked[key],
            f"best_single_{key}": best[key],
            "vs_best_single": figures,
            "at_least_best": stacked[key] >= best[key],
            "significantly_above": figures["ci"][0] > 0,
            "significantly_below": figures["ci"][1] < 0,
        }
    if not out:
        return {}
    return {"served_retriever": served_retriever, "per_retriever": out}


def retriever_deltas(rows: list[dict], retriever: str, ranker: str | None, k: int, config) -> dict:
    """The default retriever against each other one, with the default ranker, same queries.

    Paired NDCG@k differences with bootstrap intervals, and each retriever's tag precision.
    """
    mine = {r["retriever"]: r for r in rows if r["ranker"] == ranker and "_per_query_ndcg" in r}
    if retriever not in mine:
        return {}
    out = {"retriever": retriever, "ranker": ranker, "versus": {}}
    for other, row in mine.items():
        if other == retriever:
            continue
        out["versus"][other] = {
            f"ndcg@{k}_diff": paired_difference(mine[retriever], row, config),
            f"tag_p@{k}": row[f"tag_p@{k}"],
            f"pair_tag_p@{k}": row[f"pair_tag_p@{k}"],
        }
    out[f"tag_p@{k}"] = mine[retriever][f"tag_p@{k}"]
    out[f"pair_tag_p@{k}"] = mine[retriever][f"pair_tag_p@{k}"]
    return out


def paired_difference(row: dict, other: dict, config) -> dict:
    """``row`` minus ``other`` on the same queries: mean NDCG difference and bootstrap CI."""
    diff, lo, hi = paired_bootstrap_ci(
        row["_per_query_ndcg"], other["_per_query_ndcg"], n=config.bootstrap, seed=config.seed
    )
    return {"diff": diff, "ci": [lo, hi]}


def add_pairwise(rows: list[dict], k: int, config) -> None:
    """Add to each row its paired NDCG difference to every other ranker on the same retriever.

    ``ndcg@k_paired`` (JSON) maps the other ranker to ``{"diff", "ci"}``: this row minus it.
    """
    for row in rows:
        if "_per_query_ndcg" not in row:
            continue
        paired = {}
        for other in rows:
            if other is row or other["retriever"] != row["retriever"]:
                continue
            if "_per_query_ndcg" not in other:
                continue
            paired[other["ranker"]] = paired_difference(row, other, config)
        row[f"ndcg@{k}_paired"] = paired


def add_deltas(rows: list[dict], baseline: str, k: int, config) -> None:
    """Add each row's paired NDCG difference to ``baseline`` on the same retriever."""
    key = f"ndcg@{k}"
    base = {
        r["retriever"]: r["_per_query_ndcg"]
        for r in rows
        if r["ranker"] == baseline and "_per_query_ndcg" in r
    }
    for row in rows:
        values = row.pop("_per_query_ndcg", None)
        if values is None or row["retriever"] not in base or row["ranker"] == baseline:
            continue
        diff, lo, hi = paired_bootstrap_ci(
            values, base[row["retriever"]], n=config.bootstrap, seed=config.seed
        )
        row[f"{key}_vs_{baseline}"] = {"diff": diff, "ci": [lo, hi]}


def add_tag_deltas(rows: list[dict], baseline: str, k: int, config) -> None:
    """Add the paired difference of each retriever's tag figures to ``baseline`` retriever's.

    Every retriever answers the same tag and pair queries, so the per-query precisions pair up.
    """
    base = next((r["_per_query_tags"] for r in rows if r["retriever"] == baseline), None)
    for row in rows:
        values = row.pop("_per_query_tags", None)
        if values is None or base is None or row["retriever"] == baseline:
            continue
        for key, mine, theirs in (
            (f"tag_p@{k}", values[0], base[0]),
            (f"pair_tag_p@{k}", values[1], base[1]),
        ):
            if len(mine) and len(mine) == len(theirs):
                diff, lo, hi = paired_bootstrap_ci(
                    mine, theirs, n=config.bootstrap, seed=config.seed
                )
                row[f"{key}_vs_{baseline}"] = {"diff": diff, "ci": [lo, hi]}
