"""The ``imgsearch demo-data`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from imgsearch_tools import outputs
from imgsearch_tools.demo_data.conversions import TASTE_WEIGHT, TASTES
from imgsearch_tools.demo_data.tables import generate


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``imgsearch demo-data``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The object returned by ``ArgumentParser.add_subparsers``.
    """
    parser = subparsers.add_parser(
        "demo-data",
        help="write a seeded synthetic catalogue in the Unsplash Lite layout",
        description="Write a seeded synthetic catalogue (tables and drawn images) into OUT. "
        "The catalogue is built in a temporary folder beside OUT and moved into place; OUT "
        "must be new, empty, or a folder demo-data wrote before (it is then replaced).",
    )
    parser.add_argument(
        "out",
        metavar="OUT",
        help="folder to write: new, empty, or one demo-data wrote before (it is replaced)",
    )
    parser.add_argument("--photos", type=int, default=5000, help="number of photos")
    parser.add_argument("--users", type=int, default=2000, help="number of users")
    parser.add_argument("--conversions", type=int, default=150_000, help="number of conversions")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--no-images", action="store_true", help="write the tables only")
    parser.add_argument(
        "--image-workers",
        type=int,
        default=None,
        help="processes drawing the images (default: the cores other processes leave idle); "
        "an interrupted run's complete images are kept and the next run draws the rest",
    )
    parser.add_argument(
        "--taste",
        choices=TASTES,
        default="content",
        help="what users' tastes are about: the photos' colour and shape (content, the "
        "default), hidden photo attributes only conversions reveal (ids), or nothing: "
        "popularity alone (none)",
    )
    parser.add_argument(
        "--taste-strength",
        type=float,
        default=TASTE_WEIGHT,
        help="weight w of a matched favourite: P(photo) ∝ popularity × exp(w × matches) "
        "(default: %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT that demo-data did not make, beside its files "
        "(none of them is deleted or overwritten; refused if OUT holds tables)",
    )
    parser.set_defaults(handler=_run_demo_data)


def _run_demo_data(args: argparse.Namespace) -> int:
    try:
        summary = generate(
            args.out,
            n_photos=args.photos,
            n_users=args.users,
            n_conversions=args.conversions,
            seed=args.seed,
            image_size=args.image_size,
            show_progress=not args.quiet,
            with_images=not args.no_images,
            taste=args.taste,
            taste_strength=args.taste_strength,
            force=args.force,
            image_workers=args.image_workers,
        )
    except (ValueError, outputs.RefusedFolder) as error:
        print(f"demo-data: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}))
    return 0
