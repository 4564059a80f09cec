"""Logged events as Unsplash Lite conversions: a TSV export, and a merge into a catalogue."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import CONVERSION_COLUMNS, USER_COLUMNS, Catalogue
from imgsearch.conversion_store import ConversionEvent
from imgsearch.files import open_temporary
from imgsearch.unsplash_layout import CONVERSIONS_LAYOUT

# The Unsplash Lite conversions columns, then the idempotency key.
EXPORT_COLUMNS = (*CONVERSIONS_LAYOUT, "event_id")


def format_time(converted_at_us: int) -> str:
    """``2026-11-28 20:31:07.123456`` (UTC), the layout's timestamp with microseconds."""
    seconds, micros = divmod(int(converted_at_us), 1_000_000)
    stamp = np.datetime64(seconds, "s").astype(object)
    return f"{stamp:%Y-%m-%d %H:%M:%S}.{micros:06d}"


def _clean(text: str) -> str:
    # A tab or newline inside a field would break the TSV's rows.
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


def write_conversions_tsv(
    events: Iterable[ConversionEvent], out: str | Path, total: int | None = None
) -> int:
    """Write events as an Unsplash Lite ``conversions.tsv`` plus an ``event_id`` column.

    ``out`` is a file (written to a temporary name, then renamed) or ``-`` for stdout. A
    progress bar on stderr counts rows when ``total`` is given. Returns the rows written.
    """
    from tqdm import tqdm

    to_stdout = str(out) == "-"
    if not to_stdout and Path(out).is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file name such as {out}/logged.tsv")
    tmp = None if to_stdout else Path(f"{out}.tmp")
    handle = sys.stdout if to_stdout else open_temporary(tmp, "w", encoding="utf-8", newline="\n")
    rows = 0
    try:
        handle.write("\t".join(EXPORT_COLUMNS) + "\n")
        for event in tqdm(
            events, total=total, unit="event", disable=total is None, file=sys.stderr
        ):
            fields = (
                format_time(event.converted_at_us),
                event.conversion_type,
                event.keyword,
                event.photo_id,
                event.user_id,
                event.country,
                event.event_id,
            )
            handle.write("\t".join(_clean(f) for f in fields) + "\n")
            rows += 1
    except BaseException:
        if tmp is not None:
            handle.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None:
        handle.close()
        os.replace(tmp, out)
    else:
        handle.flush()
    return rows


def events_frame(events: Iterable[ConversionEvent]) -> pd.DataFrame:
    """Events as a table with the Unsplash conversions columns (``converted_at`` as
    ``datetime64[ns]``, naive UTC) and ``event_id``."""
    records = [e.values() for e in events]
    frame = pd.DataFrame.from_records(
        records,
        columns=[
            "event_id",
            "anonymous_user_id",
            "photo_id",
            "keyword",
            "converted_at_us",
            "conversion_country",
            "conversion_type",
        ],
    )
    frame["converted_at"] = pd.to_datetime(frame["converted_at_us"].astype(np.int64), unit="us")
    return frame[list(EXPORT_COLUMNS)]


def merge_logged(catalogue: Catalogue, logged: pd.DataFrame) -> tuple[Catalogue, dict]:
    """The catalogue with ``logged`` conversions (an :func:`events_frame`) added.

    Events of photos the catalogue does not have are dropped and counted. Users are renumbered
    (the users table stays sorted by id) and conversions stay sorted by time (stable: the
    catalogue's own rows keep their order).

    Returns
    -------
    (Catalogue, dict)
        The merged catalogue and what was merged: ``events``, ``merged``, ``unknown_photo``,
        ``users`` (distinct users with merged events), ``new_users`` (not in the catalogue).
    """
    photo_index = pd.Index(catalogue.photos["photo_id"])
    photo_idx = photo_index.get_indexer(logged["photo_id"])
    known = photo_idx >= 0
    kept = logged[known]
    base_ids = catalogue.users["anonymous_user_id"].to_numpy(dtype=object)
    logged_ids = kept["anonymous_user_id"].to_numpy(dtype=object)
    user_ids = np.unique(np.concatenate([base_ids, logged_ids]).astype(str)).astype(object)
    user_index = pd.Index(user_ids)
    base_conversions = catalogue.conversions
    base_user_idx = user_index.get_indexer(base_ids[base_conversions["user_idx"].to_numpy()])
    added = pd.DataFrame(
        {
            "converted_at": kept["converted_at"].to_numpy(dtype="datetime64[ns]"),
            "conversion_type": kept["conversion_type"].to_numpy(dtype=object),
            "keyword": kept["keyword"].to_numpy(dtype=object),
            "photo_idx": photo_idx[known],
            "user_idx": user_index.get_indexer(logged_ids),
            "conversion_country": kept["conversion_country"].to_numpy(dtype=object),
        }
    )
    merged = pd.concat([base_conversions.assign(user_idx=base_user_idx), added], ignore_index=True)
    merged = merged.sort_values("converted_at", kind="stable").reset_index(drop=True)
    users = pd.DataFrame(
        {"user_idx": np.arange(len(user_ids)), "anonymous_user_id": user_ids}
    ).astype(USER_COLUMNS)
    result = replace(catalogue, users=users, conversions=merged.astype(CONVERSION_COLUMNS))
    report = {
        "events": int(len(logged)),
        "merged": int(known.sum()),
        "unknown_photo": int((~known).sum()),
        "users": int(len(set(logged_ids))),
        "new_users": int(len(set(logged_ids) - set(base_ids))),
    }
    return result, report
