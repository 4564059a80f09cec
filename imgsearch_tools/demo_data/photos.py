"""The demo's photos and what describes them: the photos, keywords (with an AI tagger's misses
and confusions), labels and colors tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from imgsearch_tools.demo_data.drawing import (
    COLOURS,
    SCENE_RGB,
    SCENES,
    SHAPES,
    fill_rgb,
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

COLOR_COLUMNS = ("photo_id", "hex", "red", "green", "blue", "keyword", "ai_coverage", "ai_score")

# What each photo shows (its colour, shape and scene): the ground truth of the demo, which
# Unsplash Lite does not have. ``imgsearch eval`` measures tag precision against it.
LABEL_COLUMNS = ("photo_id", "label")

_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))

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


def categorical(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
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


def make_photos(n_photos: int, rng: np.random.Generator) -> dict:
    """Draw the latent facts of every photo: concepts, photographer, popularity, geometry."""
    n_photographers = max(1, min(200, round(n_photos / 25)))
    photographer_weight = rng.lognormal(0.0, 1.0, n_photographers)
    photographer = rng.choice(
        n_photographers, size=n_photos, p=photographer_weight / photographer_weight.sum()
    )
    # Style bias: each photographer prefers some scenes and colours.
    scene_style = rng.dirichlet(np.full(len(SCENES), 0.6), n_photographers)
    colour_style = rng.dirichlet(np.full(len(COLOURS), 0.6), n_photographers)
    scene = categorical(rng, 0.5 * scene_style[photographer] + 0.5 / len(SCENES))
    colour = categorical(rng, 0.5 * colour_style[photographer] + 0.5 / len(COLOURS))
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


def make_photo_table(photos: dict, rng: np.random.Generator) -> pd.DataFrame:
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


def make_keyword_table(photos: dict, rng: np.random.Generator) -> pd.DataFrame:
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


def make_label_table(photos: dict) -> pd.DataFrame:
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


def make_color_table(photos: dict) -> pd.DataFrame:
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
