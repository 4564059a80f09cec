"""Tests of the Unsplash Lite reader: normalisation, drops, and errors located by file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgsearch.catalogue import (
    CONVERSION_COLUMNS,
    KEYWORD_COLUMNS,
    LABEL_COLUMNS,
    PHOTO_COLUMNS,
    TABLES,
    USER_COLUMNS,
    Catalogue,
)
from imgsearch.data_report import DataError, DataReport
from imgsearch.unsplash import read_unsplash

PHOTO_HEADER = [
    "photo_id",
    "photo_url",  # extra column, ignored
    "photo_image_url",
    "photo_description",
    "photographer_username",
    "stats_views",
    "stats_downloads",
    "ai_description",
]
KEYWORD_HEADER = [
    "photo_id",
    "keyword",
    "ai_service_1_confidence",
    "ai_service_2_confidence",
    "suggested_by_user",
]
CONVERSION_HEADER = [
    "converted_at",
    "conversion_type",
    "keyword",
    "photo_id",
    "anonymous_user_id",
    "conversion_country",
]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """Write a tab-separated file with a header row."""
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def photo_row(photo_id: str, views: str = "10", downloads: str = "1") -> list[str]:
    """A valid photos.tsv row in PHOTO_HEADER order."""
    return [
        photo_id,
        f"https://unsplash.com/photos/{photo_id}",
        f"https://images.unsplash.com/{photo_id}",
        f"a photo called {photo_id}",
        "someone",
        views,
        downloads,
        "",
    ]


def conversion_row(when: str, keyword: str, photo_id: str, user: str) -> list[str]:
    """A valid conversions.tsv row in CONVERSION_HEADER order."""
    return [when, "download", keyword, photo_id, user, "FR"]


@pytest.fixture()
def valid_dir(tmp_path: Path) -> Path:
    """A small valid folder: sharded photos (columns in another order in the second shard),
    duplicates and unknown photo ids, user-suggested keywords, images for two photos."""
    write_tsv(
        tmp_path / "photos.tsv000",
        PHOTO_HEADER,
        [
            photo_row("p3", views="300", downloads="30"),
            ["p1", "u", "https://img/p1", "", "ann", "", "7", "a lake"],
            photo_row("p1", views="999"),  # repeated photo_id: the first row is kept
        ],
    )
    # The second shard has its own header, with the columns in another order and some missing.
    write_tsv(
        tmp_path / "photos.tsv001",
        ["photo_image_url", "photo_id", "extra"],
        [["https://img/p2", "p2", "x"]],
    )
    write_tsv(
        tmp_path / "keywords.tsv000",
        KEYWORD_HEADER,
        [
            ["p1", "  Mountain   LAKE ", "30", "80", "f"],
            ["p1", "mountain lake", "90", "", "f"],  # same keyword once normalised: max kept
            ["p2", "sky", "55.5", "", "f"],
            ["p2", "user tag", "", "", "t"],  # suggested by a user: no AI confidence, kept
            ["p3", "sun", "150", "", "f"],  # clipped to 1
            ["zz", "sky", "99", "", "f"],  # unknown photo: dropped
            ["p3", "moon", "20", "70.5", "f"],  # the second AI service is the more confident
        ],
    )
    write_tsv(
        tmp_path / "conversions.tsv000",
        CONVERSION_HEADER,
        [
            conversion_row("2020-06-30 14:12:25.402", "Mountain  Lake", "p1", "u2"),
            conversion_row("2020-06-29 09:00:00", "sky", "p2", "u1"),
            conversion_row("2020-06-30 14:12:25.402", "SUN", "p3", "u1"),  # same time as 1st
            conversion_row("2020-06-29 09:00:00", "sky", "p2", "u1"),  # exact duplicate
            conversion_row("2020-07-01 00:00:00", "sky", "nope", "u9"),  # unknown photo
        ],
    )
    write_tsv(
        tmp_path / "conversions.tsv001",
        CONVERSION_HEADER,
        [conversion_row("2020-06-30T16:00:00+02:00", "sky", "p2", "u2")],
    )
    write_tsv(tmp_path / "collections.tsv000", ["photo_id", "collection_id"], [["p1", "c"]])
    (tmp_path / "images").mkdir()
    for name in ["p1.jpg", "p3.jpg", "p2.png"]:
        (tmp_path / "images" / name).write_bytes(b"")
    return tmp_path


def read(data_dir: Path, strict: bool = True) -> tuple[Catalogue, DataReport]:
    """Read quietly."""
    return read_unsplash(data_dir, show_progress=False, strict=strict)


def assert_contract(catalogue: Catalogue) -> None:
    """Every table has exactly the contract's columns, in order, with the contract's dtypes."""
    for name, columns in TABLES.items():
        frame = getattr(catalogue, name)
        assert {column: str(dtype) for column, dtype in frame.dtypes.items()} == columns, name
        assert list(frame.columns) == list(columns), name


def test_photos_are_sorted_indexed_and_filled(valid_dir: Path) -> None:
    catalogue, report = read(valid_dir)
    photos = catalogue.photos
    assert_contract(catalogue)
    assert photos["photo_id"].tolist() == ["p1", "p2", "p3"]
    assert photos["photo_idx"].tolist() == [0, 1, 2]
    assert photos["photo_image_url"].tolist() == [
        "https://img/p1",
        "https://img/p2",
        "https://images.unsplash.com/p3",
    ]
    assert photos["photo_description"].tolist() == ["", "", "a photo called p3"]
    assert photos["ai_description"].tolist() == ["a lake", "", ""]
    assert photos["photographer_username"].tolist() == ["ann", "", "someone"]
    assert photos["stats_views"].tolist() == [0, 0, 300]  # empty and missing -> 0
    assert photos["stats_downloads"].tolist() == [7, 0, 30]
    assert photos["has_image"].tolist() == [True, False, True]
    assert report.photos_with_images == 2
    assert report.duplicate_rows["photos"] == 1
    assert report.rows_read["photos"] == 4
    assert catalogue.photo_idx("p3") == 2
    assert catalogue.data_dir == str(valid_dir.resolve())


def test_keywords_are_normalised_and_scaled(valid_dir: Path) -> None:
    catalogue, report = read(valid_dir)
    keywords = catalogue.keywords
    assert keywords["photo_idx"].tolist() == [0, 1, 1, 2, 2]
    assert keywords["keyword"].tolist() == ["mountain lake", "sky", "user tag", "moon", "sun"]
    np.testing.assert_allclose(keywords["confidence"], [0.9, 0.555, 0.0, 0.705, 1.0], rtol=1e-6)
    assert report.duplicate_rows["keywords"] == 1
    assert report.unknown_photo_keywords == 1
    assert report.user_suggested_keywords == 1
    assert report.rows_read["keywords"] == 7
    assert report.rows_kept["keywords"] == 5


def test_users_and_conversions(valid_dir: Path) -> None:
    catalogue, report = read(valid_dir)
    assert catalogue.users["anonymous_user_id"].tolist() == ["u1", "u2"]  # u9 only had a drop
    assert catalogue.users["user_idx"].tolist() == [0, 1]
    conversions = catalogue.conversions
    assert conversions["converted_at"].tolist() == [
        pd.Timestamp("2020-06-29 09:00:00"),
        pd.Timestamp("2020-06-30 14:00:00"),  # +02:00 converted to naive UTC
        pd.Timestamp("2020-06-30 14:12:25.402"),
        pd.Timestamp("2020-06-30 14:12:25.402"),
    ]
    # Equal timestamps keep file order (stable sort): the p1 row was first in the file.
    assert conversions["photo_idx"].tolist() == [1, 1, 0, 2]
    assert conversions["user_idx"].tolist() == [0, 1, 1, 0]
    assert conversions["keyword"].tolist() == ["sky", "sky", "mountain lake", "sun"]
    assert conversions["conversion_type"].tolist() == ["download"] * 4
    assert conversions["conversion_country"].tolist() == ["FR"] * 4
    assert report.duplicate_rows["conversions"] == 1
    assert report.unknown_photo_conversions == 1
    assert report.rows_read["conversions"] == 6
    assert report.rows_kept == {"photos": 3, "keywords": 5, "users": 2, "conversions": 4}


def test_report_summary_names_drops_with_file_and_line(valid_dir: Path) -> None:
    _, report = read(valid_dir)
    assert report.files["photos"] == ["photos.tsv000", "photos.tsv001"]
    assert report.unused_files == ["collections.tsv000"]
    assert "photos.tsv000:4: duplicate photo_id 'p1'" in "\n".join(report.warnings)
    assert "keywords.tsv000:7: unknown photo_id 'zz'" in "\n".join(report.warnings)
    assert "conversions.tsv000:6: unknown photo_id 'nope'" in "\n".join(report.warnings)
    assert "conversions.tsv000:5: exact duplicate" in "\n".join(report.warnings)
    summary = report.summary()
    assert "1 unknown photo" in summary
    assert "collections.tsv000" in summary
    assert "conversions.tsv000:6" in summary
    assert report.rows_dropped == 1 + 1 + 1 + 1 + 1


def test_single_unsharded_files_are_read(tmp_path: Path) -> None:
    write_tsv(tmp_path / "photos.tsv", ["photo_id", "photo_image_url"], [["a", "u"]])
    write_tsv(
        tmp_path / "keywords.tsv",
        ["photo_id", "keyword", "ai_service_2_confidence"],
        [["a", "Tag", "42"]],
    )
    write_tsv(tmp_path / "conversions.tsv", CONVERSION_HEADER, [])
    catalogue, report = read(tmp_path)
    assert catalogue.photos["photo_id"].tolist() == ["a"]
    assert catalogue.keywords["confidence"].tolist() == [np.float32(0.42)]
    assert len(catalogue.conversions) == len(catalogue.users) == 0
    assert report.photos_with_images == 0
    assert_contract(catalogue)


def test_shards_are_read_in_numeric_order(tmp_path: Path) -> None:
    for number in [10, 2, 0]:
        write_tsv(
            tmp_path / f"conversions.tsv{number:03d}",
            CONVERSION_HEADER,
            [conversion_row("2020-01-01 00:00:00", f"k{number}", "a", "u")],
        )
    write_tsv(tmp_path / "photos.tsv000", ["photo_id", "photo_image_url"], [["a", "u"]])
    write_tsv(tmp_path / "keywords.tsv000", KEYWORD_HEADER, [])
    catalogue, report = read(tmp_path)
    assert report.files["conversions"] == [
        "conversions.tsv000",
        "conversions.tsv002",
        "conversions.tsv010",
    ]
    # One timestamp for all: the stable sort keeps reading order.
    assert catalogue.conversions["keyword"].tolist() == ["k0", "k2", "k10"]


def test_missing_required_column(valid_dir: Path) -> None:
    write_tsv(valid_dir / "photos.tsv001", ["photo_id", "extra"], [["p2", "x"]])
    with pytest.raises(DataError) as caught:
        read(valid_dir)
    error = caught.value
    assert error.path == valid_dir / "photos.tsv001"
    assert error.line == 1
    assert error.column == "photo_image_url"
    assert str(error).startswith(f"{valid_dir / 'photos.tsv001'}:1: column 'photo_image_url'")


def test_keywords_need_one_ai_confidence_column(valid_dir: Path) -> None:
    write_tsv(valid_dir / "keywords.tsv000", ["photo_id", "keyword"], [["p1", "x"]])
    with pytest.raises(DataError, match=r"keywords\.tsv000:1: .*ai_service_1_confidence"):
        read(valid_dir)


def test_missing_table(valid_dir: Path) -> None:
    for path in valid_dir.glob("conversions.tsv*"):
        path.unlink()
    with pytest.raises(DataError) as caught:
        read(valid_dir)
    assert caught.value.path == valid_dir
    assert caught.value.line is None
    assert "conversions.tsv000" in str(caught.value)
    assert str(valid_dir) in str(caught.value)


def test_broken_integer_reports_file_line_and_column(valid_dir: Path) -> None:
    write_tsv(
        valid_dir / "photos.tsv000",
        PHOTO_HEADER,
        [photo_row("p1"), photo_row("p2"), photo_row("p3", views="abc"), photo_row("p4")],
    )
    with pytest.raises(DataError) as caught:
        read(valid_dir)
    message = str(caught.value)
    assert message.endswith("photos.tsv000:4: column 'stats_views': expected an integer, got 'abc'")
    assert (caught.value.line, caught.value.column) == (4, "stats_views")


@pytest.mark.parametrize("extra_fields", [1, -1, -3])
def test_wrong_field_count_reports_line(valid_dir: Path, extra_fields: int) -> None:
    row = photo_row("p4")
    row = row + ["x"] * extra_fields if extra_fields > 0 else row[:extra_fields]
    write_tsv(valid_dir / "photos.tsv000", PHOTO_HEADER, [photo_row("p1"), photo_row("p2"), row])
    with pytest.raises(DataError) as caught:
        read(valid_dir)
    assert (caught.value.line, caught.value.column) == (4, None)
    got = len(PHOTO_HEADER) + extra_fields
    assert f"photos.tsv000:4: expected {len(PHOTO_HEADER)} tab-separated fields, got {got}" in (
        str(caught.value)
    )


def test_first_problem_in_the_file_is_reported(valid_dir: Path) -> None:
    write_tsv(
        valid_dir / "photos.tsv000",
        PHOTO_HEADER,
        [photo_row("p1"), photo_row("p2") + ["extra"], photo_row("p3", downloads="1.5")],
    )
    with pytest.raises(DataError, match=r"photos\.tsv000:3: expected 8"):
        read(valid_dir)
    write_tsv(
        valid_dir / "photos.tsv000",
        PHOTO_HEADER,
        [photo_row("p1", downloads="1.5"), photo_row("p2") + ["extra"]],
    )
    with pytest.raises(DataError, match=r"photos\.tsv000:2: column 'stats_downloads'"):
        read(valid_dir)


def test_line_numbers_count_blank_lines_crlf_bom_and_stray_carriage_returns(
    valid_dir: Path,
) -> None:
    rows = [photo_row("p1"), photo_row("p2"), photo_row("p3", downloads="x")]
    rows[0][3] = "a description\rwith a stray carriage return"
    text = "\ufeff" + "\t".join(PHOTO_HEADER) + "\r\n"
    text += "\t".join(rows[0]) + "\r\n\r\n\n" + "\t".join(rows[1]) + "\r\n" + "\t".join(rows[2])
    (valid_dir / "photos.tsv000").write_text(text, encoding="utf-8", newline="")
    with pytest.raises(DataError, match=r"photos\.tsv000:6: column 'stats_downloads'.*'x'"):
        read(valid_dir)

    catalogue, report = read(valid_dir, strict=False)
    photos = catalogue.photos.set_index("photo_id")
    assert photos.loc["p1", "photo_description"] == rows[0][3]
    assert photos.loc["p1", "ai_description"] == ""  # the last field has no trailing "\r"
    assert photos.loc["p2", "stats_downloads"] == 1
    assert report.malformed_rows["photos"] == 1


def test_unparseable_date(valid_dir: Path) -> None:
    write_tsv(
        valid_dir / "conversions.tsv001",
        CONVERSION_HEADER,
        [
            conversion_row("2020-06-30 14:12:25", "sky", "p2", "u2"),
            conversion_row("last tuesday", "sky", "p2", "u2"),
        ],
    )
    with pytest.raises(DataError) as caught:
        read(valid_dir)
    assert str(caught.value).startswith(f"{valid_dir / 'conversions.tsv001'}:3: column ")
    assert (caught.value.column, "'last tuesday'" in str(caught.value)) == ("converted_at", True)


@pytest.mark.parametrize(
    ("file_name", "row", "column"),
    [
        ("photos.tsv001", ["u", " ", "x"], "photo_id"),
        ("keywords.tsv000", ["p1", "sky", "high", "", ""], "ai_service_1_confidence"),
        ("conversions.tsv001", conversion_row("2020-01-01", "sky", "p1", ""), "anonymous_user_id"),
    ],
)
def test_malformed_values_in_each_table(
    valid_dir: Path, file_name: str, row: list[str], column: str
) -> None:
    header = (valid_dir / file_name).read_text().splitlines()[0].split("\t")
    write_tsv(valid_dir / file_name, header, [row])
    with pytest.raises(DataError, match=rf"{file_name}:2: column '{column}'"):
        read(valid_dir)


def test_not_strict_skips_and_counts_malformed_rows(valid_dir: Path) -> None:
    write_tsv(
        valid_dir / "photos.tsv000",
        PHOTO_HEADER,
        [
            photo_row("p1"),
            photo_row("p3", views="abc"),
            photo_row("p4") + ["extra"],
            photo_row("p5")[:3],
            photo_row("", views="5"),
        ],
    )
    write_tsv(
        valid_dir / "conversions.tsv001",
        CONVERSION_HEADER,
        [conversion_row("never", "sky", "p1", "u7"), conversion_row("2021-01-01", "x", "p1", "u7")],
    )
    catalogue, report = read(valid_dir, strict=False)
    assert catalogue.photos["photo_id"].tolist() == ["p1", "p2"]
    assert report.malformed_rows == {"photos": 4, "keywords": 0, "conversions": 1}
    assert report.rows_read["photos"] == 6
    warnings = "\n".join(report.warnings)
    assert "photos.tsv000:3: column 'stats_views': expected an integer, got 'abc'" in warnings
    assert "photos.tsv000:4: expected 8 tab-separated fields, got 9" in warnings
    assert "photos.tsv000:5: expected 8 tab-separated fields, got 3" in warnings
    assert "conversions.tsv001:2: column 'converted_at'" in warnings
    assert report.warnings_total > len(report.warnings) == DataReport.MAX_WARNINGS
    # The conversion with a good date stays; its keyword for the now-dropped p3 is unknown.
    assert catalogue.conversions["keyword"].tolist()[-1] == "x"
    assert "u7" in catalogue.users["anonymous_user_id"].tolist()
    assert report.unknown_photo_keywords == 3  # zz, and p3's two keywords now p3 is dropped


def test_empty_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing table 'photos'"):
        read(tmp_path)
    write_tsv(tmp_path / "keywords.tsv000", KEYWORD_HEADER, [])
    write_tsv(tmp_path / "conversions.tsv000", CONVERSION_HEADER, [])
    (tmp_path / "photos.tsv000").write_text("")
    with pytest.raises(DataError, match=r"photos\.tsv000:1: empty file"):
        read(tmp_path)


def test_progress_goes_to_stderr_only_when_asked(
    valid_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    read_unsplash(valid_dir, show_progress=False)
    assert capsys.readouterr() == ("", "")
    read_unsplash(valid_dir, show_progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "reading Unsplash Lite" in captured.err


def test_save_load_round_trip_keeps_values(valid_dir: Path, tmp_path_factory) -> None:
    catalogue, _ = read(valid_dir)
    saved = tmp_path_factory.mktemp("catalogue")
    catalogue.save(saved)
    loaded = Catalogue.load(saved)
    assert loaded.data_dir == catalogue.data_dir
    for name in TABLES:
        pd.testing.assert_frame_equal(
            getattr(loaded, name), getattr(catalogue, name), check_dtype=False
        )
    assert loaded.conversions["converted_at"].dtype == np.dtype("datetime64[ns]")
    assert loaded.photo_idx("p2") == 1
    assert loaded.user_idx("u2") == 1


def test_save_load_round_trip_keeps_contract_dtypes(valid_dir: Path, tmp_path_factory) -> None:
    catalogue, _ = read(valid_dir)
    saved = tmp_path_factory.mktemp("catalogue")
    catalogue.save(saved)
    assert_contract(Catalogue.load(saved))


def test_loaded_text_columns_hold_one_string_object_per_distinct_value(
    valid_dir: Path, tmp_path_factory
) -> None:
    # A parquet text column cast to object naively makes a str per row (gigabytes for 20M
    # conversions); loaded, equal values are one shared object and the values are unchanged.
    catalogue, _ = read(valid_dir)
    saved = tmp_path_factory.mktemp("catalogue")
    catalogue.save(saved)
    loaded = Catalogue.load(saved)
    for name in TABLES:
        table = getattr(loaded, name)
        raw = pd.read_parquet(saved / f"{name}.parquet")
        for column, dtype in TABLES[name].items():
            if dtype != "object" or column not in raw:
                continue
            values = table[column].tolist()
            assert table[column].dtype == object
            assert values == raw[column].astype(object).tolist(), (name, column)
            assert len({id(value) for value in values}) == len(set(values)), (name, column)


def test_contract_columns_are_the_catalogue_ones() -> None:
    # Guards the imports above: this module checks against the shared contracts, not copies.
    assert TABLES == {
        "photos": PHOTO_COLUMNS,
        "keywords": KEYWORD_COLUMNS,
        "users": USER_COLUMNS,
        "conversions": CONVERSION_COLUMNS,
    }


def test_labels_are_optional_normalised_and_checked(valid_dir: Path, tmp_path: Path) -> None:
    catalogue, report = read(valid_dir)
    assert catalogue.labels is None and "labels" not in report.rows_kept
    write_tsv(
        valid_dir / "labels.tsv000",
        ["photo_id", "label"],
        [
            ["p2", " Blue  Sky "],
            ["p1", "lake"],
            ["p1", "LAKE"],  # the same label once normalised: dropped
            ["zz", "lake"],  # unknown photo: dropped, named
            ["p3", "  "],  # empty: dropped
        ],
    )
    catalogue, report = read(valid_dir)
    assert {column: str(dtype) for column, dtype in catalogue.labels.dtypes.items()} == (
        LABEL_COLUMNS
    )
    assert catalogue.labels.to_dict("list") == {"photo_idx": [0, 1], "label": ["lake", "blue sky"]}
    assert report.rows_kept["labels"] == 2 and report.unknown_photo_labels == 1
    assert report.duplicate_rows["labels"] == 1
    assert "labels.tsv000:5: unknown photo_id 'zz'; label dropped" in report.warnings
    assert "labels" in report.summary()
    saved = tmp_path / "catalogue"
    catalogue.save(saved)
    pd.testing.assert_frame_equal(Catalogue.load(saved).labels, catalogue.labels)
    assert Catalogue.load(saved).with_conversions(catalogue.conversions).labels is not None

    write_tsv(valid_dir / "labels.tsv000", ["photo_id", "name"], [["p1", "lake"]])
    with pytest.raises(DataError, match=r"labels\.tsv000:1: column 'label'"):
        read(valid_dir)
