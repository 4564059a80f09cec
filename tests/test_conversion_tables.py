"""Logged events as Unsplash Lite conversions: the export reads back, the merge keeps contracts."""

from __future__ import annotations

import shutil

import numpy as np

from imgsearch.catalogue import CONVERSION_COLUMNS
from imgsearch.conversion_store import ConversionEvent
from imgsearch.conversion_store.tables import (
    EXPORT_COLUMNS,
    events_frame,
    merge_logged,
    write_conversions_tsv,
)
from imgsearch.unsplash import read_unsplash

T0 = 1_780_000_000_123_456  # 2026-05-28, microseconds


def logged_events(catalogue, n: int = 6) -> list[ConversionEvent]:
    photos = catalogue.photos["photo_id"].tolist()
    known_user = catalogue.users["anonymous_user_id"].iloc[0]
    events = [
        ConversionEvent(
            event_id=f"e{i}",
            user_id="zz-new-user" if i % 2 else known_user,
            photo_id=photos[i],
            keyword="red circle",
            converted_at_us=T0 + i,
            country="FR",
        )
        for i in range(n)
    ]
    events.append(ConversionEvent("gone", "zz-new-user", "photo-not-in-catalogue", "red", T0, "FR"))
    return events


def test_the_export_is_an_unsplash_conversions_shard_the_reader_accepts(
    demo_data, catalogue, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    events = [e for e in logged_events(catalogue) if e.event_id != "gone"]
    out = data / "conversions.tsv999"
    assert write_conversions_tsv(events, out) == len(events)
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(EXPORT_COLUMNS)
    assert lines[1].split("\t")[0] == "2026-05-28 20:26:40.123456"
    assert not (data / "conversions.tsv999.tmp").exists()

    extended, report = read_unsplash(data, show_progress=False)
    assert report.unknown_photo_conversions == 0
    assert len(extended.conversions) == len(catalogue.conversions) + len(events)
    new_user = extended.user_idx("zz-new-user")
    mine = extended.conversions[extended.conversions["user_idx"] == new_user]
    assert len(mine) == 3
    assert set(mine["keyword"]) == {"red circle"}
    assert mine["converted_at"].iloc[0] == np.datetime64(T0 + 1, "us")


def test_merge_adds_events_renumbers_users_and_keeps_time_order(catalogue):
    frame = events_frame(logged_events(catalogue))
    merged, report = merge_logged(catalogue, frame)
    assert report == {"events": 7, "merged": 6, "unknown_photo": 1, "users": 2, "new_users": 1}
    assert len(merged.conversions) == len(catalogue.conversions) + 6
    assert merged.n_users == catalogue.n_users + 1
    assert merged.users["anonymous_user_id"].is_monotonic_increasing
    assert merged.users["user_idx"].tolist() == list(range(merged.n_users))
    assert merged.conversions["converted_at"].is_monotonic_increasing
    assert dict(merged.conversions.dtypes.astype(str)) == CONVERSION_COLUMNS
    # Every catalogue conversion keeps its user (by id), renumbering or not.
    before = catalogue.users["anonymous_user_id"].to_numpy()[catalogue.conversions["user_idx"]]
    base_rows = merged.conversions.iloc[: len(catalogue.conversions)]
    after = merged.users["anonymous_user_id"].to_numpy()[base_rows["user_idx"]]
    assert (before == after).all()
    new_rows = merged.conversions[merged.conversions["user_idx"] == merged.user_idx("zz-new-user")]
    assert sorted(merged.photo_ids(new_rows["photo_idx"].to_numpy())) == sorted(
        catalogue.photos["photo_id"].tolist()[i] for i in (1, 3, 5)
    )


def test_merging_nothing_changes_nothing(catalogue):
    merged, report = merge_logged(catalogue, events_frame([]))
    assert report["merged"] == 0
    assert merged.users.equals(catalogue.users)
    assert merged.conversions.equals(catalogue.conversions)
