"""The evaluation suite's verdicts, read from each catalogue's ``eval`` JSON: served against the
best row on test, ``stacked`` against the best single ranker, and the stacked ranking latency.

Every figure is one the runs wrote (their paired bootstrap CIs over the test queries); nothing
is recomputed. Run as ``python -m imgsearch_tools.evaluation.suite_summary NAME=RUN.json ...``;
it prints Markdown tables and the counts the issue's bar asks for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

K = 10
# The served configuration must reach this share of the best row's NDCG@10 on test.
MIN_RATIO = 0.95


def _paired(value: dict | None) -> str:
    if not value:
        return "–"
    lo, hi = value["ci"]
    return f"{value['diff']:+.4f} ({lo:+.4f} to {hi:+.4f})"


def _stacked_latency(report: dict, retriever: str) -> dict | None:
    """The ranking latency of the stacked row with ``retriever`` (milliseconds)."""
    for row in report["results"]:
        if row["retriever"] == retriever and row["ranker"] == "stacked" and "latency_ms" in row:
            return row["latency_ms"]["ranking"]
    return None


def summarise(name: str, report: dict) -> dict:
    """One catalogue's verdicts from its ``eval`` report (``header`` and ``results``)."""
    header = report["header"]
    configuration = header.get("configuration") or {}
    check = header.get("served_configuration_vs_best") or {}
    stacked = header.get("stacked_vs_best_single") or {}
    served_retriever = stacked.get("served_retriever") or header.get("default_retriever")
    per_retriever = stacked.get("per_retriever", {})
    on_served = per_retriever.get(served_retriever, {})
    rule = header.get("models", {}).get("rankers", {}).get("stacked", {}).get("rule")
    return {
        "name": name,
        "served_label": configuration.get("label", header.get("default_retriever")),
        "served": check.get("served"),
        "best": check.get("best"),
        "vs_best": check.get("vs_best"),
        "ratio": check.get("ratio"),
        "served_ok": bool(check)
        and not check["significantly_below"]
        and (check["ratio"] or 0) >= MIN_RATIO,
        "served_retriever": served_retriever,
        "stacked": per_retriever,
        "stacked_at_least": bool(on_served.get("at_least_best")),
        "stacked_above": bool(on_served.get("significantly_above")),
        "stacked_below": any(e.get("significantly_below") for e in per_retriever.values()),
        "rule": rule,
        "latency": _stacked_latency(report, served_retriever) if served_retriever else None,
        "commit_command": header.get("command", ""),
    }


def markdown(summaries: list[dict]) -> str:
    """The suite's three tables and the counts (module docstring)."""
    lines = [
        f"| catalogue | served | best row on test | served − best NDCG@{K} (paired 95% CI) "
        f"| served / best | ≥ {MIN_RATIO}× and not significantly below |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        served, best = s["served"], s["best"]
        if not served:
            lines.append(f"| {s['name']} | – | – | – | – | no served-vs-best check in the run |")
            continue
        lines.append(
            f"| {s['name']} | {s['served_label']} + {served['ranker']}, {served[f'ndcg@{K}']:.4f} "
            f"| {best['retriever']} + {best['ranker']}, {best[f'ndcg@{K}']:.4f} "
            f"| {_paired(s['vs_best'])} | {s['ratio']:.2f}× | {'yes' if s['served_ok'] else 'no'} |"
        )
    retrievers = list(dict.fromkeys(r for s in summaries for r in s["stacked"]))
    lines += [
        "",
        "| catalogue | "
        + " | ".join(retrievers)
        + " | the stacker's rule (validation) | stacked ranking p50 / p99 ms |",
        "|---|" + "---|" * len(retrievers) + "---|---|",
    ]
    for s in summaries:
        cells = []
        for retriever in retrievers:
            entry = s["stacked"].get(retriever)
            cell = f"{_paired(entry['vs_best_single'])} vs {entry['best_single']}" if entry else "–"
            cells.append(f"**{cell}**" if retriever == s["served_retriever"] and entry else cell)
        rule = s["rule"]
        rule_cell = (
            f"{'the trees' if rule['serves'] is None else rule['serves'] + chr(39) + 's order'}: "
            f"{rule['diff']:+.4f} ({rule['ci'][0]:+.4f} to {rule['ci'][1]:+.4f}) vs "
            f"{rule['best_base']}, {rule['n_queries']:,} queries"
            if rule
            else "–"
        )
        latency = s["latency"]
        latency_cell = f"{latency['p50']:.2f} / {latency['p99']:.2f}" if latency else "–"
        lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {rule_cell} | {latency_cell} |")
    with_stacked = [s for s in summaries if s["stacked"]]
    lines += [
        "",
        f"Served ≥ {MIN_RATIO}× of the best and not significantly below it: "
        f"{sum(s['served_ok'] for s in summaries)} of {len(summaries)} catalogues. "
        f"`stacked` against the best single ranker on the served retriever (bold): at least it by "
        f"the point estimate on {sum(s['stacked_at_least'] for s in with_stacked)} of "
        f"{len(with_stacked)}, significantly above it on "
        f"{sum(s['stacked_above'] for s in with_stacked)}; significantly below it on any "
        f"retriever on {sum(s['stacked_below'] for s in with_stacked)}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the suite's tables for ``NAME=RUN.json`` arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m imgsearch_tools.evaluation.suite_summary", description=__doc__
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="NAME=RUN.json",
        help="a catalogue's name in the tables and the JSON its `imgsearch eval --json` wrote",
    )
    args = parser.parse_args(argv)
    summaries = []
    for run in args.runs:
        name, sep, path = run.partition("=")
        if not sep or not name or not path:
            parser.error(f"expected NAME=RUN.json, got {run!r}")
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"{path}: {error}")
        summaries.append(summarise(name, report))
    sys.stdout.write(markdown(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
