"""The photo filter flags of client commands (``imgsearch search``), as a ``PhotoFilter``."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb

ORIENTATIONS = {
    name.removeprefix("ORIENTATION_").lower(): value
    for name, value in pb.Orientation.items()
    if value
}


def utc_time(text: str) -> datetime:
    """An ISO date or time (``2019-05-01``, ``2019-05-01T12:00``); naive means UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date or time like 2019-05-01 or 2019-05-01T12:00, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    """Add the filter flags; :func:`photo_filter` reads them back."""
    group = p.add_argument_group("filters (every one given must hold)")
    group.add_argument(
        "--orientation",
        choices=list(ORIENTATIONS),
        default=None,
        help="only photos of this orientation (from their width and height)",
    )
    group.add_argument(
        "--color",
        action="append",
        default=[],
        help="a dominant colour the photo must have (repeat for any of several)",
    )
    group.add_argument(
        "--photographer",
        action="append",
        default=[],
        help="photographer username (repeat for any of several)",
    )
    featured = group.add_mutually_exclusive_group()
    featured.add_argument(
        "--featured", dest="featured", action="store_true", default=None, help="featured only"
    )
    featured.add_argument(
        "--not-featured", dest="featured", action="store_false", help="not featured only"
    )
    group.add_argument(
        "--submitted-after", type=utc_time, default=None, help="submitted at or after (UTC)"
    )
    group.add_argument(
        "--submitted-before", type=utc_time, default=None, help="submitted before (UTC)"
    )
    group.add_argument(
        "--min-downloads", type=int, default=0, help="only photos downloaded at least this often"
    )
    group.add_argument(
        "--min-views", type=int, default=0, help="only photos viewed at least this often"
    )


def photo_filter(args: argparse.Namespace) -> pb.PhotoFilter:
    """The ``PhotoFilter`` the flags of ``args`` describe (empty: no filter)."""
    result = pb.PhotoFilter(
        colors=args.color,
        photographer_usernames=args.photographer,
        min_downloads=args.min_downloads,
        min_views=args.min_views,
    )
    if args.orientation:
        result.orientation = ORIENTATIONS[args.orientation]
    if args.featured is not None:
        result.featured = args.featured
    if args.submitted_after is not None:
        result.submitted_after.FromDatetime(args.submitted_after)
    if args.submitted_before is not None:
        result.submitted_before.FromDatetime(args.submitted_before)
    return result
