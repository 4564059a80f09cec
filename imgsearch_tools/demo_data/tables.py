"""The demo catalogue's tables in the Unsplash Lite layout: photos, tags, labels, conversions."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.unsplash_layout import CONVERSIONS_LAYOUT
from imgsearch_tools import outputs
from imgsearch_tools.demo_data.drawing import (
    COLOURS,
    SCENE_RGB,
    SCENES,
    SHAPES,
    fill_rgb,
    write_images,
)

# What Unsplash's colors table would call the main colour of each scene.
SCENE_COLOUR_NAMES = {
    "night": "navy",
    "beach": "beige",
    "forest": "dark green",
    "snow": "gray",
    "desert": "tan",
}

PHOTO_COLUMNS = (
    "photo_id",
    "photo_url",
    "photo_image_url",
    "photo_submitted_at",
    "photo_featured",
    "photo_width",
    "photo_height",
    "photographer_username",
    "photo_description",
    "ai_description",
    "stats_views",
    "stats_downloads",
)
KEYWORD_COLUMNS = (
    "photo_id",
    "keyword",
    "ai_service_1_confidence",
    "ai_service_2_confidence",
    "suggested_by_user",
)
CONVERSION_COLUMNS = CONVERSIONS_LAYOUT
COLOR_COLUMNS = ("photo_id", "hex", "red", "green", "blue", "keyword", "ai_coverage", "ai_score")
# What each photo shows (its colour, shape and scene): the ground truth of the demo, which
# Unsplash Lite does not have. ``imgsearch eval`` measures tag precision against it.
LABEL_COLUMNS = ("photo_id", "label")
TABLE_NAMES = ("photos", "keywords", "conversions", "colors", "labels")

# The name recorded in the marker of the folders this generator writes.
MAKER = "demo-data"
# The marker `imgsearch demo` wrote before output markers existed (see adopt_legacy_folder).
LEGACY_MARKER = ".complete"
_TABLE_FILE = re.compile(r"[^/]+\.tsv\d*")
_IMAGE_FILE = re.compile(r"images/[^/]+\.jpg")

# Bumped whenever the same seed and sizes give other tables, so `imgsearch demo` regenerates.
# 2: keywords carry an AI tagger's misses and confusions; labels.tsv holds the truth.
GENERATOR_VERSION = 2

PHOTO_SHARD_ROWS = 2_500
SHARD_ROWS = 100_000

# Strength of the planted signals: P(photo | user, query) ∝ popularity**POPULARITY_EXPONENT
# × exp(TASTE_WEIGHT × (favourite colour match + favourite shape match)).
POPULARITY_EXPONENT = 1.0
TASTE_WEIGHT = 2.0
# What users' tastes are about (``--taste``): ``content``, the photo's colour and shape (what
# the image shows; the default); ``ids``, two hidden photo attributes drawn independently of
# the content, so that only who converted what reveals them; ``none``, no taste at all:
# popularity alone decides among the photos that match the query.
TASTES = ("content", "ids", "none")
# Values of each hidden attribute of the ``ids`` taste; a user likes one of each.
HIDDEN_VALUES = 4
# How often a single-word colour/shape query names one of the user's favourites.
FAVOURITE_QUERY_RATE = 0.6
QUERY_TYPES = ("colour", "shape", "scene", "colour shape", "colour scene")
QUERY_TYPE_PRIOR = np.array([0.3, 0.25, 0.2, 0.15, 0.1])

_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
_COUNTRIES = np.array(
    ["US", "GB", "DE", "FR", "IN", "BR", "CA", "JP", "ES", "IT"]
    + ["AU", "NL", "PL", "MX", "KR", "SE", "TR", "ID", "RU", "ZA"]
)
_COUNTRY_WEIGHTS = np.array([30, 9, 8, 7, 7, 6, 5, 5, 4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1], float)
_FIRST_NAMES = (
    "anna alex ben carla dan elif farah gus hana ivan jules kai lena marco nina omar "
    "paula quinn rosa sami tara umar vera will xena yuki zoe leo mia noah"
).split()
_LAST_NAMES = (
    "adams berg costa dubois evans fischer garcia hale ito jensen kowalski lopez moreau "
    "nakamura olsen petrov quint rossi silva tanaka ueda vogel walsh xu young zeller "
    "brandt novak sato"
).split()
_SCENE_PHRASES = {
    "night": ("under a starry night sky", "at night", "against the night sky"),
    "beach": ("on a beach", "by the sea", "on the sand at the beach"),
    "forest": ("in a forest", "among the trees", "in the woods"),
    "snow": ("in the snow", "on a snowy field", "in a winter landscape"),
    "desert": ("in the desert", "among sand dunes", "on desert dunes"),
}
_SCENE_SYNONYMS = {
    "night": ("sky", "stars", "dark"),
    "beach": ("sea", "sand", "ocean"),
    "forest": ("trees", "woods", "nature"),
    "snow": ("winter", "mountain", "cold"),
    "desert": ("sand", "dune", "dry"),
}
_GENERIC_TAGS = ("abstract", "geometric", "pattern", "background", "art", "outdoors")
_USER_TAGS = ("colorful", "minimal", "vibrant", "wallpaper", "graphic")
# The AI tagger of keywords.tsv, per concept (colour, shape, scene): how often it misses the
# concept, and how often it names the look-alike from _CONFUSABLE instead, at the confidence it
# would have given the right tag. General-purpose taggers name colours and scenes reliably and
# simple shapes less so; real Unsplash keywords are such machine tags. Photo descriptions and
# labels.tsv stay right, so only the keyword index inherits the tagger's mistakes.
TAG_MISS_RATE = (0.05, 0.25, 0.05)
TAG_CONFUSION_RATE = (0.10, 0.10, 0.05)
# A plausible wrong tag for each concept (what a real tagger confuses): named instead of the
# concept at TAG_CONFUSION_RATE, and beside it as a low-confidence distractor.
_CONFUSABLE = {
    "red": "orange", "orange": "yellow", "yellow": "orange", "green": "yellow",
    "blue": "purple", "purple": "blue", "pink": "red", "white": "yellow",
    "circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square",
    "triangle": "star", "star": "cross", "cross": "star", "stripes": "square",
    "night": "snow", "beach": "desert", "forest": "night", "snow": "beach", "desert": "beach",
}  # fmt: skip


def generate(
    out_dir: str | Path,
    n_photos: int = 5000,
    n_users: int = 2000,
    n_conversions: int = 150_000,
    seed: int = 0,
    image_size: int = 64,
    show_progress: bool = True,
    with_images: bool = True,
    *,
    taste: str = "content",
    taste_strength: float = TASTE_WEIGHT,
    photo_shard_rows: int = PHOTO_SHARD_ROWS,
    shard_rows: int = SHARD_ROWS,
    force: bool = False,
) -> dict:
    """Write a synthetic catalogue in the Unsplash Lite layout into ``out_dir``.

    Each photo shows one shape from :data:`SHAPES` filled with one colour from :data:`COLOURS`
    on one scene from :data:`SCENES`; its keywords name the three (high confidence) plus
    synonyms, generic tags and low-confidence distractors, with the mistakes of an AI tagger
    (:data:`TAG_MISS_RATE`, :data:`TAG_CONFUSION_RATE`); ``labels.tsv000`` holds what each
    photo really shows. Conversions are drawn from planted
    per-user tastes mixed with a latent photo popularity: by default favourite colours and
    shapes (``taste``, :data:`TASTES`).

    Everything is written into a temporary folder beside ``out_dir`` and moved into place at
    the end, with a marker listing the files (:mod:`imgsearch_tools.outputs`). A folder this
    generator wrote is replaced; any other non-empty folder is refused unless ``force``, which
    adds the catalogue beside its files and deletes or overwrites none of them.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write (created if missing).
    n_photos, n_users, n_conversions : int
        Catalogue size. Every user has at least one conversion when
        ``n_conversions >= n_users``.
    seed : int
        Same seed, same sizes: byte-identical tables and images.
    image_size : int
        Side of the square JPEG images in pixels.
    show_progress : bool
        Draw a tqdm progress bar on stderr while drawing images and conversions.
    with_images : bool
        Write ``images/<photo_id>.jpg``; when False no images folder is written.
    taste : str
        What users' tastes are about: ``content`` (colour and shape), ``ids`` (hidden photo
        attributes) or ``none`` (popularity alone); see :data:`TASTES`.
    taste_strength : float
        ``w`` in P(photo) ∝ popularity × exp(w × favourites matched); 0 is no taste. The
        default catalogue (``content``, 2.0) is the same, byte for byte, as before tastes
        could be chosen.
    photo_shard_rows, shard_rows : int
        Rows per shard file for photos and for the other tables (``.tsv000``, ``.tsv001``…).
    force : bool
        Write into a non-empty folder this generator did not make (never into one holding
        tables of the Unsplash Lite layout: they would be read together with the new ones).

    Returns
    -------
    dict
        Counts, files written and the vocabulary.
    """
    if n_photos < 1 or n_users < 1 or n_conversions < 0 or image_size < 8:
        raise ValueError("need n_photos >= 1, n_users >= 1, n_conversions >= 0, image_size >= 8")
    if taste not in TASTES:
        raise ValueError(f"taste must be one of {', '.join(TASTES)}, got {taste!r}")
    if not taste_strength >= 0:
        raise ValueError(f"taste strength must be >= 0, got {taste_strength}")
    out_dir = Path(out_dir)
    adopt_legacy_folder(out_dir)
    made = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "n_photos": n_photos,
        "n_users": n_users,
        "n_conversions": n_conversions,
        "with_images": with_images,
        "image_size": image_size,
        "taste": taste,
        "taste_strength": taste_strength,
    }
    with outputs.staged_folder(
        out_dir, MAKER, force=force, info=made, conflicts=_table_conflicts
    ) as staging:
        # A seventh stream draws the ids taste's hidden attributes; the first six are the same
        # streams as with six (spawned children depend on their index only).
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]
        photos = _make_photos(n_photos, streams[0])
        photo_table = _photo_table(photos, streams[1])
        keyword_table = _keyword_table(photos, streams[2])
        color_table = _color_table(photos)
        label_table = _label_table(photos)
        conversion_table, n_active_users = _conversion_table(
            photos,
            n_users,
            n_conversions,
            streams[3],
            show_progress,
            taste=taste,
            taste_strength=taste_strength,
            hidden_rng=streams[6],
        )
        files = []
        files += _write_table(photo_table, staging, "photos", photo_shard_rows)
        files += _write_table(keyword_table, staging, "keywords", shard_rows)
        files += _write_table(conversion_table, staging, "conversions", shard_rows)
        files += _write_table(color_table, staging, "colors", shard_rows)
        files += _write_table(label_table, staging, "labels", shard_rows)
        if with_images:
            write_images(photos, staging / "images", seed, image_size, show_progress)

    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "n_photos": n_photos,
        "n_users": n_active_users,
        "n_conversions": len(conversion_table),
        "n_keyword_rows": len(keyword_table),
        "n_photographers": int(photos["n_photographers"]),
        "with_images": with_images,
        "image_size": image_size if with_images else None,
        "taste": taste,
        "taste_strength": taste_strength,
        "files": files,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "scenes": list(SCENES),
    }


# --------------------------------------------------------------------------- photos


def _categorical(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    """Draw one index per row of a (rows, k) probability matrix."""
    cumulative = np.cumsum(probabilities, axis=1)
    draws = rng.random(len(probabilities)) * cumulative[:, -1]
    picks = (cumulative <= draws[:, None]).sum(axis=1)
    return np.minimum(picks, probabilities.shape[1] - 1)


def _random_ids(rng: np.random.Generator, n: int, length: int = 11) -> np.ndarray:
    """Return ``n`` distinct URL-safe ids of ``length`` characters, like Unsplash's."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        codes = rng.integers(0, len(_ID_ALPHABET), size=(n - len(ids), length))
        for row in _ID_ALPHABET[codes]:
            photo_id = "".join(row)
            if photo_id not in seen:
                seen.add(photo_id)
                ids.append(photo_id)
    return np.array(ids, dtype=object)


def _photographer_names(rng: np.random.Generator, n: int) -> np.ndarray:
    pairs = rng.permutation(len(_FIRST_NAMES) * len(_LAST_NAMES))
    styles = rng.integers(0, 3, size=n)
    names = []
    for i in range(n):
        first = _FIRST_NAMES[pairs[i % len(pairs)] // len(_LAST_NAMES)]
        last = _LAST_NAMES[pairs[i % len(pairs)] % len(_LAST_NAMES)]
        name = (f"{first}{last}", f"{first}_{last}", f"{first}{last[0]}")[styles[i]]
        names.append(name if i < len(pairs) else f"{name}{i // len(pairs)}")
    # Two styles can collide ("anna_berg" vs another pair); suffix to keep names unique.
    unique, counts = [], {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        unique.append(name if counts[name] == 1 else f"{name}{counts[name]}")
    return np.array(unique, dtype=object)


def _make_photos(n_photos: int, rng: np.random.Generator) -> dict:
    """Draw the latent facts of every photo: concepts, photographer, popularity, geometry."""
    n_photographers = max(1, min(200, round(n_photos / 25)))
    photographer_weight = rng.lognormal(0.0, 1.0, n_photographers)
    photographer = rng.choice(
        n_photographers, size=n_photos, p=photographer_weight / photographer_weight.sum()
    )
    # Style bias: each photographer prefers some scenes and colours.
    scene_style = rng.dirichlet(np.full(len(SCENES), 0.6), n_photographers)
    colour_style = rng.dirichlet(np.full(len(COLOURS), 0.6), n_photographers)
    scene = _categorical(rng, 0.5 * scene_style[photographer] + 0.5 / len(SCENES))
    colour = _categorical(rng, 0.5 * colour_style[photographer] + 0.5 / len(COLOURS))
    shape = rng.integers(0, len(SHAPES), n_photos)
    # Latent popularity: standard normal, partly shared by a photographer's photos.
    photographer_z = rng.normal(0.0, 1.0, n_photographers)
    popularity_z = 0.6 * photographer_z[photographer] + 0.8 * rng.normal(0.0, 1.0, n_photos)
    return {
        "n_photographers": n_photographers,
        "photo_id": _random_ids(rng, n_photos),
        "photographer": photographer,
        "photographer_names": _photographer_names(rng, n_photographers),
        "colour": colour,
        "shape": shape,
        "scene": scene,
        "popularity_z": popularity_z,
        # Geometry in units of the image side: centre, radius, rotation (degrees).
        "centre_x": rng.uniform(0.34, 0.66, n_photos),
        "centre_y": rng.uniform(0.34, 0.66, n_photos),
        "radius": rng.uniform(0.2, 0.3, n_photos),
        "angle": rng.uniform(-1.0, 1.0, n_photos),  # scaled per shape when drawing
        "colour_jitter": rng.integers(-12, 13, size=(n_photos, 3)),
    }


def _shape_phrase(colour: str, shape: str) -> str:
    if shape == "stripes":
        return f"{colour} stripes"
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def _photo_table(photos: dict, rng: np.random.Generator) -> pd.DataFrame:
    n = len(photos["photo_id"])
    z = photos["popularity_z"]
    views = np.rint(np.exp(9.0 + 1.3 * z + rng.normal(0.0, 0.35, n))).astype(np.int64)
    download_rate = np.exp(-4.2 + 0.25 * z + rng.normal(0.0, 0.3, n))
    downloads = np.rint(views * download_rate).astype(np.int64)
    featured = rng.random(n) < 1.0 / (1.0 + np.exp(-(z - 1.5) * 2.0))

    start = np.datetime64("2015-01-01T00:00:00.000")
    span_ms = int(np.timedelta64(5 * 365, "D") / np.timedelta64(1, "ms"))
    submitted = start + rng.integers(0, span_ms, n).astype("timedelta64[ms]")
    epoch_ms = submitted.astype("datetime64[ms]").astype(np.int64)
    url_hex = rng.integers(0, 16**6, size=(n, 2))
    image_urls = [
        f"https://images.unsplash.com/photo-{ms}-{a:06x}{b:06x}"
        for ms, (a, b) in zip(epoch_ms, url_hex)
    ]
    long_side = rng.choice([3000, 4000, 4500, 5000, 6000], n)
    ratio = rng.choice([1.0, 1.333, 1.5, 1.5, 1.778], n)
    portrait = rng.random(n) < 0.4
    short_side = np.rint(long_side / ratio).astype(np.int64)
    width = np.where(portrait, short_side, long_side)
    height = np.where(portrait, long_side, short_side)

    template = rng.integers(0, 4, n)
    phrase_pick = rng.integers(0, 3, n)
    no_description = rng.random(n) < 0.15
    no_ai_description = rng.random(n) < 0.05
    descriptions, ai_descriptions = [], []
    for i in range(n):
        colour = COLOURS[photos["colour"][i]]
        shape = SHAPES[photos["shape"][i]]
        scene = SCENES[photos["scene"][i]]
        subject = _shape_phrase(colour, shape)
        place = _SCENE_PHRASES[scene][phrase_pick[i]]
        if no_description[i]:
            descriptions.append("")
        elif template[i] == 0:
            descriptions.append(f"{subject[0].upper()}{subject[1:]} {place}")
        elif template[i] == 1:
            descriptions.append(f"Close-up of {subject} {place}")
        elif template[i] == 2:
            descriptions.append(f"{subject[0].upper()}{subject[1:]} {place}.")
        else:
            descriptions.append(f"Minimal shot: {subject} {place}")
        ai_descriptions.append("" if no_ai_description[i] else f"{subject} {place}")

    submitted_text = np.char.replace(np.datetime_as_string(submitted, unit="ms"), "T", " ")
    return pd.DataFrame(
        {
            "photo_id": photos["photo_id"],
            "photo_url": [f"https://unsplash.com/photos/{pid}" for pid in photos["photo_id"]],
            "photo_image_url": image_urls,
            "photo_submitted_at": submitted_text,
            "photo_featured": np.where(featured, "t", "f"),
            "photo_width": width,
            "photo_height": height,
            "photographer_username": photos["photographer_names"][photos["photographer"]],
            "photo_description": descriptions,
            "ai_description": ai_descriptions,
            "stats_views": views,
            "stats_downloads": downloads,
        },
        columns=list(PHOTO_COLUMNS),
    )


def _keyword_table(photos: dict, rng: np.random.Generator) -> pd.DataFrame:
    """Tags per photo: concepts as the tagger saw them (high confidence, some missed or
    confused), synonyms and generic tags, distractors (low)."""
    n = len(photos["photo_id"])
    rows: list[tuple[int, int, str, float, float, str]] = []  # (photo, order, keyword, c1, c2, u)
    # Draw every random number up front, in a fixed order, so the table is seed-stable.
    true_c1 = rng.uniform(75.0, 100.0, (n, 3))
    true_c2 = np.where(rng.random((n, 3)) < 0.6, rng.uniform(70.0, 100.0, (n, 3)), np.nan)
    synonym_keep = rng.random((n, 3)) < 0.5
    synonym_c1 = rng.uniform(45.0, 80.0, (n, 3))
    generic_keep = rng.random((n, len(_GENERIC_TAGS))) < 0.25
    generic_c1 = rng.uniform(30.0, 70.0, (n, len(_GENERIC_TAGS)))
    distractor_keep = rng.random((n, 3)) < 0.3
    distractor_c1 = rng.uniform(5.0, 35.0, (n, 3))
    distractor_c2 = np.where(rng.random((n, 3)) < 0.2, rng.uniform(3.0, 30.0, (n, 3)), np.nan)
    user_tag = np.where(rng.random(n) < 0.1, rng.integers(0, len(_USER_TAGS), n), -1)
    tagger_draw = rng.random((n, 3))
    confused = tagger_draw < np.array(TAG_CONFUSION_RATE)
    missed = ~confused & (tagger_draw < np.array(TAG_CONFUSION_RATE) + np.array(TAG_MISS_RATE))
    for i in range(n):
        concepts = (
            COLOURS[photos["colour"][i]],
            SHAPES[photos["shape"][i]],
            SCENES[photos["scene"][i]],
        )
        tagged = set()
        for j, concept in enumerate(concepts):
            if missed[i, j]:
                continue
            keyword = _CONFUSABLE[concept] if confused[i, j] else concept
            if keyword not in tagged:
                tagged.add(keyword)
                rows.append((i, len(rows), keyword, true_c1[i, j], true_c2[i, j], "f"))
        tagged |= set(concepts)  # no synonym, generic or distractor row repeats a concept
        for j, keyword in enumerate(_SCENE_SYNONYMS[concepts[2]]):
            if synonym_keep[i, j] and keyword not in tagged:
                tagged.add(keyword)
                rows.append((i, len(rows), keyword, synonym_c1[i, j], np.nan, "f"))
        for j, keyword in enumerate(_GENERIC_TAGS):
            if generic_keep[i, j] and keyword not in tagged:
                tagged.add(keyword)
                rows.append((i, len(rows), keyword, generic_c1[i, j], np.nan, "f"))
        for j, concept in enumerate(concepts):
            keyword = _CONFUSABLE[concept]
            if distractor_keep[i, j] and keyword not in tagged:
                tagged.add(keyword)
                rows.append((i, len(rows), keyword, distractor_c1[i, j], distractor_c2[i, j], "f"))
        if user_tag[i] >= 0:
            rows.append((i, len(rows), _USER_TAGS[user_tag[i]], np.nan, np.nan, "t"))
    photo_index = np.array([r[0] for r in rows])
    return pd.DataFrame(
        {
            "photo_id": photos["photo_id"][photo_index],
            "keyword": [r[2] for r in rows],
            "ai_service_1_confidence": np.array([r[3] for r in rows], dtype=float),
            "ai_service_2_confidence": np.array([r[4] for r in rows], dtype=float),
            "suggested_by_user": [r[5] for r in rows],
        },
        columns=list(KEYWORD_COLUMNS),
    )


# Area of each shape in units of radius², matching the drawing code below.
_SHAPE_AREA = {
    "circle": math.pi,
    "square": (2 * 0.85) ** 2,
    "triangle": 3 * math.sqrt(3) / 4 * 1.1**2,
    "star": 5 * 1.1**2 * 0.42 * math.sin(math.pi / 5),
    "cross": 2 * (2 * 1.05 * 0.6) - 0.6**2,
    "ring": math.pi * (1 - 0.55**2),
    "diamond": 2 * 1.05 * 0.62,
    "stripes": 3 * (2 * 0.95) * (2 * 0.95 / 5),
}


def _label_table(photos: dict) -> pd.DataFrame:
    """What each photo shows: its colour, shape and scene, one row each."""
    n = len(photos["photo_id"])
    concepts = np.stack(
        [
            np.asarray(COLOURS, dtype=object)[photos["colour"]],
            np.asarray(SHAPES, dtype=object)[photos["shape"]],
            np.asarray(SCENES, dtype=object)[photos["scene"]],
        ],
        axis=1,
    )
    return pd.DataFrame(
        {"photo_id": np.repeat(photos["photo_id"], 3), "label": concepts.reshape(3 * n)},
        columns=list(LABEL_COLUMNS),
    )


def _color_table(photos: dict) -> pd.DataFrame:
    """Unsplash's optional colors table: the shape's colour and the scene's main colour."""
    n = len(photos["photo_id"])
    shape_rgb = fill_rgb(photos)
    area = np.array([_SHAPE_AREA[s] for s in SHAPES])[photos["shape"]] * photos["radius"] ** 2
    scene_rgb = np.array([SCENE_RGB[s][0] for s in SCENES])[photos["scene"]]
    rgb = np.concatenate([shape_rgb, scene_rgb])
    table = pd.DataFrame(
        {
            "photo_id": np.concatenate([photos["photo_id"], photos["photo_id"]]),
            "hex": [f"#{r:02X}{g:02X}{b:02X}" for r, g, b in rgb],
            "red": rgb[:, 0],
            "green": rgb[:, 1],
            "blue": rgb[:, 2],
            "keyword": np.concatenate(
                [
                    np.array(COLOURS, dtype=object)[photos["colour"]],
                    np.array([SCENE_COLOUR_NAMES[s] for s in SCENES], dtype=object)[
                        photos["scene"]
                    ],
                ]
            ),
            "ai_coverage": np.concatenate([area, 1.0 - area]),
            "ai_score": np.concatenate([np.full(n, 0.9), np.full(n, 0.6)]),
        },
        columns=list(COLOR_COLUMNS),
    )
    # Two rows per photo, in photo order like the other tables.
    return table.iloc[np.argsort(np.tile(np.arange(n), 2), kind="stable")]


# --------------------------------------------------------------------------- conversions


def _uuid_strings(rng: np.random.Generator, n: int) -> np.ndarray:
    """Deterministic version-4-looking UUID strings."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    out = []
    for row in raw:
        h = row.tobytes().hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return np.array(out, dtype=object)


def _top_k_mask(rng: np.random.Generator, probabilities: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Pick ``k[i]`` distinct columns per row with probability ∝ row weights (Gumbel top-k)."""
    keys = np.log(probabilities) + rng.gumbel(size=probabilities.shape)
    ranks = np.argsort(np.argsort(-keys, axis=1), axis=1)
    return ranks < k[:, None]


def _conversion_table(
    photos: dict,
    n_users: int,
    n_conversions: int,
    rng: np.random.Generator,
    show_progress: bool,
    taste: str = "content",
    taste_strength: float = TASTE_WEIGHT,
    hidden_rng: np.random.Generator | None = None,
) -> tuple[pd.DataFrame, int]:
    """Draw conversions from planted user tastes; returns the table and the active user count.

    Every taste draws the same users, queries and random numbers from ``rng``; only what the
    favourites are about (``taste``) and how much they weigh (``taste_strength``) differ, so
    catalogues of different tastes share their users' query habits.
    """
    n_colours, n_shapes, n_scenes = len(COLOURS), len(SHAPES), len(SCENES)
    # --- users: country, tastes, query habit, activity
    user_ids = _uuid_strings(rng, n_users)
    country = rng.choice(len(_COUNTRIES), n_users, p=_COUNTRY_WEIGHTS / _COUNTRY_WEIGHTS.sum())
    country_colour_prior = rng.dirichlet(np.full(n_colours, 3.0), len(_COUNTRIES))
    fav_colour = _top_k_mask(rng, country_colour_prior[country], rng.integers(1, 3, n_users))
    fav_shape = _top_k_mask(
        rng, np.full((n_users, n_shapes), 1.0 / n_shapes), rng.integers(1, 3, n_users)
    )
    fav_scene = rng.integers(0, n_scenes, n_users)
    habit = rng.dirichlet(QUERY_TYPE_PRIOR * 6.0, n_users)
    activity = rng.lognormal(0.0, 1.3, n_users)

    # --- which user converts: everyone once, the rest by heavy-tailed activity
    first = np.arange(min(n_users, n_conversions))
    rest = rng.choice(n_users, n_conversions - len(first), p=activity / activity.sum())
    user = rng.permutation(np.concatenate([first, rest]))

    # --- the query: a type from the user's habit, words leaning to the user's favourites
    query_type = _categorical(rng, habit[user])

    def favourite_or_any(favourites: np.ndarray, k: int) -> np.ndarray:
        fav_pick = _categorical(rng, favourites[user].astype(float))
        any_pick = rng.integers(0, k, len(user))
        return np.where(rng.random(len(user)) < FAVOURITE_QUERY_RATE, fav_pick, any_pick)

    query_colour = favourite_or_any(fav_colour, n_colours)
    query_shape = favourite_or_any(fav_shape, n_shapes)
    any_scene = rng.integers(0, n_scenes, len(user))
    query_scene = np.where(rng.random(len(user)) < 0.5, fav_scene[user], any_scene)
    uses_colour = np.isin(query_type, [0, 3, 4])
    uses_shape = np.isin(query_type, [1, 3])
    uses_scene = np.isin(query_type, [2, 4])
    want_colour = np.where(uses_colour, query_colour, n_colours)  # index n_* = "any"
    want_shape = np.where(uses_shape, query_shape, n_shapes)
    want_scene = np.where(uses_scene, query_scene, n_scenes)

    # Cells (colour, shape, scene and, for the ids taste, the hidden attributes) carry the
    # taste; popularity picks a photo inside a cell.
    content_cell = (photos["colour"] * n_shapes + photos["shape"]) * n_scenes + photos["scene"]
    n_content_cells = n_colours * n_shapes * n_scenes
    n_hidden = 1
    cell = content_cell
    if taste == "ids":
        hidden_rng = hidden_rng or np.random.default_rng(0)
        n_photos = len(content_cell)
        hidden_a = hidden_rng.integers(0, HIDDEN_VALUES, n_photos)
        hidden_b = hidden_rng.integers(0, HIDDEN_VALUES, n_photos)
        fav_a = np.eye(HIDDEN_VALUES, dtype=bool)[hidden_rng.integers(0, HIDDEN_VALUES, n_users)]
        fav_b = np.eye(HIDDEN_VALUES, dtype=bool)[hidden_rng.integers(0, HIDDEN_VALUES, n_users)]
        n_hidden = HIDDEN_VALUES * HIDDEN_VALUES
        cell = content_cell * n_hidden + hidden_a * HIDDEN_VALUES + hidden_b
    n_cells = n_content_cells * n_hidden
    photo_weight = np.exp(POPULARITY_EXPONENT * photos["popularity_z"])
    cell_weight = np.bincount(cell, weights=photo_weight, minlength=n_cells)
    cell_count = np.bincount(content_cell, minlength=n_content_cells).reshape(
        n_colours, n_shapes, n_scenes
    )
    # counts with an extra "any" slot per axis, to test whether a query has candidates
    padded = np.zeros((n_colours + 1, n_shapes + 1, n_scenes + 1))
    padded[:-1, :-1, :-1] = cell_count
    padded[-1, :, :] = padded[:-1].sum(axis=0)
    padded[:, -1, :] = padded[:, :-1].sum(axis=1)
    padded[:, :, -1] = padded[:, :, :-1].sum(axis=2)
    # A query with no matching photo (tiny catalogues) becomes the colour of a popular photo.
    empty = padded[want_colour, want_shape, want_scene] == 0
    fallback_photo = rng.choice(len(cell), len(user), p=photo_weight / photo_weight.sum())
    want_colour = np.where(empty, photos["colour"][fallback_photo], want_colour)
    want_shape = np.where(empty, n_shapes, want_shape)
    want_scene = np.where(empty, n_scenes, want_scene)

    cell_content = np.arange(n_cells) // n_hidden
    cell_colour = cell_content // (n_shapes * n_scenes)
    cell_shape = cell_content // n_scenes % n_shapes
    cell_scene = cell_content % n_scenes
    cell_a = np.arange(n_cells) % n_hidden // HIDDEN_VALUES
    cell_b = np.arange(n_cells) % HIDDEN_VALUES
    strength = 0.0 if taste == "none" else taste_strength
    taste_gain = np.exp(strength * np.arange(3))  # 0, 1 or 2 favourite matches
    chosen_cell = np.empty(len(user), dtype=np.int64)
    chunk = 16_384 // n_hidden
    starts = range(0, len(user), chunk)
    if show_progress and len(user) > 4 * chunk:
        from tqdm import tqdm

        starts = tqdm(starts, desc="conversions", unit="chunk", file=sys.stderr)
    cell_draw = rng.random(len(user))
    for start in starts:
        part = slice(start, start + chunk)
        u = user[part]
        if taste == "ids":
            matches = fav_a[u][:, cell_a].astype(np.int8) + fav_b[u][:, cell_b]
        else:
            matches = fav_colour[u][:, cell_colour].astype(np.int8) + fav_shape[u][:, cell_shape]
        allowed = (
            ((want_colour[part, None] == n_colours) | (cell_colour == want_colour[part, None]))
            & ((want_shape[part, None] == n_shapes) | (cell_shape == want_shape[part, None]))
            & ((want_scene[part, None] == n_scenes) | (cell_scene == want_scene[part, None]))
        )
        weight = np.where(allowed, cell_weight * taste_gain[matches], 0.0)
        cumulative = np.cumsum(weight, axis=1)
        target = cell_draw[part] * cumulative[:, -1]
        chosen_cell[part] = (cumulative <= target[:, None]).sum(axis=1)

    order = np.argsort(cell, kind="stable")
    cumulative = np.cumsum(photo_weight[order])
    cell_end = np.cumsum(np.bincount(cell, minlength=n_cells))
    cell_begin = cell_end - np.bincount(cell, minlength=n_cells)
    before = np.concatenate([[0.0], cumulative])[cell_begin[chosen_cell]]
    target = before + rng.random(len(user)) * cell_weight[chosen_cell]
    position = np.searchsorted(cumulative, target, side="right")
    position = np.clip(position, cell_begin[chosen_cell], cell_end[chosen_cell] - 1)
    photo = order[position]

    colour_names = np.array(COLOURS + ("",), dtype=object)
    shape_names = np.array(SHAPES + ("",), dtype=object)
    scene_names = np.array(SCENES + ("",), dtype=object)
    keyword = (
        colour_names[want_colour]
        + np.where((want_colour < n_colours) & (want_shape < n_shapes), " ", "")
        + shape_names[want_shape]
        + np.where((want_colour < n_colours) & (want_scene < n_scenes), " ", "")
        + scene_names[want_scene]
    )

    # Times: uniform over one year, written in time order; tastes do not drift.
    year_ms = int(np.timedelta64(365, "D") / np.timedelta64(1, "ms"))
    offset = np.sort(rng.integers(0, year_ms, len(user)))
    converted_at = np.datetime64("2020-01-01T00:00:00.000") + offset.astype("timedelta64[ms]")
    travelling = rng.random(len(user)) < 0.05
    conversion_country = np.where(
        travelling,
        _COUNTRIES[rng.integers(0, len(_COUNTRIES), len(user))],
        _COUNTRIES[country[user]],
    )
    table = pd.DataFrame(
        {
            "converted_at": np.char.replace(np.datetime_as_string(converted_at, "ms"), "T", " "),
            "conversion_type": "download",
            "keyword": keyword,
            "photo_id": photos["photo_id"][photo],
            "anonymous_user_id": user_ids[user],
            "conversion_country": conversion_country,
        },
        columns=list(CONVERSION_COLUMNS),
    )
    return table, int(len(np.unique(user)))


# --------------------------------------------------------------------------- files


def _table_conflicts(found: outputs.FolderContents) -> list[str]:
    """Tables already in a folder would be read together with the generated ones."""
    tables = [f for f in found.foreign if _TABLE_FILE.fullmatch(f)]
    if tables:
        return [f"it holds tables ({', '.join(tables[:3])}) a reader would mix with the new ones"]
    return []


def check_folder(out_dir: str | Path, force: bool = False) -> None:
    """Raise :class:`~imgsearch_tools.outputs.RefusedFolder` if :func:`generate` would refuse
    ``out_dir`` (someone else's files, or with ``force`` tables of its own)."""
    adopt_legacy_folder(Path(out_dir))
    outputs.claim(out_dir, MAKER, force, _table_conflicts)


def generated_by(folder: str | Path) -> dict | None:
    """The generator's record of a folder it wrote (version, seed, sizes), or None."""
    adopt_legacy_folder(Path(folder))
    return outputs.read_marker(folder, MAKER)


def adopt_legacy_folder(folder: Path) -> None:
    """Give a folder written before output markers existed the marker it would have now.

    Such folders carry `imgsearch demo`'s old ``.complete`` file (with the generator
    version); the generator's own files in them are its tables and ``images/*.jpg``.
    """
    legacy = folder / LEGACY_MARKER
    if not legacy.is_file() or (folder / outputs.MARKER).exists():
        return
    try:
        record = json.loads(legacy.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or "generator" not in record:
        return
    ours = [
        entry
        for entry in outputs.tree_entries(folder)
        if _TABLE_FILE.fullmatch(entry)
        and entry.split(".")[0] in TABLE_NAMES
        or _IMAGE_FILE.fullmatch(entry)
    ]
    images = ["images"] if (folder / "images").is_dir() else []
    outputs.write_marker(folder, MAKER, [*ours, LEGACY_MARKER], record, images)


def _write_table(table: pd.DataFrame, out_dir: Path, name: str, rows_per_shard: int) -> list[str]:
    """Write ``name.tsv000``, ``name.tsv001``… with a header row each; returns the file names."""
    files = []
    n_shards = max(1, math.ceil(len(table) / rows_per_shard))
    for shard in range(n_shards):
        part = table.iloc[shard * rows_per_shard : (shard + 1) * rows_per_shard]
        file_name = f"{name}.tsv{shard:03d}"
        part.to_csv(
            out_dir / file_name,
            sep="\t",
            index=False,
            na_rep="",
            float_format="%.4f",
            lineterminator="\n",
        )
        files.append(file_name)
    return files


# --------------------------------------------------------------------------- command line


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
        )
    except (ValueError, outputs.RefusedFolder) as error:
        print(f"demo-data: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}))
    return 0
