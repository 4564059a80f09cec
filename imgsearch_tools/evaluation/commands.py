"""The `imgsearch eval` command: offline evaluation of every retriever x ranker."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgsearch.names import RANKER_NAMES, RETRIEVER_NAMES
from retrieval_service.clip_model import TRAIN_STEPS


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``imgsearch eval``.

    Parameters
    ----------
    subparsers:
        The CLI's subparsers action.
    """
    parser = subparsers.add_parser(
        "eval",
        help="offline evaluation: NDCG/P/Recall@10 and latency per retriever x ranker",
        description=(
            "Split the conversions by time (first 80% train, last 20% test), train the "
            "rankers (and CLIP when the catalogue has images) on the training part, and "
            "measure every retriever x ranker on the test (user, keyword) pairs. Rankers are "
            "trained as build trains them, so the report also names the ranker build's "
            "validation rule would serve (default_ranker; its rows are marked) and checks it "
            "against the best one on test."
        ),
    )
    parser.add_argument(
        "--data",
        required=True,
        help="an Unsplash Lite folder (or a catalogue folder of parquet tables)",
    )
    parser.add_argument(
        "--retrievers",
        default=None,
        help=f"comma-separated retrievers (default: all, {','.join(RETRIEVER_NAMES)})",
    )
    parser.add_argument(
        "--rankers",
        default=None,
        help=f"comma-separated rankers (default: all, {','.join(RANKER_NAMES)})",
    )
    parser.add_argument("--candidates-k", type=int, default=100, help="candidates per query")
    parser.add_argument(
        "--min-pair",
        type=int,
        default=3,
        help="test conversions a (user, keyword) pair needs to be a test query",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of the latest conversions tested"
    )
    parser.add_argument(
        "--no-filter-train",
        dest="filter_train",
        action="store_false",
        help="keep photos the user converted in training among the candidates",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="tune ranker hyper-parameters on a validation slice of the training part",
    )
    parser.add_argument(
        "--clip-artifacts",
        default=None,
        metavar="DIR",
        help="load CLIP from this artifact set instead of training it",
    )
    parser.add_argument(
        "--clip-steps", type=int, default=TRAIN_STEPS, help="CLIP training steps when trained here"
    )
    parser.add_argument(
        "--max-queries", type=int, default=None, metavar="N", help="evaluate at most N queries"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of query draws and bootstrap")
    parser.add_argument("--json", required=True, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="write a Markdown table")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="write a PNG chart")
    parser.add_argument(
        "--results-page",
        default=None,
        metavar="FILE.md",
        help="write the docs site's results page: the tables (and the --plot chart) under a "
        "header naming this command, the commit and the machine",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_eval)


def load_catalogue(data: str | Path, show_progress: bool = True):
    """Read a catalogue from an Unsplash Lite folder or from saved parquet tables.

    Returns
    -------
    Catalogue
    """
    from imgsearch.catalogue import Catalogue

    data = Path(data)
    if (data / "photos.parquet").exists():
        return Catalogue.load(data)
    if (data / "catalogue" / "photos.parquet").exists():
        return Catalogue.load(data / "catalogue")
    from imgsearch.unsplash import read_unsplash

    catalogue, report = read_unsplash(data, show_progress=show_progress)
    dropped = getattr(report, "rows_dropped", 0)
    if dropped:
        print(report.summary(), file=sys.stderr)
    return catalogue


def write_eval_page(report: dict, path: str, plot: str | None) -> None:
    """Write the evaluation's results page; the chart is linked when it sits beside the page."""
    import os

    from imgsearch_tools.evaluation.report import markdown_table
    from imgsearch_tools.results_page import write_results_page

    body = markdown_table(report)
    if plot:
        relative = os.path.relpath(Path(plot).resolve(), Path(path).resolve().parent)
        body += f"\n![NDCG@10 per retriever and ranker, and latency per stage]({relative})\n"
    write_results_page(path, "Evaluation", report["header"]["command"], body)


def run_eval(args: argparse.Namespace) -> int:
    """Handle ``imgsearch eval``; returns the exit status (2 for bad input)."""
    from imgsearch.data_report import DataError
    from imgsearch_tools.evaluation.report import (
        markdown_table,
        write_json,
        write_markdown,
        write_plot,
    )
    from imgsearch_tools.evaluation.runner import EvalConfig, EvaluationError

    config = EvalConfig(
        retrievers=_names(args.retrievers) if args.retrievers else None,
        rankers=_names(args.rankers) if args.rankers else None,
        candidates_k=args.candidates_k,
        min_pair=args.min_pair,
        test_fraction=args.test_fraction,
        filter_train=args.filter_train,
        tune=args.tune,
        clip_artifacts=args.clip_artifacts,
        clip_steps=args.clip_steps,
        max_queries=args.max_queries,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    if config.candidates_k < 1 or config.min_pair < 1:
        print("error: --candidates-k and --min-pair must be at least 1", file=sys.stderr)
        return 2
    try:
        # Validate names before reading data or training anything.
        from imgsearch_tools.evaluation.runner import resolve_names

        resolve_names(config.retrievers, RETRIEVER_NAMES, "retriever")
        resolve_names(config.rankers, RANKER_NAMES, "ranker")
        catalogue = load_catalogue(args.data, show_progress=config.show_progress)
        from imgsearch_tools.evaluation.runner import evaluate

        report = evaluate(catalogue, config, command=getattr(args, "command_line", None))
    except (EvaluationError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(report, args.json)
    written = [args.json]
    if args.markdown:
        write_markdown(report, args.markdown)
        written.append(args.markdown)
    if args.plot:
        write_plot(report, args.plot)
        written.append(args.plot)
    if args.results_page:
        write_eval_page(report, args.results_page, args.plot)
        written.append(args.results_page)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
