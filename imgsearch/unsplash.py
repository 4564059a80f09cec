"""Read and validate an Unsplash Lite folder into a normalised :class:`Catalogue`."""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from imgsearch.catalogue import (
    COLOR_COLUMNS,
    CONVERSION_COLUMNS,
    KEYWORD_COLUMNS,
    LABEL_COLUMNS,
    PHOTO_COLUMNS,
    USER_COLUMNS,
    Catalogue,
    normalise_keyword,
)

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
_TRUE = frozenset({"t", "true", "1"})
_FALSE = frozenset({"f", "false", "0", ""})
# Columns that identify something: an empty value makes the row meaningless.
ID_COLUMNS = {
    "photos": ("photo_id",),
    "keywords": ("photo_id",),
    "conversions": ("photo_id", "anonymous_user_id"),
    "labels": ("photo_id",),
    "colors": ("photo_id",),
}
_INTEGER_PATTERN = r"\s*[+-]?\d+\s*"
# Bookkeeping columns carried with every row until the tables are normalised.
_FILE = "_file"
_LINE = "_line"
# Example warnings kept per kind of problem, so that one noisy kind does not hide the others.
_EXAMPLES_PER_KIND = 3
_EXPECTED_TIME = "expected a timestamp like '2020-06-30 14:12:25.402'"
_EARLIEST = pd.Timestamp("1678-01-01", tz="UTC")
_LATEST = pd.Timestamp("2261-12-31", tz="UTC")


class DataError(ValueError):
    """A problem in the input data, located by file, line and column.

    Parameters
    ----------
    path
        The file (or, for a missing table, the folder) the problem is in.
    line
        1-based line number in ``path`` (the header is line 1), or None.
    column
        The column concerned, or None when the problem is the whole row or file.
    detail
        What is wrong, e.g. ``"expected an integer, got 'abc'"``.

    The message reads ``<path>:<line>: column '<column>': <detail>``.
    """

    def __init__(self, path: str | Path, line: int | None, column: str | None, detail: str) -> None:
        self.path = Path(path)
        self.line = line
        self.column = column
        self.detail = detail
        where = str(path) if line is None else f"{path}:{line}"
        what = detail if column is None else f"column {column!r}: {detail}"
        super().__init__(f"{where}: {what}")


@dataclass
class DataReport:
    """What :func:`read_unsplash` read, kept and dropped, with example warnings.

    Attributes
    ----------
    data_dir
        The folder read.
    files
        Shard file names read, per table.
    rows_read
        Data rows in the files (header rows and blank lines excluded), per table.
    rows_kept
        Rows in the catalogue, per table (``photos``, ``keywords``, ``users``, ``conversions``,
        and ``labels`` when the folder has them).
    malformed_rows
        Rows skipped as malformed (only with ``strict=False``), per table.
    duplicate_rows
        Duplicate rows dropped, per table: repeated ``photo_id`` (first kept), repeated
        (photo, keyword) (highest confidence kept), exact duplicate conversions.
    unknown_photo_keywords, unknown_photo_conversions, unknown_photo_labels
        Rows dropped because their ``photo_id`` is not in the photos table.
    empty_keywords
        Keyword (or label) rows dropped because the text is empty once normalised.
    user_suggested_keywords
        Keyword rows kept with no AI confidence (given confidence 0.0).
    photos_with_images
        Photos whose ``images/<photo_id>.jpg`` exists.
    unused_files
        Files of optional tables (collections, colors) present but not used.
    warnings
        Up to ``MAX_WARNINGS`` examples, each starting with ``file:line:``.
    warnings_total
        How many warnings there were in all.
    """

    MAX_WARNINGS: ClassVar[int] = 10

    data_dir: str = ""
    files: dict[str, list[str]] = field(default_factory=dict)
    rows_read: dict[str, int] = field(default_factory=dict)
    rows_kept: dict[str, int] = field(default_factory=dict)
    malformed_rows: dict[str, int] = field(default_factory=dict)
    duplicate_rows: dict[str, int] = field(default_factory=dict)
    unknown_photo_keywords: int = 0
    unknown_photo_conversions: int = 0
    unknown_photo_labels: int = 0
    empty_keywords: int = 0
    user_suggested_keywords: int = 0
    photos_with_images: int = 0
    unused_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    warnings_total: int = 0

    def warn(self, message: str) -> None:
        """Count a warning and keep it as an example while fewer than ``MAX_WARNINGS`` are kept."""
        self.warnings_total += 1
        if len(self.warnings) < self.MAX_WARNINGS:
            self.warnings.append(message)

    @property
    def rows_dropped(self) -> int:
        """Rows read but not in the catalogue, all tables and reasons together."""
        return (
            sum(self.malformed_rows.values())
            + sum(self.duplicate_rows.values())
            + self.unknown_photo_keywords
            + self.unknown_photo_conversions
            + self.unknown_photo_labels
            + self.empty_keywords
        )

    def summary(self) -> str:
        """Return a few human-readable lines: counts per table, drops, example warnings.

        Returns
        -------
        str
            Multi-line text without a trailing newline.
        """
        dropped_extra = {
            "keywords": [
                ("unknown photo", self.unknown_photo_keywords),
                ("empty keyword", self.empty_keywords),
            ],
            "conversions": [("unknown photo", self.unknown_photo_conversions)],
            "labels": [("unknown photo", self.unknown_photo_labels)],
        }
        lines = [f"Unsplash Lite data in {self.data_dir}:"]
        for table in TABLES + tuple(t for t in OPTIONAL_TABLES if t in self.files):
            drops = [
                ("malformed", self.malformed_rows.get(table, 0)),
                ("duplicate", self.duplicate_rows.get(table, 0)),
                *dropped_extra.get(table, []),
            ]
            dropped = ", ".join(f"{count:,} {why}" for why, count in drops if count)
            line = (
                f"  {table:<12}{self.rows_read.get(table, 0):>11,} read"
                f"{self.rows_kept.get(table, 0):>11,} kept"
            )
            if dropped:
                line += f"  (dropped: {dropped})"
            if table == "photos":
                line += f"; {self.photos_with_images:,} with images"
            if table == "keywords" and self.user_suggested_keywords:
                line += f"; {self.user_suggested_keywords:,} without AI confidence"
            lines.append(line)
        lines.append(f"  {'users':<12}{self.rows_kept.get('users', 0):>27,} with conversions")
        if self.unused_files:
            lines.append(f"  not used: {', '.join(self.unused_files)}")
        if self.warnings_total:
            shown = len(self.warnings)
            lines.append(f"  warnings ({shown} of {self.warnings_total:,} shown):")
            lines.extend(f"    {warning}" for warning in self.warnings)
        return "\n".join(lines)


def find_shards(data_dir: str | Path, table: str) -> list[Path]:
    """Return the files of ``table`` in ``data_dir`` in reading order.

    Parameters
    ----------
    data_dir
        The Unsplash Lite folder.
    table
        Table name, e.g. ``"photos"``.

    Returns
    -------
    list of Path
        ``<table>.tsv`` and/or ``<table>.tsv000``, ``<table>.tsv001``… ordered by shard number
        (the unnumbered file first); empty when the table is absent.
    """
    pattern = re.compile(rf"{re.escape(table)}\.tsv(\d*)")
    shards = []
    for entry in os.scandir(data_dir):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            number = match.group(1)
            shards.append((int(number) if number else -1, entry.name))
    return [Path(data_dir) / name for _, name in sorted(shards)]


def read_unsplash(
    data_dir: str | Path, show_progress: bool = True, strict: bool = True
) -> tuple[Catalogue, DataReport]:
    """Read an Unsplash Lite folder into a normalised catalogue and a report of what was dropped.

    Parameters
    ----------
    data_dir
        Folder with ``photos.tsv*``, ``keywords.tsv*`` and ``conversions.tsv*`` (tab-separated,
        one header row per shard), and optionally ``images/<photo_id>.jpg``.
    show_progress
        Show a progress bar on stderr.
    strict
        Raise :class:`DataError` on the first malformed row (wrong number of fields, bad number
        or timestamp, empty id). With False such rows are skipped and counted in the report.

    Returns
    -------
    catalogue : Catalogue
        Photos sorted by ``photo_id``; keywords deduplicated per (photo, keyword) with the
        highest confidence; users of the kept conversions; conversions sorted by time (stable).
    report : DataReport
        Counts of rows read, kept and dropped, with example warnings.

    Raises
    ------
    DataError
        A required table or column is missing, or (with ``strict``) a row is malformed.
        Unknown photo ids and duplicates are never fatal: they are dropped and counted.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, None, None, "not a folder")
    report = DataReport(data_dir=str(data_dir))
    shards = {}
    for table in TABLES:
        shards[table] = find_shards(data_dir, table)
        if not shards[table]:
            raise DataError(
                data_dir,
                None,
                None,
                f"missing table {table!r}: expected {table}.tsv or {table}.tsv000, "
                f"{table}.tsv001, ...",
            )
        report.files[table] = [path.name for path in shards[table]]
    for table in OPTIONAL_TABLES:
        if found := find_shards(data_dir, table):
            shards[table] = found
            report.files[table] = [path.name for path in found]
    for table in UNUSED_TABLES:
        report.unused_files.extend(path.name for path in find_shards(data_dir, table))

    total_bytes = sum(path.stat().st_size for paths in shards.values() for path in paths)
    frames = {}
    with tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="reading Unsplash Lite",
        file=sys.stderr,
        disable=not show_progress,
    ) as progress:
        for table in shards:
            parts = []
            for file_number, path in enumerate(shards[table]):
                progress.set_postfix_str(path.name)
                parts.append(_read_table_shard(path, table, file_number, strict, report))
                progress.update(path.stat().st_size)
            frames[table] = pd.concat(parts, ignore_index=True)

    photos = _normalise_photos(frames["photos"], data_dir, shards["photos"], report)
    keywords = _normalise_keywords(frames["keywords"], photos, shards["keywords"], report)
    users, conversions = _normalise_conversions(
        frames["conversions"], photos, shards["conversions"], report
    )
    labels = colors = None
    if "labels" in frames:
        labels = _normalise_labels(frames["labels"], photos, shards["labels"], report)
    if "colors" in frames:
        colors = _normalise_colors(frames["colors"], photos, shards["colors"], report)
    report.rows_kept = {
        "photos": len(photos),
        "keywords": len(keywords),
        "users": len(users),
        "conversions": len(conversions),
    }
    if labels is not None:
        report.rows_kept["labels"] = len(labels)
    if colors is not None:
        report.rows_kept["colors"] = len(colors)
    catalogue = Catalogue(
        photos=photos,
        keywords=keywords,
        users=users,
        conversions=conversions,
        data_dir=str(data_dir.resolve()),
        labels=labels,
        colors=colors,
    )
    return catalogue, report


# --- reading one shard -------------------------------------------------------------------------


def _read_table_shard(
    path: Path, table: str, file_number: int, strict: bool, report: DataReport
) -> pd.DataFrame:
    """Read one shard, check it, and return its rows with values parsed.

    Rows carry ``_file`` (``file_number``) and ``_line`` (1-based line in the shard). Text
    columns are strings; ``stats_*`` int64; confidences float64 (NaN when empty);
    ``converted_at`` datetime64[ns]. Optional columns the shard lacks are added empty.
    """
    data = path.read_bytes()
    header, bad_lines, frame = _parse_tsv(path, data, table)
    wanted = REQUIRED_COLUMNS[table] + OPTIONAL_COLUMNS[table]
    for column in wanted:
        if column not in frame:
            frame[column] = pd.Series("", index=frame.index, dtype=object)
    frame[_FILE] = np.int32(file_number)

    # Every problem found: (row positions in ``frame``, column, detail per row).
    problems: list[tuple[np.ndarray, str | None, Callable[[int], str]]] = []
    for column in ID_COLUMNS[table]:
        frame[column] = _map_distinct(frame[column], str.strip)
        empty = np.flatnonzero(frame[column].to_numpy() == "")
        problems.append((empty, column, lambda row: "empty value"))
    if table == "photos":
        for column in INTEGER_COLUMNS:
            text = frame[column].str.strip()
            is_integer = text.str.fullmatch(_INTEGER_PATTERN).to_numpy(dtype=bool)
            bad = np.flatnonzero(~is_integer & (text != "").to_numpy())
            problems.append((bad, column, _got("expected an integer", frame[column])))
            values = pd.to_numeric(text.where(is_integer, "0"))
            frame[column] = values.astype(np.int64)
        featured = frame["photo_featured"].str.strip().str.lower()
        is_true = featured.isin(_TRUE).to_numpy(dtype=bool)
        bad = np.flatnonzero(~is_true & ~featured.isin(_FALSE).to_numpy(dtype=bool))
        problems.append((bad, "photo_featured", _got("expected t or f", frame["photo_featured"])))
        frame["photo_featured"] = is_true
        submitted = frame["photo_submitted_at"]
        times, bad = _parse_times(submitted)
        bad = bad[(submitted.iloc[bad].str.strip() != "").to_numpy(dtype=bool)]
        problems.append((bad, "photo_submitted_at", _got(_EXPECTED_TIME, submitted)))
        frame["photo_submitted_at"] = times
    if table in ("keywords", "colors"):
        for column in CONFIDENCE_COLUMNS if table == "keywords" else ("ai_coverage",):
            # to_numeric reads "" as NaN (missing) and ignores surrounding spaces.
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
            bad = np.flatnonzero(np.isnan(values) & (frame[column].to_numpy() != ""))
            problems.append((bad, column, _got("expected a number", frame[column])))
            frame[column] = values
    if table == "conversions":
        times, bad = _parse_times(frame["converted_at"])
        problems.append((bad, "converted_at", _got(_EXPECTED_TIME, frame["converted_at"])))
        frame["converted_at"] = times

    lines = frame[_LINE].to_numpy()
    report.rows_read[table] = report.rows_read.get(table, 0) + len(frame) + len(bad_lines)
    if strict:
        first = _first_problem(path, lines, bad_lines, problems)
        if first is not None:
            raise first
        return frame
    malformed = np.zeros(len(frame), dtype=bool)
    examples = list(bad_lines[:_EXAMPLES_PER_KIND])
    report.warnings_total += max(0, len(bad_lines) - _EXAMPLES_PER_KIND)
    for rows, column, detail in problems:
        malformed[rows] = True
        examples.extend(
            (int(lines[row]), f"column {column!r}: {detail(row)}")
            for row in rows[:_EXAMPLES_PER_KIND]
        )
        report.warnings_total += max(0, len(rows) - _EXAMPLES_PER_KIND)
    for line, detail in sorted(examples):
        report.warn(f"{path.name}:{line}: {detail}; row skipped")
    report.malformed_rows[table] = (
        report.malformed_rows.get(table, 0) + int(malformed.sum()) + len(bad_lines)
    )
    return frame[~malformed].reset_index(drop=True)


def _parse_tsv(
    path: Path, data: bytes, table: str
) -> tuple[list[str], list[tuple[int, str]], pd.DataFrame]:
    """Split ``data`` into the header, lines with a wrong field count, and the other rows.

    Lines end at ``\\n`` only (a stray ``\\r`` inside a field does not end a row; a ``\\r``
    before ``\\n`` is dropped). The field count of every line is found with numpy on the raw
    bytes, so bad lines are located exactly and left out of the pandas parse via ``skiprows``.

    Returns
    -------
    header
        Column names of the shard.
    bad_lines
        (1-based line, detail) for each data line with a wrong number of fields.
    frame
        The wanted columns (required and optional ones present) as strings, plus ``_line``.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    line_ends = np.flatnonzero(raw == ord("\n"))
    if len(raw) and raw[-1] != ord("\n"):
        line_ends = np.append(line_ends, len(raw))
    if len(line_ends) == 0:
        raise DataError(path, 1, None, "empty file: expected a header row")
    line_starts = np.concatenate(([0], line_ends[:-1] + 1))
    header_text = data[: line_ends[0]].decode("utf-8-sig", errors="replace").rstrip("\r")
    header = header_text.split("\t")
    _check_header(path, header, table)

    tabs_before = np.searchsorted(np.flatnonzero(raw == ord("\t")), line_ends)
    fields = np.diff(tabs_before, prepend=0) + 1
    lengths = line_ends - line_starts
    ends_with_cr = lengths > 0
    ends_with_cr[ends_with_cr] = raw[line_ends[ends_with_cr] - 1] == ord("\r")
    blank = (lengths == 0) | ((lengths == 1) & ends_with_cr)
    bad = (fields != len(header)) & ~blank
    bad[0] = False
    bad_indexes = np.flatnonzero(bad)
    bad_lines = [
        (int(index) + 1, f"expected {len(header)} tab-separated fields, got {fields[index]}")
        for index in bad_indexes
    ]
    skipped = bad | blank
    skipped[0] = True
    data_lines = np.flatnonzero(~skipped) + 1

    wanted = REQUIRED_COLUMNS[table] + OPTIONAL_COLUMNS[table]
    # First occurrence of each wanted column; extra (and repeated) columns are not parsed.
    positions = {}
    for position, name in enumerate(header):
        if name in wanted and name not in positions:
            positions[name] = position
    if len(data_lines) == 0:  # pandas refuses a file whose every line is skipped
        frame = pd.DataFrame({name: pd.Series([], dtype=object) for name in positions})
        frame[_LINE] = data_lines
        return header, bad_lines, frame
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            sep="\t",
            header=None,
            usecols=sorted(positions.values()),
            skiprows=set(np.flatnonzero(skipped).tolist()),
            dtype=object,
            na_filter=False,
            quoting=csv.QUOTE_NONE,
            lineterminator="\n",
            skip_blank_lines=False,
            encoding="utf-8",
            encoding_errors="replace",
            engine="c",
        )
    except pd.errors.ParserError as error:  # the pre-scan should make this unreachable
        match = re.search(r"line (\d+)", str(error))
        raise DataError(path, int(match.group(1)) if match else None, None, str(error)) from error
    if len(frame) != len(data_lines):
        raise DataError(path, None, None, f"read {len(frame)} rows, expected {len(data_lines)}")
    frame.columns = [header[position] for position in frame.columns]
    last_column = header[-1]
    if last_column in positions and ends_with_cr.any():
        frame[last_column] = frame[last_column].str.removesuffix("\r")
    frame[_LINE] = data_lines
    return header, bad_lines, frame


def _check_header(path: Path, header: list[str], table: str) -> None:
    """Raise :class:`DataError` (line 1) when a required column is missing from ``header``."""
    present = set(header)
    for column in REQUIRED_COLUMNS[table]:
        if column not in present:
            raise DataError(
                path, 1, column, f"missing required column (header has: {', '.join(header)})"
            )
    if table == "keywords" and not present.intersection(CONFIDENCE_COLUMNS):
        raise DataError(
            path,
            1,
            CONFIDENCE_COLUMNS[0],
            f"missing required column: need {CONFIDENCE_COLUMNS[0]!r} or "
            f"{CONFIDENCE_COLUMNS[1]!r} (header has: {', '.join(header)})",
        )


def _parse_times(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Parse ISO timestamps to naive UTC ``datetime64[ns]``; also the rows that did not parse
    (NaT), an empty value among them."""
    times = pd.to_datetime(raw, format="ISO8601", utc=True, errors="coerce")
    # Beyond datetime64[ns]'s range (years 1677-2262) is a typo, not a date to keep.
    times = times.where(times.between(_EARLIEST, _LATEST))
    bad = np.flatnonzero(times.isna().to_numpy())
    return times.dt.tz_convert(None).astype("datetime64[ns]"), bad


def _got(expected: str, raw: pd.Series) -> Callable[[int], str]:
    """Return a detail formatter ``"<expected>, got '<raw value>'"`` for a row position."""
    return lambda row: f"{expected}, got {raw.iat[row]!r}"


def _first_problem(
    path: Path,
    lines: np.ndarray,
    bad_lines: list[tuple[int, str]],
    problems: list[tuple[np.ndarray, str | None, Callable[[int], str]]],
) -> DataError | None:
    """Return the error for the problem on the earliest line of the shard, or None."""
    candidates = []
    if bad_lines:
        line, detail = bad_lines[0]
        candidates.append((line, None, detail))
    for rows, column, detail in problems:
        if len(rows):
            candidates.append((int(lines[rows[0]]), column, detail(rows[0])))
    if not candidates:
        return None
    line, column, detail = min(candidates, key=lambda candidate: candidate[0])
    return DataError(path, line, column, detail)


# --- normalising the tables --------------------------------------------------------------------


def _where(shards: list[Path], frame: pd.DataFrame, row: int) -> str:
    """``file:line`` of a row of a concatenated table."""
    return f"{shards[frame[_FILE].iat[row]].name}:{frame[_LINE].iat[row]}"


def _warn_rows(
    report: DataReport,
    shards: list[Path],
    frame: pd.DataFrame,
    rows: np.ndarray,
    describe: Callable[[int], str],
) -> None:
    """Warn about the first few of ``rows`` (positions in ``frame``); count the rest too."""
    for row in rows[:_EXAMPLES_PER_KIND]:
        report.warn(f"{_where(shards, frame, row)}: {describe(row)}")
    report.warnings_total += max(0, len(rows) - _EXAMPLES_PER_KIND)


def _map_distinct(values: pd.Series, function: Callable[[str], str]) -> pd.Series:
    """Apply ``function`` once per distinct value: ids, keywords and countries repeat a lot."""
    codes, uniques = pd.factorize(values.to_numpy(), use_na_sentinel=False)
    mapped = np.array([function(value) for value in uniques], dtype=object)
    return pd.Series(mapped[codes], index=values.index, dtype=object)


def _keyword_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Normalise keywords; return per-row codes into the sorted distinct normalised keywords.

    Returns
    -------
    codes
        int64 per row; equal codes mean equal normalised keywords, and code order is text order.
    vocabulary
        The distinct normalised keywords, sorted (object array).
    """
    codes, uniques = pd.factorize(values.to_numpy(), use_na_sentinel=False)
    normalised = np.array([normalise_keyword(text) for text in uniques], dtype=object)
    vocabulary_codes, vocabulary = pd.factorize(normalised, sort=True, use_na_sentinel=False)
    return vocabulary_codes[codes].astype(np.int64), np.asarray(vocabulary, dtype=object)


def _conform(columns: dict[str, str], **values: np.ndarray | pd.Series) -> pd.DataFrame:
    """Build a table with exactly the contract's ``columns``, in order, with their dtypes."""
    return pd.DataFrame(
        {
            name: pd.Series(np.asarray(values[name]), dtype=dtype, copy=False)
            for name, dtype in columns.items()
        }
    )


def _photo_index(photos: pd.DataFrame) -> pd.Index:
    """An index of photo ids (object dtype, so lookups compare Python strings directly)."""
    return pd.Index(photos["photo_id"].to_numpy(), dtype=object)


def _normalise_photos(
    frame: pd.DataFrame, data_dir: Path, shards: list[Path], report: DataReport
) -> pd.DataFrame:
    """Drop repeated photo ids (first kept), sort by ``photo_id``, flag images on disk."""
    duplicate = frame["photo_id"].duplicated().to_numpy()
    _warn_rows(
        report,
        shards,
        frame,
        np.flatnonzero(duplicate),
        lambda row: f"duplicate photo_id {frame['photo_id'].iat[row]!r}; first row kept",
    )
    report.duplicate_rows["photos"] = int(duplicate.sum())
    photos = frame[~duplicate].sort_values("photo_id", kind="stable").reset_index(drop=True)
    photos["photo_idx"] = np.arange(len(photos), dtype=np.int32)
    images_dir = data_dir / "images"
    image_names: set[str] = set()
    if images_dir.is_dir():
        with os.scandir(images_dir) as entries:
            image_names = {entry.name for entry in entries if entry.name.endswith(".jpg")}
    has_image = (photos["photo_id"] + ".jpg").isin(image_names).to_numpy(dtype=bool)
    report.photos_with_images = int(has_image.sum())
    return _conform(
        PHOTO_COLUMNS,
        **{name: photos[name] for name in PHOTO_COLUMNS if name != "has_image"},
        has_image=has_image,
    )


def _map_photo_ids(
    frame: pd.DataFrame, photos: pd.DataFrame, shards: list[Path], report: DataReport, row: str
) -> tuple[np.ndarray, np.ndarray]:
    """Photo index per row (-1 when unknown) and the unknown mask; each unknown one is warned
    about as ``unknown photo_id '<id>'; <row> dropped``."""
    photo_idx = _photo_index(photos).get_indexer(frame["photo_id"].to_numpy())
    unknown = photo_idx < 0
    _warn_rows(
        report,
        shards,
        frame,
        np.flatnonzero(unknown),
        lambda i: f"unknown photo_id {frame['photo_id'].iat[i]!r}; {row} dropped",
    )
    return photo_idx, unknown


def _normalise_keywords(
    frame: pd.DataFrame, photos: pd.DataFrame, shards: list[Path], report: DataReport
) -> pd.DataFrame:
    """Map photo ids, normalise keywords, scale confidences, keep the best per (photo, keyword)."""
    photo_idx, unknown = _map_photo_ids(frame, photos, shards, report, "keyword")
    report.unknown_photo_keywords = int(unknown.sum())
    keyword_code, vocabulary = _keyword_codes(frame["keyword"])
    empty = (vocabulary == "")[keyword_code] & ~unknown
    _warn_rows(
        report, shards, frame, np.flatnonzero(empty), lambda row: "empty keyword; row dropped"
    )
    report.empty_keywords = int(empty.sum())

    kept = np.flatnonzero(~unknown & ~empty)
    confidence = frame[list(CONFIDENCE_COLUMNS)].to_numpy(dtype=np.float64)[kept]
    best = np.fmax(confidence[:, 0], confidence[:, 1])  # fmax: a missing (NaN) one is ignored
    # Keywords suggested by users have no AI confidence: kept, with the lowest confidence.
    no_confidence = np.isnan(best)
    report.user_suggested_keywords = int(no_confidence.sum())
    best[no_confidence] = 0.0
    best = np.clip(best / 100.0, 0.0, 1.0)

    # One int64 key per (photo, keyword), ordered like (photo_idx, keyword text).
    key = photo_idx[kept].astype(np.int64) * max(len(vocabulary), 1) + keyword_code[kept]
    duplicate = pd.Series(key).duplicated().to_numpy()
    _warn_rows(
        report,
        shards,
        frame,
        kept[duplicate],
        lambda row: (
            f"duplicate keyword {vocabulary[keyword_code[row]]!r} for photo "
            f"{frame['photo_id'].iat[row]!r}; highest confidence kept"
        ),
    )
    report.duplicate_rows["keywords"] = int(duplicate.sum())
    order = np.lexsort((-best, key))  # by key, then highest confidence first
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    best_rows = order[first]
    return _conform(
        KEYWORD_COLUMNS,
        photo_idx=photo_idx[kept][best_rows],
        keyword=vocabulary[keyword_code[kept][best_rows]],
        confidence=best[best_rows],
    )


def _normalise_labels(
    frame: pd.DataFrame, photos: pd.DataFrame, shards: list[Path], report: DataReport
) -> pd.DataFrame:
    """Map photo ids, normalise labels like keywords, drop unknown photos, empties, repeats."""
    photo_idx, unknown = _map_photo_ids(frame, photos, shards, report, "label")
    report.unknown_photo_labels = int(unknown.sum())
    label = _map_distinct(frame["label"], normalise_keyword).to_numpy()
    empty = (label == "") & ~unknown
    _warn_rows(report, shards, frame, np.flatnonzero(empty), lambda row: "empty label; row dropped")
    report.empty_keywords += int(empty.sum())
    table = pd.DataFrame({"photo_idx": photo_idx, "label": label})[~unknown & ~empty]
    duplicate = table.duplicated().to_numpy()
    report.duplicate_rows["labels"] = int(duplicate.sum())
    table = table[~duplicate].sort_values(["photo_idx", "label"], kind="stable")
    return _conform(LABEL_COLUMNS, photo_idx=table["photo_idx"], label=table["label"])


def _normalise_colors(
    frame: pd.DataFrame, photos: pd.DataFrame, shards: list[Path], report: DataReport
) -> pd.DataFrame:
    """Map photo ids, normalise colour names like keywords; drop unknown photos, empty names
    and repeats (the largest coverage kept)."""
    photo_idx, unknown = _map_photo_ids(frame, photos, shards, report, "colour")
    color = _map_distinct(frame["keyword"], normalise_keyword).to_numpy()
    empty = (color == "") & ~unknown
    _warn_rows(report, shards, frame, np.flatnonzero(empty), lambda row: "empty colour; dropped")
    table = pd.DataFrame(
        {"photo_idx": photo_idx, "color": color, "coverage": frame["ai_coverage"].to_numpy()}
    )[~unknown & ~empty]
    table = table.sort_values(["photo_idx", "color", "coverage"], ascending=[True, True, False])
    duplicate = table.duplicated(["photo_idx", "color"]).to_numpy()
    report.duplicate_rows["colors"] = int(duplicate.sum())
    table = table[~duplicate]
    return _conform(COLOR_COLUMNS, **{name: table[name] for name in COLOR_COLUMNS})


def _normalise_conversions(
    frame: pd.DataFrame, photos: pd.DataFrame, shards: list[Path], report: DataReport
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Map ids, drop unknown photos and exact duplicates, derive users, sort by time."""
    photo_idx, unknown = _map_photo_ids(frame, photos, shards, report, "conversion")
    report.unknown_photo_conversions = int(unknown.sum())

    kept = np.flatnonzero(~unknown)
    converted_at = frame["converted_at"].to_numpy()[kept]
    conversion_type = _map_distinct(frame["conversion_type"], str.strip).to_numpy()[kept]
    keyword_code, vocabulary = _keyword_codes(frame["keyword"].iloc[kept])
    # Users come from kept conversions; dropping exact duplicates below loses no user.
    user_idx, user_ids = pd.factorize(
        frame["anonymous_user_id"].to_numpy()[kept], sort=True, use_na_sentinel=False
    )
    country = _map_distinct(frame["conversion_country"], str.strip).to_numpy()[kept]
    # Exact duplicates, found on integer codes of every column (much faster than on text).
    codes = pd.DataFrame(
        {
            "converted_at": converted_at.view(np.int64),
            "conversion_type": pd.factorize(conversion_type, use_na_sentinel=False)[0],
            "keyword": keyword_code,
            "photo_idx": photo_idx[kept],
            "user_idx": user_idx,
            "conversion_country": pd.factorize(country, use_na_sentinel=False)[0],
        }
    )
    duplicate = codes.duplicated().to_numpy()
    _warn_rows(
        report,
        shards,
        frame,
        kept[duplicate],
        lambda row: "exact duplicate conversion; dropped",
    )
    report.duplicate_rows["conversions"] = int(duplicate.sum())

    rows = np.flatnonzero(~duplicate)
    rows = rows[np.argsort(converted_at[rows], kind="stable")]
    users = _conform(
        USER_COLUMNS,
        user_idx=np.arange(len(user_ids), dtype=np.int32),
        anonymous_user_id=np.asarray(user_ids, dtype=object),
    )
    conversions = _conform(
        CONVERSION_COLUMNS,
        converted_at=converted_at[rows],
        conversion_type=conversion_type[rows],
        keyword=vocabulary[keyword_code[rows]],
        photo_idx=photo_idx[kept][rows],
        user_idx=user_idx[rows],
        conversion_country=country[rows],
    )
    return users, conversions
