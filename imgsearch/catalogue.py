"""The normalised catalogue: photos, keywords, users and conversions as columnar tables."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# Column contracts of the normalised tables (what every stage may rely on).
PHOTO_COLUMNS = {
    "photo_idx": "int32",  # 0..N-1, stable for one catalogue (photos sorted by photo_id)
    "photo_id": "object",
    "photo_image_url": "object",
    "photo_description": "object",  # "" when missing
    "ai_description": "object",  # "" when missing
    "photographer_username": "object",  # "" when missing
    "stats_views": "int64",  # 0 when missing
    "stats_downloads": "int64",  # 0 when missing
    "has_image": "bool",  # images/<photo_id>.jpg exists beside the tables
    "photo_width": "int64",  # pixels, 0 when missing
    "photo_height": "int64",  # pixels, 0 when missing
    "photo_featured": "bool",  # False when missing
    "photo_submitted_at": "datetime64[ns]",  # naive UTC, NaT when missing
}
# Photo columns that catalogues written before filters lack (their sets refuse filters).
FILTER_PHOTO_COLUMNS = ("photo_width", "photo_height", "photo_featured", "photo_submitted_at")
_MISSING_PHOTO_VALUES = {
    "photo_width": 0,
    "photo_height": 0,
    "photo_featured": False,
    "photo_submitted_at": pd.NaT,
}
KEYWORD_COLUMNS = {
    "photo_idx": "int32",
    "keyword": "object",  # normalised: lower case, trimmed, inner whitespace collapsed
    "confidence": "float32",  # max of the AI services' confidences, scaled to [0, 1]
}
USER_COLUMNS = {
    "user_idx": "int32",  # 0..U-1 (users sorted by anonymous_user_id)
    "anonymous_user_id": "object",
}
CONVERSION_COLUMNS = {
    "converted_at": "datetime64[ns]",  # naive UTC
    "conversion_type": "object",
    "keyword": "object",  # normalised like KEYWORD_COLUMNS.keyword
    "photo_idx": "int32",
    "user_idx": "int32",
    "conversion_country": "object",  # "" when missing
}
# Optional: what photos really show (judged labels; the demo's drawn content). Evaluation only.
LABEL_COLUMNS = {
    "photo_idx": "int32",
    "label": "object",  # normalised like KEYWORD_COLUMNS.keyword
}
# Optional: each photo's dominant colours (Unsplash's colors table, or computed from the image).
COLOR_COLUMNS = {
    "photo_idx": "int32",
    "color": "object",  # normalised like KEYWORD_COLUMNS.keyword, e.g. "red", "dark green"
    "coverage": "float32",  # share of the image it covers, NaN when the table does not say
}
TABLES = {
    "photos": PHOTO_COLUMNS,
    "keywords": KEYWORD_COLUMNS,
    "users": USER_COLUMNS,
    "conversions": CONVERSION_COLUMNS,
}


def normalise_keyword(text: str) -> str:
    """Return the canonical form of a keyword or query: lower case, single spaces, trimmed."""
    return " ".join(str(text).lower().split())


def normalise_user_id(user_id: str) -> str:
    """The one form of a user id everywhere it is stored, looked up or deleted: NFC, trimmed.

    Applied once where a request enters, so that ``" alice"`` and ``"alice"`` are one user
    (a deletion of one reaches the events of the other).
    """
    return unicodedata.normalize("NFC", str(user_id)).strip()


@dataclass
class Catalogue:
    """The four normalised tables of one catalogue, with id lookups.

    Conversions are sorted by ``converted_at`` (stable), so a temporal split is a slice.
    ``labels`` (:data:`LABEL_COLUMNS`) is None unless the data folder has a labels table;
    ``colors`` (:data:`COLOR_COLUMNS`) is None unless it has a colors table or the build
    computed the colours from the images.
    """

    photos: pd.DataFrame
    keywords: pd.DataFrame
    users: pd.DataFrame
    conversions: pd.DataFrame
    data_dir: str = ""
    labels: pd.DataFrame | None = None
    colors: pd.DataFrame | None = None
    _photo_index: dict[str, int] = field(default_factory=dict, repr=False)
    _user_index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._photo_index = {pid: i for i, pid in enumerate(self.photos["photo_id"].tolist())}
        self._user_index = {
            uid: i for i, uid in enumerate(self.users["anonymous_user_id"].tolist())
        }

    @property
    def n_photos(self) -> int:
        return len(self.photos)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def photo_idx(self, photo_id: str) -> int | None:
        """Return the integer index of ``photo_id``, or None when it is not in the catalogue."""
        return self._photo_index.get(photo_id)

    def photo_idx_list(self, photo_ids) -> list[int | None]:
        """:meth:`photo_idx` of each id, in one pass (None where the catalogue lacks it)."""
        return list(map(self._photo_index.get, photo_ids))

    def user_idx(self, anonymous_user_id: str) -> int | None:
        """Return the integer index of a user, or None for a user with no conversions."""
        return self._user_index.get(anonymous_user_id)

    def photo_ids(self, photo_idx: np.ndarray) -> list[str]:
        """Map integer indexes back to photo ids."""
        ids = self.photos["photo_id"].to_numpy()
        return ids[np.asarray(photo_idx, dtype=np.int64)].tolist()

    def truth_tags(self) -> tuple[pd.DataFrame, str]:
        """What tag precision counts against: ``(table, source)``.

        The labels (what each photo shows) when the catalogue has them, else the keywords at
        any confidence; the table has ``photo_idx`` and ``keyword`` columns, ``source`` is
        ``"labels"`` or ``"keywords"``.
        """
        if self.labels is not None and len(self.labels):
            return self.labels.rename(columns={"label": "keyword"}), "labels"
        return self.keywords, "keywords"

    def image_path(self, photo_id: str) -> Path:
        """Where the image of ``photo_id`` lives in the source data folder."""
        return Path(self.data_dir) / "images" / f"{photo_id}.jpg"

    def with_conversions(self, conversions: pd.DataFrame) -> Catalogue:
        """Return the same catalogue with another conversions table (e.g. a training split)."""
        return Catalogue(
            photos=self.photos,
            keywords=self.keywords,
            users=self.users,
            conversions=conversions.reset_index(drop=True),
            data_dir=self.data_dir,
            labels=self.labels,
            colors=self.colors,
        )

    def save(self, directory: str | Path) -> None:
        """Write the tables as parquet files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            getattr(self, name).to_parquet(directory / f"{name}.parquet", index=False)
        if self.labels is not None:
            self.labels.to_parquet(directory / "labels.parquet", index=False)
        if self.colors is not None:
            self.colors.to_parquet(directory / "colors.parquet", index=False)
        (directory / "data_dir.txt").write_text(str(self.data_dir))

    @classmethod
    def load(cls, directory: str | Path) -> Catalogue:
        """Read a catalogue written by :meth:`save`.

        A photos table written before the filter columns existed gets them filled as missing
        (:func:`with_filter_columns`).
        """
        directory = Path(directory)
        tables = {
            name: pd.read_parquet(directory / f"{name}.parquet") for name, columns in TABLES.items()
        }
        tables["photos"] = with_filter_columns(tables["photos"])
        tables = {name: conform(table, TABLES[name]) for name, table in tables.items()}
        data_dir_file = directory / "data_dir.txt"
        data_dir = data_dir_file.read_text() if data_dir_file.exists() else ""
        labels_file = directory / "labels.parquet"
        labels = (
            conform(pd.read_parquet(labels_file), LABEL_COLUMNS) if labels_file.exists() else None
        )
        colors_file = directory / "colors.parquet"
        colors = (
            conform(pd.read_parquet(colors_file), COLOR_COLUMNS) if colors_file.exists() else None
        )
        return cls(**tables, data_dir=data_dir, labels=labels, colors=colors)


def conform(table: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """``table`` cast to ``columns``' dtypes, each text column's equal values one shared ``str``.

    pandas reads parquet text as its string dtype, and casting that to ``object`` makes a
    Python string per row: the 20 million conversions of a million-photo catalogue took 3.9 GiB
    that way, for a few thousand distinct keywords, types and countries. Factorised first,
    each distinct value is one object and a row holds a reference to it (the same values, and
    hashing a repeated value reuses the string's cached hash).
    """
    text = [name for name, dtype in columns.items() if dtype == "object"]
    table = table.astype({name: dtype for name, dtype in columns.items() if name not in text})
    for name in text:  # factorised before any cast: no string per row is ever made
        table[name] = map_distinct(table[name])
    return table


def map_distinct(values: pd.Series, function: Callable[[str], str] | None = None) -> pd.Series:
    """``values`` as an ``object`` Series holding one string per distinct value, ``function``
    (if given) applied once to each: ids, keywords and countries repeat a lot.

    The Series is factorised as it is (an Arrow string column too), so no Python string is
    made per row.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    if function is None:
        mapped = np.asarray(uniques, dtype=object)
    else:
        mapped = np.array([function(value) for value in uniques], dtype=object)
    return pd.Series(mapped[codes], index=values.index, dtype=object)


def with_filter_columns(photos: pd.DataFrame) -> pd.DataFrame:
    """``photos`` with :data:`FILTER_PHOTO_COLUMNS` added as missing where it lacks them."""
    missing = {name: value for name, value in _MISSING_PHOTO_VALUES.items() if name not in photos}
    if not missing:
        return photos
    return photos.assign(**{name: [value] * len(photos) for name, value in missing.items()})
