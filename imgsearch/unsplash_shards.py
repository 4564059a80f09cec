"""Reading one shard of an Unsplash Lite table: parsed columns, every problem located by file
and line, malformed rows raised (strict) or skipped and counted."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import map_distinct
from imgsearch.data_report import DataError, DataReport
from imgsearch.unsplash_layout import (
    CONFIDENCE_COLUMNS,
    EARLIEST_TIME,
    EXAMPLES_PER_KIND,
    EXPECTED_TIME,
    FALSE_VALUES,
    FILE_COLUMN,
    ID_COLUMNS,
    INTEGER_COLUMNS,
    INTEGER_PATTERN,
    LATEST_TIME,
    LINE_COLUMN,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    TRUE_VALUES,
)


def read_table_shard(
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
    frame[FILE_COLUMN] = np.int32(file_number)

    # Every problem found: (row positions in ``frame``, column, detail per row).
    problems: list[tuple[np.ndarray, str | None, Callable[[int], str]]] = []
    for column in ID_COLUMNS[table]:
        frame[column] = map_distinct(frame[column], str.strip)
        empty = np.flatnonzero(frame[column].to_numpy() == "")
        problems.append((empty, column, lambda row: "empty value"))
    if table == "photos":
        for column in INTEGER_COLUMNS:
            text = frame[column].str.strip()
            is_integer = text.str.fullmatch(INTEGER_PATTERN).to_numpy(dtype=bool)
            bad = np.flatnonzero(~is_integer & (text != "").to_numpy())
            problems.append((bad, column, _got("expected an integer", frame[column])))
            values = pd.to_numeric(text.where(is_integer, "0"))
            frame[column] = values.astype(np.int64)
        featured = frame["photo_featured"].str.strip().str.lower()
        is_true = featured.isin(TRUE_VALUES).to_numpy(dtype=bool)
        bad = np.flatnonzero(~is_true & ~featured.isin(FALSE_VALUES).to_numpy(dtype=bool))
        problems.append((bad, "photo_featured", _got("expected t or f", frame["photo_featured"])))
        frame["photo_featured"] = is_true
        submitted = frame["photo_submitted_at"]
        times, bad = _parse_times(submitted)
        bad = bad[(submitted.iloc[bad].str.strip() != "").to_numpy(dtype=bool)]
        problems.append((bad, "photo_submitted_at", _got(EXPECTED_TIME, submitted)))
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
        problems.append((bad, "converted_at", _got(EXPECTED_TIME, frame["converted_at"])))
        frame["converted_at"] = times

    lines = frame[LINE_COLUMN].to_numpy()
    report.rows_read[table] = report.rows_read.get(table, 0) + len(frame) + len(bad_lines)
    if strict:
        first = _first_problem(path, lines, bad_lines, problems)
        if first is not None:
            raise first
        return frame
    malformed = np.zeros(len(frame), dtype=bool)
    examples = list(bad_lines[:EXAMPLES_PER_KIND])
    report.warnings_total += max(0, len(bad_lines) - EXAMPLES_PER_KIND)
    for rows, column, detail in problems:
        malformed[rows] = True
        examples.extend(
            (int(lines[row]), f"column {column!r}: {detail(row)}")
            for row in rows[:EXAMPLES_PER_KIND]
        )
        report.warnings_total += max(0, len(rows) - EXAMPLES_PER_KIND)
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
        frame[LINE_COLUMN] = data_lines
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
    frame[LINE_COLUMN] = data_lines
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
    times = times.where(times.between(EARLIEST_TIME, LATEST_TIME))
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


def _where(shards: list[Path], frame: pd.DataFrame, row: int) -> str:
    """``file:line`` of a row of a concatenated table."""
    return f"{shards[frame[FILE_COLUMN].iat[row]].name}:{frame[LINE_COLUMN].iat[row]}"


def warn_rows(
    report: DataReport,
    shards: list[Path],
    frame: pd.DataFrame,
    rows: np.ndarray,
    describe: Callable[[int], str],
) -> None:
    """Warn about the first few of ``rows`` (positions in ``frame``); count the rest too."""
    for row in rows[:EXAMPLES_PER_KIND]:
        report.warn(f"{_where(shards, frame, row)}: {describe(row)}")
    report.warnings_total += max(0, len(rows) - EXAMPLES_PER_KIND)
