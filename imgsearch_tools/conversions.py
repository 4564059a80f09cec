"""`imgsearch export-conversions`: the logged conversions as an Unsplash Lite conversions table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    """Register export-conversions."""
    p = subparsers.add_parser(
        "export-conversions",
        help="write the logged conversions as an Unsplash Lite conversions table",
        description="Write every conversion logged through FeedbackService, oldest first, as "
        "a tab-separated table with the Unsplash Lite conversions columns (converted_at, "
        "conversion_type, keyword, photo_id, anonymous_user_id, conversion_country) plus "
        "event_id. The store is found as the servers find it: --conversions-dsn, else "
        "--conversions-db, else the SQLite file beside the artifact root.",
    )
    p.add_argument("out", metavar="OUT", help="the file to write (- for stdout)")
    add_store_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_export_conversions)


def add_store_arguments(p: argparse.ArgumentParser, artifacts: bool = True) -> None:
    """--conversions-db and --conversions-dsn (and --artifacts), as `serve` has them."""
    if artifacts:
        p.add_argument(
            "--artifacts", default=None, help="artifact root (IMGSEARCH_ARTIFACTS, var/artifacts)"
        )
    p.add_argument(
        "--conversions-db",
        default=None,
        help="SQLite file of logged conversions (IMGSEARCH_CONVERSIONS_DB; default: beside "
        "the artifact root)",
    )
    p.add_argument(
        "--conversions-dsn",
        default=None,
        help="PostgreSQL DSN of the conversion store (IMGSEARCH_CONVERSIONS_DSN)",
    )


def store_location(args) -> dict:
    """``open_store`` arguments from the flags, the environment and the defaults."""
    from imgsearch.config import ConversionStoreConfig, with_overrides

    config = with_overrides(
        ConversionStoreConfig(),
        artifacts=args.artifacts,
        conversions_db=args.conversions_db,
        conversions_dsn=args.conversions_dsn,
    )
    return config.conversion_store()


def open_existing_store(location: dict):
    """Open the store for reading; a SQLite file that does not exist is an error, not created.

    Raises
    ------
    StoreError
        When there is no store there or it cannot be opened.
    """
    from imgsearch.conversion_store import StoreError, open_store

    if "db" in location and not Path(location["db"]).exists():
        raise StoreError(
            f"no conversion store at {location['db']} (nothing logged yet, or another "
            "--artifacts / --conversions-db?)"
        )
    return open_store(**location)


def cmd_export_conversions(args) -> int:
    from imgsearch.conversion_store import StoreError
    from imgsearch.conversion_store.tables import write_conversions_tsv

    try:
        with open_existing_store(store_location(args)) as store:
            total = store.count()
            rows = write_conversions_tsv(
                store.scan(), args.out, total=None if args.quiet else total
            )
            where = store.location
    except (StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {rows:,} logged conversions from {where} to {args.out}", file=sys.stderr)
    return 0
