"""Read and validate an Unsplash Lite folder into a normalised :class:`Catalogue`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

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
    map_distinct,
    normalise_keyword,
)
from imgsearch.data_report import DataError, DataReport
from imgsearch.unsplash_layout import (
    CONFIDENCE_COLUMNS,
    OPTIONAL_TABLES,
    TABLES,
    UNUSED_TABLES,
)
from imgsearch.unsplash_shards import read_table_shard, warn_rows


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
                parts.append(read_table_shard(path, table, file_number, strict, report))
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


# --- normalising the tables --------------------------------------------------------------------


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
    warn_rows(
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
    warn_rows(
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
    warn_rows(
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
    warn_rows(
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
    label = map_distinct(frame["label"], normalise_keyword).to_numpy()
    empty = (label == "") & ~unknown
    warn_rows(report, shards, frame, np.flatnonzero(empty), lambda row: "empty label; row dropped")
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
    color = map_distinct(frame["keyword"], normalise_keyword).to_numpy()
    empty = (color == "") & ~unknown
    warn_rows(report, shards, frame, np.flatnonzero(empty), lambda row: "empty colour; dropped")
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
    conversion_type = map_distinct(frame["conversion_type"], str.strip).to_numpy()[kept]
    keyword_code, vocabulary = _keyword_codes(frame["keyword"].iloc[kept])
    # Users come from kept conversions; dropping exact duplicates below loses no user.
    user_idx, user_ids = pd.factorize(
        frame["anonymous_user_id"].to_numpy()[kept], sort=True, use_na_sentinel=False
    )
    country = map_distinct(frame["conversion_country"], str.strip).to_numpy()[kept]
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
    warn_rows(
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
