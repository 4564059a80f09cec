"""Tests of the synthetic Unsplash Lite catalogue: layout, determinism, pixels, planted tastes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgsearch_tools.demo_data import (
    COLOUR_RGB,
    COLOURS,
    SCENE_RGB,
    SCENES,
    SHAPES,
    conversions,
    folder,
)
from imgsearch_tools.demo_data import commands as demo_data_commands
from imgsearch_tools.demo_data import (
    photos as demo_photos,
)
from imgsearch_tools.demo_data import tables as demo_data

SMALL = dict(n_photos=200, n_users=50, n_conversions=2000, show_progress=False)
# Small shards so that the tiny catalogue is still split like a large one.
SHARDS = dict(photo_shard_rows=120, shard_rows=800)


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo_data.generate(out, seed=3, **SMALL, **SHARDS)
    return out


def read_table(data_dir: Path, name: str) -> pd.DataFrame:
    shards = sorted(data_dir.glob(f"{name}.tsv*"))
    return pd.concat(
        [pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str) for path in shards],
        ignore_index=True,
    )


@pytest.fixture(scope="module")
def tables(catalogue_dir) -> dict[str, pd.DataFrame]:
    return {name: read_table(catalogue_dir, name) for name in folder.TABLE_NAMES}


@pytest.fixture(scope="module")
def true_tags(tables) -> pd.DataFrame:
    """One row per photo: the colour, shape and scene it shows (labels.tsv)."""
    labels = tables["labels"]
    columns = {}
    for name, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("scene", SCENES)):
        rows = labels[labels["label"].isin(vocabulary)]
        assert rows["photo_id"].is_unique, name
        columns[name] = rows.set_index("photo_id")["label"]
    return pd.DataFrame(columns).reindex(tables["photos"]["photo_id"])


def files_by_name(data_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }


def test_layout_headers_and_shards(catalogue_dir, tables):
    names = sorted(path.name for path in catalogue_dir.glob("*.tsv*"))
    assert names == [
        "colors.tsv000",
        "conversions.tsv000",
        "conversions.tsv001",
        "conversions.tsv002",
        "keywords.tsv000",
        "keywords.tsv001",
        "labels.tsv000",
        "photos.tsv000",
        "photos.tsv001",
    ]
    expected = {
        "photos": demo_photos.PHOTO_COLUMNS,
        "keywords": demo_photos.KEYWORD_COLUMNS,
        "conversions": conversions.CONVERSION_COLUMNS,
        "colors": demo_photos.COLOR_COLUMNS,
        "labels": demo_photos.LABEL_COLUMNS,
    }
    for path in catalogue_dir.glob("*.tsv*"):
        header = path.read_text().split("\n", 1)[0].split("\t")
        assert header == list(expected[path.name.split(".")[0]]), path.name
    photos = tables["photos"]
    assert len(photos) == 200 and len(tables["conversions"]) == 2000
    assert photos["photo_id"].is_unique
    assert photos["photo_id"].str.fullmatch(r"[A-Za-z0-9_-]{11}").all()
    assert photos["photo_image_url"].str.startswith("https://images.unsplash.com/photo-").all()
    assert set(photos["photo_featured"]) <= {"t", "f"}
    assert (photos["stats_views"].astype(int) >= photos["stats_downloads"].astype(int)).all()
    assert (photos["photo_description"] == "").any() and (photos["photo_description"] != "").any()


def test_default_photo_shard_size_splits_above_2500(tmp_path):
    summary = demo_data.generate(
        tmp_path, n_photos=2501, n_users=5, n_conversions=10, show_progress=False,
        with_images=False,
    )  # fmt: skip
    assert [f for f in summary["files"] if f.startswith("photos")] == [
        "photos.tsv000",
        "photos.tsv001",
    ]


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = demo_data.generate(tmp_path / "a", seed=5, image_size=32, **SMALL)
    demo_data.generate(tmp_path / "b", seed=5, image_size=32, **SMALL)
    demo_data.generate(tmp_path / "c", seed=6, image_size=32, **SMALL)
    a, b, c = (files_by_name(tmp_path / name) for name in "abc")
    assert len(a) == len(first["files"]) + 200 + 1  # tables, images, the output marker
    assert a == b
    for name in first["files"]:
        assert a[name] != c[name], name
    image = next(name for name in a if name.endswith(".jpg"))
    assert Image.open(tmp_path / "a" / image).size == (32, 32)


def test_without_images_writes_the_same_tables_and_no_images_folder(tmp_path, catalogue_dir):
    summary = demo_data.generate(tmp_path, seed=3, with_images=False, **SMALL, **SHARDS)
    assert not (tmp_path / "images").exists()
    for name in summary["files"]:
        assert (tmp_path / name).read_bytes() == (catalogue_dir / name).read_bytes(), name


def test_rerun_replaces_stale_shards_and_images(tmp_path):
    demo_data.generate(tmp_path, **SMALL, **SHARDS)
    demo_data.generate(tmp_path, with_images=False, **SMALL)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".imgsearch-output.json",
        "colors.tsv000",
        "conversions.tsv000",
        "keywords.tsv000",
        "labels.tsv000",
        "photos.tsv000",
    ]


def test_every_photo_has_an_image_of_the_right_size(catalogue_dir, tables):
    for photo_id in tables["photos"]["photo_id"]:
        with Image.open(catalogue_dir / "images" / f"{photo_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (64, 64)
    assert len(list((catalogue_dir / "images").iterdir())) == len(tables["photos"])


def test_labels_name_one_colour_shape_and_scene_and_keywords_are_machine_tags(tables, true_tags):
    assert true_tags.notna().all().all()
    assert len(tables["labels"]) == 3 * len(tables["photos"])
    keywords = tables["keywords"]
    assert not keywords.duplicated(["photo_id", "keyword"]).any()
    by_user = keywords[keywords["suggested_by_user"] == "t"]
    assert len(by_user) > 0
    assert (by_user["ai_service_1_confidence"] == "").all()
    confidence = pd.to_numeric(keywords["ai_service_1_confidence"], errors="coerce")
    assert confidence.dropna().between(0, 100).all()
    # The tagger: most concepts tagged confidently; some missed; some named as their look-alike
    # with the same high confidence; low-confidence distractors besides.
    confident = keywords[confidence >= 70]
    for name, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("scene", SCENES)):
        tagged = confident[confident["keyword"].isin(vocabulary)].set_index("photo_id")["keyword"]
        truth = true_tags[name]
        right = (tagged.reindex(truth.index) == truth).mean()
        missed = ~truth.index.isin(tagged.index)
        assert 0.5 < right < 1.0, name
        assert 0 < missed.sum() < len(truth) / 2, name
        assert ((tagged != truth.reindex(tagged.index)).sum() > 0) or name == "scene", name
    vocabulary = set(COLOURS + SHAPES + SCENES)
    merged = keywords.join(true_tags, on="photo_id")
    wrong = merged["keyword"].isin(vocabulary) & ~(
        (merged["keyword"] == merged["colour"])
        | (merged["keyword"] == merged["shape"])
        | (merged["keyword"] == merged["scene"])
    )
    assert (confidence[wrong] < 40).sum() > 20 and (confidence[wrong] >= 70).sum() > 5


def test_drawn_colour_and_scene_match_the_keywords(catalogue_dir, true_tags):
    colour_palette = np.array([COLOUR_RGB[c] for c in COLOURS], float)
    scene_palette = np.concatenate([np.array(SCENE_RGB[s], float) for s in SCENES])
    scene_of_entry = np.repeat(np.arange(len(SCENES)), [len(SCENE_RGB[s]) for s in SCENES])
    colour_hits = scene_hits = 0
    for photo_id, tags in true_tags.iterrows():
        with Image.open(catalogue_dir / "images" / f"{photo_id}.jpg") as image:
            pixels = np.asarray(image.convert("RGB"), float)
        # Colour: most frequent shape colour among the centre pixels, the scene's own
        # colours taking the background pixels.
        centre = pixels[16:48, 16:48].reshape(-1, 3)
        palette = np.concatenate([colour_palette, np.array(SCENE_RGB[tags["scene"]], float)])
        nearest = ((centre[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
        votes = np.bincount(nearest[nearest < len(COLOURS)], minlength=len(COLOURS))
        colour_hits += COLOURS[votes.argmax()] == tags["colour"]
        # Scene: the scene whose colours take most pixels, against every scene and colour.
        flat = pixels.reshape(-1, 3)
        palette = np.concatenate([colour_palette, scene_palette])
        nearest = ((flat[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
        background = scene_of_entry[nearest[nearest >= len(COLOURS)] - len(COLOURS)]
        scene_hits += (
            SCENES[np.bincount(background, minlength=len(SCENES)).argmax()] == tags["scene"]
        )
    assert colour_hits / len(true_tags) >= 0.95
    assert scene_hits / len(true_tags) >= 0.9


def test_conversions_reference_photos_that_show_the_keyword(tables, true_tags):
    conversions = tables["conversions"]
    assert conversions["photo_id"].isin(set(tables["photos"]["photo_id"])).all()
    assert (conversions["conversion_type"] == "download").all()
    assert conversions["converted_at"].str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}").all()
    times = pd.to_datetime(conversions["converted_at"])
    assert (times.max() - times.min()).days > 300
    assert conversions["conversion_country"].str.fullmatch(r"[A-Z]{2}").all()
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert conversions["anonymous_user_id"].str.fullmatch(uuid).all()
    assert conversions["anonymous_user_id"].nunique() == 50
    tags = true_tags.loc[conversions["photo_id"]].to_numpy()
    for words, photo_tags in zip(conversions["keyword"].str.split(), tags):
        assert set(words) <= set(photo_tags), (words, photo_tags)
    two_words = conversions["keyword"].str.contains(" ")
    assert 0 < two_words.mean() < 0.5
    two_word_keywords = set(conversions.loc[two_words, "keyword"])
    assert not two_word_keywords & set(tables["keywords"]["keyword"])


def test_users_have_heavy_tailed_activity(tables):
    per_user = tables["conversions"]["anonymous_user_id"].value_counts()
    assert per_user.min() >= 1
    assert per_user.max() > 4 * per_user.median()


def split_in_time(conversions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    ordered = conversions.sort_values("converted_at", kind="stable")
    cut = int(0.8 * len(ordered))
    return ordered.iloc[:cut], ordered.iloc[cut:]


def test_planted_colour_taste_persists_over_time(tables, true_tags):
    """A user's most converted colour early on predicts their later non-colour conversions."""
    conversions = tables["conversions"].assign(
        colour=true_tags["colour"].loc[tables["conversions"]["photo_id"]].to_numpy()
    )
    train, test = split_in_time(conversions)
    favourite = train.groupby("anonymous_user_id")["colour"].agg(
        lambda s: s.value_counts().index[0]
    )
    test = test[~test["keyword"].str.split().str[0].isin(COLOURS)]
    test = test[test["anonymous_user_id"].isin(favourite.index)]
    share = (test["colour"] == favourite.loc[test["anonymous_user_id"]].to_numpy()).mean()
    assert share > 0.3  # 1/8 without a planted taste


def test_taste_beats_popularity_beats_random(tables, true_tags):
    """On later single-word queries, rank the converted photo among the query's photos."""
    photos = tables["photos"].set_index("photo_id")
    log_views = np.log1p(photos["stats_views"].astype(float)).to_numpy()
    colour = true_tags["colour"].map(COLOURS.index).to_numpy()
    shape = true_tags["shape"].map(SHAPES.index).to_numpy()
    position = {photo_id: i for i, photo_id in enumerate(photos.index)}
    train, test = split_in_time(tables["conversions"])
    users = {user: i for i, user in enumerate(tables["conversions"]["anonymous_user_id"].unique())}
    colour_counts = np.ones((len(users), len(COLOURS)))
    shape_counts = np.ones((len(users), len(SHAPES)))
    train_users = train["anonymous_user_id"].map(users).to_numpy()
    train_photos = train["photo_id"].map(position).to_numpy()
    np.add.at(colour_counts, (train_users, colour[train_photos]), 1)
    np.add.at(shape_counts, (train_users, shape[train_photos]), 1)
    colour_share = colour_counts / colour_counts.sum(1, keepdims=True)
    shape_share = shape_counts / shape_counts.sum(1, keepdims=True)

    rng = np.random.default_rng(0)
    percentiles = {"random": [], "popularity": [], "taste": []}
    single = test[test["keyword"].isin(COLOURS + SHAPES + SCENES)]
    for keyword, photo_id, user in single[["keyword", "photo_id", "anonymous_user_id"]].values:
        column = "colour" if keyword in COLOURS else "shape" if keyword in SHAPES else "scene"
        candidates = np.flatnonzero(true_tags[column].to_numpy() == keyword)
        u = users[user]
        scores = {
            "random": rng.random(len(candidates)),
            "popularity": log_views[candidates],
            "taste": log_views[candidates]
            + np.log(colour_share[u, colour[candidates]])
            + np.log(shape_share[u, shape[candidates]]),
        }
        converted = candidates == position[photo_id]
        for name, score in scores.items():
            percentiles[name].append((score < score[converted][0]).mean())
    mean = {name: float(np.mean(values)) for name, values in percentiles.items()}
    assert mean["popularity"] > mean["random"] + 0.1, mean
    assert mean["taste"] > mean["popularity"] + 0.03, mean


def test_cli_writes_a_catalogue(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="imgsearch")
    demo_data_commands.add_commands(parser.add_subparsers(dest="command"))
    argv = ["demo-data", str(tmp_path), "--photos", "30", "--users", "5", "--conversions", "40"]
    args = parser.parse_args(argv + ["--seed", "2", "--image-size", "24", "--quiet"])
    assert args.handler(args) == 0
    assert '"n_photos": 30' in capsys.readouterr().out
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 30
    args = parser.parse_args(argv + ["--no-images", "--quiet"])
    assert args.handler(args) == 0
    assert not (tmp_path / "images").exists()
    args = parser.parse_args(["demo-data", str(tmp_path), "--photos", "0", "--quiet"])
    assert args.handler(args) == 2


def test_reads_back_cleanly_with_the_unsplash_reader(catalogue_dir, tables):
    unsplash = pytest.importorskip("imgsearch.unsplash")
    catalogue, report = unsplash.read_unsplash(catalogue_dir, show_progress=False)
    assert report.rows_dropped == 0 and report.warnings_total == 0
    assert catalogue.n_photos == 200 and catalogue.n_users == 50
    assert len(catalogue.conversions) == 2000
    assert report.photos_with_images == 200
    assert len(catalogue.keywords) == len(tables["keywords"])
    assert len(catalogue.labels) == len(tables["labels"]) == 600
    assert re.fullmatch(r"[a-z ]+", " ".join(catalogue.conversions["keyword"].unique()))
