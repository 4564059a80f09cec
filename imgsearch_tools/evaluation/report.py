"""The evaluation report: header figures, JSON, the Markdown table and the chart."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import Catalogue

# Latency columns of the table, per query.
STAGES = ("retrieval", "ranking", "total")

# --------------------------------------------------------------------------- header


def dataset_summary(catalogue: Catalogue) -> dict:
    """Sizes and a content fingerprint of the catalogue (same tables, same fingerprint)."""
    digest = hashlib.sha256()
    for name in ("photos", "keywords", "conversions"):
        table = getattr(catalogue, name)
        columns = [c for c in table.columns if c != "has_image"]
        digest.update(name.encode())
        digest.update(pd.util.hash_pandas_object(table[columns], index=False).to_numpy().tobytes())
    photos = catalogue.photos
    return {
        "data_dir": catalogue.data_dir,
        "fingerprint": digest.hexdigest()[:16],
        "photos": len(photos),
        "photos_with_images": int(photos["has_image"].sum()) if "has_image" in photos else 0,
        "keyword_rows": len(catalogue.keywords),
        "distinct_keywords": int(catalogue.keywords["keyword"].nunique()),
        "users": catalogue.n_users,
        "conversions": len(catalogue.conversions),
    }


def jsonable(value):
    """Convert numpy scalars, paths and tuples into JSON types (recursively)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"<array {value.shape}>"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- writers


def write_json(report: dict, path: str | Path) -> None:
    """Write the report as JSON (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(report), indent=2) + "\n")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _fmt_ci(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_ci", (None, None))
    if lo is None or hi is None:
        return _fmt(row.get(key))
    return f"{_fmt(row.get(key))} ({_fmt(lo)}–{_fmt(hi)})"


def markdown_table(report: dict) -> str:
    """The results as a Markdown table, with a line on data, split, machine and command.

    Rows of the ranker the validation rule serves by default are marked ``(default)``; the
    selection and its test check follow the table (:func:`selection_markdown`).
    """
    header = report["header"]
    k = header["protocol"]["k"]
    served = header.get("default_ranker")
    columns = [
        "retriever",
        "ranker",
        "queries",
        f"NDCG@{k} (95% CI)",
        f"P@{k}",
        f"Recall@{k}",
        "seed NDCG",
        "cand. recall",
        f"tag P@{k}",
        f"pair tag P@{k}",
        "retrieval p50/p99 ms",
        "ranking p50/p99 ms",
        "total p50/p99 ms",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in report["results"]:
        if row.get("skipped"):
            cells = [row["retriever"], row["ranker"], f"skipped: {row['skipped']}"]
            cells += [""] * (len(columns) - len(cells))
        else:
            lat = row["latency_ms"]
            cells = [
                row["retriever"],
                f"**{row['ranker']}** (default)" if row["ranker"] == served else row["ranker"],
                str(row["queries"]),
                _fmt_ci(row, f"ndcg@{k}"),
                _fmt_ci(row, f"p@{k}"),
                _fmt_ci(row, f"recall@{k}"),
                _fmt(row["seed_ndcg"]),
                _fmt(row.get("candidate_recall")),
                _fmt(row[f"tag_p@{k}"]),
                _fmt(row[f"pair_tag_p@{k}"]),
            ] + [f"{_fmt(lat[s]['p50'])} / {_fmt(lat[s]['p99'])}" for s in STAGES]
        lines.append("| " + " | ".join(cells) + " |")
    data, split, protocol, machine = (
        header["dataset"],
        header["split"],
        header["protocol"],
        header["machine"],
    )
    notes = [
        "",
        f"Data: {data['photos']:,} photos ({data['photos_with_images']:,} with images), "
        f"{data['users']:,} users, {data['conversions']:,} conversions "
        f"(fingerprint `{data['fingerprint']}`). "
        f"Split: first {1 - split['test_fraction']:.0%} of conversions by time train "
        f"({split['train_conversions']:,}), last {split['test_fraction']:.0%} test "
        f"({split['test_conversions']:,}); {protocol['queries']:,} test queries "
        f"(user, keyword pairs with ≥ {protocol['min_pair']} test conversions), "
        f"{protocol['candidates_k']} candidates each, training photos "
        f"{'filtered' if protocol['filter_train'] else 'kept'}; "
        f"{protocol['pair_queries']} two-keyword queries for pair tag P@{k}; tag P@{k} "
        + (
            "counts a photo by its labels (labels.tsv: what it shows), not its keywords."
            if protocol.get("tag_truth") == "labels"
            else "counts a photo by its keywords."
        ),
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, Python "
        f"{machine['python']}; {header['date']}; {header['duration_s']} s.",
        f"Command: `{header['command']}`",
    ]
    selection = selection_markdown(report)
    return "\n".join(lines + notes) + "\n" + (f"\n{selection}" if selection else "")


def selection_markdown(report: dict) -> str:
    """The default ranker: the validation table that chose it, and its test check per retriever.

    Empty when the report has no selection (rankers given already fitted).
    """
    header = report["header"]
    selection = header.get("ranker_selection") or {}
    if not header.get("default_ranker"):
        return ""
    k = header["protocol"]["k"]
    validation = selection.get("validation", {})
    lines = [
        f"Default ranker (validation rule, training part only): **{header['default_ranker']}**"
        f" — {selection.get('reason', '')}.",
    ]
    if selection.get("table"):
        lines += [
            "",
            f"| ranker | validation NDCG@{k} (95% CI) | vs popularity (paired 95% CI) |",
            "|---|---|---|",
        ]
        for row in selection["table"]:
            lo, hi = row["ndcg@10_ci"]
            versus = row.get("vs_popularity")
            cell = (
                f"{versus['diff']:+.4f} ({versus['ci'][0]:+.4f} to {versus['ci'][1]:+.4f})"
                if versus
                else "–"
            )
            name = row["ranker"]
            if name == header["default_ranker"]:
                name = f"**{name}** (default)"
            lines.append(f"| {name} | {row['ndcg@10']:.4f} ({lo:.4f}–{hi:.4f}) | {cell} |")
        lines.append(
            f"\n{validation.get('selection_queries', 0):,} ranker-selection queries ((user, "
            f"keyword) pairs with ≥ "
            f"{validation.get('selection_min_pair', validation.get('min_pair', 1))} "
            f"conversions there and a converted photo among the candidates the rankers were "
            f"trained with: the figures of this table and the stacker's rule; "
            f"{validation.get('tuning_queries', 0):,} more, pairs with ≥ "
            f"{validation.get('min_pair', 1)}, tuned parameters and prior weights) from the last "
            f"{validation.get('fraction', 0):.0%} of the training conversions."
        )
    checks = header.get("served_vs_best") or {}
    if checks:
        lines += [
            "",
            f"| retriever | served | best on test | served − best NDCG@{k} (paired 95% CI) "
            f"| served − popularity (paired 95% CI) |",
            "|---|---|---|---|---|",
        ]
        for retriever, check in checks.items():
            cells = [retriever, check["served"], check["best"]]
            for key in ("vs_best", "vs_popularity"):
                value = check.get(key)
                cells.append(
                    f"{value['diff']:+.4f} ({value['ci'][0]:+.4f} to {value['ci'][1]:+.4f})"
                    if value
                    else "–"
                )
            lines.append("| " + " | ".join(cells) + " |")
    lines += configuration_markdown(header, k)
    lines += stacked_markdown(header, k)
    fusion = header.get("models", {}).get("fusion", {})
    if fusion.get("label"):
        lines.append(f"\nHybrid fusion (validation, with {fusion['ranker']}): {fusion['label']}.")
    compared = header.get("default_retriever_vs_others") or {}
    if compared.get("versus"):
        mine = compared["retriever"]
        parts = [
            f"− {other}: {v[f'ndcg@{k}_diff']['diff']:+.4f} "
            f"({v[f'ndcg@{k}_diff']['ci'][0]:+.4f} to {v[f'ndcg@{k}_diff']['ci'][1]:+.4f}), "
            f"tag P@{k} {v[f'tag_p@{k}']:.3f}"
            for other, v in compared["versus"].items()
        ]
        lines.append(
            f"\n{mine} with {compared['ranker']}, NDCG@{k} paired on the test queries "
            + "; ".join(parts)
            + f" (tag P@{k} of {mine}: {compared[f'tag_p@{k}']:.3f})."
        )
    return "\n".join(lines) + "\n"


def configuration_markdown(header: dict, k: int) -> list[str]:
    """The served configuration, how validation chose it, and how it did on test."""
    lines = []
    configuration = header.get("configuration") or {}
    if configuration:
        lines.append(
            f"\nServed configuration (validation, {configuration_queries(configuration)}, "
            f"rule `{configuration['rule']}`): **{configuration['label']} + "
            f"{configuration['ranker']}** — {configuration['reason']}."
        )
    check = header.get("served_configuration_vs_best") or {}
    if check:
        served, best, paired = check["served"], check["best"], check["vs_best"]
        ratio = f"{check['ratio']:.2f}×" if check.get("ratio") is not None else "–"
        lines.append(
            f"\nOn test: served {served['retriever']} + {served['ranker']} NDCG@{k} "
            f"{served[f'ndcg@{k}']:.4f}; best of all rows {best['retriever']} + "
            f"{best['ranker']} {best[f'ndcg@{k}']:.4f}; served − best "
            f"{paired['diff']:+.4f} (paired 95% CI {paired['ci'][0]:+.4f} to "
            f"{paired['ci'][1]:+.4f}), {ratio} of the best"
            + (" — significantly below it." if check.get("significantly_below") else ".")
        )
    return lines


def configuration_queries(configuration: dict) -> str:
    """What the configuration's selection queries count, per time-ordered fold."""
    folds = configuration.get("folds") or [
        {"slice": "validation slice", "queries": configuration.get("n_queries", 0)}
    ]
    counts = " and ".join(f"{fold['queries']:,} from the {fold['slice']}" for fold in folds)
    pairs = configuration.get("pairs_in_slice")
    drawn = f", drawn from its {pairs:,} pairs" if pairs and len(folds) == 1 else ""
    return (
        f"{configuration.get('n_queries', 0):,} configuration queries ({counts}{drawn}: every "
        "(user, keyword) pair with a conversion in the slice whose user converted before it, "
        "the tuning pairs left out, scored like test queries whether or not a retriever "
        "reaches its photos)"
    )


def stacked_markdown(header: dict, k: int) -> list[str]:
    """Per retriever, the stacked ranker against the best single ranker on test."""
    compared = header.get("stacked_vs_best_single") or {}
    if not compared:
        return []
    lines = [
        "",
        f"| retriever | stacked NDCG@{k} | best single ranker | its NDCG@{k} "
        f"| stacked − best single (paired 95% CI) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for retriever, entry in compared["per_retriever"].items():
        versus = entry["vs_best_single"]
        verdict = (
            "significantly above"
            if entry["significantly_above"]
            else "significantly below"
            if entry["significantly_below"]
            else "at least (point)"
            if entry["at_least_best"]
            else "below (point, not significant)"
        )
        name = retriever
        if retriever == compared["served_retriever"]:
            name = f"**{retriever}** (served)"
        lines.append(
            f"| {name} | {entry[f'ndcg@{k}']:.4f} | {entry['best_single']} "
            f"| {entry[f'best_single_ndcg@{k}']:.4f} | {versus['diff']:+.4f} "
            f"({versus['ci'][0]:+.4f} to {versus['ci'][1]:+.4f}) | {verdict} |"
        )
    rule = ((header.get("models") or {}).get("rankers") or {}).get("stacked", {}).get("rule")
    if rule:
        lines += ["", f"`stacked` on validation: {rule['reason']}."]
    return lines


def write_markdown(report: dict, path: str | Path) -> None:
    """Write :func:`markdown_table` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(report))


def write_plot(report: dict, path: str | Path) -> None:
    """Draw NDCG@k with CI whiskers per retriever x ranker, and a latency panel, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["header"]["protocol"]["k"]
    rows = [r for r in report["results"] if not r.get("skipped")]
    evaluated = [r for r in report["results"] if r["retriever"] != "*"]  # "*": skipped rankers
    retrievers = list(dict.fromkeys(r["retriever"] for r in evaluated))
    rankers = list(dict.fromkeys(r["ranker"] for r in evaluated))
    by = {(r["retriever"], r["ranker"]): r for r in rows}
    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(rankers))
    x = np.arange(len(retrievers))
    colours = plt.get_cmap("tab10")
    for j, ranker in enumerate(rankers):
        mean, err_lo, err_hi = [], [], []
        for retriever in retrievers:
            row = by.get((retriever, ranker))
            if row is None:
                mean.append(np.nan)
                err_lo.append(0.0)
                err_hi.append(0.0)
                continue
            value = row[f"ndcg@{k}"]
            lo, hi = row[f"ndcg@{k}_ci"]
            mean.append(value)
            err_lo.append(max(0.0, value - lo))
            err_hi.append(max(0.0, hi - value))
        ax_q.bar(
            x + (j - (len(rankers) - 1) / 2) * width,
            mean,
            width,
            yerr=[err_lo, err_hi],
            capsize=3,
            label=ranker,
            color=colours(j),
        )
    for i, retriever in enumerate(retrievers):
        if not any((retriever, r) in by for r in rankers):
            ax_q.text(i, 0.0, "skipped", ha="center", va="bottom", fontsize=9, color="grey")
    ax_q.set_xticks(x, retrievers)
    ax_q.set_ylabel(f"NDCG@{k} (95% bootstrap CI)")
    ax_q.set_title(f"Ranking quality, {report['header']['protocol']['queries']} test queries")
    tops = [r[f"ndcg@{k}_ci"][1] for r in rows if r[f"ndcg@{k}_ci"][1] is not None]
    if tops:  # head room for the legend above the bars
        ax_q.set_ylim(0, max(tops) * 1.3 or 1.0)
    ax_q.legend(title="ranker", fontsize=8, ncol=min(len(rankers), 5), loc="upper left")
    ax_q.grid(axis="y", alpha=0.3)

    labels = [f"{r['retriever']} + {r['ranker']}" for r in rows]
    y = np.arange(len(rows))
    retrieval = [r["latency_ms"]["retrieval"]["p50"] for r in rows]
    ranking = [r["latency_ms"]["ranking"]["p50"] for r in rows]
    p99 = [r["latency_ms"]["total"]["p99"] for r in rows]
    ax_t.barh(y, retrieval, color="tab:blue", label="retrieval p50")
    ax_t.barh(y, ranking, left=retrieval, color="tab:orange", label="ranking p50")
    ax_t.scatter(p99, y, marker="|", s=120, color="black", label="total p99", zorder=3)
    ax_t.set_yticks(y, labels, fontsize=8)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("ms per query, in-process")
    ax_t.set_title("Latency per stage")
    ax_t.legend(fontsize=8, loc="lower right")
    ax_t.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
