"""The demo's conversions: users with planted tastes (content, hidden ids or none) choosing
among the photos that match their queries, weighted by popularity."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from imgsearch.unsplash_layout import CONVERSIONS_LAYOUT
from imgsearch_tools.demo_data.drawing import (
    COLOURS,
    SCENES,
    SHAPES,
)
from imgsearch_tools.demo_data.photos import categorical

CONVERSION_COLUMNS = CONVERSIONS_LAYOUT

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

_COUNTRIES = np.array(
    ["US", "GB", "DE", "FR", "IN", "BR", "CA", "JP", "ES", "IT"]
    + ["AU", "NL", "PL", "MX", "KR", "SE", "TR", "ID", "RU", "ZA"]
)

_COUNTRY_WEIGHTS = np.array([30, 9, 8, 7, 7, 6, 5, 5, 4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1], float)


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


def make_conversion_table(
    photos: dict,
    n_users: int,
    n_conversions: int,
    rng: np.random.Generator,
    show_progress: bool,
    taste: str = "content",
    taste_strength: float = TASTE_WEIGHT,
    hidden_rng: np.random.Generator | None = None,
) -> tuple[ConversionRows, int]:
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
    query_type = categorical(rng, habit[user])

    def favourite_or_any(favourites: np.ndarray, k: int) -> np.ndarray:
        fav_pick = categorical(rng, favourites[user].astype(float))
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
    # The weights over cells depend on the user's favourites and the query's words only: draw
    # each conversion's cell from the cumulative weights of its profile, computed once.
    if taste == "ids":
        user_key = fav_a.argmax(axis=1) * HIDDEN_VALUES + fav_b.argmax(axis=1)
        n_user_keys = HIDDEN_VALUES * HIDDEN_VALUES
    else:
        user_key = (fav_colour @ (1 << np.arange(n_colours))) << n_shapes
        user_key = user_key + fav_shape @ (1 << np.arange(n_shapes))
        n_user_keys = 1 << (n_colours + n_shapes)
    profile_key = np.ravel_multi_index(
        (user_key[user], want_colour, want_shape, want_scene),
        (n_user_keys, n_colours + 1, n_shapes + 1, n_scenes + 1),
    )
    _, first, profile = np.unique(profile_key, return_index=True, return_inverse=True)
    by_profile = np.argsort(profile, kind="stable")
    profile_size = np.bincount(profile, minlength=len(first))
    profile_end = np.cumsum(profile_size)
    profile_start = profile_end - profile_size
    cell_draw = rng.random(len(user))
    chosen_cell = np.empty(len(user), dtype=np.int64)
    chunk = 16_384 // n_hidden
    starts = range(0, len(first), chunk)
    if show_progress and len(first) > 4 * chunk:
        from tqdm import tqdm

        starts = tqdm(starts, desc="conversions", unit="chunk", file=sys.stderr)
    for start in starts:
        rows = first[start : start + chunk]  # one conversion standing for each profile
        u = user[rows]
        if taste == "ids":
            matches = fav_a[u][:, cell_a].astype(np.int8) + fav_b[u][:, cell_b]
        else:
            matches = fav_colour[u][:, cell_colour].astype(np.int8) + fav_shape[u][:, cell_shape]
        allowed = (
            ((want_colour[rows, None] == n_colours) | (cell_colour == want_colour[rows, None]))
            & ((want_shape[rows, None] == n_shapes) | (cell_shape == want_shape[rows, None]))
            & ((want_scene[rows, None] == n_scenes) | (cell_scene == want_scene[rows, None]))
        )
        weight = np.where(allowed, cell_weight * taste_gain[matches], 0.0)
        cumulative = np.cumsum(weight, axis=1)
        for offset, row in enumerate(cumulative, start):
            members = by_profile[profile_start[offset] : profile_end[offset]]
            # Cells whose cumulative weight is at most the draw: as counting them does.
            chosen_cell[members] = np.searchsorted(row, cell_draw[members] * row[-1], "right")

    order = np.argsort(cell, kind="stable")
    cumulative = np.cumsum(photo_weight[order])
    cell_end = np.cumsum(np.bincount(cell, minlength=n_cells))
    cell_begin = cell_end - np.bincount(cell, minlength=n_cells)
    before = np.concatenate([[0.0], cumulative])[cell_begin[chosen_cell]]
    target = before + rng.random(len(user)) * cell_weight[chosen_cell]
    position = np.searchsorted(cumulative, target, side="right")
    position = np.clip(position, cell_begin[chosen_cell], cell_end[chosen_cell] - 1)
    photo = order[position]

    # Times: uniform over one year, written in time order; tastes do not drift.
    year_ms = int(np.timedelta64(365, "D") / np.timedelta64(1, "ms"))
    offset = np.sort(rng.integers(0, year_ms, len(user)))
    travelling = rng.random(len(user)) < 0.05
    country_index = np.where(
        travelling, rng.integers(0, len(_COUNTRIES), len(user)), country[user]
    ).astype(np.int8)
    table = ConversionRows(
        offset=offset,
        want=np.stack([want_colour, want_shape, want_scene]).astype(np.int8),
        photo_id=photos["photo_id"],
        photo=photo.astype(np.int32),
        user_ids=user_ids,
        user=user.astype(np.int32),
        country=country_index,
    )
    return table, int(np.count_nonzero(np.bincount(user, minlength=n_users)))


class ConversionRows:
    """The drawn conversions as compact integer columns; :meth:`rows` spells a slice of them
    out as the table's strings, so a catalogue of tens of millions of conversions is written a
    shard at a time instead of held as strings whole."""

    def __init__(self, offset, want, photo_id, photo, user_ids, user, country) -> None:
        self._offset, self._want, self._photo_id, self._photo = offset, want, photo_id, photo
        self._user_ids, self._user, self._country = user_ids, user, country

    def __len__(self) -> int:
        return len(self._user)

    def rows(self, start: int, stop: int) -> pd.DataFrame:
        """Rows ``start`` to ``stop`` (exclusive) as the conversions table's columns."""
        n_colours, n_shapes, n_scenes = len(COLOURS), len(SHAPES), len(SCENES)
        want_colour, want_shape, want_scene = (
            w.astype(np.int64) for w in self._want[:, start:stop]
        )
        keyword = (
            _COLOUR_NAMES[want_colour]
            + np.where((want_colour < n_colours) & (want_shape < n_shapes), " ", "")
            + _SHAPE_NAMES[want_shape]
            + np.where((want_colour < n_colours) & (want_scene < n_scenes), " ", "")
            + _SCENE_NAMES[want_scene]
        )
        converted_at = _EPOCH + self._offset[start:stop].astype("timedelta64[ms]")
        return pd.DataFrame(
            {
                "converted_at": np.char.replace(
                    np.datetime_as_string(converted_at, "ms"), "T", " "
                ),
                "conversion_type": "download",
                "keyword": keyword,
                "photo_id": self._photo_id[self._photo[start:stop]],
                "anonymous_user_id": self._user_ids[self._user[start:stop]],
                "conversion_country": _COUNTRIES[self._country[start:stop]],
            },
            columns=list(CONVERSION_COLUMNS),
        )


_COLOUR_NAMES = np.array(COLOURS + ("",), dtype=object)
_SHAPE_NAMES = np.array(SHAPES + ("",), dtype=object)
_SCENE_NAMES = np.array(SCENES + ("",), dtype=object)
_EPOCH = np.datetime64("2020-01-01T00:00:00.000")
