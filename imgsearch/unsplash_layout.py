"""The Unsplash Lite layout the loader reads: its tables, their columns and value formats."""

from __future__ import annotations

import pandas as pd

# The tables read, in reading order (photos first: the others refer to its ids).
TABLES = ("photos", "keywords", "conversions")
# Read when present: ``colors`` (Unsplash Lite's: each photo's dominant colours, what the colour
# filter matches), and ``labels`` (photo_id, label): what photos really show, e.g. a judged
# sample, or the demo's drawn content; not part of Unsplash Lite, evaluation only.
OPTIONAL_TABLES = ("colors", "labels")
# Tables of Unsplash Lite that the catalogue does not use; noted in the report when present.
UNUSED_TABLES = ("collections",)
# The columns of Unsplash Lite's conversions table, in the dataset's order (what writers of
# that layout write: the demo generator, the export of logged conversions).
CONVERSIONS_LAYOUT = (
    "converted_at",
    "conversion_type",
    "keyword",
    "photo_id",
    "anonymous_user_id",
    "conversion_country",
)
CONFIDENCE_COLUMNS = ("ai_service_1_confidence", "ai_service_2_confidence")
REQUIRED_COLUMNS = {
    "photos": ("photo_id", "photo_image_url"),
    "keywords": ("photo_id", "keyword"),
    "conversions": ("converted_at", "keyword", "photo_id", "anonymous_user_id"),
    "labels": ("photo_id", "label"),
    "colors": ("photo_id", "keyword"),
}
OPTIONAL_COLUMNS = {
    "photos": (
        "photo_description",
        "ai_description",
        "photographer_username",
        "stats_views",
        "stats_downloads",
        "photo_width",
        "photo_height",
        "photo_featured",
        "photo_submitted_at",
    ),
    "keywords": CONFIDENCE_COLUMNS,
    "conversions": ("conversion_type", "conversion_country"),
    "labels": (),
    "colors": ("ai_coverage",),
}
INTEGER_COLUMNS = ("stats_views", "stats_downloads", "photo_width", "photo_height")
# How Unsplash Lite writes booleans (``photo_featured``); an empty value reads as false.
TRUE_VALUES = frozenset({"t", "true", "1"})
FALSE_VALUES = frozenset({"f", "false", "0", ""})
# Columns that identify something: an empty value makes the row meaningless.
ID_COLUMNS = {
    "photos": ("photo_id",),
    "keywords": ("photo_id",),
    "conversions": ("photo_id", "anonymous_user_id"),
    "labels": ("photo_id",),
    "colors": ("photo_id",),
}
INTEGER_PATTERN = r"\s*[+-]?\d+\s*"
# Bookkeeping columns carried with every row until the tables are normalised.
FILE_COLUMN = "_file"
LINE_COLUMN = "_line"
# Example warnings kept per kind of problem, so that one noisy kind does not hide the others.
EXAMPLES_PER_KIND = 3
EXPECTED_TIME = "expected a timestamp like '2020-06-30 14:12:25.402'"
EARLIEST_TIME = pd.Timestamp("1678-01-01", tz="UTC")
LATEST_TIME = pd.Timestamp("2261-12-31", tz="UTC")
