"""What reading a data folder found: :class:`DataError` (file, line, column) and
:class:`DataReport` (rows read, kept and dropped, with example warnings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from imgsearch.unsplash_layout import (
    OPTIONAL_TABLES,
    TABLES,
)


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
