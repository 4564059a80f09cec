"""The `imgsearch` command line: one entry point, subcommands contributed by each module."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# Each module exposes ``add_commands(subparsers)``; keep heavy imports (torch, faiss) inside
# the handlers so `imgsearch --help` and light commands start fast.
COMMAND_MODULES = [
    "imgsearch_tools.build_commands",
    "imgsearch_tools.serve",
    "imgsearch_tools.commands",
    "imgsearch_tools.conversions",
    "imgsearch_tools.demo_data",
    "imgsearch_tools.evaluation.commands",
    "imgsearch_tools.bench.arguments",
    "imgsearch_tools.bench.filters",
    "imgsearch_tools.bench.token_match",
    "imgsearch_tools.bench.scale",
    "imgsearch_tools.bench.ingest",
    "imgsearch_tools.catalog_commands",
    "imgsearch_tools.certs",
    "imgsearch_tools.clip_commands",
    "imgsearch_tools.web.commands",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every module's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="imgsearch", description="Personalized image search over gRPC."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line as given, for the reports that record what produced their figures.
    args.command_line = shlex.join(["imgsearch", *(sys.argv[1:] if argv is None else argv)])
    try:
        status = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
